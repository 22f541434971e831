"""A real abdominal CT (TotalSegmentator test reference, CC-BY-4.0; Wasserthal et al., Radiology:
AI 2023) through the acquisition layer and preprocessing, as three tasks: MSD-Spleen-like,
MSD-Liver-like and BTCV-like multi-organ. The files are read from ../shared (never copied into the
repository); the canonical folders are built in pytest's tmp folder."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from hybridmim.data.integrity import check_dataset
from hybridmim.data.layout import make_index, write_json
from hybridmim.data.sources.acquire import acquire
from hybridmim.dataset_catalog import get_dataset

from conftest import REAL_CT as REAL_CT_DIR  # noqa: E402
CT, SEG = REAL_CT_DIR / "example_ct_sm.nii.gz", REAL_CT_DIR / "example_seg.nii.gz"

# TotalSegmentator v2 "total" label -> BTCV index (../shared/data/real_ct_small/README.md);
# BTCV 5 (esophagus) has no counterpart in this file.
TOTALSEG_TO_BTCV = {1: 1, 2: 2, 3: 3, 4: 4, 5: 6, 6: 7, 7: 11, 8: 12, 9: 13, 52: 8, 63: 9, 64: 10}

pytestmark = pytest.mark.skipif(
    not (CT.is_file() and SEG.is_file()),
    reason=f"the real CT example is not available at {REAL_CT_DIR} (shared test data)")


@pytest.fixture(scope="module")
def real_ct():
    ct, seg = nib.load(str(CT)), nib.load(str(SEG))
    return np.asanyarray(ct.dataobj), np.asanyarray(seg.dataobj), ct.affine


def _relabel(seg: np.ndarray, mapping: dict[int, int]) -> np.ndarray:
    lookup = np.zeros(256, np.uint8)
    for source, target in mapping.items():
        lookup[source] = target
    return lookup[seg]


def _to_lps_storage(array: np.ndarray, affine: np.ndarray):
    """The same physical image stored with x and y reversed (as most scanners write it)."""
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    flip[0, 3], flip[1, 3] = array.shape[0] - 1, array.shape[1] - 1
    return array[::-1, ::-1].copy(), affine @ flip


def _task_folder(root: Path, name: str, image: np.ndarray, label: np.ndarray, affine: np.ndarray,
                 labels: dict[int, str]) -> Path:
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        (root / sub).mkdir(parents=True)
    nib.save(nib.Nifti1Image(image, affine), str(root / "imagesTr" / "ct_001.nii.gz"))
    nib.save(nib.Nifti1Image(label, affine), str(root / "labelsTr" / "ct_001.nii.gz"))
    write_json(root / "dataset.json", make_index(
        name=name, description="TotalSegmentator example CT (CC-BY-4.0)", reference="Wasserthal "
        "et al., Radiology: AI 2023", licence="CC-BY-4.0", channels=("CT",), labels=labels,
        training=[{"image": "./imagesTr/ct_001.nii.gz", "label": "./labelsTr/ct_001.nii.gz"}],
        test=[]))
    return root


def _acquire_and_preprocess(tmp_path: Path, registry_name: str, folder: Path):
    from hybridmim.data.prepare.preprocess import preprocess_dataset

    spec = dataclasses.replace(get_dataset(registry_name),
                               source={"kind": "folder", "path": str(folder)})
    raw = acquire(spec, tmp_path / "raw", tmp_path / "downloads")
    assert check_dataset(raw, spec.labels, spec.channels) == []
    out = preprocess_dataset(raw, tmp_path / "processed" / registry_name, spec)
    index = json.loads((out / "dataset.json").read_text())
    (case,) = index["cases"]
    image = np.load(out / case["image"])
    label = np.load(out / case["label"])
    return spec, case, image, label


def _centroid_x(label: np.ndarray, value: int) -> float:
    return float(np.argwhere(label == value)[:, 0].mean())


def test_real_ct_as_spleen_liver_and_btcv_tasks(tmp_path, real_ct):
    ct, seg, affine = real_ct
    voxel_mm3 = float(abs(np.linalg.det(affine[:3, :3])))
    spleen = _task_folder(tmp_path / "src_spleen", "spleen", ct, _relabel(seg, {1: 1}), affine,
                          {0: "background", 1: "spleen"})
    liver = _task_folder(tmp_path / "src_liver", "liver", ct, _relabel(seg, {5: 1}), affine,
                         {0: "background", 1: "liver", 2: "tumour"})
    # The BTCV-like copy is stored LPS, so reorientation to RAS is exercised on real anatomy.
    lps_ct, lps_affine = _to_lps_storage(ct, affine)
    lps_seg, _ = _to_lps_storage(_relabel(seg, TOTALSEG_TO_BTCV), affine)
    btcv_labels = dict(get_dataset("btcv").labels)
    btcv = _task_folder(tmp_path / "src_btcv", "btcv", lps_ct, lps_seg, lps_affine, btcv_labels)

    spec, s_case, s_image, s_label = _acquire_and_preprocess(tmp_path, "msd_spleen", spleen)
    _, l_case, l_image, l_label = _acquire_and_preprocess(tmp_path, "msd_liver", liver)
    b_spec, b_case, b_image, b_label = _acquire_and_preprocess(tmp_path, "btcv", btcv)

    target = list(spec.preprocess.spacing)
    for case, image, label in ((s_case, s_image, s_label), (l_case, l_image, l_label),
                               (b_case, b_image, b_label)):
        assert case["spacing"] == pytest.approx(target)  # 1.5 x 1.5 x 2.0 mm
        assert image.dtype == np.float32 and image.shape[0] == 1
        assert image.shape[1:] == label.shape
        assert -1100 <= image.min() and image.max() <= 1300  # still Hounsfield units
    # labels: exactly the mapped organs (esophagus absent), and organ volumes kept by resampling
    assert set(np.unique(s_label)) == {0, 1}
    assert set(np.unique(l_label)) == {0, 1}
    assert set(np.unique(b_label)) == set(range(14)) - {5}
    resampled_mm3 = float(np.prod(target))
    for label, value, source_value in ((s_label, 1, 1), (l_label, 1, 5), (b_label, 6, 5)):
        before = np.count_nonzero(seg == source_value) * voxel_mm3
        after = np.count_nonzero(label == value) * resampled_mm3
        assert after == pytest.approx(before, rel=0.1)
    # orientation: in a RAS array x grows towards the patient's right, so the liver and the right
    # kidney lie at higher x than the spleen and the left kidney; the LPS-stored copy must come
    # out identical to the RAS-stored one
    assert _centroid_x(b_label, 6) > _centroid_x(b_label, 1) + 50
    assert _centroid_x(b_label, 2) > _centroid_x(b_label, 3) + 30
    np.testing.assert_array_equal(b_label == 1, s_label == 1)
    np.testing.assert_allclose(b_image, s_image)


def test_real_ct_with_unmapped_labels_fails_the_btcv_check(tmp_path, real_ct):
    ct, seg, affine = real_ct
    folder = _task_folder(tmp_path / "raw_ts", "ts", ct, seg, affine,
                          dict(get_dataset("btcv").labels))
    problems = check_dataset(folder, get_dataset("btcv").labels, ("CT",))
    assert len(problems) == 1
    assert problems[0].startswith("ct_001: ./labelsTr/ct_001.nii.gz: label values [14, 18, 19")
