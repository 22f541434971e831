"""Segmentation fine-tuning: one job spec (workflow/schemas/finetune_spec.schema.yaml) → model.pt.

Step-based training of a stock MONAI network with Dice + cross-entropy, validated every
``val_every`` steps with sliding-window inference on the split's ``val`` cases. The published
``model.pt`` holds the weights of the BEST validation Dice (``meta.weights`` says so), not the
last step's. The full training state is saved to ``state/latest.pt`` every ``checkpoint_every``
steps and on SIGTERM; re-running the same spec resumes from it, continuing the same MLflow run.
A resume starts a fresh shuffle epoch (the sample order is seeded by seed and epoch; random crops
are seeded by seed and the step the loader started at), so it is reproducible but not identical to
an uninterrupted run.
"""
from __future__ import annotations

import copy
import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Iterator

import torch
from monai.losses import DiceCELoss

from hybridmim import checkpoints, runtime
from hybridmim.data.layout import read_processed_index
from hybridmim.evaluate.metrics import (check_class_indices, class_names, dice_metric,
                                        foreground_masks, ground_truth_masks, metric_key, nanmean)
from hybridmim.hashing import spec_hash as compute_spec_hash
from hybridmim.jobguard import guarded_job
from hybridmim.runtime import prepare_network
from hybridmim.predict.inference import predict_volume, probabilities_to_masks
from hybridmim.spec_schemas import check_spec
from hybridmim.training_loop import TrainingLoop, optimisation, optimiser_step

log = logging.getLogger(__name__)


def dataset_spacing(processed_dir: str | Path) -> list[float] | None:
    """Voxel spacing of the preprocessed data (the recipe's target spacing, else the first
    case's), recorded in model.pt so inference knows the resolution the model expects."""
    info = read_processed_index(processed_dir)
    spacing = (info.get("recipe") or {}).get("spacing")
    if spacing is None and info.get("cases"):
        spacing = info["cases"][0].get("spacing")
    return [float(s) for s in spacing] if spacing is not None else None


def initialise_network(network: torch.nn.Module, init: dict[str, Any]) -> dict[str, Any]:
    """Random init (``scratch``) or a transfer from a published model file. Returns counts and
    key lists of what was (not) transferred, for the log and MLflow."""
    checkpoint = init.get("checkpoint")
    if not checkpoint:
        return {"source": "random", "counts": {}, "keys": {}}
    from hybridmim.models.transfer import load_into

    result = load_into(network, checkpoint, reinit_first_layer=init.get("first_layer") == "reinit")
    keys = {name: sorted(value) for name, value in result.items()}
    counts = {name: len(value) for name, value in keys.items()}
    if counts["loaded"] == 0:
        raise ValueError(f"init.checkpoint {checkpoint}: no tensor matched the fine-tuning "
                         "network; was it pretrained with the same backbone settings?")
    log.info("initialised from %s: %s", checkpoint, counts)
    return {"source": str(checkpoint), "counts": counts, "keys": keys}


