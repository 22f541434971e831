"""The embedded demo generator: determinism, canonical layout, labels, geometry, atomicity."""

import hashlib
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from hybridmim.data import demo
from hybridmim.data.demo import generate_demo

EXPECTED_LABELS = {"brats": {0, 1, 2, 4}, "btcv": set(range(14)), "liver": {0, 1, 2},
                   "spleen": {0, 1}}
# Every field of a Decathlon dataset.json (MONAI's DecathlonDataset refuses fewer).
MSD_INDEX_FIELDS = ("name", "description", "reference", "licence", "tensorImageSize",
                    "modality", "labels", "numTraining", "numTest", "training", "test")


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    root = tmp_path_factory.mktemp("raw")
    return {kind: generate_demo(kind, root / kind, num_cases=6, num_test=2, seed=3)
            for kind in demo.DEMO_KINDS}


def _tree_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _load(path: Path) -> np.ndarray:
    return np.asarray(nib.load(path).dataobj)


def _cases(folder: Path):
    index = json.loads((folder / "dataset.json").read_text())
    for entry in index["training"]:
        yield nib.load(folder / entry["image"]), _load(folder / entry["label"])


def test_same_seed_gives_identical_bytes_and_another_seed_does_not(tmp_path):
    first = _tree_digest(generate_demo("liver", tmp_path / "a", num_cases=2, num_test=1, seed=7))
    second = _tree_digest(generate_demo("liver", tmp_path / "b", num_cases=2, num_test=1, seed=7))
    other = _tree_digest(generate_demo("liver", tmp_path / "c", num_cases=2, num_test=1, seed=8))
    assert first == second
    assert len(first) == 2 * 2 + 1 + 1  # images+labels, one test image, dataset.json
    assert first["imagesTr/liver_001.nii.gz"] != other["imagesTr/liver_001.nii.gz"]


@pytest.mark.parametrize("kind", demo.DEMO_KINDS)
def test_layout_and_dataset_json(raw, kind):
    folder = raw[kind]
    index = json.loads((folder / "dataset.json").read_text())
    assert set(MSD_INDEX_FIELDS) <= set(index)
    assert index["name"] == f"demo_{kind}"
    assert (index["numTraining"], index["numTest"]) == (6, 2)
    assert index["tensorImageSize"] == ("4D" if kind == "brats" else "3D")
    expected_channels = ["t1", "t1ce", "t2", "flair"] if kind == "brats" else ["CT"]
    assert list(index["modality"].values()) == expected_channels
    assert {int(k) for k in index["labels"]} == EXPECTED_LABELS[kind]
    assert sorted(p.name for p in (folder / "imagesTr").iterdir()) == sorted(
        Path(e["image"]).name for e in index["training"])
    assert len(list((folder / "labelsTr").iterdir())) == 6
    assert len(list((folder / "imagesTs").iterdir())) == 2
    assert not list(folder.parent.glob(f".{kind}.*"))  # no temporary folders left behind


@pytest.mark.parametrize("kind", demo.DEMO_KINDS)
def test_labels_geometry_and_intensities(raw, kind):
    seen = set()
    for image, label in _cases(raw[kind]):
        data = np.asarray(image.dataobj)
        spacing = np.linalg.norm(image.affine[:3, :3], axis=0)
        assert np.allclose(image.header.get_zooms()[:3], spacing)
        assert nib.aff2axcodes(image.affine) == ("L", "P", "S")  # stored as scanners do
        assert label.dtype == np.uint8 and label.shape == data.shape[:3]
        assert max(data.shape[:3]) <= 80 and min(data.shape[:3]) >= 24
        seen |= set(np.unique(label).tolist())
        if kind == "brats":
            assert data.shape[3] == 4 and np.allclose(spacing, 1.0)
            assert data.min() == 0 and data.max() > 300
        else:
            assert 1.3 <= spacing[0] <= 1.7 and 1.8 <= spacing[2] <= 2.4
            assert data.min() < -900 and data.max() > 300  # air and bone in HU
        assert (label > 0).sum() > 20
    assert seen == EXPECTED_LABELS[kind]


def _world_centroid(image, label, value):
    index = np.argwhere(label == value).mean(axis=0)
    return image.affine[:3, :3] @ index + image.affine[:3, 3]


def test_abdominal_anatomy_is_on_the_right_side(raw):
    """Liver on the patient's right (+x in RAS world), spleen on the left, aorta posterior."""
    for image, label in _cases(raw["btcv"]):
        liver, spleen = _world_centroid(image, label, 6), _world_centroid(image, label, 1)
        aorta, stomach = _world_centroid(image, label, 8), _world_centroid(image, label, 7)
        assert liver[0] > spleen[0] + 20
        assert aorta[1] < stomach[1]
        body = np.asarray(image.dataobj) > -500
        # organs lie inside the body
        assert body[label > 0].all()


