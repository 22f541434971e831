"""Conversion of the real sources' layouts (BTCV zip, BraTS folders/zip, a user's folder) into the
canonical layout, the integrity check, and the manual-download errors. Inputs are tiny random
NIfTIs laid out exactly like the real archives; no network."""
from __future__ import annotations

import json
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from hybridmim.data.integrity import DatasetIntegrityError, check_dataset
from hybridmim.data.layout import make_index, write_json
from hybridmim.data.sources.acquire import ManualDownloadRequired, acquire
from hybridmim.data.sources.convert import ConversionError
from hybridmim.data.sources.convert.brats import CHANNEL_ORDER
from hybridmim.dataset_catalog import DatasetSpec, dataset_from_config, get_dataset

AFFINE = np.array([[-1.0, 0, 0, 90], [0, -1.0, 0, 120], [0, 0, 1.0, -70], [0, 0, 0, 1]])
SHAPE = (9, 8, 6)


def _save(path: Path, array: np.ndarray, affine: np.ndarray = AFFINE) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, affine), str(path))
    return path


def _ct(rng) -> np.ndarray:
    return rng.integers(-1000, 1000, size=SHAPE).astype(np.int16)


def _nothing_under(folder: Path) -> bool:
    return not folder.exists() or not any(folder.iterdir())


# --------------------------------------------------------------------------------------------
# BTCV
def _btcv_zip(tmp_path: Path, numbers=(1, 2, 21), with_labels=True) -> Path:
    rng = np.random.default_rng(0)
    src = tmp_path / "btcv_src"
    for number in numbers:
        _save(src / f"RawData/Training/img/img{number:04d}.nii.gz", _ct(rng))
        if with_labels:
            _save(src / f"RawData/Training/label/label{number:04d}.nii.gz",
                  rng.integers(0, 14, size=SHAPE).astype(np.uint8))
    (src / "RawData/Training/label").mkdir(parents=True, exist_ok=True)
    _save(src / "RawData/Testing/img/img0061.nii.gz", _ct(rng))
    archive = tmp_path / "downloads" / "RawData.zip"
    archive.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(archive, "w") as zf:
        for path in sorted(src.rglob("*")):
            zf.write(path, path.relative_to(src).as_posix())
        zf.writestr("__MACOSX/RawData/._img0001.nii.gz", b"junk")
    return archive


def test_btcv_archive_in_downloads_folder_becomes_canonical(tmp_path):
    _btcv_zip(tmp_path)
    spec = get_dataset("btcv")
    raw = acquire(spec, tmp_path / "raw", tmp_path / "downloads", progress=False,
                  converter_options={"expect_all_cases": False})
    index = json.loads((raw / "dataset.json").read_text())
    assert [e["case"] for e in index["training"]] == ["img0001", "img0002", "img0021"]
    assert index["training"][0] == {"case": "img0001", "image": "./imagesTr/img0001.nii.gz",
                                    "label": "./labelsTr/img0001.nii.gz"}
    assert index["test"] == ["./imagesTs/img0061.nii.gz"]
    assert {int(k) for k in index["labels"]} == set(range(14))
    assert index["labels"]["6"] == "liver" and index["modality"] == {"0": "CT"}
    assert check_dataset(raw, spec.labels, spec.channels) == []
    marker = json.loads((raw / ".acquired.json").read_text())
    assert marker["source"]["file"] == "RawData.zip" and len(marker["source"]["md5"]) == 32
    stamp = (raw / ".acquired.json").stat().st_mtime_ns
    acquire(spec, tmp_path / "raw", tmp_path / "downloads", progress=False)  # done: no-op
    assert (raw / ".acquired.json").stat().st_mtime_ns == stamp
    # case ids match the registry's published splits
    assert set(spec.split_variants["transunet"].fixed["val"]) >= {"img0001", "img0002"}


