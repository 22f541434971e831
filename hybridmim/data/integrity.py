"""Integrity check of a dataset in the canonical layout (in the spirit of nnU-Net's
``verify_dataset_integrity``): every problem is collected, none stops the check, so one run tells
the user everything that is wrong.

Checked: dataset.json readable and complete; its ``modality`` and ``labels`` agree with the
registry entry; counts agree with the lists; every listed file exists and is a readable NIfTI;
image channel count; image/label shape and affine agree (and the channel files of a case agree);
no NaN/Inf voxels; no constant (empty) image channel; label values integral and inside the label
map; files lying in imagesTr/labelsTr/imagesTs that dataset.json does not list.
"""
from __future__ import annotations

import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import nibabel as nib
import numpy as np

from hybridmim.data.layout import (REQUIRED_INDEX_FIELDS, index_entries, listed_files,
                                   unlisted_files)
from hybridmim.progress import StepProgress

log = logging.getLogger("hybridmim.data.integrity")

# Image and label share a voxel grid when their affines agree to 1 µm / 1e-3 of a direction
# cosine: NIfTI writers round differently, true mismatches are far larger.
AFFINE_ATOL = 1e-3


class DatasetIntegrityError(ValueError):
    """A dataset with problems; ``problems`` lists each one, prefixed with its case."""

    def __init__(self, raw_dir: Path | str, problems: Sequence[str]):
        self.problems = list(problems)
        shown = "\n  - ".join(self.problems)
        super().__init__(
            f"{raw_dir}: {len(self.problems)} problem(s) found by the integrity check:\n  - "
            f"{shown}\nFix or remove these cases (or re-download/re-convert the dataset), "
            "then run again.")


def _read(raw_dir: Path, rel: str) -> tuple[np.ndarray | None, np.ndarray | None, str | None]:
    """(voxels, affine, None) of a file dataset.json lists, or (None, None, the problem)."""
    if Path(rel).is_absolute() or ".." in Path(rel).parts:
        return None, None, (f"path {rel!r} in dataset.json must be relative and stay inside the "
                            "folder")
    if not (raw_dir / rel).is_file():
        return None, None, f"{rel}: listed in dataset.json but missing"
    try:
        image = nib.load(str(raw_dir / rel))
        return np.asanyarray(image.dataobj), image.affine, None
    except Exception as err:  # nibabel raises many types (ImageFileError, EOFError, zlib, ...)
        return None, None, f"{rel}: unreadable NIfTI ({type(err).__name__}: {err})"


def _check_case(raw_dir: Path, case: str, images: list[str], label: str | None,
                label_values: set[int], num_channels: int) -> list[str]:
    problems: list[str] = []

    def add(message: str) -> None:
        problems.append(f"{case}: {message}")

    num_found = 0  # image channels read so far
    grid: tuple[tuple[int, ...], np.ndarray, str] | None = None  # (spatial shape, affine, file)
    for rel in images:
        array, affine, error = _read(raw_dir, rel)
        if error:
            add(error)
            continue
        if array.ndim not in (3, 4):
            add(f"{rel}: image has {array.ndim} dimensions, expected 3 (or 4 with channels last)")
            continue
        if grid is None:
            grid = (array.shape[:3], affine, rel)
        elif array.shape[:3] != grid[0]:
            add(f"{rel}: shape {array.shape[:3]} differs from {grid[2]} {grid[0]}")
        elif not np.allclose(affine, grid[1], atol=AFFINE_ATOL):
            add(f"{rel}: affine differs from {grid[2]} (channels not on one grid)")
        for channel in (np.moveaxis(array, 3, 0) if array.ndim == 4 else [array]):
            where = f"{rel} channel {num_found}" if num_channels > 1 else rel
            num_found += 1
            bad = (int(np.count_nonzero(~np.isfinite(channel)))
                   if np.issubdtype(channel.dtype, np.floating) else 0)
            if bad:
                add(f"{where}: {bad} NaN/Inf voxel(s)")
            elif channel.size == 0 or channel.min() == channel.max():
                add(f"{where}: image is constant (empty) — value "
                    f"{channel.flat[0] if channel.size else 'n/a'} everywhere")
    if grid is not None and num_found != num_channels and not any(
            "unreadable" in p or "missing" in p for p in problems):
        add(f"image has {num_found} channel(s), the dataset declares {num_channels}")
    if label is None:
        return problems
    array, affine, error = _read(raw_dir, label)
    if error:
        add(error)
        return problems
    if array.ndim == 4 and array.shape[3] == 1:
        array = array[..., 0]
    if array.ndim != 3:
        add(f"{label}: label has shape {array.shape}, expected a 3D volume")
        return problems
    if grid is not None:
        if array.shape != grid[0]:
            add(f"{label}: label shape {array.shape} differs from image shape {grid[0]}")
        elif not np.allclose(affine, grid[1], atol=AFFINE_ATOL):
            add(f"{label}: label affine differs from the image's (not on the same grid); "
                f"max difference {np.abs(affine - grid[1]).max():.4g}")
    if np.issubdtype(array.dtype, np.floating):
        if not np.all(np.isfinite(array)):
            add(f"{label}: {int(np.count_nonzero(~np.isfinite(array)))} NaN/Inf voxel(s) in label")
            return problems
        if not np.array_equal(np.rint(array), array):
            add(f"{label}: label has non-integer values")
            return problems
    present = {int(v) for v in np.unique(array)}
    outside = sorted(present - label_values)
    if outside:
        add(f"{label}: label values {outside} are not in the label map {sorted(label_values)}")
    return problems


