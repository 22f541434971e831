"""Fine-tuning: schedule, sliding windows, the training job end to end on a learnable toy task,
initialisation from a pretrained model, resume after SIGTERM, label-fraction subsets."""
import json
import logging
import math
import os
import signal
import shutil

import numpy as np
import pytest
import torch

from hybridmim.checkpoints import load_model_file, load_state, publish_model
from hybridmim.data.layout import make_index, save_nifti, write_json
from hybridmim.dataset_catalog import CT_FINETUNE_WINDOW
from hybridmim.finetune.train import FinetuneJob, initialise_network, run_finetuning
from hybridmim.models.backbones import build_segmentation_network
from hybridmim.predict.inference import predict_volume, probabilities_to_masks
from conftest import set_nested

CROP = 32
TINY_UNET = {"name": "unet", "in_channels": 1, "filters": [4, 8, 8, 16, 16], "dropout": 0.0}
LABELS = {"0": "background", "1": "cube"}
WINDOW = dict(CT_FINETUNE_WINDOW)
BRATS_LABELS = {"0": "background", "1": "NCR", "2": "ED", "4": "ET"}
BRATS_REGIONS = {"TC": [1, 4], "WT": [1, 2, 4], "ET": [4]}
# The toy raw images are already on the recipe grid and every voxel is above the threshold, so
# preprocessing them for inference gives the cached arrays again.
TOY_PREPROCESS = {"orientation": "RAS", "spacing": [1.5, 1.5, 2.0], "normalize": "none",
                  "foreground_threshold": -1000.0}


def raw_dir_of(processed):
    """Where make_processed_dataset writes the raw layout of a toy dataset."""
    return processed.with_name(processed.name + "_raw")


def make_processed_dataset(folder, n_cases=6, seed=0, regions=False):
    """A preprocessed dataset in the docs/contracts.md layout: CT-like volumes (HU) with a bright
    cube of random size and position (label 1); with ``regions``, nested BraTS-style labels
    2 ⊃ 1 ⊃ 4 instead. Splits: the last case is test, the one before val, the rest train."""
    rng = np.random.default_rng(seed)
    (folder / "cases").mkdir(parents=True)
    spacing = [1.5, 1.5, 2.0]
    cases = []
    for index in range(n_cases):
        shape = tuple(int(s) for s in rng.integers(34, 44, size=3))
        image = rng.normal(-60.0, 25.0, size=shape).astype(np.float32)
        label = np.zeros(shape, dtype=np.uint8)
        size = int(rng.integers(9, 14))
        start = [int(rng.integers(2, s - size - 2)) for s in shape]
        box = tuple(slice(a, a + size) for a in start)
        image[box] += 220.0
        label[box] = 2 if regions else 1
        if regions:
            inner = tuple(slice(a + 2, a + size - 2) for a in start)
            core = tuple(slice(a + 4, a + size - 4) for a in start)
            label[inner], label[core] = 1, 4
            image[inner] += 60.0
            image[core] += 60.0
        case = f"case{index:02d}"
        _save_raw_case(raw_dir_of(folder), case, image, label, spacing)
        np.save(folder / "cases" / f"{case}_image.npy", image[None])
        np.save(folder / "cases" / f"{case}_label.npy", label)
        cases.append({"case": case, "image": f"cases/{case}_image.npy",
                      "label": f"cases/{case}_label.npy", "spacing": spacing,
                      "shape": [1, *shape]})
    labels = BRATS_LABELS if regions else LABELS
    index_json = {"name": folder.name, "dataset": folder.name, "modality": {"0": "CT"},
                  "channels": ["CT"], "labels": labels, "numTraining": n_cases,
                  "recipe": {"spacing": spacing, "modality": "CT", "labels": labels},
                  "recipe_hash": "test", "cases": cases}
    (folder / "dataset.json").write_text(json.dumps(index_json))
    write_json(raw_dir_of(folder) / "dataset.json", make_index(
        name=folder.name, description="toy", reference="-", licence="-", channels=("CT",),
        labels={int(k): v for k, v in labels.items()},
        training=[{"image": f"./imagesTr/{c['case']}.nii.gz",
                   "label": f"./labelsTr/{c['case']}.nii.gz"} for c in cases], test=[]))
    ids = [c["case"] for c in cases]
    (folder / "splits.json").write_text(json.dumps(
        {"seed": 0, "recipe": "test", "train": ids[:-2], "val": [ids[-2]], "test": [ids[-1]]}))
    return folder


def _save_raw_case(raw, case, image, label, spacing):
    for sub, array in (("imagesTr", image), ("labelsTr", label)):
        (raw / sub).mkdir(parents=True, exist_ok=True)
        save_nifti(array, np.diag([*spacing, 1.0]), raw / sub / f"{case}.nii.gz")


