"""One image as it came (NIfTI, any orientation and spacing) → a label map on that same grid.

The model's recorded preprocessing (model.pt ``meta["preprocess"]``, the recipe its cache was
built with) is rebuilt from the preprocessing step's own MONAI transforms (channels first,
reorient, resample, crop to the foreground box, z-score MRI), then the fine-tuning intensity
window (hybridmim.data.intensity). After sliding-window inference the class probabilities go back
through MONAI's ``Invertd`` (un-crop, un-resample bilinearly, un-reorient) and only then become
labels, as MONAI's reference pipelines do, in the dataset's own label values (BraTS TC/WT/ET
regions back to 0/1/2/4 by ``regions_to_label_values``).
"""
from __future__ import annotations

import gzip
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from hybridmim.data.intensity import apply_window
from hybridmim.data.layout import read_processed_index
from hybridmim.data.loading import labels_to_regions
from hybridmim.dataset_catalog import validate_window
from hybridmim.predict.inference import predict_volume


class InputError(ValueError):
    """An input image cannot be segmented; the message names the file and what to do."""


PREPROCESS_KEYS = ("orientation", "spacing", "normalize", "foreground_threshold")


def check_preprocess(recipe: Mapping[str, Any] | None, where: str) -> dict[str, Any]:
    if not recipe:
        raise ValueError(f"{where} records no preprocessing (meta.preprocess); re-run its "
                         "fine-tuning job with this version of hybridmim")
    missing = [key for key in PREPROCESS_KEYS if key not in recipe]
    if missing:
        raise ValueError(f"{where}: preprocessing lacks {missing}")
    return {key: recipe[key] for key in PREPROCESS_KEYS}


def recorded_preprocess(processed_dir: str | Path) -> dict[str, Any] | None:
    """The recipe a preprocessed cache was built with (its dataset.json), as a model records it."""
    try:
        return check_preprocess(read_processed_index(processed_dir).get("recipe"),
                                f"{processed_dir}/dataset.json")
    except (OSError, ValueError):  # no cache, or one without a complete recipe
        return None


def preprocessing_steps(recipe: Mapping[str, Any], keys: str | list[str] = "image"
                        ) -> list[dict[str, Any]]:
    """The recipe's invertible MONAI transforms (hybridmim.data.prepare.preprocess's order and
    arguments) as config entries on ``keys`` ("image", maybe "label"). The bundle of `hybridmim
    export` holds them and `hybridmim predict` instantiates them, so the two cannot drift apart."""
    steps: list[dict[str, Any]] = [
        {"_target_": "Orientationd", "keys": keys, "axcodes": recipe["orientation"],
         "labels": [["L", "R"], ["P", "A"], ["I", "S"]]}]
    if recipe.get("spacing") is not None:
        steps.append({"_target_": "Spacingd", "keys": keys,
                      "pixdim": [float(s) for s in recipe["spacing"]],
                      "mode": "bilinear" if keys == "image" else ["bilinear", "nearest"]})
    threshold = float(recipe["foreground_threshold"])
    steps.append({"_target_": "CropForegroundd", "keys": keys, "source_key": "image",
                  "select_fn": f"$lambda x: x > {threshold!r}", "allow_smaller": True})
    if recipe["normalize"] == "zscore_nonzero_channelwise":
        steps.append({"_target_": "NormalizeIntensityd", "keys": "image", "nonzero": True,
                      "channel_wise": True})
    return steps


def preprocessing_transforms(recipe: Mapping[str, Any], with_label: bool = False):
    """The Compose of ``preprocessing_steps`` on ``image`` (and ``label``)."""
    from monai.bundle import ConfigParser

    steps = preprocessing_steps(recipe, ["image", "label"] if with_label else "image")
    parser = ConfigParser({"preprocessing": {"_target_": "Compose", "transforms": steps}})
    return parser.get_parsed_content("preprocessing")


