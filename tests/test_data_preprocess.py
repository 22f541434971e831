"""Registry entries and config blocks; preprocessing of the demo datasets and of a real CT:
output format, orientation, spacing, idempotence, invalidation, clear errors, atomicity."""

import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from hybridmim.data.demo import generate_demo
from hybridmim.data.layout import make_index, save_nifti, write_json
from hybridmim.data.prepare.preprocess import (PreprocessError, preprocess_dataset,
                                               preprocessing_recipe)
from hybridmim.data.prepare.splits import SplitError, load_splits, make_splits
from hybridmim.dataset_catalog import (REGISTRY, DatasetConfigError, dataset_from_config,
                                       get_dataset)
from hybridmim.hashing import spec_hash

from conftest import REAL_CT  # noqa: E402


# --------------------------------------------------------------------------------- registry
def test_registry_has_real_and_demo_datasets():
    assert {"brats2020", "btcv", "msd_liver", "msd_spleen", "demo_brats", "demo_btcv",
            "demo_liver", "demo_spleen"} <= set(REGISTRY)
    brats = get_dataset("brats2020")
    assert brats.modality == "MRI" and brats.channels == ("t1", "t1ce", "t2", "flair")
    assert brats.labels == {0: "background", 1: "NCR/NET", 2: "ED", 4: "ET"}
    assert brats.regions == {"TC": (1, 4), "WT": (1, 2, 4), "ET": (4,)}
    assert brats.num_classes == 3 and brats.source["kind"] == "manual"
    btcv = get_dataset("btcv")
    assert len(btcv.labels) == 14 and btcv.labels[10] == "portal and splenic veins"
    assert btcv.preprocess.spacing == (1.5, 1.5, 2.0)
    assert btcv.windows["finetune"]["a_min"] == -175 and btcv.windows["pretrain"]["b_min"] == 0.001
    assert get_dataset("msd_liver").source["md5"] == "a90ec6c4aa7f6a3d087205e23d4e6397"
    spleen = get_dataset("msd_spleen")
    assert spleen.source["md5"] == "410d4a301da4e5b2f6f86ec3ddba524e"
    assert spleen.source["url"].endswith("/Task09_Spleen.tar")
    assert spleen.split.describe() == "fraction:0.8/0/0.2,val_is_test"
    assert json.loads(json.dumps(btcv.to_dict()))["labels"]["1"] == "spleen"


@pytest.mark.parametrize("variant, train, test", [("monai", 24, 6), ("transunet", 18, 12)])
def test_btcv_published_splits(variant, train, test):
    split = dataset_from_config("btcv", {"split": variant}).split
    assert (len(split.fixed["train"]), len(split.fixed["test"])) == (train, test)
    assert not set(split.fixed["train"]) & set(split.fixed["test"])
    assert "img0035" in split.fixed["test"] and "img0011" not in split.fixed["train"]


def test_overrides_and_user_blocks():
    coarse = dataset_from_config("msd_spleen", {"spacing": [2, 2, 3], "include_unlabelled": True})
    assert coarse.preprocess.spacing == (2.0, 2.0, 3.0) and coarse.preprocess.include_unlabelled
    assert get_dataset("msd_spleen").preprocess.spacing == (1.5, 1.5, 2.0)  # entry unchanged
    own = dataset_from_config("my_kidneys", {
        "modality": "ct", "labels": {"0": "background", "1": "kidney", "2": "cyst"},
        "folder": "/data/kidneys", "split": {"kind": "fraction", "train": 0.5, "val": 0.25,
                                             "test": 0.25, "seed": 3}})
    assert own.modality == "CT" and own.labels == {0: "background", 1: "kidney", 2: "cyst"}
    assert own.source == {"kind": "folder", "path": "/data/kidneys"}
    assert own.split.fractions == (0.5, 0.25, 0.25) and own.split.seed == 3
    # A user's CT is clipped to its own foreground intensities (fingerprint), not to the abdomen's.
    assert own.windows["finetune"]["kind"] == "ct_foreground"
    assert own.preprocess.spacing == "median"
    # Single-channel MRI needs no 'channels' key (it used to be refused).
    mri = dataset_from_config("my_brains", {"modality": "MRI", "labels": {0: "bg", 1: "lesion"},
                                            "folder": "/data/brains"})
    assert mri.num_channels == 1 and mri.preprocess.normalize == "zscore_nonzero_channelwise"


