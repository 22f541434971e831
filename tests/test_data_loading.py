"""Splits, intensity windows and the torch datasets over the preprocessed cache."""

import json
import shutil

import numpy as np
import pytest
import torch

from hybridmim.data.demo import generate_demo
from hybridmim.data.intensity import apply_window
from hybridmim.data.loading import PretrainCropDataset, SegmentationDataset, labels_to_regions
from hybridmim.data.prepare.preprocess import preprocess_dataset
from hybridmim.data.prepare.splits import (SplitError, label_fraction_subset, load_splits,
                                           make_splits, pretraining_cases)
from hybridmim.dataset_catalog import (BRATS_REGIONS, CT_PRETRAIN_WINDOW, MRI_PRETRAIN_WINDOW,
                                       dataset_from_config, get_dataset, validate_window)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """Preprocessed demo spleen (10 cases) and BraTS (5 cases) with their splits."""
    root = tmp_path_factory.mktemp("data")
    result = {}
    for kind, cases in (("spleen", 10), ("brats", 5)):
        spec = get_dataset(f"demo_{kind}")
        raw = generate_demo(kind, root / "raw" / kind, num_cases=cases, num_test=0, seed=11)
        out = preprocess_dataset(raw, root / "processed" / kind, spec)
        make_splits(out, spec)
        result[kind] = (out, spec)
    return result


# ---------------------------------------------------------------------------------- splits
def test_splits_are_seeded_disjoint_and_complete(cache, tmp_path):
    out, spec = cache["spleen"]
    splits = load_splits(out)
    train, val, test = (set(splits[k]) for k in ("train", "val", "test"))
    assert (len(train), len(val), len(test)) == (6, 2, 2)
    assert not (train & val or train & test or val & test)
    assert train | val | test == {f"spleen_{i:03d}" for i in range(1, 11)}
    assert splits["seed"] == 0 and splits["recipe"] == "fraction:0.6/0.2/0.2"
    copy = shutil.copytree(out, tmp_path / "copy")
    (copy / "splits.json").unlink()
    assert make_splits(copy, spec)["test"] == splits["test"]  # same seed, same split
    (copy / "splits.json").unlink()
    assert make_splits(copy, spec, seed=1)["test"] != splits["test"]


def test_splits_are_never_silently_redrawn(cache, tmp_path):
    out, spec = cache["spleen"]
    stamp = (out / "splits.json").stat().st_mtime_ns
    assert make_splits(out, spec) == load_splits(out)
    assert (out / "splits.json").stat().st_mtime_ns == stamp
    copy = shutil.copytree(out, tmp_path / "copy")
    with pytest.raises(SplitError, match="recipe .* seed 0, now asked for .* seed 5"):
        make_splits(copy, spec, seed=5)
    index = json.loads((copy / "dataset.json").read_text())
    index["cases"] = index["cases"][:-1]
    (copy / "dataset.json").write_text(json.dumps(index))
    with pytest.raises(SplitError, match=r"different set of labelled cases .*gone: \['spleen_010'\]"):
        make_splits(copy, spec)
    assert load_splits(copy) == load_splits(out)


def test_fixed_and_val_is_test_splits(cache, tmp_path):
    out, _ = cache["spleen"]
    copy = shutil.copytree(out, tmp_path / "copy")
    (copy / "splits.json").unlink()
    fixed = dataset_from_config("mine", {"modality": "CT", "labels": {0: "bg", 1: "spleen"},
                                         "folder": str(copy), "split": {
        "kind": "fixed", "train": [f"spleen_{i:03d}" for i in range(1, 8)],
        "test": ["spleen_008", "spleen_009"], "val_is_test": True}})
    splits = make_splits(copy, fixed)
    assert splits["val"] == splits["test"] == ["spleen_008", "spleen_009"]
    assert splits["unassigned"] == ["spleen_010"] and splits["val_is_test"]
    (copy / "splits.json").unlink()
    with pytest.raises(SplitError, match=r"lacks: \['img0001'"):
        make_splits(copy, get_dataset("btcv"))  # BTCV's published lists name other cases
    assert not (copy / "splits.json").exists()