def check_headers(paths: Sequence[str | Path], channels: int) -> None:
    """Cheap checks of one case's files (headers only): they exist, are NIfTI, hold a 3D volume
    with the model's channel count. ``paths``: one (3D or 4D channels-last) file, or one 3D file
    per channel."""
    import nibabel as nib

    shapes = []
    for path in paths:
        if not Path(path).is_file():
            raise InputError(f"{path}: no such file")
        try:
            shapes.append(tuple(nib.load(str(path)).shape))
        except Exception as error:  # nibabel raises many types for a broken file
            raise InputError(f"{path}: cannot be read as NIfTI ({type(error).__name__}: "
                             f"{str(error)[:200]})") from None
    if any(len(s) < 3 or min(s[:3]) < 2 for s in shapes):
        raise InputError(f"{paths[0]}: shape {shapes[0]} is not a 3D volume; 2D images are "
                         "not supported")
    found = shapes[0][3] if len(paths) == 1 and len(shapes[0]) == 4 else len(paths)
    if found != channels or any(len(s) > 4 for s in shapes):
        raise InputError(f"{paths[0]}: {found} channel(s), the model takes {channels}; give "
                         "one 4D file or one file per channel")
    spatial = [s[:3] for s in shapes]
    if len(set(spatial)) > 1:
        raise InputError(f"{', '.join(str(p) for p in paths)}: channel files differ in shape "
                         f"{spatial}")


def load_image(paths: Sequence[str | Path], channels: int):
    """Channels-first MetaTensor of one case, checked: the headers (``check_headers``), then
    every voxel finite."""
    from monai.transforms import LoadImage

    check_headers(paths, channels)
    names = ", ".join(str(p) for p in paths)
    loader = LoadImage(image_only=True, ensure_channel_first=True, reader="NibabelReader")
    try:
        image = loader([str(p) for p in paths] if len(paths) > 1 else str(paths[0]))
    except Exception as error:  # a header can be fine and the data still broken (truncated)
        raise InputError(f"{names}: cannot be read as NIfTI ({type(error).__name__}: "
                         f"{str(error)[:200]})") from None
    finite = torch.isfinite(image.as_tensor())
    if not bool(finite.all()):
        raise InputError(f"{names}: {int((~finite).sum())} voxel(s) are NaN or infinite")
    return image


def label_values(labels: Mapping[str, str]) -> list[int]:
    """Label values in class-index order (class i of a label-map network is values[i])."""
    return sorted(int(v) for v in labels)


def regions_to_label_values(masks: torch.Tensor, labels: Mapping[str, str],
                            regions: Mapping[str, Sequence[int]]) -> torch.Tensor:
    """Overlapping region masks (R, X, Y, Z) → a label map of the dataset's values.

    A value is written where every region containing it is on; values in more regions win,
    so for BraTS WT → 2, TC ∧ WT → 1, ET ∧ TC ∧ WT → 4 (the inverse of
    ``labels_to_regions``)."""
    out = torch.zeros(masks.shape[1:], dtype=torch.uint8)
    members = {v: [i for i, values in enumerate(regions.values()) if v in [int(x) for x in values]]
               for v in label_values(labels) if v != 0}
    for value, inside in sorted(members.items(), key=lambda item: len(item[1])):
        if inside:
            out[masks[inside].all(dim=0)] = value
    return out


def masks_from_label_values(label: torch.Tensor, labels: Mapping[str, str],
                            regions: Mapping[str, Sequence[int]] | None) -> torch.Tensor:
    """A label map of dataset values (X, Y, Z) → the evaluated binary masks (K, X, Y, Z), no
    background: one per foreground label, or one per region."""
    label = label.reshape(label.shape[-3:]).long()
    if regions:
        return labels_to_regions(label, regions).bool()
    values = [v for v in label_values(labels) if v != 0]
    unknown = sorted(set(torch.unique(label).tolist()) - set(values) - {0})
    if unknown:
        raise ValueError(f"label values {unknown[:10]} are not in the label map "
                         f"{label_values(labels)}")
    return torch.stack([label == v for v in values])