def test_btcv_incomplete_archive_names_the_missing_cases(tmp_path):
    _btcv_zip(tmp_path)
    with pytest.raises(ConversionError, match=r"30 labelled cases.*img0003") as info:
        acquire(get_dataset("btcv"), tmp_path / "raw", tmp_path / "downloads", progress=False)
    assert "Re-download RawData.zip" in str(info.value)
    assert _nothing_under(tmp_path / "raw")


def test_btcv_image_without_label_is_refused(tmp_path):
    archive = _btcv_zip(tmp_path, numbers=(1,), with_labels=False)
    with pytest.raises(ConversionError, match="img0001.nii.gz has no label0001"):
        acquire(get_dataset("btcv"), tmp_path / "raw", tmp_path / "downloads",
                manual_paths={"btcv": archive}, progress=False,
                converter_options={"expect_all_cases": False})
    assert _nothing_under(tmp_path / "raw")


def test_btcv_missing_gives_precise_manual_instructions(tmp_path):
    with pytest.raises(ManualDownloadRequired) as info:
        acquire(get_dataset("btcv"), tmp_path / "raw", tmp_path / "downloads", progress=False,
                environ={})
    message = str(info.value)
    for needle in ("syn3193805", "syn3379050", "RawData.zip", "SYNAPSE_AUTH_TOKEN",
                   str(tmp_path / "downloads" / "RawData.zip"), "publishes no checksum"):
        assert needle in message
    assert _nothing_under(tmp_path / "raw")


# --------------------------------------------------------------------------------------------
# BraTS 2020
def _brats_tree(root: Path, cases=(1, 2, 355), gz: bool = False) -> dict[str, dict]:
    """Kaggle-mirror layout; case 355's segmentation carries its official-release misnomer."""
    rng = np.random.default_rng(7)
    ext = ".nii.gz" if gz else ".nii"
    written = {}
    base = root / "BraTS2020_TrainingData" / "MICCAI_BraTS2020_TrainingData"
    for number in cases:
        case = f"BraTS20_Training_{number:03d}"
        arrays = {}
        for offset, channel in enumerate(CHANNEL_ORDER):
            arrays[channel] = (rng.random(SHAPE) * 100 + offset * 1000).astype(np.float32)
            _save(base / case / f"{case}_{channel}{ext}", arrays[channel])
        seg = rng.choice(np.array([0, 1, 2, 4], dtype=np.uint8), size=SHAPE)
        seg_name = "W39_1998.09.19_Segm.nii" if number == 355 else f"{case}_seg{ext}"
        _save(base / case / seg_name, seg)
        arrays["seg"] = seg
        written[case] = arrays
    (base / "name_mapping.csv").write_text("BraTS_2020_subject_ID\n")
    return written


def test_brats_folder_stacks_channels_in_order_and_handles_case_355(tmp_path):
    written = _brats_tree(tmp_path / "kaggle")
    spec = get_dataset("brats2020")
    raw = acquire(spec, tmp_path / "raw", tmp_path / "downloads",
                  manual_paths={"brats2020": tmp_path / "kaggle"}, progress=False,
                  converter_options={"expect_all_cases": False})
    index = json.loads((raw / "dataset.json").read_text())
    assert index["modality"] == {"0": "t1", "1": "t1ce", "2": "t2", "3": "flair"}
    assert index["tensorImageSize"] == "4D"
    assert [Path(e["image"]).name for e in index["training"]] == [
        "BraTS20_Training_001.nii.gz", "BraTS20_Training_002.nii.gz",
        "BraTS20_Training_355.nii.gz"]
    for case, arrays in written.items():
        image = nib.load(str(raw / "imagesTr" / f"{case}.nii.gz"))
        assert image.shape == SHAPE + (4,)
        np.testing.assert_allclose(image.affine, AFFINE)
        data = np.asanyarray(image.dataobj)
        for position, channel in enumerate(CHANNEL_ORDER):
            np.testing.assert_array_equal(data[..., position], arrays[channel])
        label = np.asanyarray(nib.load(str(raw / "labelsTr" / f"{case}.nii.gz")).dataobj)
        assert label.dtype == np.uint8
        np.testing.assert_array_equal(label, arrays["seg"])  # 0/1/2/4 kept as is
    assert check_dataset(raw, spec.labels, spec.channels) == []
    # the user's folder is left alone
    assert (tmp_path / "kaggle" / "BraTS2020_TrainingData").is_dir()


