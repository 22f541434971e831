"""BTCV (Multi-Atlas Labeling Beyond the Cranial Vault, abdomen) → canonical layout.

Source: ``RawData.zip`` from Synapse (syn3379050 in challenge project syn3193805), extracted:
``RawData/Training/{img,label}/img00XX.nii.gz`` / ``label00XX.nii.gz`` (30 labelled CT volumes)
and ``RawData/Testing/img/img00XX.nii.gz`` (20 unlabelled). Case ids keep the archive's image
names (``img0001`` ...), which is what MONAI's 24/6 list and TransUNet's 18/12 list refer to
(``hybridmim.dataset_catalog.BTCV_SPLITS``). Both files of a case are stored under the image's name
(``imagesTr/img0001.nii.gz`` and ``labelsTr/img0001.nii.gz``), as in every MSD task. Volumes are
linked unchanged; labels are 0 (background) … 13 (``registry.BTCV_LABELS``).
"""
from __future__ import annotations

import logging
import re
from pathlib import Path

from hybridmim.data.layout import make_index, strip_nifti_suffix, write_json
from hybridmim.data.sources.convert.common import (ConversionError, Verify, find_dirs, find_nifti,
                                                   link_or_copy,
                                                   nifti_files, publish)
from hybridmim.dataset_catalog import BTCV_LABELS, BTCV_SPLITS

log = logging.getLogger("hybridmim.data.sources.convert.btcv")

_IMAGE = re.compile(r"^img(\d{4})\.nii(\.gz)?$")
BTCV_LABELLED_CASES: tuple[str, ...] = tuple(sorted(
    set(BTCV_SPLITS["monai"].fixed["train"]) | set(BTCV_SPLITS["monai"].fixed["val"])))


def find_btcv_root(source: Path) -> Path:
    """The folder holding ``Training/img`` and ``Training/label`` (normally ``RawData/``)."""
    roots = find_dirs(Path(source), lambda d: (d / "Training" / "img").is_dir()
                      and (d / "Training" / "label").is_dir())
    if len(roots) != 1:
        raise ConversionError(
            f"{source}: expected one BTCV 'RawData' folder with Training/img/ and "
            f"Training/label/, found {[str(r) for r in roots] or 'none'}. Use the Abdomen "
            "'RawData.zip' of the challenge (Synapse syn3379050), not the registration data.")
    return roots[0]


def convert_btcv(source: Path, out_dir: Path, verify: Verify,
                 expect_all_cases: bool = True) -> Path:
    """Extracted ``RawData.zip`` (or a folder holding ``RawData/``) → ``out_dir``.

    ``expect_all_cases``: require exactly the 30 published labelled cases (a smaller set means an
    incomplete archive); tests with a handful of cases turn it off.
    """
    root = find_btcv_root(Path(source))
    pairs, problems = [], []
    for image in nifti_files(root / "Training" / "img"):
        match = _IMAGE.match(image.name)
        if not match:
            problems.append(f"unexpected file {image.name} in {image.parent}")
            continue
        number = match.group(1)
        label = find_nifti(root / "Training" / "label", f"label{number}")
        if label is None:
            problems.append(f"{image.name} has no label{number}.nii.gz in Training/label/")
            continue
        pairs.append((strip_nifti_suffix(image.name), image, label))
    images_ts = [p for p in (nifti_files(root / "Testing" / "img")
                             if (root / "Testing" / "img").is_dir() else [])
                 if _IMAGE.match(p.name)]
    found = {case for case, _, _ in pairs}
    if expect_all_cases and found != set(BTCV_LABELLED_CASES):
        missing = sorted(set(BTCV_LABELLED_CASES) - found)
        extra = sorted(found - set(BTCV_LABELLED_CASES))
        problems.append(f"expected the 30 labelled cases {BTCV_LABELLED_CASES[0]}..."
                        f"{BTCV_LABELLED_CASES[-1]}; missing {missing}, unexpected {extra}")
    if not pairs:
        problems.append("no labelled case found in Training/img/")
    if problems:
        raise ConversionError(f"{root}: not a complete BTCV RawData folder: " + "; ".join(problems)
                              + ". Re-download RawData.zip and run again.")

    def build(temp: Path) -> None:
        training = []
        for case, image, label in pairs:
            suffix = ".nii.gz" if image.name.endswith(".gz") else ".nii"
            link_or_copy(image, temp / "imagesTr" / f"{case}{suffix}")
            label_suffix = ".nii.gz" if label.name.endswith(".gz") else ".nii"
            link_or_copy(label, temp / "labelsTr" / f"{case}{label_suffix}")
            training.append({"case": case, "image": f"./imagesTr/{case}{suffix}",
                             "label": f"./labelsTr/{case}{label_suffix}"})
        test = []
        for image in images_ts:
            link_or_copy(image, temp / "imagesTs" / image.name)
            test.append(f"./imagesTs/{image.name}")
        index = make_index(
            name="BTCV", description="Multi-Atlas Labeling Beyond the Cranial Vault, abdomen: "
            "portal-venous CT with 13 organs labelled", reference="https://www.synapse.org/"
            "#!Synapse:syn3193805/wiki/217789", licence="see the challenge's terms of use "
            "(synapse.org)", channels=("CT",), labels=BTCV_LABELS, training=training, test=test)
        write_json(temp / "dataset.json", index)

    log.info("Converting BTCV (%d labelled, %d test cases) into %s", len(pairs), len(images_ts),
             out_dir)
    return publish(Path(out_dir), build, verify)