class FinetuneJob:
    """Everything one fine-tuning job needs, built from its spec."""

    def __init__(self, spec: dict[str, Any]):
        # Fail before any work, naming the bad key: the schema checks keys, types and ranges,
        # this the one check between keys.
        check_spec(spec, "finetune")
        if spec["init"]["name"] != "scratch" and not spec["init"].get("checkpoint"):
            raise ValueError(f"init.name is {spec['init']['name']!r} but init.checkpoint is "
                             "empty; point it at a pretrained model.pt or use init.name 'scratch'")
        self.spec = spec
        self.spec_hash = compute_spec_hash(spec)
        self.out = Path(spec["out"])
        self.state_dir = checkpoints.state_dir_for(self.out)
        ds = spec["dataset"]
        self.processed_dir = ds["processed_dir"]
        self.regions = ds.get("regions") or None
        self.names = class_names(ds["labels"], self.regions)
        self.out_channels = len(self.regions) if self.regions else len(ds["labels"])
        self.crop = spec["crop"]
        self.optim = spec["optim"]
        self.steps = int(self.optim["steps"])
        runtime.configure_threads(spec.get("threads"))
        self.device = runtime.select_device()
        self.precision_choice = runtime.precision_choice(spec.get("precision", "auto"),
                                                         self.device, spec["backbone"]["name"])
        self.precision = self.precision_choice.precision

    # ---- data ---------------------------------------------------------------------------------
    def datasets(self):
        from hybridmim.data.loading import SegmentationDataset
        from hybridmim.data.prepare.splits import label_fraction_subset, load_splits

        splits = load_splits(self.processed_dir)
        if not splits.get("train"):
            raise ValueError(f"{self.processed_dir}/splits.json has no 'train' cases")
        train_ids = label_fraction_subset(splits["train"], float(self.spec["label_fraction"]),
                                          int(self.spec["seed"]))
        val_ids = list(splits.get("val") or [])
        # MONAI's BTCV/MSD reference protocol reports on its validation cases; selecting the
        # best checkpoint on them would then be selection on the test set.
        self.val_is_test = bool(splits.get("val_is_test"))
        if not val_ids:
            raise ValueError(f"{self.processed_dir}/splits.json has no 'val' cases; fine-tuning "
                             "selects its best checkpoint on them — regenerate the splits")
        ds = self.spec["dataset"]
        common = {"window": ds["window"], "crop": self.crop, "regions": self.regions}
        train = SegmentationDataset(self.processed_dir, train_ids,
                                    num_samples=int(self.spec.get("crops_per_volume", 2)),
                                    train=True, **common)
        val = SegmentationDataset(self.processed_dir, val_ids, num_samples=1, train=False, **common)
        return train_ids, val_ids, train, val

    def batches(self, dataset, epoch: int, loader_seed: int) -> Iterator[tuple[int, dict]]:
        """Endless (epoch, batch) stream; each epoch is a seeded shuffle of the training cases."""
        from torch.utils.data import DataLoader, DistributedSampler

        sampler = DistributedSampler(dataset, num_replicas=1, rank=0, shuffle=True,
                                     seed=int(self.spec["seed"]))
        workers = int(self.spec.get("num_workers", 0))
        loader = DataLoader(dataset, batch_size=int(self.spec["batch_size"]), sampler=sampler,
                            num_workers=workers, persistent_workers=workers > 0,
                            pin_memory=self.device.type == "cuda",
                            generator=torch.Generator().manual_seed(loader_seed))
        while True:
            sampler.set_epoch(epoch)
            for batch in loader:
                yield epoch, batch
            epoch += 1

    # ---- validation ---------------------------------------------------------------------------
    def validate(self, network: torch.nn.Module, val_dataset) -> dict[str, float]:
        """Mean Dice per class over the validation cases (sliding window, Gaussian blending)."""
        # HD95 is not needed to pick the best checkpoint; Dice alone keeps validation cheap.
        validation_dice = dice_metric()
        network.eval()
        for index in range(len(val_dataset)):
            item = val_dataset[index]
            probs = predict_volume(network, torch.as_tensor(item["image"]), self.crop,
                                   overlap=float(self.spec["sw_overlap"]), device=self.device,
                                   precision=self.precision, regions=bool(self.regions))
            pred = probabilities_to_masks(probs, bool(self.regions))
            truth = ground_truth_masks(torch.as_tensor(item["label"]), self.out_channels,
                                       bool(self.regions))
            pred, truth = foreground_masks(pred, truth, bool(self.regions))
            validation_dice(pred.unsqueeze(0).float(), truth.unsqueeze(0).float())
        network.train()
        per_case = validation_dice.aggregate()  # (cases, classes)
        dice = {name: nanmean([float(v) for v in per_case[:, i]])
                for i, name in enumerate(self.names)}
        return {**{f"val_dice_{metric_key(n)}": v for n, v in dice.items()},
                "val_dice_mean": nanmean(list(dice.values()))}