def test_brats_zip_in_downloads_folder_stacked_by_two_workers(tmp_path):
    _brats_tree(tmp_path / "src", cases=(5, 6), gz=True)
    archive = tmp_path / "downloads" / "MICCAI_BraTS2020_TrainingData.zip"
    archive.parent.mkdir()
    with zipfile.ZipFile(archive, "w") as zf:
        for path in sorted((tmp_path / "src").rglob("*")):
            zf.write(path, path.relative_to(tmp_path / "src").as_posix())
    raw = acquire(get_dataset("brats2020"), tmp_path / "raw", tmp_path / "downloads",
                  progress=False, converter_options={"expect_all_cases": False, "workers": 2})
    assert sorted(p.name for p in (raw / "labelsTr").iterdir()) == [
        "BraTS20_Training_005.nii.gz", "BraTS20_Training_006.nii.gz"]


def test_brats_missing_channel_and_missing_dataset_errors(tmp_path):
    _brats_tree(tmp_path / "src", cases=(1, 2))
    (tmp_path / "src/BraTS2020_TrainingData/MICCAI_BraTS2020_TrainingData/BraTS20_Training_002/"
     "BraTS20_Training_002_t1ce.nii").unlink()
    with pytest.raises(ConversionError, match="BraTS20_Training_002: missing "
                                              "BraTS20_Training_002_t1ce"):
        acquire(get_dataset("brats2020"), tmp_path / "raw", tmp_path / "downloads",
                manual_paths={"brats2020": tmp_path / "src"}, progress=False,
                converter_options={"expect_all_cases": False})
    with pytest.raises(ManualDownloadRequired, match="brats2020/registration.html") as info:
        acquire(get_dataset("brats2020"), tmp_path / "raw", tmp_path / "downloads",
                progress=False)
    assert "MICCAI_BraTS2020_TrainingData.zip" in str(info.value)
    assert "No official checksum" in str(info.value)
    assert _nothing_under(tmp_path / "raw")


# --------------------------------------------------------------------------------------------
# A user's own folder and the integrity check
def _user_folder(root: Path, n: int = 3) -> Path:
    rng = np.random.default_rng(3)
    training = []
    for number in range(1, n + 1):
        name = f"case_{number}.nii.gz"
        _save(root / "imagesTr" / name, _ct(rng))
        _save(root / "labelsTr" / name, (rng.random(SHAPE) > 0.5).astype(np.uint8))
        training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
    (root / "imagesTs").mkdir()
    write_json(root / "dataset.json", make_index(
        name="mine", description="", reference="", licence="", channels=("CT",),
        labels={0: "background", 1: "spleen"}, training=training, test=[]))
    return root


def _folder_spec(folder: Path) -> DatasetSpec:
    return dataset_from_config("mine", {"modality": "CT", "labels": {0: "background", 1: "spleen"},
                                        "folder": str(folder)})


def test_user_folder_is_checked_linked_and_idempotent(tmp_path):
    folder = _user_folder(tmp_path / "mine")
    raw = acquire(_folder_spec(folder), tmp_path / "raw", tmp_path / "downloads")
    assert sorted(p.name for p in (raw / "imagesTr").iterdir()) == [
        "case_1.nii.gz", "case_2.nii.gz", "case_3.nii.gz"]
    stamp = (raw / ".acquired.json").stat().st_mtime_ns
    acquire(_folder_spec(folder), tmp_path / "raw", tmp_path / "downloads")
    assert (raw / ".acquired.json").stat().st_mtime_ns == stamp  # nothing redone


