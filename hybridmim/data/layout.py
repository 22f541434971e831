"""The canonical dataset layout on disk (the Medical Segmentation Decathlon's):

    <raw_dir>/imagesTr/  labelsTr/  imagesTs/  dataset.json

``dataset.json`` holds name, description, reference, licence, tensorImageSize, modality
({"0": channel name, ...}), labels ({"0": "background", ...}), numTraining, numTest, training
([{"image": ..., "label": ...}]) and test ([image, ...]). Only ``modality``, ``labels`` and
``training`` are required (the code reads nothing else); the others are checked when present.
A multi-channel image is either one 4D NIfTI (channels last, as MSD stores BraTS) or a list of
3D files, one per channel, in channel order. An entry may carry an explicit ``"case"`` id;
otherwise the id is the image file name without ``.nii.gz`` (for a list of channel files: the
label's file name).

Every producer of this layout (demo generator, converters, extraction) publishes it through
``atomic_directory`` so that a half-written dataset never exists under its final name.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import nibabel as nib
import numpy as np

from hybridmim import atomic

# What the code reads; every other MSD field is optional (and what make_index writes).
REQUIRED_INDEX_FIELDS = ("modality", "labels", "training")
NIFTI_SUFFIXES = (".nii.gz", ".nii")
LAYOUT_DIRS = ("imagesTr", "labelsTr", "imagesTs")


class LayoutError(ValueError):
    """The raw folder does not follow the canonical layout; the message names the file."""


@dataclass(frozen=True)
class CaseFiles:
    case: str
    images: tuple[Path, ...]  # one 4D file, or one 3D file per channel
    label: Path | None


def strip_nifti_suffix(name: str) -> str:
    for suffix in NIFTI_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def read_index(raw_dir: Path) -> dict:
    path = Path(raw_dir) / "dataset.json"
    try:
        index = json.loads(path.read_text())
    except FileNotFoundError:
        raise LayoutError(f"{path}: missing; a raw dataset folder needs dataset.json next to "
                          f"imagesTr/ and labelsTr/ (MSD layout)") from None
    except json.JSONDecodeError as error:
        raise LayoutError(f"{path}: not valid JSON ({error}); re-create it with the converter "
                          f"or the demo generator") from None
    missing = [key for key in REQUIRED_INDEX_FIELDS if key not in index]
    if missing:
        raise LayoutError(f"{path}: lacks {missing}; see hybridmim/data/layout.py for the fields")
    return index


def index_entries(index: dict, include_unlabelled: bool = True) -> Iterator[
        tuple[str, list[str], str | None]]:
    """(case id, image paths, label path or None) of each entry of dataset.json, paths as written
    there: the labelled ``training`` entries, then (when asked) the unlabelled ``test`` ones."""
    entries = [(entry, entry["label"]) for entry in index["training"]]
    if include_unlabelled:
        entries += [(e if isinstance(e, dict) else {"image": e}, None)
                    for e in index.get("test", [])]
    for entry, label in entries:
        images = entry["image"] if isinstance(entry["image"], list) else [entry["image"]]
        yield entry.get("case") or _derive_case_id(images, label), images, label


def listed_files(index: dict) -> list[str]:
    """Every path dataset.json lists (images, channel files, labels), as written there."""
    return [path for _, images, label in index_entries(index)
            for path in (*images, *([label] if label else []))]


def unlisted_files(folder: Path, listed: Iterable[str]) -> list[str]:
    """Files in the layout's folders that are not among ``listed`` (hidden files aside)."""
    listed = {os.path.normpath(path) for path in listed}
    unlisted = []
    for sub in LAYOUT_DIRS:
        for path in sorted((folder / sub).iterdir()) if (folder / sub).is_dir() else []:
            rel = f"{sub}/{path.name}"
            if not path.name.startswith(".") and os.path.normpath(rel) not in listed:
                unlisted.append(rel)
    return unlisted


