"""The pretraining loop end to end on a tiny processed CT dataset (CPU): outputs, MLflow, resume."""
from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from hybridmim.checkpoints import build_network, load_model_file, state_dir_for
from hybridmim.dataset_catalog import CT_PRETRAIN_WINDOW
from hybridmim.pretrain.spec import PretrainSpecError, validate_pretrain_spec
from hybridmim.pretrain.train import run_pretraining
from hybridmim.training_loop import PREEMPT_ENV, PREEMPTED_EXIT_CODE, Preempted
from conftest import set_nested


def _write_processed_dataset(root, name="tiny_ct", cases=6, val=1, test=1):
    """A preprocessed CT cache in the docs/contracts.md layout: HU volumes, dataset.json, splits.

    Volume shapes are a little smaller than a 32³ crop along one axis, so crops contain padding.
    """
    folder = root / name
    (folder / "cases").mkdir(parents=True)
    rng = np.random.default_rng(0)
    records = []
    for i in range(cases):
        shape = (40, 28 + i % 3, 36)
        grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"))
        body = (grid ** 2).sum(0) < 0.8
        hu = np.where(body, 40.0, -1000.0) + rng.normal(0, 30, shape)
        image = hu[None].astype(np.float32)
        case = f"case{i:02d}"
        np.save(folder / "cases" / f"{case}_image.npy", image)
        np.save(folder / "cases" / f"{case}_label.npy", body.astype(np.uint8))
        records.append({"case": case, "image": f"cases/{case}_image.npy",
                        "label": f"cases/{case}_label.npy", "spacing": [1.5, 1.5, 2.0],
                        "shape": list(image.shape)})
    index = {"name": name, "channels": ["CT"], "labels": {"0": "background", "1": "body"},
             "recipe": {"modality": "CT", "spacing": [1.5, 1.5, 2.0]}, "recipe_hash": "test",
             "cases": records}
    (folder / "dataset.json").write_text(json.dumps(index))
    ids = [r["case"] for r in records]
    splits = {"seed": 0, "recipe": "test", "test": ids[:test], "val": ids[test:test + val],
              "train": ids[test + val:]}
    (folder / "splits.json").write_text(json.dumps(splits))
    return folder


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("pretrain")
    return root, _write_processed_dataset(root)


def _spec(workspace, out: str, **changes):
    root, data_dir = workspace
    spec = {
        "run_name": f"test/{out}", "seed": 0, "out": str(root / out / "model.pt"),
        "tracking": {"uri": f"sqlite:///{root}/mlflow.db", "artifact_root": str(root / "art")},
        "provenance": {"rule": "pretrain", "wildcards": {"backbone": "unet"}},
        "precision": "fp32", "deterministic": True,
        # One thread: on a shared, oversubscribed CPU two OpenMP threads can be far slower.
        "threads": 1,
        "backbone": {"name": "unet", "in_channels": 1, "filters": [4, 8, 8, 16, 16],
                     "dropout": 0.1},
        "geometry": {"crop": 32, "region": 16, "patch": 8},
        "method": {"name": "hybridmim", "kind": "hybridmim", "box": "partial",
                   "masking": "uniform", "mask_ratio": 0.4, "region_grouping": "spatial",
                   "loss_weights": {"pr": 1.0, "num": 0.1, "loc": 0.1, "con": 0.01, "cl": 0.1},
                   "temperature": 0.5, "proj_dim": 16, "gather_negatives": False},
        "data": {"datasets": [{"name": "tiny_ct", "processed_dir": str(data_dir),
                               "modality": "CT", "window": dict(CT_PRETRAIN_WINDOW)}],
                 "crops_per_volume": 2, "volumes_per_step": 2, "val_volumes": 1,
                 "num_workers": 0},
        "optim": {"lr": 1e-3, "weight_decay": 1e-3, "warmup_steps": 2, "steps": 4,
                  "grad_clip": 1.0},
        "checkpoint_every": 2, "log_every": 1,
    }
    for dotted, value in changes.items():
        set_nested(spec, dotted, value, sep="__")
    return spec