@guarded_job
def run_finetuning(spec: dict[str, Any]) -> dict[str, Any]:
    """Train, validate, checkpoint and publish one fine-tuning job; return its metrics.json.

    Resume, checkpoint cadence, preemption, progress and the MLflow run come from
    hybridmim/training_loop.py, shared with pretraining; this is the segmentation step,
    validation and the best model."""
    from hybridmim.models.backbones import build_segmentation_network

    job = FinetuneJob(spec)
    runtime.seed_everything(int(spec["seed"]))
    network, class_path, kwargs = build_segmentation_network(spec["backbone"], job.out_channels,
                                                             job.crop)
    train_ids, val_ids, train_ds, val_ds = job.datasets()
    # What the resume state holds beside TrainingLoop's own entries (and the RNG states).
    extras = {"epoch": 0, "seconds": 0.0, "history": [], "init_counts": None,
              "best": {"val_dice_mean": -1.0, "step": -1}}
    loop = TrainingLoop(spec, job.spec_hash, job.steps,
                        lambda: {**extras, "rng": runtime.rng_state()}, job.device)
    init_report = None
    if loop.saved is None:  # a resumed job gets its weights from the state
        init_report = initialise_network(network, spec["init"])
        extras["init_counts"] = init_report["counts"]
    network.to(job.device)
    forward = prepare_network(network, job.device, job.precision, spec)
    optimizer, scheduler, scaler = optimisation(network.parameters(), job.optim, job.steps,
                                                job.device, job.precision)
    state = loop.resume(model=network, optimizer=optimizer, scheduler=scheduler, scaler=scaler)
    if state is not None:
        runtime.set_rng_state(state["rng"])
        extras.update({key: state[key] for key in extras})
    loss_fn = (DiceCELoss(sigmoid=True) if job.regions
               else DiceCELoss(to_onehot_y=True, softmax=True))

    with loop.tracked("finetune", data_dirs=[job.processed_dir],
                      upstream_model=spec["init"].get("checkpoint")) as run:
        if init_report is not None:
            run.set_tags({"init.source": init_report["source"], **job.precision_choice.tags(),
                          "train_cases": len(train_ids), "val_cases": len(val_ids),
                          **{f"init.{k}": v for k, v in init_report["counts"].items()}})
            run.log_dict({"train_ids": train_ids, "val_ids": val_ids, "init": init_report},
                         "finetune_setup.json")
        network.train()
        stream = job.batches(train_ds, extras["epoch"],
                             loader_seed=int(spec["seed"]) * 1_000_003 + loop.step)
        t_last = time.monotonic()
        while loop.step < job.steps:
            extras["epoch"], batch = next(stream)
            # Items hold several crops of one volume: (B, N, C, ...) → a batch of B*N crops.
            image = batch["image"].flatten(0, 1).to(job.device, non_blocking=True)
            # The target: class indices (N, 1, ...) or region channels (N, R, ...), one per region
            # (labels_to_regions), so only class indices need a range check.
            target = batch["label"].flatten(0, 1).to(job.device, non_blocking=True)
            if not job.regions:
                check_class_indices(target, job.out_channels)
            with runtime.autocast(job.device, job.precision):
                logits = forward(image)
            # The loss (softmax/sigmoid, Dice ratios) runs in fp32 for stability.
            loss = loss_fn(logits.float(), target.float())
            if not torch.isfinite(loss):
                raise FloatingPointError(f"loss became {loss.item()} at step {loop.step}; lower "
                                         "optim.lr or use precision fp32/bf16")
            lr = optimizer.param_groups[0]["lr"]  # the rate this step uses
            optimiser_step(loss, network, optimizer, scheduler, scaler,
                           float(job.optim.get("grad_clip") or 0.0))
            loop.step += 1
            now = time.monotonic()
            extras["seconds"], t_last = extras["seconds"] + (now - t_last), now
            if loop.due(spec["log_every"]):
                run.log_metrics({"train_loss": loss.item(), "lr": lr}, loop.step)
            if loop.due(spec["val_every"]):
                _validate_and_keep_best(job, loop, run, forward, val_ds, extras)
                t_last = time.monotonic()  # validation time is not training time
            loop.end_of_step(loss=loss.item())
        return publish(job, loop, run, class_path, kwargs, extras["seconds"],
                       extras["init_counts"])


