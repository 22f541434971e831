"""A dataset's fingerprint and the preprocessing recipe derived from it (in the spirit of nnU-Net's
plans): the median voxel spacing becomes the target spacing when the config does not set one, and
the intensities of the labelled (foreground) voxels are summarised by percentiles so that a CT
window can be chosen from them. The fingerprint is printed and recorded with the preprocessed
cache; every derived value can be overridden in the dataset's config block.
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Sequence

import nibabel as nib
import numpy as np

from hybridmim.dataset_catalog import MEDIAN_SPACING, DatasetSpec

log = logging.getLogger(__name__)

FOREGROUND_PERCENTILES = (0.5, 50.0, 99.5)
SAMPLES_PER_CASE = 10_000  # foreground voxels kept per case, as nnU-Net samples them


def ras_spacing(image_path: Path) -> tuple[float, float, float]:
    """Voxel size (mm) along R, A, S of a NIfTI file, read from its header only."""
    image = nib.load(str(image_path))
    zooms = np.linalg.norm(image.affine[:3, :3], axis=0)
    ras_axis_of = nib.orientations.io_orientation(image.affine)[:, 0]  # voxel axis -> R/A/S
    return tuple(round(float(s), 6) for s in zooms[np.argsort(ras_axis_of)])


def resolve_spacing(spec: DatasetSpec, image_paths: Sequence[Path]) -> tuple[DatasetSpec, dict]:
    """``spec`` with a "median" target spacing replaced by the median of the cases' spacings,
    and the spacing part of the fingerprint."""
    readable = []
    for path in image_paths:
        try:
            readable.append(ras_spacing(path))
        except Exception:  # nibabel raises many types; the case's own load names the file later
            continue
    fingerprint = {"modality": spec.modality, "num_cases": len(image_paths)}
    if not readable:
        return spec, fingerprint
    spacings = np.array(readable)
    median = tuple(round(float(s), 4) for s in np.median(spacings, axis=0))
    fingerprint.update(median_spacing=list(median),
                       spacing_min=[round(float(s), 4) for s in spacings.min(axis=0)],
                       spacing_max=[round(float(s), 4) for s in spacings.max(axis=0)])
    if spec.preprocess.spacing == MEDIAN_SPACING:
        spec = dataclasses.replace(spec, preprocess=dataclasses.replace(spec.preprocess,
                                                                        spacing=median))
        fingerprint["spacing_from"] = "median of the dataset"
    else:
        fingerprint["spacing_from"] = "config or registry"
    return spec, fingerprint


class ForegroundSampler:
    """Collects a fixed-seed sample of labelled voxels' intensities (first channel, after
    resampling, before normalisation) and summarises them."""

    def __init__(self, seed: int = 0):
        self.rng = np.random.default_rng(seed)
        self.samples: list[np.ndarray] = []

    def add(self, image: np.ndarray, label: np.ndarray) -> None:
        values = np.asarray(image[0])[np.asarray(label[0]) > 0].astype(np.float64)
        if values.size > SAMPLES_PER_CASE:
            values = self.rng.choice(values, SAMPLES_PER_CASE, replace=False)
        self.samples.append(values)

    def summary(self) -> dict:
        values = np.concatenate(self.samples) if self.samples else np.empty(0)
        if values.size == 0:
            return {}
        pcts = np.percentile(values, FOREGROUND_PERCENTILES)
        return {"foreground_intensity": {
            **{f"p{p:g}": round(float(v), 4) for p, v in zip(FOREGROUND_PERCENTILES, pcts)},
            "mean": round(float(values.mean()), 4), "std": round(float(values.std()), 4),
            "voxels_sampled": int(values.size)}}


def describe_recipe(name: str, recipe: dict, fingerprint: dict) -> str:
    """One paragraph for the log: the chosen recipe, where it came from, how to override it."""
    intensity = fingerprint.get("foreground_intensity") or {}
    percentiles = ", ".join(f"{k} {v:g}" for k, v in intensity.items()
                            if k.startswith("p")) or "n/a (no labelled voxels)"
    return (f"{name}: recipe spacing {recipe['spacing']} mm ({fingerprint.get('spacing_from')}; "
            f"dataset median {fingerprint.get('median_spacing')}, range "
            f"{fingerprint.get('spacing_min')}..{fingerprint.get('spacing_max')}), "
            f"normalize {recipe['normalize']} (modality {fingerprint.get('modality')}), "
            f"foreground threshold {recipe['foreground_threshold']}; foreground intensities "
            f"{percentiles}. Override with spacing / normalize / foreground_threshold / windows "
            f"in datasets.{name} (config/README.md, 'Your own dataset').")