def tracking_block(tmp_path):
    return {"uri": f"sqlite:///{tmp_path}/mlflow/mlflow.db",
            "artifact_root": str(tmp_path / "mlflow" / "artifacts")}


def finetune_spec(tmp_path, processed, tracking, **overrides):
    spec = {
        # One thread: on a shared, oversubscribed CPU two OpenMP threads can be 10-100x slower.
        "run_name": "finetune-test", "seed": 0, "precision": "fp32", "threads": 1,
        "out": str(tmp_path / "finetune" / "model.pt"), "tracking": tracking,
        "provenance": {"rule": "finetune", "wildcards": {"dataset": "toy"}},
        "backbone": TINY_UNET, "crop": CROP,
        "dataset": {"name": "toy", "processed_dir": str(processed), "modality": "CT",
                    "window": WINDOW, "labels": LABELS, "regions": None,
                    "raw_dir": str(raw_dir_of(processed)), "preprocess": TOY_PREPROCESS},
        "init": {"name": "scratch", "checkpoint": None, "first_layer": "keep"},
        "label_fraction": 1.0,
        "optim": {"lr": 1e-2, "weight_decay": 1e-5, "warmup_steps": 2, "steps": 40,
                  "grad_clip": 1.0},
        "batch_size": 1, "crops_per_volume": 2, "val_every": 10, "sw_overlap": 0.25,
        "checkpoint_every": 10, "log_every": 1,
    }
    for key, value in overrides.items():
        set_nested(spec, key, value)
    return spec


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return make_processed_dataset(tmp_path_factory.mktemp("data") / "toy")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One real SQLite MLflow store for the module (creating one takes seconds)."""
    return tracking_block(tmp_path_factory.mktemp("store"))


@pytest.mark.parametrize("shape", [(37, 41, 29), (20, 13, 45)])
def test_sliding_window_output_has_image_shape(shape):
    torch.set_num_threads(1)
    torch.manual_seed(0)
    net = build_segmentation_network(TINY_UNET, 3, 16)[0].eval()
    probs = predict_volume(net, torch.randn(1, *shape), crop=16, overlap=0.5)
    assert probs.shape == (3, *shape)
    assert torch.allclose(probs.sum(0), torch.ones(shape), atol=1e-5)
    masks = probabilities_to_masks(probs, regions=False)
    assert masks.dtype == torch.bool and (masks.sum(0) == 1).all()
    region_masks = probabilities_to_masks(predict_volume(net, torch.randn(1, *shape), 16,
                                                         regions=True), regions=True)
    assert region_masks.shape == (3, *shape)
    with pytest.raises(ValueError, match=r"\(C, X, Y, Z\)"):
        predict_volume(net, torch.randn(*shape), crop=16)


def test_finetuning_learns_publishes_best_weights_and_evaluates(tmp_path, toy, store):
    from mlflow.tracking import MlflowClient

    from hybridmim.evaluate.run import run_evaluation

    spec = finetune_spec(tmp_path, toy, store)
    # Validation Dice of the same seeded network before any training, for comparison.
    job = FinetuneJob(spec)
    torch.manual_seed(spec["seed"])
    untrained = build_segmentation_network(TINY_UNET, 2, CROP)[0]
    before = job.validate(untrained, job.datasets()[3])["val_dice_mean"]

    result = run_finetuning(spec)
    out = tmp_path / "finetune"
    assert json.loads((out / "metrics.json").read_text()) == json.loads(json.dumps(result))
    best = result["metrics"]["best_val_dice_mean"]
    assert best > 0.8 and best > before + 0.4, (before, best)

    model = load_model_file(out / "model.pt")
    meta = model["meta"]
    assert meta["weights"] == "best_validation" and meta["best_val_dice"] == best
    assert meta["mlflow_run_id"] == result["run_id"]
    assert (meta["labels"], meta["window"], meta["crop"], meta["regions"]) == \
        (LABELS, WINDOW, CROP, None)
    assert meta["spacing"] == [1.5, 1.5, 2.0] and meta["init"]["name"] == "scratch"
    best_state = torch.load(out / "state" / "best.pt", weights_only=False)
    assert best_state["step"] == meta["best_step"]
    assert all(torch.equal(best_state["model"][k], v) for k, v in model["state_dict"].items())

    run = MlflowClient(spec["tracking"]["uri"]).get_run(result["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.tags["init.source"] == "random" and run.data.tags["train_cases"] == "4"
    client = MlflowClient(spec["tracking"]["uri"])
    losses = client.get_metric_history(result["run_id"], "train_loss")
    assert [m.step for m in sorted(losses, key=lambda m: m.step)] == list(range(1, 41))
    val = client.get_metric_history(result["run_id"], "val_dice_cube")
    assert sorted(m.step for m in val) == [10, 20, 30, 40]
    assert max(m.value for m in val) == pytest.approx(best)

    evaluation = run_evaluation({
        "run_name": "eval", "out": str(tmp_path / "evaluate" / "metrics.json"),
        "tracking": spec["tracking"], "dataset": spec["dataset"], "precision": "fp32",
        "model": str(out / "model.pt"), "split": "test", "sw_overlap": 0.5,
        "upstream_run_id": result["run_id"]})
    assert evaluation["metrics"]["test_dice_cube"] > 0.8
    assert evaluation["upstream_run_id"] == result["run_id"]


def _publish_pretrained(path):
    torch.manual_seed(123)
    # A reconstruction model: same backbone, 1 output channel (the image), not 2 classes.
    net, class_path, kwargs = build_segmentation_network(TINY_UNET, 1, CROP)
    publish_model(path, class_path, kwargs, net.state_dict(),
                  {"stage": "pretrain", "mlflow_run_id": "pretrain-run"})
    return net.state_dict()


def test_init_from_pretrained_model_changes_encoder_and_decoder_not_head(tmp_path, toy, store):
    from mlflow.tracking import MlflowClient

    pretrained = _publish_pretrained(tmp_path / "pretrain" / "model.pt")
    torch.manual_seed(0)
    net = build_segmentation_network(TINY_UNET, 2, CROP)[0]
    fresh = {k: v.clone() for k, v in net.state_dict().items()}
    report = initialise_network(net, {"name": "hybridmim",
                                      "checkpoint": str(tmp_path / "pretrain" / "model.pt")})
    after = net.state_dict()
    head = [k for k in after if k.startswith("output_block.")]
    body = [k for k in after if k not in head and after[k].is_floating_point()]
    assert head and body and report["counts"]["shape_mismatched"] == len(
        [k for k in head if k.endswith(("weight", "bias"))])
    assert all(torch.equal(after[k], pretrained[k]) for k in body)
    assert any(not torch.equal(after[k], fresh[k]) for k in body)
    assert all(torch.equal(after[k], fresh[k]) for k in head)

    spec = finetune_spec(tmp_path, toy, store, **{
        "init": {"name": "hybridmim", "checkpoint": str(tmp_path / "pretrain" / "model.pt"),
                 "first_layer": "keep"}, "optim.steps": 2, "val_every": 2})
    result = run_finetuning(spec)
    tags = MlflowClient(spec["tracking"]["uri"]).get_run(result["run_id"]).data.tags
    assert tags["init.loaded"] == str(report["counts"]["loaded"])
    assert tags["upstream.run_id"] == "pretrain-run"
    init_meta = load_model_file(spec["out"])["meta"]["init"]
    assert init_meta["name"] == "hybridmim" and init_meta["transferred"] == report["counts"]


def test_resume_after_sigterm_continues_at_saved_step(tmp_path, toy, store, caplog):
    from mlflow.tracking import MlflowClient

    class TerminateAtFirstValidation(logging.Handler):
        def emit(self, record):
            if record.getMessage().startswith("step 2 validation"):
                os.kill(os.getpid(), signal.SIGTERM)  # what SLURM sends before preempting

    caplog.set_level(logging.INFO, logger="hybridmim")
    trigger = TerminateAtFirstValidation()
    logging.getLogger("hybridmim.finetune.train").addHandler(trigger)
    spec = finetune_spec(tmp_path, toy, store, **{"optim.steps": 6, "val_every": 2,
                                           "checkpoint_every": 100})
    try:
        with pytest.raises(SystemExit) as stopped:
            run_finetuning(spec)
    finally:
        logging.getLogger("hybridmim.finetune.train").removeHandler(trigger)
    assert stopped.value.code == 143
    # The stop went through the loop machinery pretraining shares (hybridmim/training_loop.py).
    assert "stopped after step 2 of 6" in caplog.text
    state = load_state(tmp_path / "finetune" / "state", _spec_hash(spec))
    assert state["step"] == 2 and not os.path.exists(spec["out"])
    client = MlflowClient(spec["tracking"]["uri"])
    assert client.get_run(state["mlflow_run_id"]).info.status == "KILLED"

    caplog.clear()
    result = run_finetuning(spec)
    assert "(step 2)" in caplog.text
    assert result["run_id"] == state["mlflow_run_id"]
    assert client.get_run(result["run_id"]).info.status == "FINISHED"
    steps = sorted(m.step for m in client.get_metric_history(result["run_id"], "train_loss"))
    assert steps == [1, 2, 3, 4, 5, 6]


def _spec_hash(spec):
    from hybridmim.hashing import spec_hash

    return spec_hash(spec)


def test_label_fraction_subset_is_deterministic_and_nonempty(tmp_path, toy, store):
    def train_ids(fraction, seed=0):
        return FinetuneJob(finetune_spec(tmp_path, toy, store, label_fraction=fraction,
                                         seed=seed)).datasets()[0]

    all_ids = train_ids(1.0)
    assert len(all_ids) == 4
    quarter = train_ids(0.25)
    assert len(quarter) == 1 and set(quarter) <= set(all_ids)
    assert train_ids(0.25) == quarter and train_ids(0.01) and len(train_ids(0.5)) == 2


def test_bad_spec_names_the_key(tmp_path, toy, store):
    spec = finetune_spec(tmp_path, toy, store)
    del spec["optim"]["lr"]
    with pytest.raises(ValueError, match=r"finetune spec: missing \['optim.lr'\]"):
        run_finetuning(spec)
    with pytest.raises(ValueError, match="label_fraction: 0.0 is less than or equal to the minimum"):
        run_finetuning(finetune_spec(tmp_path, toy, store, label_fraction=0.0))
    with pytest.raises(ValueError, match="init.checkpoint is empty"):
        run_finetuning(finetune_spec(tmp_path, toy, store, **{"init.name": "hybridmim"}))


def test_brats_regions_train_with_sigmoid_and_evaluate_per_region(tmp_path, store):
    from hybridmim.evaluate.run import run_evaluation

    processed = make_processed_dataset(tmp_path / "brats", n_cases=4, regions=True)
    spec = finetune_spec(tmp_path, processed, store, **{
        "dataset.labels": BRATS_LABELS, "dataset.regions": BRATS_REGIONS,
        "optim.steps": 2, "val_every": 2})
    result = run_finetuning(spec)
    assert set(result["best_scores"]) == {"val_dice_tc", "val_dice_wt", "val_dice_et",
                                          "val_dice_mean"}
    assert load_model_file(spec["out"])["network"]["kwargs"]["out_channels"] == 3
    evaluation = run_evaluation({
        "run_name": "eval", "out": str(tmp_path / "evaluate" / "metrics.json"),
        "tracking": spec["tracking"], "dataset": spec["dataset"], "model": spec["out"],
        "split": "test", "sw_overlap": 0.25})
    assert set(evaluation["per_class"]["dice"]) == {"TC", "WT", "ET"}
    assert all(v is None or 0.0 <= v <= 1.0 for v in evaluation["per_class"]["dice"].values())
    assert not math.isnan(evaluation["metrics"]["test_dice_mean"] or 0.0)


def test_no_checkpoint_selection_when_validation_cases_are_the_test_cases(tmp_path, toy, store):
    """MONAI's BTCV/MSD protocol reports on its validation cases (splits: val_is_test); choosing
    the best checkpoint on them would be choosing on the test set: the final weights are
    published instead."""
    data = tmp_path / "toy_val_is_test"
    shutil.copytree(toy, data)
    splits = json.loads((data / "splits.json").read_text())
    splits.update(val=splits["test"], val_is_test=True)
    (data / "splits.json").write_text(json.dumps(splits))
    spec = finetune_spec(tmp_path, data, store, **{"optim.steps": 6, "val_every": 2,
                                                   "checkpoint_every": 2})
    run_finetuning(spec)
    out = tmp_path / "finetune"
    model = load_model_file(out / "model.pt")
    assert model["meta"]["weights"].startswith("final")
    final = torch.load(out / "state" / "latest.pt", map_location="cpu", weights_only=False)
    assert final["step"] == 6
    for key, value in final["model"].items():
        assert torch.equal(model["state_dict"][key], value), key


def test_bf16_finetuning_dice_is_within_seed_noise_of_fp32(tmp_path, toy, store):
    """bf16 changes the arithmetic, not what is learned: at the same seed its validation Dice
    differs from fp32's by no more than two fp32 seeds differ from each other (+0.02 for a toy
    task where both seeds may converge to the same Dice)."""
    from mlflow.tracking import MlflowClient

    dice, run_ids = {}, {}
    for precision, seed in (("fp32", 0), ("fp32", 1), ("bf16", 0)):
        spec = finetune_spec(tmp_path / f"{precision}_{seed}", toy, store, precision=precision,
                             seed=seed, val_every=20, checkpoint_every=20)
        result = run_finetuning(spec)
        dice[precision, seed] = result["metrics"]["best_val_dice_mean"]
        run_ids[precision, seed] = result["run_id"]
    seed_noise = abs(dice["fp32", 0] - dice["fp32", 1])
    assert dice["bf16", 0] > 0.8, dice
    assert abs(dice["bf16", 0] - dice["fp32", 0]) <= seed_noise + 0.02, dice
    tags = MlflowClient(store["uri"]).get_run(run_ids["bf16", 0]).data.tags
    assert tags["precision"] == "bf16" and tags["precision.reason"].startswith("requested bf16")