def _validate_and_keep_best(job: FinetuneJob, loop: TrainingLoop, run, network, val_ds,
                            extras: dict[str, Any]) -> None:
    """Validate, log, and keep the weights of the best validation Dice in ``state/best.pt``."""
    scores = job.validate(network, val_ds)
    run.log_metrics(scores, loop.step)
    extras["history"].append({"step": loop.step, **scores})
    # A NaN mean (no validation case holds any structure) still yields a best.pt.
    score = -0.5 if math.isnan(scores["val_dice_mean"]) else scores["val_dice_mean"]
    if score > extras["best"]["val_dice_mean"]:
        extras["best"] = {"val_dice_mean": score, "step": loop.step}
        # The network's own weights (``network`` may be a compiled wrapper of it).
        checkpoints.save_state(job.state_dir, {"model": loop.objects["model"].state_dict(),
                                               "step": loop.step, "scores": scores},
                               job.spec_hash, name="best")
    log.info("step %d validation: %s (best %.4f at step %d)", loop.step,
             json.dumps({k: round(v, 4) for k, v in scores.items()}),
             extras["best"]["val_dice_mean"], extras["best"]["step"])


def _recorded_data_hash(run, processed_dir: str) -> str:
    """The data hash the run's provenance tags hold (hashing a large folder twice is slow)."""
    from hybridmim.tracking.provenance import data_hash

    try:
        return run.client.get_run(run.run_id).data.tags[f"data_hash.{Path(processed_dir).name}"]
    except Exception:  # a run without the tag (NullRun, older run): compute it
        return data_hash(processed_dir)["hash"]


def publish(job: FinetuneJob, loop: TrainingLoop, run, class_path: str, kwargs: dict[str, Any],
            seconds: float, init_counts: dict[str, int] | None) -> dict[str, Any]:
    """Write model.pt and metrics.json beside it.

    The published weights are the best validation checkpoint (state/best.pt), except when the
    split's validation cases ARE its test cases (``val_is_test``): then the final weights are
    published, so that no choice is ever made on the cases the evaluation reports."""
    from hybridmim.tracking import catalog

    spec = job.spec
    best_state = checkpoints.load_state(job.state_dir, job.spec_hash, name="best")
    if best_state is None:
        raise RuntimeError(f"{job.state_dir}/best.pt is missing although training finished; "
                           "delete the state folder and re-run the job")
    ds = spec["dataset"]
    best_step, best_dice = int(best_state["step"]), float(best_state["scores"]["val_dice_mean"])
    weights, published = "best_validation", best_state["model"]
    if getattr(job, "val_is_test", False):
        final_state = checkpoints.load_state(job.state_dir, job.spec_hash, name="latest")
        if final_state is None or int(final_state["step"]) != job.steps:
            raise RuntimeError(f"{job.state_dir}/latest.pt does not hold the final step; "
                               "delete the state folder and re-run the job")
        weights, published = "final (validation cases are the test cases)", final_state["model"]
    from hybridmim.predict.pipeline import recorded_preprocess

    meta = {"method": spec["init"].get("name"), "crop": job.crop,
            "spacing": dataset_spacing(job.processed_dir), "modality": ds.get("modality"),
            "channels": int(spec["backbone"]["in_channels"]), "labels": ds["labels"],
            "regions": job.regions, "window": ds["window"],
            # The cache records the recipe as applied (a "median" spacing resolved to numbers).
            "preprocess": recorded_preprocess(job.processed_dir) or ds.get("preprocess"),
            "channel_names": ds.get("channels"),
            "init": {**copy.deepcopy(spec["init"]), "transferred": init_counts or {}},
            "data_hash": _recorded_data_hash(run, job.processed_dir),
            "weights": weights, "best_step": best_step, "best_val_dice": best_dice}
    metrics = {"best_val_dice_mean": best_dice, "best_step": float(best_step),
               "steps": float(job.steps), "train_seconds": seconds}
    run.log_metrics({"best_val_dice_mean": best_dice}, job.steps)
    # Registered in the MLflow model registry under dataset-backbone-init.
    result = loop.publish(run, class_path, kwargs, published, meta, metrics,
                          registered_name=catalog.registered_name(spec),
                          best_scores=best_state.get("scores", {}))
    log.info("published %s (best validation Dice %.4f at step %d of %d)", job.out, best_dice,
             best_step, job.steps)
    return result