def _mlflow_history(spec, run_id, key):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=spec["tracking"]["uri"])
    return client.get_run(run_id), client.get_metric_history(run_id, key)


@pytest.fixture(scope="module")
def reference_run(workspace):
    """One uninterrupted run: 4 train volumes, 2 per step → 2 steps per epoch, so the run crosses
    an epoch and the preempted twin below resumes mid-epoch (step 3)."""
    spec = _spec(workspace, "reference")
    return spec, run_pretraining(copy.deepcopy(spec))


def test_full_run_writes_model_metrics_and_mlflow_run(reference_run):
    spec, result = reference_run
    out_dir = state_dir_for(spec["out"]).parent
    metrics = json.loads((out_dir / "metrics.json").read_text())
    assert metrics == json.loads(json.dumps(result))
    assert metrics["stage"] == "pretrain" and metrics["metrics"]["steps"] == 4
    for term in ("pr", "num", "loc", "con", "cl", "total", "val/total"):
        assert math.isfinite(metrics["metrics"][f"final/{term}"])
    assert metrics["metrics"]["seconds_per_step"] > 0
    cost = metrics["metrics"]
    assert cost["cost/timed_steps"] == 3  # the first step (set-up) is not timed
    assert 0 < cost["cost/median_step_s"] < cost["cost/total_s"]
    crops = spec["data"]["volumes_per_step"] * spec["data"]["crops_per_volume"]
    assert cost["cost/crops_per_s"] == pytest.approx(crops / cost["cost/median_step_s"])
    assert cost["cost/peak_mem_mb"] > 0  # the model and activations grew the process

    model = load_model_file(spec["out"])
    assert model["network"]["class"] == "monai.networks.nets.DynUNet"
    meta = model["meta"]
    assert meta["mlflow_run_id"] == metrics["run_id"] and meta["spec_hash"] == metrics["spec_hash"]
    assert meta["stage"] == "pretrain" and meta["steps"] == 4 and meta["crop"] == 32
    assert meta["spacing"] == [1.5, 1.5, 2.0] and meta["data_hash"]["tiny_ct"]
    assert set(model["heads"]["state_dict"]) >= {"count.weight", "location.weight",
                                                 "projection.weight"}
    network = build_network(model)  # stock MONAI net, strict load
    assert network(torch.rand(1, 1, 32, 32, 32)).shape == (1, 1, 32, 32, 32)

    run, total = _mlflow_history(spec, metrics["run_id"], "train/total")
    assert run.info.status == "FINISHED"
    assert [m.step for m in total] == [1, 2, 3, 4]
    _, lr = _mlflow_history(spec, metrics["run_id"], "lr")
    # warm-up 2 of 4 steps: factor 0, 1/2, then cosine from 1 (MONAI's WarmupCosineSchedule)
    assert [m.value for m in lr] == pytest.approx([0.0, 5e-4, 1e-3, 5e-4])
    _, val = _mlflow_history(spec, metrics["run_id"], "val/total")
    assert [m.step for m in val] == [2, 4]
    _, clock = _mlflow_history(spec, metrics["run_id"], "cost/train_s")
    assert sorted({m.step for m in clock}) == [1, 2, 3, 4]  # time-to-quality's x axis
    assert run.data.tags["config_hash"] == metrics["spec_hash"]
    assert run.data.params["optim.steps"] == "4"
    # The backbone is the run's MLflow model (not registered: only fine-tuned models are).
    assert run.outputs.model_outputs and run.data.tags["model_uri"].startswith("models:/m-")


