"""DDP pretraining equals its documented single-process counterpart.

W processes with ``volumes_per_step = v`` must train the same weights as one process with
``volumes_per_step = v·W`` and the same seed (hybridmim/pretrain/train.py docstring): same volumes
per step, same (volume, mask) pairs, per-sample loss means, and negatives gathered across ranks.
"""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from torch.utils.data import DistributedSampler

from hybridmim.checkpoints import load_model_file
from hybridmim.dataset_catalog import CT_PRETRAIN_WINDOW
from hybridmim.pretrain.feed import global_crop_rows
from hybridmim.pretrain.losses import partial_region_loss
from hybridmim.pretrain.masking import MaskGeometry, expand_to_voxels, sample_patch_mask
from hybridmim.pretrain.train import run_pretraining
from hybridmim.runtime import DistInfo
from hybridmim.training_loop import PREEMPT_ENV

CROP = 32


def test_rank_rows_reproduce_the_single_process_batch():
    """Over all ranks, every (volume, crop) of a step sits at the global row that one process with
    v·W volumes per step gives it — checked against the real DistributedSampler order."""
    volumes, world, per_rank, crops = 11, 3, 2, 2
    dataset = list(range(volumes))
    single = list(DistributedSampler(dataset, num_replicas=1, rank=0, shuffle=True, seed=5,
                                     drop_last=True))
    steps = volumes // (per_rank * world)
    for step in range(steps):
        expected = {}  # global row -> (volume, crop)
        for i, volume in enumerate(single[step * per_rank * world:(step + 1) * per_rank * world]):
            for k in range(crops):
                expected[i * crops + k] = (volume, k)
        seen = {}
        for rank in range(world):
            order = list(DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True,
                                            seed=5, drop_last=True))
            local = order[step * per_rank:(step + 1) * per_rank]
            rows = global_crop_rows(per_rank, crops, DistInfo(rank=rank, world_size=world))
            for row, (volume, k) in zip(rows.tolist(),
                                        [(v, k) for v in local for k in range(crops)]):
                assert row not in seen
                seen[row] = (volume, k)
        assert seen == expected
    assert torch.equal(global_crop_rows(4, 2, DistInfo()), torch.arange(8))


def test_partial_region_loss_of_a_batch_is_the_mean_over_equal_parts():
    """What DDP's gradient averaging relies on: equal halves (with different numbers of scored
    voxels) average to the loss of the whole batch."""
    geometry = MaskGeometry(crop=CROP, region=16, patch=8)
    gen = torch.Generator().manual_seed(0)
    target = torch.rand(4, 1, CROP, CROP, CROP, generator=gen)
    recon = torch.randn(4, 1, CROP, CROP, CROP, generator=gen)
    mask = expand_to_voxels(sample_patch_mask(4, geometry, 0.4, generator=gen), geometry.patch)
    valid = torch.ones_like(mask)
    valid[0, ..., 20:] = False  # padding in one sample only: scored counts differ
    box = (slice(0, CROP),) * 3
    # Per-sample normalisation (the DDP-exact option; the default, one mean over the batch's
    # voxels as the authors' code, weighs the halves by their scored counts).
    halves = [partial_region_loss(recon[s], target[s], box, mask[s], valid[s], "sample")
              for s in (slice(0, 2), slice(2, 4))]
    counts = (mask & valid).flatten(1).sum(1)
    assert counts[0] != counts[2]
    whole = partial_region_loss(recon, target, box, mask, valid, "sample")
    assert torch.allclose(whole, (halves[0] + halves[1]) / 2, rtol=1e-6)


def _write_small_volumes(root, cases=6):
    """A processed CT cache whose volumes are smaller than the crop on every axis: the crop is the
    centred, padded volume (PretrainCropDataset draws no random offset), so crops are the same in
    every process and the data pipeline is deterministic."""
    folder = root / "small_ct"
    (folder / "cases").mkdir(parents=True)
    rng = np.random.default_rng(0)
    records = []
    for i in range(cases):
        shape = (24 + i % 3, 26, 28 + i % 2)
        grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"))
        body = (grid ** 2).sum(0) < 0.5 + 0.05 * i
        image = (np.where(body, 40.0, -1000.0) + rng.normal(0, 200, shape))[None]
        case = f"case{i:02d}"
        np.save(folder / "cases" / f"{case}_image.npy", image.astype(np.float32))
        np.save(folder / "cases" / f"{case}_label.npy", body.astype(np.uint8))
        records.append({"case": case, "image": f"cases/{case}_image.npy",
                        "label": f"cases/{case}_label.npy", "spacing": [1.5, 1.5, 2.0],
                        "shape": [1, *shape]})
    (folder / "dataset.json").write_text(json.dumps({
        "name": "small_ct", "channels": ["CT"], "labels": {"0": "background", "1": "body"},
        "recipe": {"modality": "CT", "spacing": [1.5, 1.5, 2.0]}, "recipe_hash": "test",
        "cases": records}))
    ids = [r["case"] for r in records]
    (folder / "splits.json").write_text(json.dumps(
        {"seed": 0, "recipe": "test", "test": ids[:1], "val": ids[1:2], "train": ids[2:]}))
    return folder