def _break(folder: Path, how: str) -> str:
    """Damage case_2 of a user folder; return the text the error must contain."""
    image, label = folder / "imagesTr/case_2.nii.gz", folder / "labelsTr/case_2.nii.gz"
    rng = np.random.default_rng(9)
    if how == "unreadable":
        image.write_bytes(b"this is not a NIfTI file")
        return "unreadable NIfTI"
    if how == "truncated":
        image.write_bytes(image.read_bytes()[:200])
        return "unreadable NIfTI"
    if how == "shape":
        _save(label, np.zeros((9, 8, 5), np.uint8))
        return "label shape (9, 8, 5) differs from image shape (9, 8, 6)"
    if how == "affine":
        shifted = AFFINE.copy()
        shifted[0, 3] += 5
        _save(label, (rng.random(SHAPE) > 0.5).astype(np.uint8), shifted)
        return "label affine differs"
    if how == "nan":
        data = _ct(rng).astype(np.float32)
        data[1, 2, 3] = np.nan
        _save(image, data)
        return "1 NaN/Inf voxel(s)"
    if how == "label_outside":
        data = np.zeros(SHAPE, np.uint8)
        data[0, 0, 0] = 7
        _save(label, data)
        return "label values [7] are not in the label map [0, 1]"
    if how == "constant":
        _save(image, np.full(SHAPE, -1000, np.int16))
        return "image is constant"
    if how == "missing":
        label.unlink()
        return "./labelsTr/case_2.nii.gz: listed in dataset.json but missing"
    raise AssertionError(how)


@pytest.mark.parametrize("how", ["unreadable", "truncated", "shape", "affine", "nan",
                                 "label_outside", "constant", "missing"])
def test_bad_case_is_named_and_nothing_is_published(tmp_path, how):
    folder = _user_folder(tmp_path / "mine")
    needle = _break(folder, how)
    with pytest.raises(DatasetIntegrityError) as info:
        acquire(_folder_spec(folder), tmp_path / "raw", tmp_path / "downloads")
    assert needle in str(info.value)
    assert info.value.problems and all(p.startswith("case_2: ") for p in info.value.problems)
    assert _nothing_under(tmp_path / "raw")


def test_every_problem_is_reported_at_once(tmp_path):
    folder = _user_folder(tmp_path / "mine", n=4)
    _break(folder, "nan")
    _save(folder / "labelsTr/case_3.nii.gz", np.full(SHAPE, 3, np.uint8))
    (folder / "imagesTr/case_4.nii.gz").write_bytes(b"garbage")
    (folder / "imagesTr/stray.nii.gz").write_bytes(b"not listed")
    index = json.loads((folder / "dataset.json").read_text())
    index["numTraining"] = 7
    write_json(folder / "dataset.json", index)
    problems = check_dataset(folder, {0: "bg", 1: "spleen"}, ("CT",))
    text = "\n".join(problems)
    assert "case_2: ./imagesTr/case_2.nii.gz: 1 NaN/Inf" in text
    assert "case_3: ./labelsTr/case_3.nii.gz: label values [3]" in text
    assert "case_4: ./imagesTr/case_4.nii.gz: unreadable NIfTI" in text
    assert "imagesTr/stray.nii.gz: present but not listed" in text
    assert "numTraining is 7 but 'training' lists 4" in text
    assert len(problems) == 5
    # the wrong channel count and label map are reported too
    problems = check_dataset(folder, {0: "bg", 1: "a", 2: "b"}, ("t1", "t2"))
    assert any("declares 1 channel(s)" in p for p in problems)
    assert any("case_1: image has 1 channel(s), the dataset declares 2" in p for p in problems)
    assert any("labels [0, 1] differ from the label map of the registry entry [0, 1, 2]" in p
               for p in problems)