def test_bf16_pretraining_trains_and_records_its_precision(workspace, reference_run):
    ref_spec, ref_result = reference_run
    spec = _spec(workspace, "bf16", precision="bf16", optim__steps=12, checkpoint_every=12)
    result = run_pretraining(copy.deepcopy(spec))
    run, total = _mlflow_history(spec, result["run_id"], "train/total")
    assert run.data.tags["precision"] == "bf16"
    assert run.data.tags["precision.reason"].startswith("requested bf16")
    ref_run, ref_total = _mlflow_history(ref_spec, ref_result["run_id"], "train/total")
    assert ref_run.data.tags["precision"] == "fp32"
    losses = [m.value for m in sorted(total, key=lambda m: m.step)]
    # Finite all the way: the tiny UNet's 2-voxel bottleneck hits the oneDNN bf16 bug that
    # precision.guard_cpu_bf16_convolutions works around (without it: NaN by step 3).
    assert all(math.isfinite(v) for v in losses) and len(losses) == 12
    # Step 1 sees the same weights, crops and masks as the fp32 reference: the loss differs only
    # by the arithmetic, so it must differ (bf16 did run) but only a little.
    fp32_first = next(m.value for m in ref_total if m.step == 1)
    assert losses[0] != fp32_first
    assert losses[0] == pytest.approx(fp32_first, rel=0.05)


def test_bf16_step_fits_a_fixed_batch_as_fp32_does(workspace):
    """The bf16 training step learns: on one fixed batch the loss falls like fp32's."""
    from hybridmim.models.hybridmim_model import build_pretrain_model
    from hybridmim.runtime import prepare_network
    from hybridmim.pretrain.losses import HybridMIMLoss
    from hybridmim.pretrain.masking import MaskGeometry
    from hybridmim.pretrain.spec import resolve_method
    from hybridmim.pretrain.step import PretrainStep

    torch.set_num_threads(1)
    spec = _spec(workspace, "unused")
    method = resolve_method(spec["method"])
    cpu = torch.device("cpu")
    # Smooth volumes (a bright ball on a ramp): masked regions are predictable from the rest.
    axis = torch.linspace(-1, 1, 32)
    x, y, z = torch.meshgrid(axis, axis, axis, indexing="ij")
    images = torch.stack([0.2 + 0.2 * (x + 1) / 2 + 0.5 * ((x - c) ** 2 + y ** 2 + z ** 2 < 0.3)
                          for c in (-0.3, -0.1, 0.1, 0.3)])[:, None]
    valid = torch.ones_like(images, dtype=torch.bool)
    curves = {}
    for precision in ("fp32", "bf16"):
        torch.manual_seed(0)
        model = build_pretrain_model(spec["backbone"], spec["geometry"], method)
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
        step = PretrainStep(model=model, forward_model=prepare_network(model, cpu, precision),
                            loss_fn=HybridMIMLoss(method["loss_weights"], method["temperature"]),
                            optimizer=optimizer,
                            scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0),
                            scaler=torch.amp.GradScaler("cpu", enabled=False),
                            geometry=MaskGeometry.coerce(spec["geometry"]), method=method,
                            device=cpu, precision=precision, grad_clip=1.0)
        generator = torch.Generator().manual_seed(0)
        curves[precision] = [float(step.train_step(images, valid, generator.manual_seed(0))["pr"])
                             for _ in range(10)]
    fp32, bf16 = curves["fp32"], curves["bf16"]
    assert all(math.isfinite(v) for v in bf16)
    assert bf16[-1] < 0.75 * bf16[0] and fp32[-1] < 0.75 * fp32[0], curves
    assert bf16[-1] == pytest.approx(fp32[-1], rel=0.2), curves