def test_liver_tumours_inside_liver_and_hypodense(raw):
    for image, label in _cases(raw["liver"]):
        data = np.asarray(image.dataobj)
        tumour = label == 2
        assert tumour.any()
        shell = np.zeros_like(tumour)  # voxels next to a tumour, outside it
        for axis in range(3):
            shell |= np.roll(tumour, 1, axis) | np.roll(tumour, -1, axis)
        shell &= ~tumour
        assert (label[shell] == 1).mean() > 0.5  # mostly surrounded by liver
        assert data[tumour].mean() < data[label == 1].mean() - 15


def test_brats_tumour_is_nested_and_contrasts_differ(raw):
    for image, label in _cases(raw["brats"]):
        data = np.asarray(image.dataobj).astype(float)
        t1, t1ce, t2, flair = (data[..., c] for c in range(4))
        brain = flair > 0
        edema, enhancing = label == 2, label == 4
        assert (label[~brain] == 0).all()
        core = np.isin(label, [1, 4])
        lo, hi = np.argwhere(core).min(0), np.argwhere(core).max(0)
        whole = np.argwhere(label > 0)
        assert (whole.min(0) <= lo).all() and (whole.max(0) >= hi).all()
        if (label == 1).any():
            necrosis = np.argwhere(label == 1)
            assert (necrosis.min(0) >= lo).all() and (necrosis.max(0) <= hi).all()
        normal = brain & (label == 0)
        assert flair[edema].mean() > 1.3 * flair[normal].mean()
        assert t1ce[enhancing].mean() > 1.3 * t1ce[edema].mean()
        assert t2[edema].mean() > t2[normal].mean()
        assert t1[edema].mean() < t1[normal].mean() * 1.05


def _bounding_box(mask: np.ndarray) -> tuple[slice, ...]:
    nonzero = np.argwhere(mask)
    return tuple(slice(lo, hi + 1) for lo, hi in zip(nonzero.min(0), nonzero.max(0)))


@pytest.mark.parametrize("kind", ["spleen", "brats"])
def test_structures_are_large_in_a_small_field_of_view(raw, kind):
    """What lets the demo's CPU-sized fine-tuning learn: after the recipe's foreground crop
    (CT > -175 HU, MRI > 0) the volume fits a 48 x 48 in-plane crop at the recipe spacing, and the
    target is a few percent of it (a real spleen is ~0.5 %)."""
    for image, label in _cases(raw[kind]):
        data = np.asarray(image.dataobj)
        spacing = np.linalg.norm(image.affine[:3, :3], axis=0)
        foreground = data[..., 0] > 0 if kind == "brats" else data > -175
        box = _bounding_box(foreground)
        extent_mm = np.array([s.stop - s.start for s in box]) * spacing
        recipe_spacing = (1.0, 1.0, 1.0) if kind == "brats" else (1.5, 1.5, 2.0)
        assert (extent_mm / recipe_spacing <= [48, 48, 40]).all(), extent_mm
        target = label[box] > 0  # spleen, or the whole tumour
        assert 0.015 < target.mean() < 0.15


def test_cases_differ_within_a_dataset(raw):
    volumes = [label for _, label in _cases(raw["spleen"])]
    centroids = np.array([np.argwhere(v == 1).mean(0) for v in volumes])
    sizes = np.array([(v == 1).sum() for v in volumes])
    assert np.ptp(centroids, axis=0).max() > 3
    assert sizes.max() > 1.3 * sizes.min()


def test_failure_leaves_no_partial_folder_and_keeps_the_old_one(tmp_path, monkeypatch):
    target = tmp_path / "spleen"
    calls = {"n": 0}
    real_save = demo.save_nifti

    def failing_save(*args):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError("disk full")
        real_save(*args)

    monkeypatch.setattr(demo, "save_nifti", failing_save)
    with pytest.raises(OSError, match="disk full"):
        generate_demo("spleen", target, num_cases=3, num_test=0, seed=1)
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []

    monkeypatch.setattr(demo, "save_nifti", real_save)
    generate_demo("spleen", target, num_cases=2, num_test=0, seed=1)
    before = _tree_digest(target)
    calls["n"] = 0
    monkeypatch.setattr(demo, "save_nifti", failing_save)
    with pytest.raises(OSError):
        generate_demo("spleen", target, num_cases=3, num_test=0, seed=1)
    assert _tree_digest(target) == before
    assert [p.name for p in tmp_path.iterdir()] == ["spleen"]


def test_same_arguments_do_not_rewrite(tmp_path):
    folder = generate_demo("demo_spleen", tmp_path / "s", num_cases=2, num_test=0, seed=0)
    stamp = (folder / "dataset.json").stat().st_mtime_ns
    generate_demo("spleen", folder, num_cases=2, num_test=0, seed=0)
    assert (folder / "dataset.json").stat().st_mtime_ns == stamp
    generate_demo("spleen", folder, num_cases=3, num_test=0, seed=0)
    assert json.loads((folder / "dataset.json").read_text())["numTraining"] == 3


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="unknown demo kind 'lung'"):
        generate_demo("lung", "/nonexistent", 1, 0, 0)
    with pytest.raises(ValueError, match="num_cases"):
        generate_demo("spleen", "/nonexistent", 0, 0, 0)