def test_pretraining_corpus_excludes_val_and_test(cache):
    dirs = [cache["spleen"][0], cache["brats"][0]]
    corpus = pretraining_cases(dirs)
    for folder in dirs:
        splits = load_splits(folder)
        assert corpus[str(folder)] == splits["train"]
        assert not set(corpus[str(folder)]) & (set(splits["val"]) | set(splits["test"]))
    out, spec = cache["spleen"]
    dataset = PretrainCropDataset([{"processed_dir": str(out), "window": spec.windows["pretrain"],
                                    "modality": "CT"}], pretraining_cases([str(out)]), crop=16,
                                  crops_per_volume=1)
    seen = {dataset[i]["case"] for i in range(len(dataset))}
    assert seen == set(load_splits(out)["train"])


def test_label_fraction_subsets_are_seeded_nested_and_nonempty():
    ids = [f"c{i:02d}" for i in range(24)]
    subsets = {f: label_fraction_subset(ids, f, seed=0) for f in (0.01, 0.1, 0.25, 0.5, 1.0)}
    assert len(subsets[0.01]) == 1 and len(subsets[0.25]) == 6 and subsets[1.0] == ids
    assert set(subsets[0.1]) <= set(subsets[0.25]) <= set(subsets[0.5])
    assert label_fraction_subset(ids, 0.25, seed=0) == subsets[0.25]
    assert label_fraction_subset(ids, 0.25, seed=1) != subsets[0.25]
    with pytest.raises(ValueError, match="label fraction"):
        label_fraction_subset(ids, 0.0, seed=0)


# -------------------------------------------------------------------------------- windows
def test_windows():
    hu = np.array([-2000.0, -1000.0, 0.0, 1000.0, 3000.0], np.float32)
    assert np.allclose(apply_window(hu, CT_PRETRAIN_WINDOW), [0.001, 0.001, 0.5005, 1.0, 1.0])
    finetune = get_dataset("btcv").windows["finetune"]
    assert np.allclose(apply_window(torch.tensor([-175.0, 37.5, 250.0]), finetune).numpy(),
                       [0.0, 0.5, 1.0])
    z = torch.tensor([0.0, -3.0, 3.0, 10.0, -0.5])
    assert torch.allclose(apply_window(z, MRI_PRETRAIN_WINDOW),
                          torch.tensor([0.001, 0.001, 1.0, 1.0, 0.001 + 0.999 * 2.5 / 6]))
    original = hu.copy()
    identity = apply_window(hu, {"kind": "identity"})
    identity[0] = 5
    assert (hu == original).all() and apply_window(hu, CT_PRETRAIN_WINDOW).dtype == np.float32
    with pytest.raises(ValueError, match="missing \\['b_max'"):
        validate_window({"kind": "ct", "a_min": 0, "a_max": 1, "b_min": 0, "clip": True})
    with pytest.raises(ValueError, match="a_min .* must be below a_max"):
        validate_window({**CT_PRETRAIN_WINDOW, "a_min": 2000})


# ------------------------------------------------------------------------------ pretraining
def test_pretrain_crops_shape_window_and_padding_mask(cache):
    out, spec = cache["spleen"]
    entry = {"processed_dir": out, "window": spec.windows["pretrain"], "modality": "CT"}
    train = pretraining_cases([out])
    small = PretrainCropDataset([entry], train, crop=16, crops_per_volume=3)
    item = small[0]
    assert item["image"].shape == (3, 1, 16, 16, 16) and item["valid"].shape == (3, 1, 16, 16, 16)
    assert item["valid"].all() and item["image"].min() >= 0.001 and item["image"].max() <= 1
    # the volumes are smaller than 64 in x and y
    big = PretrainCropDataset([entry], train, crop=64, crops_per_volume=2)
    item = big[1]
    record = next(c for c in json.loads((out / "dataset.json").read_text())["cases"]
                  if c["case"] == item["case"])
    valid, image = item["valid"], item["image"]
    assert valid.sum() == 2 * np.prod([min(s, 64) for s in record["shape"][1:]])
    assert (image[~valid.expand_as(image)] == 0).all()
    assert image[valid.expand_as(image)].min() >= 0.001
    torch.manual_seed(0)
    first = small[2]["image"]
    torch.manual_seed(0)
    assert torch.equal(first, small[2]["image"])
    batch = next(iter(torch.utils.data.DataLoader(small, batch_size=2)))
    assert batch["image"].shape == (2, 3, 1, 16, 16, 16)