def list_cases(raw_dir: Path, index: dict, include_unlabelled: bool) -> list[CaseFiles]:
    """Labelled training cases (and, when asked, the unlabelled imagesTs ones), paths resolved
    and checked to exist."""
    raw_dir = Path(raw_dir)
    cases, seen = [], set()
    for case, images, label in index_entries(index, include_unlabelled):
        if case in seen:
            raise LayoutError(f"{raw_dir / 'dataset.json'}: case id {case!r} occurs twice; give "
                              f"each entry a distinct file name or an explicit 'case' key")
        seen.add(case)
        cases.append(CaseFiles(case=case, images=tuple(_resolve(raw_dir, p) for p in images),
                               label=_resolve(raw_dir, label) if label else None))
    return cases


def _resolve(raw_dir: Path, relative: str) -> Path:
    # normpath, not resolve(): a symlinked file keeps its own name, which is the case id
    path = Path(os.path.normpath(raw_dir / relative))
    if not path.is_file():
        raise LayoutError(f"{path}: listed in {raw_dir / 'dataset.json'} but missing; re-run the "
                          f"download/convert step for this dataset")
    return path


def _derive_case_id(images: list[str], label: str | None) -> str:
    names = [strip_nifti_suffix(Path(p).name) for p in images]
    if len(images) == 1:
        return names[0]
    if label is not None:
        return strip_nifti_suffix(Path(label).name)
    return os.path.commonprefix(names).rstrip("_-.") or names[0]


def read_json_or_none(path: Path):
    """The JSON content of ``path``, or None when it is missing or unreadable (not written yet,
    or cut short by a run that was killed): the caller then rebuilds what the file describes."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def read_processed_index(processed_dir, missing_ok: bool = False) -> dict | None:
    """The dataset.json of a preprocessed cache (data/processed/<dataset>); None when there is
    none and ``missing_ok``."""
    path = Path(processed_dir) / "dataset.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        if missing_ok:
            return None
        raise FileNotFoundError(f"{path}: no preprocessed dataset here; run the preprocess step "
                                f"(`hybridmim data preprocess`) first") from None


def make_index(*, name: str, description: str, reference: str, licence: str,
               channels: tuple[str, ...], labels: dict[int, str], training: list[dict],
               test: list[str]) -> dict:
    """A dataset.json dict with every MSD field (MONAI's DecathlonDataset refuses fewer)."""
    return {"name": name, "description": description, "reference": reference, "licence": licence,
            "tensorImageSize": "4D" if len(channels) > 1 else "3D",
            "modality": {str(i): channel for i, channel in enumerate(channels)},
            "labels": {str(value): label for value, label in sorted(labels.items())},
            "numTraining": len(training), "numTest": len(test), "training": training,
            "test": test}


def write_json(path: Path, data: dict) -> None:
    # dataset.json keeps the key order of the Medical Segmentation Decathlon's files.
    atomic.write_json(path, data, sort_keys=False)


def save_nifti(array: np.ndarray, affine: np.ndarray, path: Path) -> None:
    """Write a .nii.gz whose bytes depend only on the data: gzip's header timestamp is pinned to 0
    (nibabel would stamp the current time), so identical inputs give identical files and hashes."""
    image = nib.Nifti1Image(array, affine)
    image.header.set_xyzt_units("mm", "sec")
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    with open(path, "wb") as handle:
        handle.write(gzip.compress(image.to_bytes(), compresslevel=4, mtime=0))


@contextlib.contextmanager
def atomic_directory(final_dir: Path) -> Iterator[Path]:
    """Yield an empty temporary sibling of ``final_dir``; when the block succeeds it replaces
    ``final_dir`` (any previous content is removed only after the new one is in place), when it
    fails the temporary folder is deleted and ``final_dir`` is left as it was."""
    final_dir = Path(final_dir)
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    temp_dir = final_dir.parent / f".{final_dir.name}.tmp-{os.getpid()}"
    old_dir = final_dir.parent / f".{final_dir.name}.old-{os.getpid()}"
    for leftover in (temp_dir, old_dir):
        shutil.rmtree(leftover, ignore_errors=True)
    temp_dir.mkdir()
    try:
        yield temp_dir
    except BaseException:
        shutil.rmtree(temp_dir, ignore_errors=True)
        raise
    if final_dir.exists():
        os.replace(final_dir, old_dir)
    os.replace(temp_dir, final_dir)
    shutil.rmtree(old_dir, ignore_errors=True)
