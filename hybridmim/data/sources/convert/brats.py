"""BraTS 2020 training data → canonical layout.

Source: the CBICA release ``MICCAI_BraTS2020_TrainingData.zip`` (or its extracted folder), or the
Kaggle mirror's ``BraTS2020_TrainingData/MICCAI_BraTS2020_TrainingData/``: 369 case folders
``BraTS20_Training_XXX/`` with ``BraTS20_Training_XXX_{t1,t1ce,t2,flair,seg}.nii[.gz]``. Case
folders are found at any depth, so both layouts work.

Output per case: ``imagesTr/<case>.nii.gz``, ONE 4D NIfTI with the channels stacked on the last
axis in the order **t1, t1ce, t2, flair** (``CHANNEL_ORDER``, = ``registry`` channels and
dataset.json ``modality``), and ``labelsTr/<case>.nii.gz`` (uint8, values kept as 0/1/2/4:
necrotic/non-enhancing core, edema, enhancing tumour — evaluation regions are built later).
Validation-set folders (``BraTS20_Validation_XXX``, no segmentation) become ``imagesTs``.

Known quirk: in the official release the segmentation of case 355 is named
``W39_1998.09.19_Segm.nii``; ``SEGMENTATION_ALIASES`` maps it, so the case is kept.
"""
from __future__ import annotations

import logging
import re
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import nibabel as nib
import numpy as np

from hybridmim.data.layout import make_index, save_nifti, write_json
from hybridmim.data.sources.convert.common import (ConversionError, Verify, find_dirs, find_nifti,
                                                   publish)
from hybridmim.dataset_catalog import BRATS_LABELS

log = logging.getLogger("hybridmim.data.sources.convert.brats")

CHANNEL_ORDER = ("t1", "t1ce", "t2", "flair")
SEGMENTATION_ALIASES = {"BraTS20_Training_355": ("W39_1998.09.19_Segm.nii",
                                                 "W39_1998.09.19_Segm.nii.gz")}
NUM_TRAINING_CASES = 369
_CASE = re.compile(r"^BraTS20_(Training|Validation)_(\d{3})$")
# The affines of a case's sequences come from one co-registered space; allow float noise only.
_AFFINE_ATOL_MM = 1e-3


def _case_files(folder: Path, labelled: bool) -> tuple[list[Path], Path | None, list[str]]:
    case = folder.name
    problems = []
    channels = []
    for channel in CHANNEL_ORDER:
        path = find_nifti(folder, f"{case}_{channel}")
        if path is None:
            problems.append(f"{case}: missing {case}_{channel}.nii[.gz]")
        channels.append(path)
    seg = None
    if labelled:
        seg = find_nifti(folder, f"{case}_seg")
        if seg is None:
            seg = next((folder / alias for alias in SEGMENTATION_ALIASES.get(case, ())
                        if (folder / alias).is_file()), None)
        if seg is None:
            problems.append(f"{case}: missing segmentation {case}_seg.nii[.gz]")
    return channels, seg, problems