def test_pretrain_refuses_mixed_channel_counts(cache):
    spleen, brats = cache["spleen"][0], cache["brats"][0]
    with pytest.raises(ValueError, match="mixes channel counts"):
        PretrainCropDataset([{"processed_dir": spleen, "window": CT_PRETRAIN_WINDOW},
                             {"processed_dir": brats, "window": MRI_PRETRAIN_WINDOW}],
                            pretraining_cases([spleen, brats]), crop=16)
    with pytest.raises(ValueError, match="preprocessed as CT"):
        PretrainCropDataset([{"processed_dir": spleen, "window": CT_PRETRAIN_WINDOW,
                              "modality": "MRI"}], pretraining_cases([spleen]), crop=16)
    mri = PretrainCropDataset([{"processed_dir": brats, "window": MRI_PRETRAIN_WINDOW}],
                              split_ids={str(brats): ["brats_001"]}, crop=32)
    assert mri[0]["image"].shape == (2, 4, 32, 32, 32)


# ---------------------------------------------------------------------------- segmentation
def test_segmentation_training_crops_are_label_balanced(cache):
    out, spec = cache["spleen"]
    train_ids = load_splits(out)["train"]
    dataset = SegmentationDataset(out, train_ids, spec.windows["finetune"], crop=16,
                                  num_samples=4, train=True)
    torch.manual_seed(0)
    centres = []
    for _ in range(5):
        for i in range(len(dataset)):
            item = dataset[i]
            assert item["image"].shape == (4, 1, 16, 16, 16)
            assert item["label"].shape == (4, 1, 16, 16, 16) and item["label"].dtype == torch.int64
            assert item["image"].min() >= -0.2 and item["image"].max() <= 1.2
            centres += item["label"][:, 0, 8, 8, 8].tolist()
    spleen_share = np.mean([
        (np.load(out / f"cases/{case}_label.npy") == 1).mean() for case in train_ids])
    assert spleen_share < 0.05  # a uniform crop would almost never be centred on the spleen
    assert 0.3 < np.mean(centres) < 0.7  # pos:neg 1:1


def test_segmentation_validation_returns_whole_volumes(cache):
    out, spec = cache["spleen"]
    val_ids = load_splits(out)["val"]
    dataset = SegmentationDataset(out, val_ids, spec.windows["finetune"], crop=16, train=False)
    item = dataset[0]
    stored = np.load(out / f"cases/{item['case']}_label.npy")
    assert item["case"] == val_ids[0] and item["image"].shape[1:] == stored.shape
    assert torch.equal(item["label"][0], torch.from_numpy(stored.astype(np.int64)))
    assert item["spacing"].tolist() == [1.5, 1.5, 2.0]
    with pytest.raises(KeyError, match="no preprocessed case"):
        SegmentationDataset(out, ["nope"], spec.windows["finetune"], crop=16)


def test_brats_regions_and_class_indices(cache):
    label = np.array([0, 1, 2, 4], np.uint8).reshape(1, 1, 1, 4)
    regions = labels_to_regions(torch.from_numpy(label), BRATS_REGIONS)
    assert regions.shape == (3, 1, 1, 4)  # TC, WT, ET
    assert regions[:, 0, 0].tolist() == [[0, 1, 0, 1], [0, 1, 1, 1], [0, 0, 0, 1]]
    assert torch.equal(labels_to_regions(torch.from_numpy(label[0]), {"TC": [1, 4]}),
                       torch.tensor([[[[0.0, 1.0, 0.0, 1.0]]]]))
    out, spec = cache["brats"]
    ids = load_splits(out)["train"]
    training = SegmentationDataset(out, ids, spec.windows["finetune"], crop=24, num_samples=2,
                                   regions=spec.regions)
    item = training[0]
    assert item["image"].shape == (2, 4, 24, 24, 24) and item["label"].shape == (2, 3, 24, 24, 24)
    tc, wt, et = item["label"][:, 0], item["label"][:, 1], item["label"][:, 2]
    assert (et <= tc).all() and (tc <= wt).all() and wt.any()
    plain = SegmentationDataset(out, ids, spec.windows["finetune"], crop=24, train=False)
    values = set(np.unique(np.load(out / f"cases/{ids[0]}_label.npy")).tolist())
    assert 4 in values and set(plain[0]["label"].unique().tolist()) <= {0, 1, 2, 3}