def test_resume_after_preemption_reaches_the_same_weights(workspace, reference_run, monkeypatch):
    ref_spec, ref_result = reference_run
    spec = _spec(workspace, "resumed")
    monkeypatch.setenv(PREEMPT_ENV, "3")
    with pytest.raises(Preempted) as stopped:
        run_pretraining(copy.deepcopy(spec))
    assert stopped.value.code == PREEMPTED_EXIT_CODE
    state = torch.load(state_dir_for(spec["out"]) / "latest.pt", weights_only=False)
    assert state["step"] == 3
    first_run_id = state["mlflow_run_id"]
    assert _mlflow_history(spec, first_run_id, "lr")[0].info.status == "KILLED"

    monkeypatch.delenv(PREEMPT_ENV)
    result = run_pretraining(copy.deepcopy(spec))
    assert result["run_id"] == first_run_id  # the same MLflow run continues
    run, total = _mlflow_history(spec, first_run_id, "train/total")
    assert run.info.status == "FINISHED" and [m.step for m in total] == [1, 2, 3, 4]

    resumed = load_model_file(spec["out"])["state_dict"]
    reference = load_model_file(ref_spec["out"])["state_dict"]
    for key, value in reference.items():
        assert torch.allclose(resumed[key], value, atol=1e-6), key
    ref_losses = [m.value for m in _mlflow_history(ref_spec, ref_result["run_id"],
                                                   "train/total")[1]]
    assert [m.value for m in total] == pytest.approx(ref_losses, rel=1e-5)


def test_state_of_another_spec_is_ignored(workspace, monkeypatch):
    spec = _spec(workspace, "changed", optim__steps=2, data__val_volumes=0)
    monkeypatch.setenv(PREEMPT_ENV, "1")
    with pytest.raises(Preempted):
        run_pretraining(copy.deepcopy(spec))
    old_run = torch.load(state_dir_for(spec["out"]) / "latest.pt",
                         weights_only=False)["mlflow_run_id"]
    monkeypatch.delenv(PREEMPT_ENV)
    changed = _spec(workspace, "changed", optim__steps=2, data__val_volumes=0,
                    optim__lr=5e-4)
    result = run_pretraining(copy.deepcopy(changed))
    assert result["run_id"] != old_run
    _, total = _mlflow_history(changed, result["run_id"], "train/total")
    assert [m.step for m in total] == [1, 2]  # started from step 0


def test_simmim_baseline_trains_full_reconstruction_only(workspace):
    spec = _spec(workspace, "simmim", method={"name": "simmim", "mask_ratio": 0.4},
                 optim__steps=2, data__val_volumes=0, data__crops_per_volume=1)
    result = run_pretraining(spec)
    finals = {k for k in result["metrics"] if k.startswith("final/")}
    assert finals == {"final/pr", "final/pr_weighted", "final/total", "final/grad_norm", "final/lr"}
    model = load_model_file(spec["out"])
    assert model["meta"]["method"] == "simmim" and model["meta"]["method_kind"] == "simmim"