def _read(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Voxels and affine of a NIfTI file; a damaged or truncated one is named in the error."""
    try:
        image = nib.load(str(path))
        return np.asanyarray(image.dataobj), image.affine
    except Exception as err:  # nibabel raises many types for a broken file
        raise ConversionError(f"{path}: cannot be read as NIfTI ({type(err).__name__}: {err}); "
                              "the file is damaged — re-extract or re-download it.") from None


def _stack_case(args) -> None:
    """Write one case (runs in a worker process when ``workers`` > 1)."""
    case, channel_paths, seg_path, image_out, label_out = args
    arrays, affines = zip(*(_read(p) for p in channel_paths))
    for path, array, affine in zip(channel_paths[1:], arrays[1:], affines[1:]):
        if array.shape != arrays[0].shape:
            raise ConversionError(f"{case}: {path.name} has shape {array.shape} but "
                                  f"{channel_paths[0].name} has {arrays[0].shape}")
        if not np.allclose(affine, affines[0], atol=_AFFINE_ATOL_MM):
            raise ConversionError(f"{case}: {path.name} and {channel_paths[0].name} have "
                                  "different affines (not co-registered)")
    dtype = np.result_type(*arrays)
    stacked = np.stack([a.astype(dtype, copy=False) for a in arrays], axis=-1)
    save_nifti(stacked, affines[0], image_out)
    if seg_path is not None:
        values, seg_affine = _read(seg_path)
        rounded = np.rint(values)
        if not np.array_equal(rounded, values) or rounded.min() < 0 or rounded.max() > 255:
            raise ConversionError(f"{seg_path}: segmentation values must be integers in 0..255; "
                                  f"found {np.unique(values)[:10]}")
        save_nifti(rounded.astype(np.uint8), seg_affine, label_out)


def find_brats_cases(source: Path) -> list[Path]:
    folders = find_dirs(Path(source), lambda d: bool(_CASE.match(d.name)), max_depth=6)
    names = [f.name for f in folders]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConversionError(f"{source}: case folders occur more than once, e.g. {duplicates[:3]}"
                              "; point the manual path at one copy of the training data.")
    return sorted(folders, key=lambda f: f.name)


def convert_brats(source: Path, out_dir: Path, verify: Verify,
                  expect_all_cases: bool = True, workers: int = 1) -> Path:
    """A folder holding the BraTS20_Training_XXX case folders (at any depth) → ``out_dir``.

    ``expect_all_cases``: require all 369 training cases; ``workers``: processes that stack cases
    in parallel (each needs ~1 GB of memory).
    """
    folders = find_brats_cases(Path(source))
    training = [f for f in folders if f.name.startswith("BraTS20_Training_")]
    validation = [f for f in folders if f.name.startswith("BraTS20_Validation_")]
    problems, jobs = [], []
    for folder, labelled in [(f, True) for f in training] + [(f, False) for f in validation]:
        channels, seg, missing = _case_files(folder, labelled)
        problems += missing
        if not missing:
            jobs.append((folder.name, channels, seg))
    if not training:
        problems.append("no BraTS20_Training_XXX case folder found")
    elif expect_all_cases and len(training) != NUM_TRAINING_CASES:
        expected = {f"BraTS20_Training_{n:03d}" for n in range(1, NUM_TRAINING_CASES + 1)}
        absent = sorted(expected - {f.name for f in training})
        problems.append(f"expected {NUM_TRAINING_CASES} training cases, found {len(training)} "
                        f"(missing e.g. {absent[:5]})")
    if problems:
        raise ConversionError(f"{source}: not a complete BraTS 2020 training set: "
                              + "; ".join(problems[:20])
                              + (f" (and {len(problems) - 20} more)" if len(problems) > 20 else "")
                              + ". Re-extract or re-download the archive.")

    def build(temp: Path) -> None:
        tasks, entries, test = [], [], []
        for case, channels, seg in jobs:
            sub = "imagesTr" if seg is not None else "imagesTs"
            tasks.append((case, channels, seg, temp / sub / f"{case}.nii.gz",
                          temp / "labelsTr" / f"{case}.nii.gz"))
            if seg is not None:
                entries.append({"image": f"./imagesTr/{case}.nii.gz",
                                "label": f"./labelsTr/{case}.nii.gz"})
            else:
                test.append(f"./imagesTs/{case}.nii.gz")
        if workers > 1:
            with ProcessPoolExecutor(max_workers=workers) as pool:
                list(pool.map(_stack_case, tasks))
        else:
            for index, task in enumerate(tasks, 1):
                _stack_case(task)
                if index % 25 == 0 or index == len(tasks):
                    log.info("BraTS: stacked %d/%d cases", index, len(tasks))
        index = make_index(
            name="BraTS2020", description="BraTS 2020 training data: pre-operative glioma MRI, "
            "channels stacked t1, t1ce, t2, flair", reference="https://www.med.upenn.edu/cbica/"
            "brats2020/", licence="see the BraTS 2020 data usage agreement",
            channels=CHANNEL_ORDER, labels=BRATS_LABELS, training=entries, test=test)
        write_json(temp / "dataset.json", index)

    log.info("Converting BraTS 2020 (%d training, %d validation cases) into %s", len(training),
             len(validation), out_dir)
    return publish(Path(out_dir), build, verify)