def _spec(root, data_dir, out, volumes_per_step, seed=0):
    return {
        "run_name": f"ddp/{out}", "seed": seed, "out": str(root / out / "model.pt"),
        "tracking": {"uri": f"sqlite:///{root}/mlflow.db", "artifact_root": str(root / "art")},
        "provenance": {"rule": "pretrain", "wildcards": {}},
        "precision": "fp32", "deterministic": True, "threads": 1,
        # No dropout: the two contrastive views and the forward pass are then the same function
        # in every process (dropout draws from each rank's own stream).
        "backbone": {"name": "unet", "in_channels": 1, "filters": [4, 8, 8, 16, 16],
                     "dropout": 0.0},
        "geometry": {"crop": CROP, "region": 16, "patch": 8},
        # All five terms; gathered negatives make L_CL's negative set the global batch.
        "method": {"name": "hybridmim", "kind": "hybridmim", "box": "partial",
                   "masking": "uniform", "mask_ratio": 0.4, "region_grouping": "spatial",
                   "loss_weights": {"pr": 1.0, "num": 0.1, "loc": 0.1, "con": 0.01, "cl": 0.1},
                   "temperature": 0.5, "proj_dim": 16, "gather_negatives": True,
                   # Per-sample L_PR means: the rank average then equals the global-batch loss
                   # (the authors' one-mean-per-batch default does not split across ranks).
                   "pr_normalisation": "sample"},
        "data": {"datasets": [{"name": "small_ct", "processed_dir": str(data_dir),
                               "modality": "CT", "window": dict(CT_PRETRAIN_WINDOW)}],
                 "crops_per_volume": 2, "volumes_per_step": volumes_per_step, "val_volumes": 0,
                 "num_workers": 0},
        # 4 training volumes, 4 per step in total: every step is an epoch (new permutation).
        "optim": {"lr": 1e-3, "weight_decay": 1e-3, "warmup_steps": 1, "steps": 3,
                  "grad_clip": 1.0},
        "checkpoint_every": 3, "log_every": 1,
    }


def _max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


@pytest.mark.slow
def test_two_processes_train_the_same_weights_as_one_with_the_global_batch(tmp_path):
    data_dir = _write_small_volumes(tmp_path)
    spec_file = tmp_path / "ddp_spec.json"
    ddp = _spec(tmp_path, data_dir, "ddp", volumes_per_step=2)
    spec_file.write_text(json.dumps(ddp))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop(PREEMPT_ENV, None)
    started = time.perf_counter()
    launched = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                               "--nproc_per_node", "2", "-m", "hybridmim", "pretrain",
                               "--spec-file", str(spec_file)], env=env, capture_output=True,
                              text=True, timeout=300)
    assert launched.returncode == 0, launched.stderr[-3000:]
    ddp_seconds = time.perf_counter() - started

    run_pretraining(copy.deepcopy(_spec(tmp_path, data_dir, "single", volumes_per_step=4)))
    run_pretraining(copy.deepcopy(_spec(tmp_path, data_dir, "other_seed", volumes_per_step=4,
                                        seed=1)))
    weights = {name: load_model_file(tmp_path / name / "model.pt")
               for name in ("ddp", "single", "other_seed")}
    assert weights["ddp"]["meta"]["steps"] == weights["single"]["meta"]["steps"] == 3

    def all_tensors(record):  # network and pretraining heads (count, location, projection)
        return {**record["state_dict"],
                **{f"heads.{k}": v for k, v in record["heads"]["state_dict"].items()}}

    ddp_w, single_w = all_tensors(weights["ddp"]), all_tensors(weights["single"])
    init_w = _initial_weights(_spec(tmp_path, data_dir, "single", volumes_per_step=4))
    # Adam turns float-summation noise in near-zero gradient components into updates of up to
    # ~lr (one process with 1 vs 2 threads already differs by ~6e-4 at lr 1e-3), so element-wise
    # closeness is judged against how far training moved the weights, not in absolute terms.
    moved = _norm({k: single_w[k] - init_w[k] for k in single_w})
    assert moved < 0.1 * _norm(init_w)  # init_w really is the start (not another init)
    relative = _norm({k: ddp_w[k] - single_w[k] for k in single_w}) / moved
    other = _norm({k: v - single_w[k] for k, v in all_tensors(weights["other_seed"]).items()})
    print(f"DDP vs single process: max |dw| = {_max_abs_diff(ddp_w, single_w):.3g}, "
          f"||dw|| / ||w - w0|| = {relative:.3g}; other seed: {other / moved:.3g}; "
          f"torchrun run {ddp_seconds:.1f} s")
    assert relative < 1e-2
    # The check can fail: another seed (other init and masks) lands far outside the tolerance.
    assert other / moved > 1.0


def _norm(tensors: dict[str, torch.Tensor]) -> float:
    return float(torch.sqrt(sum(v.double().square().sum() for v in tensors.values())))


def _initial_weights(spec) -> dict[str, torch.Tensor]:
    """The weights every process starts from (train.py seeds, then builds the model)."""
    from hybridmim.models.hybridmim_model import build_pretrain_model
    from hybridmim.pretrain.spec import resolve_method
    from hybridmim.runtime import seed_everything

    seed_everything(spec["seed"])
    model = build_pretrain_model(spec["backbone"], spec["geometry"],
                                 resolve_method(spec["method"]))
    heads = model.heads_record()["state_dict"]
    return {**model.network.state_dict(), **{f"heads.{k}": v for k, v in heads.items()}}