@pytest.mark.parametrize("call, message", [
    (lambda: get_dataset("nope"), "unknown dataset 'nope'"),
    (lambda: dataset_from_config("btcv", {"spacingg": [1, 1, 1]}), "'spacingg'"),
    (lambda: dataset_from_config("btcv", {"split": "nnunet"}), "unknown split 'nnunet'"),
    (lambda: dataset_from_config("btcv", {"spacing": [1, 1]}),
     r"datasets.btcv.spacing: \[1, 1\] is too short \(Target voxel size: three positive"),
    (lambda: dataset_from_config("btcv", {"split": {"kind": "fixed", "train": []}}),
     r"datasets.btcv.split.train: \[\] should be non-empty"),
    (lambda: dataset_from_config("btcv", {"split": {"kind": "fraction", "train": 0.8, "val": 0.2}}),
     r"missing \['datasets.btcv.split.test'\]"),
    (lambda: dataset_from_config("btcv", {"normalize": "minmax"}),
     "datasets.btcv.normalize: 'minmax'"),
    (lambda: dataset_from_config("mine", {"modality": "CT", "folder": "/x"}), r"\['labels'\]"),
    (lambda: dataset_from_config("mine", {"modality": "MRI", "lables": {0: "bg"},
                                          "folder": "/x"}),
     r"unknown key 'lables' \(did you mean 'labels'\?\); allowed keys are \[.*'manual_path'"),
    (lambda: dataset_from_config("mine", {"modality": "MRI", "labels": {0: "bg"},
                                          "foldr": "/x"}), r"'foldr' \(did you mean 'folder'\?\)"),
    (lambda: dataset_from_config("mine", {"modality": "CT", "labels": {0: "bg"}, "folder": "/x",
                                          "num_case": 3}), r"'num_case' \(did you mean 'num_cases"),
    (lambda: dataset_from_config("mine", {"modality": "PET", "labels": {0: "bg"},
                                          "folder": "/x"}), "modality must be CT or MRI"),
    (lambda: dataset_from_config("mine", {"modality": "CT", "labels": {1: "x"}, "folder": "/x"}),
     "must include 0"),
    (lambda: dataset_from_config("btcv", {"windows": {"finetune": {"kind": "ct", "a_min": 0}}}),
     "windows.finetune"),
    (lambda: dataset_from_config("btcv", {"split": {"kind": "fraction", "train": 0.5, "val": 0.1,
                                            "test": 0.1}}), "sum to 1"),
])
def test_bad_registry_use_names_dataset_and_key(call, message):
    with pytest.raises(DatasetConfigError, match=message):
        call()