def check_dataset(raw_dir: str | os.PathLike, label_map: Mapping[int, str] | Iterable[int],
                  channels: Sequence[str], declared_by: str = "the registry entry") -> list[str]:
    """Every problem of the dataset at ``raw_dir``, each prefixed by its case (or dataset.json).
    ``declared_by`` says where the expected labels/channels come from, for the messages."""
    raw_dir = Path(raw_dir)
    label_values = {int(k) for k in label_map}
    num_channels = len(channels)
    index_path = raw_dir / "dataset.json"
    try:
        index = json.loads(index_path.read_text())
    except FileNotFoundError:
        return [f"dataset.json: missing in {raw_dir}"]
    except (OSError, json.JSONDecodeError) as err:
        return [f"dataset.json: unreadable ({err})"]
    problems: list[str] = []
    missing = [key for key in REQUIRED_INDEX_FIELDS if key not in index]
    if missing:
        problems.append(f"dataset.json: lacks field(s) {missing}")
    if not isinstance(index.get("training"), list):
        return problems + ["dataset.json: no 'training' list"]
    if isinstance(index.get("modality"), dict) and len(index["modality"]) != num_channels:
        problems.append(f"dataset.json: declares {len(index['modality'])} channel(s) "
                        f"{list(index['modality'].values())}, while {declared_by} expects "
                        f"{num_channels} (list "
                        f"the channels in order under the dataset's 'channels')")
    if isinstance(index.get("labels"), dict):
        declared = {int(k) for k in index["labels"]}
        if declared != label_values:
            problems.append(f"dataset.json: labels {sorted(declared)} differ from the label map "
                            f"of {declared_by} {sorted(label_values)}")
    for key, listed in (("numTraining", "training"), ("numTest", "test")):
        if key in index and index[key] != len(index.get(listed, [])):
            problems.append(f"dataset.json: {key} is {index[key]} but '{listed}' lists "
                            f"{len(index.get(listed, []))} entries")
    cases = list(index_entries(index))
    names = [case for case, _, _ in cases]
    for duplicate in sorted({n for n in names if names.count(n) > 1}):
        problems.append(f"{duplicate}: case id occurs more than once in dataset.json")
    problems += [f"{rel}: present but not listed in dataset.json (remove it or add it to "
                 "dataset.json)" for rel in unlisted_files(raw_dir, listed_files(index))]
    progress = StepProgress(len(cases), "integrity check", every_s=30.0)
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = pool.map(lambda c: _check_case(raw_dir, c[0], c[1], c[2], label_values,
                                                 num_channels), cases)
        for done, case_problems in enumerate(results, 1):
            problems += case_problems
            progress.update(done)
    progress.close()
    return problems


def assert_dataset_ok(raw_dir: str | os.PathLike, label_map: Mapping[int, str] | Iterable[int],
                      channels: Sequence[str], *, shown_as: str | os.PathLike | None = None,
                      declared_by: str = "the registry entry") -> None:
    """Raise one DatasetIntegrityError listing EVERY problem, or return quietly. ``shown_as``
    names the folder in the message when ``raw_dir`` is a temporary copy the user never saw (the
    problems' relative paths then point into the user's own folder)."""
    problems = check_dataset(raw_dir, label_map, channels, declared_by=declared_by)
    if problems:
        raise DatasetIntegrityError(shown_as or Path(raw_dir), problems)
    log.info("%s passed the integrity check", raw_dir)
