"""Torch datasets over the preprocessed cache (docs/contracts.md).

- ``PretrainCropDataset``: random crops for masked-image-modelling pretraining, several per
  volume, with a ``valid`` mask that is False on padding, so a loss can ignore voxels that were
  never part of the image (method.md: the authors' code counted zero padding as masked; we don't).
- ``SegmentationDataset``: fine-tuning crops balanced between foreground and background
  (MONAI RandCropByPosNegLabeld, pos:neg 1:1) with flips, 90° rotations and intensity jitter; or,
  for validation/test, whole volumes with their case id and spacing (for HD95 in mm).

Volumes are read with ``np.load(mmap_mode="r")`` so a crop touches only the bytes it needs.
Random choices come from torch's global generator (re-seeding MONAI's transforms per item), which
``torch.utils.data.DataLoader`` seeds differently in every worker: crops are reproducible under
``torch.manual_seed`` and never repeat across workers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from hybridmim.data.intensity import apply_window, resolve_window
from hybridmim.data.layout import read_processed_index
from hybridmim.dataset_catalog import validate_window


def _records(processed_dir: Path, index: dict, ids: Sequence[str]) -> list[dict]:
    by_case = {record["case"]: record for record in index["cases"]}
    missing = [case for case in ids if case not in by_case]
    if missing:
        raise KeyError(f"{processed_dir}: no preprocessed case(s) {missing[:5]}; the splits or "
                       f"ids do not belong to this cache (re-run preprocessing and splits)")
    return [by_case[case] for case in ids]


def labels_to_regions(label: torch.Tensor, regions: Mapping[str, Sequence[int]]) -> torch.Tensor:
    """Overlapping binary channels from a label map: channel r is 1 where the label is one of
    ``regions[r]`` (BraTS: TC = {1, 4}, WT = {1, 2, 4}, ET = {4}). ``label`` is (X, Y, Z) or
    (1, X, Y, Z); the result is float32 (R, X, Y, Z)."""
    if label.ndim == 4:
        label = label[0]
    return torch.stack([torch.isin(label, torch.as_tensor(list(values), dtype=label.dtype))
                        for values in regions.values()]).to(torch.float32)


class PretrainCropDataset(Dataset):
    """One item per volume: ``{"image": (K, C, *crop) float32, "valid": (K, 1, *crop) bool,
    "case": id, "dataset": processed_dir}`` with K = ``crops_per_volume`` random crops, windowed
    with the dataset's pretraining window. A volume smaller than the crop along an axis is centred
    and padded with 0 there (``valid`` False).

    ``datasets``: ``[{"processed_dir", "window", "modality"?, "name"?}]``. ``split_ids``:
    ``{processed_dir: [ids]}``, e.g. the training cases from ``splits.pretraining_cases``."""

    def __init__(self, datasets: Sequence[Mapping], split_ids: Mapping[str, Sequence[str]],
                 crop: int = 96, crops_per_volume: int = 2):
        self.crop = (int(crop),) * 3
        self.crops_per_volume = int(crops_per_volume)
        self.items: list[tuple[Path, dict, dict]] = []  # (processed_dir, case record, window)
        channel_counts: dict[str, int] = {}
        for entry in datasets:
            processed_dir = Path(entry["processed_dir"])
            index = read_processed_index(processed_dir)
            modality = index["recipe"]["modality"]
            if entry.get("modality") and str(entry["modality"]).upper() != modality:
                raise ValueError(f"{processed_dir}: preprocessed as {modality}, but the pretraining "
                                 f"spec says {entry['modality']}")
            window = validate_window(resolve_window(dict(entry["window"]), index),
                                     f"{processed_dir} window")
            ids = split_ids.get(str(entry["processed_dir"]))
            if ids is None:
                raise KeyError(f"split_ids has no id list for {processed_dir}")
            channel_counts[str(processed_dir)] = len(index["channels"])
            self.items += [(processed_dir, record, window)
                           for record in _records(processed_dir, index, ids)]
        if len(set(channel_counts.values())) > 1:
            raise ValueError(f"pretraining corpus mixes channel counts {channel_counts}; one "
                             f"network input takes one channel count, pretrain them separately")
        if not self.items:
            raise ValueError("pretraining corpus is empty: no cases in the given splits")
        self.channels = next(iter(channel_counts.values()))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, item: int) -> dict:
        processed_dir, record, window = self.items[item]
        volume = np.load(processed_dir / record["image"], mmap_mode="r")
        images = np.zeros((self.crops_per_volume, volume.shape[0], *self.crop), np.float32)
        valid = np.zeros((self.crops_per_volume, 1, *self.crop), bool)
        for k in range(self.crops_per_volume):
            source, target = [], []
            for size, want in zip(volume.shape[1:], self.crop):
                if size >= want:
                    start = int(torch.randint(size - want + 1, ()))
                    source.append(slice(start, start + want))
                    target.append(slice(0, want))
                else:  # smaller than the crop: centre it, the rest is padding
                    offset = (want - size) // 2
                    source.append(slice(0, size))
                    target.append(slice(offset, offset + size))
            patch = np.asarray(volume[(slice(None), *source)])
            images[(k, slice(None), *target)] = apply_window(patch, window)
            valid[(k, 0, *target)] = True
        return {"image": torch.from_numpy(images), "valid": torch.from_numpy(valid),
                "case": record["case"], "dataset": str(processed_dir)}


class SegmentationDataset(Dataset):
    """Fine-tuning / evaluation data of one preprocessed dataset.

    ``train=True``: ``{"image": (N, C, *crop), "label": (N, 1, *crop) int64 | (N, R, *crop) float32,
    "case"}`` with N = ``num_samples`` crops per volume. ``train=False``: ``{"image": (C, X, Y, Z),
    "label": (1, X, Y, Z) | (R, X, Y, Z), "case", "spacing"}``, the whole volume.
    Without ``regions``, label values are mapped to class indices 0..L-1 in the order of the
    dataset's label map (BraTS 4 → 3); with ``regions`` the label becomes R overlapping binary
    channels (``labels_to_regions``)."""

    def __init__(self, processed_dir, ids: Sequence[str], window: Mapping, crop: int = 96,
                 num_samples: int = 2, train: bool = True,
                 regions: Mapping[str, Sequence[int]] | None = None):
        self.processed_dir = Path(processed_dir)
        index = read_processed_index(self.processed_dir)
        self.records = _records(self.processed_dir, index, list(ids))
        unlabelled = [r["case"] for r in self.records if r["label"] is None]
        if unlabelled:
            raise ValueError(f"{self.processed_dir}: cases {unlabelled[:5]} have no label")
        self.window = validate_window(resolve_window(dict(window), index),
                                      f"{self.processed_dir} window")
        self.crop, self.num_samples, self.train = (int(crop),) * 3, int(num_samples), bool(train)
        self.regions = dict(regions) if regions else None
        values = sorted(int(v) for v in index["labels"])
        self.class_of_value = np.zeros(256, np.uint8)  # label value -> class index lookup
        self.class_of_value[values] = np.arange(len(values))
        self.transforms = self._training_transforms() if self.train else None

    def _training_transforms(self):
        from monai.transforms import (Compose, RandCropByPosNegLabeld, RandFlipd,
                                      RandRotate90d, RandScaleIntensityd, RandShiftIntensityd,
                                      SpatialPadd)
        keys = ["image", "label"]
        # MONAI's CT recipe samples negative centres only inside the body (image above the
        # window floor); z-scored MRI has meaningful negative values, so it samples anywhere.
        threshold = self.window["b_min"] if self.window["kind"] == "ct" else None
        return Compose([
            SpatialPadd(keys=keys, spatial_size=self.crop),
            RandCropByPosNegLabeld(keys=keys, label_key="label", spatial_size=self.crop, pos=1,
                                   neg=1, num_samples=self.num_samples,
                                   image_key="image" if threshold is not None else None,
                                   image_threshold=threshold or 0.0),
            RandFlipd(keys=keys, prob=0.2, spatial_axis=0),
            RandFlipd(keys=keys, prob=0.2, spatial_axis=1),
            RandFlipd(keys=keys, prob=0.2, spatial_axis=2),
            RandRotate90d(keys=keys, prob=0.2, max_k=3),
            RandScaleIntensityd(keys="image", factors=0.1, prob=0.1),
            RandShiftIntensityd(keys="image", offsets=0.1, prob=0.1),
        ])

    def __len__(self) -> int:
        return len(self.records)

    def _finish_label(self, label: torch.Tensor) -> torch.Tensor:
        if self.regions:
            return labels_to_regions(label, self.regions)
        return label.to(torch.int64)

    def __getitem__(self, item: int) -> dict:
        record = self.records[item]
        image = torch.from_numpy(apply_window(np.load(self.processed_dir / record["image"]),
                                              self.window))
        raw_label = np.load(self.processed_dir / record["label"])
        # Regions are defined on label values; plain segmentation trains on class indices.
        label = raw_label if self.regions else self.class_of_value[raw_label]
        label = torch.from_numpy(np.ascontiguousarray(label))[None]
        if not self.train:
            return {"image": image, "label": self._finish_label(label), "case": record["case"],
                    "spacing": torch.tensor(record["spacing"], dtype=torch.float64)}
        self.transforms.set_random_state(seed=int(torch.randint(2 ** 31 - 1, ())))
        samples = self.transforms({"image": image, "label": label})
        return {"image": torch.stack([torch.as_tensor(s["image"]).as_subclass(torch.Tensor)
                                      for s in samples]),
                "label": torch.stack([self._finish_label(torch.as_tensor(s["label"])
                                                         .as_subclass(torch.Tensor))
                                      for s in samples]),
                "case": record["case"]}