# ------------------------------------------------------------------------------ demo data
@pytest.fixture(scope="module")
def processed(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    result = {}
    for kind in ("brats", "btcv", "liver", "spleen"):
        raw = generate_demo(kind, root / "raw" / kind, num_cases=4, num_test=1, seed=5)
        spec = get_dataset(f"demo_{kind}")
        result[kind] = (raw, preprocess_dataset(raw, root / "processed" / kind, spec), spec)
    return result


def _index(folder: Path) -> dict:
    return json.loads((folder / "dataset.json").read_text())


@pytest.mark.parametrize("kind", ["brats", "btcv", "liver", "spleen"])
def test_demo_preprocessing_output_format(processed, kind):
    _, out, spec = processed[kind]
    index = _index(out)
    assert index["recipe_hash"] == spec_hash(preprocessing_recipe(spec))
    assert index["recipe"]["spacing"] == list(spec.preprocess.spacing)
    assert index["name"] == f"demo_{kind}" and index["channels"] == list(spec.channels)
    assert len(index["cases"]) == 4  # imagesTs is not cached unless asked
    for case in index["cases"]:
        image, label = np.load(out / case["image"]), np.load(out / case["label"])
        assert image.dtype == np.float32 and label.dtype == np.uint8
        assert list(image.shape) == case["shape"] and image.shape[1:] == label.shape
        assert image.shape[0] == spec.num_channels and max(image.shape[1:]) <= 64
        assert np.allclose(case["spacing"], spec.preprocess.spacing)
        assert set(np.unique(label).tolist()) <= set(spec.labels)
        assert (label > 0).any()
        if spec.modality == "CT":  # HU kept: air and soft tissue, no window applied
            assert image.min() < -800 and image.max() > 200
        else:
            for channel in image:
                brain = channel[channel != 0]
                assert abs(brain.mean()) < 1e-3 and abs(brain.std() - 1) < 1e-2
    assert not list(out.parent.glob(f".{kind}.*"))


def test_demo_preprocessing_reorients_to_ras(processed):
    """The demo is stored LPS; after preprocessing the liver (patient's right) must sit at higher
    x indices than the spleen, and the aorta (posterior) at lower y than the stomach."""
    _, out, _ = processed["btcv"]
    for case in _index(out)["cases"]:
        label = np.load(out / case["label"])
        centroid = {v: np.argwhere(label == v).mean(0) for v in (1, 6, 7, 8)}
        assert centroid[6][0] > centroid[1][0] + 10
        assert centroid[8][1] < centroid[7][1]


def test_idempotent_and_recipe_or_raw_change_rebuilds(tmp_path):
    raw = generate_demo("spleen", tmp_path / "raw", num_cases=3, num_test=1, seed=0)
    out = tmp_path / "processed"
    spec = get_dataset("demo_spleen")
    preprocess_dataset(raw, out, spec)
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    preprocess_dataset(raw, out, spec)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == stamps

    splits = make_splits(out, spec)
    coarse = dataset_from_config("demo_spleen", {"spacing": [3.0, 3.0, 4.0]})
    preprocess_dataset(raw, out, coarse)
    assert load_splits(out) == splits  # a rebuild keeps the splits
    index = _index(out)
    assert index["recipe_hash"] == spec_hash(preprocessing_recipe(coarse))
    assert index["recipe_hash"] != spec_hash(preprocessing_recipe(spec))
    assert np.allclose(index["cases"][0]["spacing"], [3, 3, 4])
    assert max(index["cases"][0]["shape"][1:]) <= 32

    with_test = dataset_from_config("demo_spleen", {"spacing": [3.0, 3.0, 4.0],
                                            "include_unlabelled": True})
    preprocess_dataset(raw, out, with_test)
    assert [c["label"] for c in _index(out)["cases"]][-1] is None

    (out / "cases" / "spleen_001_image.npy").unlink()  # a missing file also triggers a rebuild
    preprocess_dataset(raw, out, with_test)
    assert (out / "cases" / "spleen_001_image.npy").is_file()

    for folder in ("imagesTr", "labelsTr"):  # case 2 gets case 1's content under its own name
        (raw / folder / "spleen_002.nii.gz").write_bytes(
            (raw / folder / "spleen_001.nii.gz").read_bytes())
    preprocess_dataset(raw, out, with_test)
    assert np.array_equal(np.load(out / "cases" / "spleen_002_image.npy"),
                          np.load(out / "cases" / "spleen_001_image.npy"))

    raw_index = _index(raw)
    raw_index["training"] = raw_index["training"][:1]
    raw_index["numTraining"] = 1
    write_json(raw / "dataset.json", raw_index)
    preprocess_dataset(raw, out, with_test)
    assert [c["case"] for c in _index(out)["cases"]] == ["spleen_001", "spleen_004"]
    with pytest.raises(SplitError, match="different set of labelled cases"):
        make_splits(out, with_test)  # the case set changed under the existing splits
    assert sorted(p.name for p in tmp_path.iterdir()) == ["processed", "raw"]


def test_user_dataset_from_config_block(tmp_path):
    raw = generate_demo("liver", tmp_path / "raw", num_cases=2, num_test=0, seed=2)
    spec = dataset_from_config("my_liver", {"modality": "CT", "folder": str(raw), "labels": {
        0: "background", 1: "liver", 2: "lesion"}, "spacing": [2.0, 2.0, 2.0]})
    out = preprocess_dataset(spec.source["path"], tmp_path / "processed", spec)
    index = _index(out)
    assert index["dataset"] == "my_liver" and index["labels"]["2"] == "lesion"
    assert np.allclose(index["cases"][1]["spacing"], 2.0)


def test_multichannel_as_one_file_per_channel_matches_4d(tmp_path):
    raw = generate_demo("brats", tmp_path / "raw4d", num_cases=1, num_test=0, seed=1)
    spec = get_dataset("demo_brats")
    image = nib.load(raw / "imagesTr" / "brats_001.nii.gz")
    split = tmp_path / "split"
    (split / "imagesTr").mkdir(parents=True)
    (split / "labelsTr").mkdir()
    files = []
    for channel, name in enumerate(spec.channels):
        path = split / "imagesTr" / f"brats_001_{name}.nii.gz"
        save_nifti(np.asarray(image.dataobj)[..., channel], image.affine, path)
        files.append(f"./imagesTr/{path.name}")
    label_path = split / "labelsTr" / "brats_001.nii.gz"
    label_path.write_bytes((raw / "labelsTr" / "brats_001.nii.gz").read_bytes())
    write_json(split / "dataset.json", make_index(
        name="split", description="", reference="", licence="", channels=spec.channels,
        labels=spec.labels, training=[{"image": files, "label": "./labelsTr/brats_001.nii.gz"}],
        test=[]))
    a = preprocess_dataset(raw, tmp_path / "p4d", spec)
    b = preprocess_dataset(split, tmp_path / "psplit", spec)
    case_a, case_b = _index(a)["cases"][0], _index(b)["cases"][0]
    assert case_b["case"] == "brats_001" and case_a["shape"] == case_b["shape"]
    assert np.allclose(np.load(a / case_a["image"]), np.load(b / case_b["image"]), atol=1e-5)
    assert (np.load(a / case_a["label"]) == np.load(b / case_b["label"])).all()


# ----------------------------------------------------------------------------- bad inputs
def _corrupt(raw: Path, how: str) -> Path:
    """Damage case 2 of a 2-case spleen dataset; return the file that is now wrong."""
    image_path = raw / "imagesTr" / "spleen_002.nii.gz"
    label_path = raw / "labelsTr" / "spleen_002.nii.gz"
    image, label = nib.load(image_path), nib.load(label_path)
    data = np.asarray(image.dataobj).astype(np.float32)
    if how == "nan":
        data[3, 4, 5] = np.nan
        save_nifti(data, image.affine, image_path)
        return image_path
    if how == "empty":
        save_nifti(np.full(data.shape, -1024, np.int16), image.affine, image_path)
        return image_path
    if how == "unreadable":
        image_path.write_bytes(image_path.read_bytes()[:300])
        return image_path
    labels = np.asarray(label.dataobj).copy()
    if how == "label_out_of_map":
        labels[labels == 1] = 7
        save_nifti(labels, label.affine, label_path)
    elif how == "shape":
        save_nifti(labels[:-3], label.affine, label_path)
    elif how == "affine":
        shifted = label.affine.copy()
        shifted[0, 3] += 5.0
        save_nifti(labels, shifted, label_path)
    return label_path


@pytest.mark.parametrize("how, message", [
    ("nan", "NaN or infinite"), ("unreadable", "cannot be read as NIfTI"),
    ("label_out_of_map", r"label value\(s\) \[7\.0\]"), ("shape", "differs from its image"),
    ("affine", "affine differs"), ("empty", "no voxel above the foreground threshold"),
])
def test_bad_input_is_named_and_leaves_no_partial_output(tmp_path, how, message):
    raw = generate_demo("spleen", tmp_path / "raw", num_cases=2, num_test=0, seed=4)
    spec = get_dataset("demo_spleen")
    out = tmp_path / "processed"
    preprocess_dataset(raw, out, spec)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    bad_file = _corrupt(raw, how)
    with pytest.raises(PreprocessError, match=message) as error:
        preprocess_dataset(raw, out, spec)
    assert str(bad_file) in str(error.value)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before  # old cache kept
    assert sorted(p.name for p in tmp_path.iterdir()) == ["processed", "raw"]
    with pytest.raises(PreprocessError):
        preprocess_dataset(raw, tmp_path / "fresh", spec)
    assert not (tmp_path / "fresh").exists()


def test_labels_cut_by_the_foreground_crop_are_reported(tmp_path, caplog):
    raw = generate_demo("spleen", tmp_path / "raw", num_cases=1, num_test=0, seed=4)
    label_path = raw / "labelsTr" / "spleen_001.nii.gz"
    label = nib.load(label_path)
    labels = np.asarray(label.dataobj).copy()
    labels[:3, :3, :3] = 1  # a corner of air, outside the body
    save_nifti(labels, label.affine, label_path)
    with caplog.at_level("WARNING", logger="hybridmim.data.prepare.preprocess"):
        preprocess_dataset(raw, tmp_path / "p", get_dataset("demo_spleen"))
    assert "spleen_001.nii.gz: the foreground crop" in caplog.text


def test_missing_files_and_channel_mismatch_are_named(tmp_path):
    raw = generate_demo("spleen", tmp_path / "raw", num_cases=2, num_test=0, seed=4)
    with pytest.raises(ValueError, match="expects"):
        preprocess_dataset(raw, tmp_path / "p", get_dataset("demo_brats"))
    (raw / "labelsTr" / "spleen_001.nii.gz").unlink()
    with pytest.raises(ValueError, match="spleen_001.nii.gz: listed in .* but missing"):
        preprocess_dataset(raw, tmp_path / "p", get_dataset("demo_spleen"))
    assert not (tmp_path / "p").exists()


# -------------------------------------------------------------------------------- real CT
def _real_spleen_task(folder: Path, flip_to_lps: bool) -> Path:
    """The TotalSegmentator example as an MSD-Spleen-like case: label 1 (spleen) → 1, all other
    structures → 0. With ``flip_to_lps`` the same voxels are stored in LPS order."""
    ct, seg = nib.load(REAL_CT / "example_ct_sm.nii.gz"), nib.load(REAL_CT / "example_seg.nii.gz")
    (folder / "imagesTr").mkdir(parents=True)
    (folder / "labelsTr").mkdir()
    spleen = (np.asarray(seg.dataobj) == 1).astype(np.uint8)
    if flip_to_lps:
        flip = np.diag([-1.0, -1.0, 1.0, 1.0])
        flip[:2, 3] = [ct.shape[0] - 1, ct.shape[1] - 1]
        affine = ct.affine @ flip
        save_nifti(np.asarray(ct.dataobj)[::-1, ::-1].copy(), affine,
                   folder / "imagesTr" / "ct_001.nii.gz")
        save_nifti(spleen[::-1, ::-1].copy(), affine, folder / "labelsTr" / "ct_001.nii.gz")
    else:  # the real file itself, read in place from ../shared (never copied into the repo)
        (folder / "imagesTr" / "ct_001.nii.gz").symlink_to(REAL_CT / "example_ct_sm.nii.gz")
        save_nifti(spleen, seg.affine, folder / "labelsTr" / "ct_001.nii.gz")
    write_json(folder / "dataset.json", make_index(
        name="real_ct_spleen", description="TotalSegmentator example, spleen only",
        reference="Wasserthal et al., Radiology: AI 2023", licence="CC-BY-4.0", channels=("CT",),
        labels={0: "background", 1: "spleen"},
        training=[{"image": "./imagesTr/ct_001.nii.gz", "label": "./labelsTr/ct_001.nii.gz"}],
        test=[]))
    return folder


@pytest.mark.skipif(not REAL_CT.is_dir(), reason="../shared/data/real_ct_small not available")
def test_real_ct_as_spleen_task(tmp_path):
    spec = get_dataset("msd_spleen")
    ras = preprocess_dataset(_real_spleen_task(tmp_path / "ras", False), tmp_path / "p_ras", spec)
    lps = preprocess_dataset(_real_spleen_task(tmp_path / "lps", True), tmp_path / "p_lps", spec)
    case = _index(ras)["cases"][0]
    assert case["case"] == "ct_001"  # named after the link, not the file it points to
    assert np.allclose(case["spacing"], [1.5, 1.5, 2.0])
    image, label = np.load(ras / case["image"]), np.load(ras / case["label"])
    assert image.shape[0] == 1 and image.shape[1:] == label.shape
    assert set(np.unique(label).tolist()) == {0, 1}
    # Spleen volume is preserved by resampling: 9452 voxels of 27 mm³ → voxels of 4.5 mm³.
    assert abs(int(label.sum()) - 9452 * 27 / 4.5) < 0.1 * 9452 * 27 / 4.5
    # Physical field of view 366×303×90 mm → at most 244×202×45 voxels; air is cropped away.
    assert image.shape[1] < 244 and image.shape[2] <= 202 and image.shape[3] <= 45
    assert image.min() >= -1100 and image.max() > 300  # still Hounsfield units
    for axis in range(3):  # the crop is tight: each boundary slab touches the body
        for side in (0, -1):
            assert (np.take(image[0], side, axis=axis) > -175).any()
    # RAS: the spleen (patient's left) sits at low x, posterior (low y).
    centroid = np.argwhere(label == 1).mean(0)
    assert centroid[0] < 0.5 * label.shape[0] and centroid[1] < 0.5 * label.shape[1]
    # The same voxels stored in LPS order give the identical RAS result.
    case_lps = _index(lps)["cases"][0]
    assert case_lps["shape"] == case["shape"]
    assert np.allclose(np.load(lps / case_lps["image"]), image, atol=1e-3)
    assert (np.load(lps / case_lps["label"]) == label).all()
    assert not any(p.is_symlink() or p.suffix == ".gz" for p in ras.rglob("*"))
    assert os.path.realpath(tmp_path / "ras" / "imagesTr" / "ct_001.nii.gz").startswith(
        str(REAL_CT))