def test_bad_specs_name_the_key(workspace):
    with pytest.raises(PretrainSpecError, match=r"missing \['optim.steps'\]"):
        spec = _spec(workspace, "bad")
        del spec["optim"]["steps"]
        validate_pretrain_spec(spec)
    with pytest.raises(PretrainSpecError, match="method.box must be 'full'"):
        validate_pretrain_spec(_spec(workspace, "bad", method={"name": "simmim", "box": "partial"}))
    with pytest.raises(PretrainSpecError, match="multiple of geometry.patch"):
        validate_pretrain_spec(_spec(workspace, "bad", geometry__patch=6))
    with pytest.raises(PretrainSpecError, match="geometry.patch: 0 is less than the minimum of 1"):
        validate_pretrain_spec(_spec(workspace, "bad", geometry__patch=0))
    with pytest.raises(PretrainSpecError, match=r"missing \['geometry.region'\]"):
        validate_pretrain_spec(_spec(workspace, "bad", geometry={"crop": 32, "patch": 8}))
    with pytest.raises(PretrainSpecError, match="needs at least 2 crops"):
        validate_pretrain_spec(_spec(workspace, "bad", data__volumes_per_step=1,
                                     data__crops_per_volume=1))
    weights = {"pr": 1.0, "num": 0.0, "loc": 0.0, "con": 0.0, "cl": 0.0}
    with pytest.raises(PretrainSpecError, match=r"loss_weights: Additional properties.*'rot'"):
        validate_pretrain_spec(_spec(workspace, "bad", method__loss_weights={**weights, "rot": 1}))
    with pytest.raises(PretrainSpecError, match="loss_weights.num: -1 is less than the minimum"):
        validate_pretrain_spec(_spec(workspace, "bad", method__loss_weights={**weights, "num": -1}))
    with pytest.raises(PretrainSpecError, match=r"loss_weights is missing \['num', 'loc'"):
        validate_pretrain_spec(_spec(workspace, "bad", method__loss_weights={"pr": 1.0}))
    with pytest.raises(PretrainSpecError, match="loss_weights are all 0"):
        validate_pretrain_spec(_spec(workspace, "bad", method__loss_weights={**weights, "pr": 0}))
    with pytest.raises(PretrainSpecError, match="mask_ratio: 1.5 is greater than or equal to"):
        validate_pretrain_spec(_spec(workspace, "bad", method__mask_ratio=1.5))
    with pytest.raises(PretrainSpecError, match="method.box: 'center' is not one of"):
        validate_pretrain_spec(_spec(workspace, "bad", method__box="center"))
    with pytest.raises(PretrainSpecError, match="method.masking: 'blocks' is not one of"):
        validate_pretrain_spec(_spec(workspace, "bad", method__masking="blocks"))
    with pytest.raises(PretrainSpecError, match="method.region_grouping: 'zorder' is not one of"):
        validate_pretrain_spec(_spec(workspace, "bad", method__region_grouping="zorder"))
    with pytest.raises(PretrainSpecError, match=r"method.name: 'mae' is not one of"):
        validate_pretrain_spec(_spec(workspace, "bad", method={"name": "mae"}))
    with pytest.raises(PretrainSpecError, match="optim.steps: 0 is less than the minimum of 1"):
        validate_pretrain_spec(_spec(workspace, "bad", optim__steps=0))
    with pytest.raises(PretrainSpecError, match=r"warmup_steps \(5\) exceeds optim.steps \(4\)"):
        validate_pretrain_spec(_spec(workspace, "bad", optim__warmup_steps=5))


@pytest.mark.slow
def test_ddp_with_gathered_negatives_resumes_to_the_same_weights(workspace, tmp_path):
    """torchrun, 2 CPU processes (gloo): negatives gathered across ranks, validation on rank 0
    only, per-rank RNG streams restored on resume."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop(PREEMPT_ENV, None)

    def launch(spec, stop_at=None):
        path = tmp_path / f"{len(list(tmp_path.iterdir()))}.json"
        path.write_text(json.dumps(spec))
        run_env = {**env, PREEMPT_ENV: str(stop_at)} if stop_at else env
        return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                               "--nproc_per_node", "2", "-m", "hybridmim", "pretrain",
                               "--spec-file", str(path)], env=run_env, capture_output=True,
                              text=True, timeout=600)

    changes = dict(method__gather_negatives=True, data__volumes_per_step=1, optim__steps=3)
    straight = _spec(workspace, "ddp_straight", **changes)
    assert launch(straight).returncode == 0
    resumed = _spec(workspace, "ddp_resumed", **changes)
    stopped = launch(resumed, stop_at=2)
    assert stopped.returncode != 0 and "stopped after step 2 of 3" in stopped.stderr
    finished = launch(resumed)
    assert finished.returncode == 0, finished.stderr[-2000:]
    reference = load_model_file(straight["out"])["state_dict"]
    result = load_model_file(resumed["out"])["state_dict"]
    for key, value in reference.items():
        assert torch.allclose(result[key], value, atol=1e-6), key


def test_channels_last_changes_speed_only(workspace):
    # No dropout: a dropout mask is drawn in memory order, so it differs between layouts.
    totals = {}
    for layout, extra in (("default", {}), ("channels_last", {"channels_last": True})):
        spec = _spec(workspace, f"layout_{layout}", backbone__dropout=0.0, optim__steps=2,
                     **extra)
        result = run_pretraining(copy.deepcopy(spec))
        _, total = _mlflow_history(spec, result["run_id"], "train/total")
        totals[layout] = [m.value for m in sorted(total, key=lambda m: m.step)]
    assert totals["channels_last"] == pytest.approx(totals["default"], rel=1e-4)
