"""The pretraining corpus of a spec: training volumes (``train`` split of every dataset) and the
optional fixed held-out volumes for a validation loss (``val`` split, ``data.val_volumes``)."""
from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import Dataset

from hybridmim.data.loading import PretrainCropDataset
from hybridmim.data.prepare.splits import load_splits, pretraining_cases


def _crop_dataset(spec: dict[str, Any], ids: dict[str, list[str]]) -> PretrainCropDataset:
    """Random crops of the cases ``ids`` ({processed_dir: case ids}) of the corpus' datasets."""
    entries = [{"processed_dir": d["processed_dir"], "window": d["window"],
                "modality": d.get("modality"), "name": d.get("name")}
               for d in spec["data"]["datasets"] if str(d["processed_dir"]) in ids]
    return PretrainCropDataset(entries, split_ids=ids, crop=spec["geometry"]["crop"],
                               crops_per_volume=int(spec["data"]["crops_per_volume"]))


def build_train_dataset(spec: dict[str, Any]) -> PretrainCropDataset:
    """Training volumes: the ``train`` split only (checked free of val/test cases)."""
    return _crop_dataset(spec, pretraining_cases([d["processed_dir"]
                                                  for d in spec["data"]["datasets"]]))


class FixedCrops(Dataset):
    """A dataset whose random crops are the same on every pass: item i is drawn under a forked
    RNG seeded with ``seed + i``, so validation neither varies nor shifts the training stream."""

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Any:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed + index)
            return self.dataset[index]


def validation_ids(spec: dict[str, Any]) -> dict[str, list[str]]:
    """``data.val_volumes`` ids taken round-robin over the datasets' ``val`` splits."""
    wanted = int(spec["data"].get("val_volumes", 0))
    pools = {d["processed_dir"]: sorted(load_splits(d["processed_dir"])["val"])
             for d in spec["data"]["datasets"]}
    available = sum(len(ids) for ids in pools.values())
    if wanted > available:
        raise ValueError(f"data.val_volumes is {wanted} but the corpus' val splits hold only "
                         f"{available} volume(s) ({ {k: len(v) for k, v in pools.items()} }); "
                         f"lower data.val_volumes")
    round_robin = [(directory, ids[position])
                   for position in range(max(map(len, pools.values()), default=0))
                   for directory, ids in pools.items() if position < len(ids)]
    chosen: dict[str, list[str]] = {}
    for directory, case in round_robin[:wanted]:
        chosen.setdefault(directory, []).append(case)
    return chosen


def build_val_dataset(spec: dict[str, Any], seed: int) -> FixedCrops | None:
    if int(spec["data"].get("val_volumes", 0)) == 0:
        return None
    return FixedCrops(_crop_dataset(spec, validation_ids(spec)), seed)
