"""The native-spacing pretraining cache (`pretraining.data_recipe: native`): data/pretrain/<ds>.

The authors' pretraining reads whole CT volumes reoriented to RAS at their native spacing; the
window (-1000..1000 HU -> [0.001, 1]) and the padding to the crop are applied by the reader
(hybridmim.data.loading.PretrainCropDataset), as for the fine-tuning cache. So this cache is the
dataset's own preprocessing recipe with two changes: no resampling, no foreground crop. It has
its own recipe hash (rebuilt when the recipe, the code or the raw files change) and carries the
fine-tuning cache's splits.json, so a pretraining corpus reads exactly the training cases the
downstream split allows and never a validation or test case.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

from hybridmim.atomic import write_json


def build_native_cache(config: dict[str, Any], name: str,
                       data_root: str | os.PathLike = "data") -> Path:
    """Build data/pretrain/<name> from data/raw/<name> and the fine-tuning cache's splits.json,
    copied (never redrawn: both caches hold one split); returns its splits.json."""
    import json

    from hybridmim.config import dataset_spec
    from hybridmim.data.prepare.preprocess import preprocess_dataset

    raw_dir = Path(data_root) / "raw" / name
    splits_file = Path(data_root) / "processed" / name / "splits.json"
    for needed, step in ((raw_dir / "dataset.json", "acquire"), (splits_file, "preprocess")):
        if not needed.is_file():
            raise FileNotFoundError(f"{needed} is missing: run `hybridmim data {step} --dataset "
                                    f"{name}` first (the native pretraining cache reads the raw "
                                    f"data and the fine-tuning cache's split)")
    spec = dataset_spec(config, name)
    native = dataclasses.replace(spec.preprocess, spacing=None, crop_foreground=False)
    out_dir = Path(data_root) / "pretrain" / name
    preprocess_dataset(raw_dir, out_dir, dataclasses.replace(spec, preprocess=native))
    write_json(out_dir / "splits.json", json.loads(splits_file.read_text()))
    return out_dir / "splits.json"
