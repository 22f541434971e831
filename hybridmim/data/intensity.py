"""Intensity windows applied by the stage that reads the preprocessed cache.

The cache keeps CT in Hounsfield units and MRI as per-channel z-scores (docs/contracts.md), because
pretraining and fine-tuning want different windows of the same voxels (method.md): fine-tuning maps
CT -175..250 HU to [0, 1]; pretraining maps -1000..1000 HU to [0.001, 1] so that a real voxel is
never exactly 0 and 0 can only mean "masked" or "padding".

A window is a plain JSON dict so it can travel inside a job spec:
- ``{"kind": "ct", "a_min", "a_max", "b_min", "b_max", "clip": true}`` — linear map a → b.
- ``{"kind": "mri_pretrain", "z_min", "z_max", "b_min", "b_max"}`` — z-scores clipped to
  [z_min, z_max] and mapped linearly to [b_min, b_max]; voxels that are exactly 0 (the background
  that non-zero z-scoring leaves untouched) go to b_min, so the brain's surroundings look like the
  CT air in the pretraining input instead of mid-grey.
- ``{"kind": "identity"}`` — values as stored (MRI fine-tuning uses its z-scores directly).
- ``{"kind": "ct_foreground", "b_min", "b_max", "clip"}`` — a ``ct`` window whose a_min/a_max are
  the 0.5th/99.5th percentiles of the dataset's labelled voxels, read from the fingerprint the
  preprocess step records (nnU-Net's CT clipping); the default fine-tuning window of a user's own
  CT dataset. ``resolve_window`` turns it into a ``ct`` window for one preprocessed dataset.
"""

from __future__ import annotations

import sys

import numpy as np

from hybridmim.dataset_catalog import WINDOW_KINDS


def resolve_window(window: dict, processed_index: dict, where: str = "window") -> dict:
    """A ``ct_foreground`` window as the ``ct`` window it stands for in this preprocessed dataset
    (``processed_index``: its dataset.json); any other window unchanged."""
    if window.get("kind") != "ct_foreground":
        return window
    intensity = (processed_index.get("fingerprint") or {}).get("foreground_intensity") or {}
    if "p0.5" not in intensity or intensity["p99.5"] <= intensity["p0.5"]:
        raise ValueError(f"{where}: a ct_foreground window needs the foreground intensity "
                         f"percentiles of the preprocessed dataset's fingerprint, which has "
                         f"{intensity or 'none'}; re-run the preprocess step, or set an explicit "
                         f"window (kind: ct, a_min, a_max, ...) in the dataset's 'windows'")
    return {"kind": "ct", "a_min": float(intensity["p0.5"]), "a_max": float(intensity["p99.5"]),
            "b_min": window["b_min"], "b_max": window["b_max"], "clip": window["clip"]}


def _is_tensor(image) -> bool:
    # torch is not imported here: the registry (and through it the Snakefile's config parsing)
    # imports this module, and an object can only be a tensor if torch is already loaded.
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(image, torch.Tensor)


def _linear(image, src_min: float, src_max: float, dst_min: float, dst_max: float, clip: bool):
    # MONAI's ScaleIntensityRange computes the same map, in the same order, as
    # (image - a) / (b - a) * (d - c) + c; this does it on one new array
    # instead of five: fine-tuning windows whole volumes per item, and the temporaries were
    # half of the data loader's time (benchmarks/loader.py).
    scaled = image - src_min
    scaled /= src_max - src_min
    scaled *= dst_max - dst_min
    scaled += dst_min
    if clip:
        if _is_tensor(scaled):
            return scaled.clamp_(dst_min, dst_max)
        return np.clip(scaled, dst_min, dst_max, out=scaled)
    return scaled


def apply_window(image, window: dict):
    """Map stored intensities to network input. Works on numpy arrays and torch tensors, returns
    float32 of the same kind; the input is never modified in place."""
    kind = window["kind"]
    tensor = _is_tensor(image)
    image = image.float() if tensor else np.asarray(image, dtype=np.float32)
    if kind == "identity":
        return image.clone() if tensor else image.copy()
    if kind == "ct":
        return _linear(image, window["a_min"], window["a_max"], window["b_min"], window["b_max"],
                       window["clip"])
    if kind == "ct_foreground":
        raise ValueError("a ct_foreground window must be resolved against its dataset first "
                         "(hybridmim.data.intensity.resolve_window)")
    if kind == "mri_pretrain":
        mapped = _linear(image, window["z_min"], window["z_max"], window["b_min"], window["b_max"],
                         True)
        mapped[image == 0] = window["b_min"]
        return mapped
    raise ValueError(f"unknown window kind {kind!r}; use one of {sorted(WINDOW_KINDS)}")