@dataclass
class Prediction:
    label: np.ndarray  # uint8 (X, Y, Z) on the input grid, dataset label values
    resampled_probs: torch.Tensor  # (K, ...) on the preprocessed grid
    resampled_image: torch.Tensor  # (C, ...) the network input (windowed)
    resampled_label: torch.Tensor | None  # the label through the same transforms, if given
    resampled_spacing: list[float]


class CasePredictor:
    """Segment raw cases with one network and the recipe it was trained with."""

    def __init__(self, network: torch.nn.Module, meta: Mapping[str, Any],
                 recipe: Mapping[str, Any], overlap: float = 0.5,
                 device: torch.device | str = "cpu", precision: str = "fp32"):
        self.network = network
        self.recipe = check_preprocess(recipe, "model")
        self.window = validate_window(meta["window"], "model window")
        self.crop = int(meta["crop"])
        self.channels = int(meta["channels"])
        self.labels = meta["labels"]
        self.regions = meta.get("regions") or None
        self.overlap, self.device, self.precision = overlap, device, precision

    def __call__(self, image_paths: Sequence[str | Path],
                 label_path: str | Path | None = None) -> Prediction:
        from monai.data import MetaTensor
        from monai.transforms import Invertd

        image = load_image(image_paths, self.channels)
        data: dict[str, Any] = {"image": image}
        if label_path is not None:
            data["label"] = load_image([label_path], 1)
        transforms = preprocessing_transforms(self.recipe, with_label=label_path is not None)
        data = transforms(data)
        network_input = apply_window(data["image"].as_tensor(), self.window)
        probs = predict_volume(self.network, network_input, self.crop, overlap=self.overlap,
                               device=self.device, precision=self.precision,
                               regions=bool(self.regions))
        affine = np.asarray(data["image"].affine, dtype=float)
        spacing = [float(s) for s in np.linalg.norm(affine[:3, :3], axis=0)]
        data["pred"] = MetaTensor(probs)  # Invertd gives it the image's meta and transform trace
        inverted = Invertd(keys="pred", transform=transforms, orig_keys="image",
                           nearest_interp=False)(data)["pred"]
        original = inverted.as_tensor().float()
        if tuple(original.shape[1:]) != tuple(image.shape[1:]):
            raise RuntimeError(f"inverted prediction {tuple(original.shape[1:])} does not match "
                               f"the input grid {tuple(image.shape[1:])}")
        if self.regions:
            label = regions_to_label_values(original > 0.5, self.labels, self.regions)
        else:
            lookup = torch.as_tensor(label_values(self.labels), dtype=torch.uint8)
            label = lookup[original.argmax(dim=0)]
        resampled_label = (torch.round(data["label"].as_tensor()[0]).to(torch.uint8)
                           if label_path is not None else None)
        return Prediction(label=label.numpy(), resampled_probs=probs,
                          resampled_image=network_input, resampled_label=resampled_label,
                          resampled_spacing=spacing)


def save_label_map(label: np.ndarray, reference: str | Path, path: str | Path) -> None:
    """Write a uint8 label map atomically with the reference image's affine and header (so
    orientation codes, qform/sform and units are the input's)."""
    import nibabel as nib

    from hybridmim.atomic import atomic_path

    ref = nib.load(str(reference))
    header = ref.header.copy()
    header.set_data_dtype(np.uint8)
    out = nib.Nifti1Image(np.asarray(label, dtype=np.uint8), ref.affine, header)
    out.set_qform(ref.get_qform(), code=int(ref.header["qform_code"]))
    out.set_sform(ref.get_sform(), code=int(ref.header["sform_code"]))
    out.header["scl_slope"], out.header["scl_inter"] = 1.0, 0.0
    payload = out.to_bytes()
    if str(path).endswith(".gz"):
        payload = gzip.compress(payload, compresslevel=6, mtime=0)
    with atomic_path(path) as tmp:
        tmp.write_bytes(payload)
