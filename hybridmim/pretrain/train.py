"""HybridMIM / SimMIM-style pretraining of one backbone on one corpus: ``run_pretraining(spec)``.

The job spec (pretrain_spec.schema.yaml) fully defines the run. One code path serves CPU,
one GPU and ``torchrun`` DDP (only rank 0 logs and writes). The job resumes by itself: its state
(model, optimizer, scheduler, scaler, step, RNG states incl. the masking generator, history and
MLflow run id) is saved every ``checkpoint_every`` steps and on SIGTERM into ``state/`` beside
``model.pt``; a re-run of the same spec continues from there, in the same MLflow run.

DDP (``torchrun --nproc_per_node=W``, one process per GPU): every rank takes ``volumes_per_step``
volumes per step, so the effective batch is W × ``volumes_per_step`` × ``crops_per_volume`` crops,
and the gradient is averaged over the ranks. The run is equivalent to ONE process with
``volumes_per_step`` × W volumes per step (same seed): the ranks read the same volumes in total
(feed.py), every rank draws the masks of the global batch from one identically seeded generator
and keeps its own rows (``feed.global_crop_rows``), and L_Num, L_Loc, L_Con (and L_PR with
``method.pr_normalisation: sample``) are means of per-sample terms, so the average of the rank
losses is the global loss. With the default ``pr_normalisation: batch`` (the authors' code) each
rank takes one L_PR mean over its own scored voxels. L_CL matches only with
``method.gather_negatives: true`` (negatives from all ranks); with the default (off) each rank
contrasts its own samples. Equivalence holds up to float summation order and needs a deterministic
data pipeline (tests/test_pretrain_ddp.py checks it); dropout and random crops draw from each
rank's own stream. The learning rate is NOT scaled with W: when changing the GPU count, scale
``optim.lr`` yourself (e.g. linearly with the effective batch) or keep the effective batch fixed by
dividing ``volumes_per_step``.

Resume, checkpoint cadence, preemption (incl. the ``HYBRIDMIM_PREEMPT_AT_STEP`` hook), progress and
the MLflow run come from hybridmim/training_loop.py, shared with fine-tuning.
"""
from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

import torch

from hybridmim import runtime
from hybridmim.data.layout import read_processed_index
from hybridmim.hashing import spec_hash as compute_spec_hash
from hybridmim.jobguard import guarded_job
from hybridmim.pretrain.cost import CostMeter
from hybridmim.pretrain.feed import StepFeed, global_crop_rows
from hybridmim.pretrain.losses import HybridMIMLoss
from hybridmim.pretrain.masking import MaskGeometry
from hybridmim.pretrain.spec import resolve_method, validate_pretrain_spec
from hybridmim.pretrain.step import PretrainStep, TermWindow
from hybridmim.predict.pipeline import recorded_preprocess
from hybridmim.training_loop import TrainingLoop, optimisation

log = logging.getLogger(__name__)

VALIDATION_SEED_OFFSET = 7_777_777


@guarded_job
def run_pretraining(spec: dict[str, Any]) -> dict[str, Any]:
    """Run (or resume) the pretraining job; returns the content of its metrics.json."""
    validate_pretrain_spec(spec)
    runtime.configure_threads(spec.get("threads"))
    dist = runtime.init_distributed()
    try:
        return _PretrainJob(spec, dist).run()
    finally:
        runtime.shutdown_distributed()


class _PretrainJob:
    def __init__(self, spec: dict[str, Any], dist: runtime.DistInfo):
        from hybridmim.models.hybridmim_model import build_pretrain_model
        from hybridmim.pretrain.corpus import build_train_dataset, build_val_dataset

        self.spec, self.dist = spec, dist
        self.spec_hash = compute_spec_hash(spec)
        self.method = resolve_method(spec["method"])
        self.geometry = MaskGeometry.coerce(spec["geometry"])
        self.device = runtime.select_device(dist)
        self.precision_choice = runtime.precision_choice(spec.get("precision", "auto"),
                                                         self.device, spec["backbone"]["name"])
        self.precision = self.precision_choice.precision
        data, optim = spec["data"], spec["optim"]
        volumes, crops = int(data["volumes_per_step"]), int(data["crops_per_volume"])
        self.cost = CostMeter(self.device, volumes * crops * dist.world_size)
        self.total_steps = int(optim["steps"])
        self.seed = int(spec["seed"])
        # Same seed on every rank: identical initial weights (DDP also broadcasts rank 0's).
        runtime.seed_everything(self.seed, deterministic=bool(spec.get("deterministic", False)))

        self.model = build_pretrain_model(spec["backbone"], spec["geometry"], self.method)
        self.model.to(self.device)
        self.loss_fn = HybridMIMLoss.from_method(self.method)
        self.optimizer, self.scheduler, self.scaler = optimisation(
            self.model.parameters(), optim, self.total_steps, self.device, self.precision)
        # Masks come from their own generator on the device, seeded identically on every rank:
        # each rank draws the masks of the global batch and keeps its rows (PretrainStep).
        self.mask_generator = torch.Generator(device=self.device)
        self.mask_generator.manual_seed(self.seed * 1_000)

        self.history: list[dict[str, Any]] = []
        self.loop = TrainingLoop(spec, self.spec_hash, self.total_steps, self._state_extras,
                                 self.device, dist)
        self._restore(self.loop.resume(model=self.model, optimizer=self.optimizer,
                                       scheduler=self.scheduler, scaler=self.scaler))

        self.dataset = build_train_dataset(spec)
        self.feed = StepFeed(self.dataset, volumes, dist, self.seed, self.device,
                             num_workers=int(data.get("num_workers", 0)), start_step=self.loop.step)
        self.val_dataset = (build_val_dataset(spec, self.seed + VALIDATION_SEED_OFFSET)
                            if dist.is_main else None)

        network: torch.nn.Module = runtime.prepare_network(self.model, self.device,
                                                           self.precision, spec)
        if dist.enabled:
            # DDP must be told when a switched-off loss leaves a head without gradient.
            on = self.loss_fn.enabled
            network = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[dist.local_rank] if self.device.type == "cuda" else None,
                find_unused_parameters=not (on("loc") and on("cl") and (on("num") or on("con"))))
        self.stepper = PretrainStep(
            model=self.model, forward_model=network, loss_fn=self.loss_fn,
            optimizer=self.optimizer, scheduler=self.scheduler, scaler=self.scaler,
            geometry=self.geometry, method=self.method, device=self.device,
            precision=self.precision, grad_clip=float(optim.get("grad_clip", 0.0) or 0.0),
            global_batch=volumes * crops * dist.world_size,
            mask_rows=global_crop_rows(volumes, crops, dist))

    # ------------------------------------------------------------------------------------- state
    def _restore(self, state: dict[str, Any] | None) -> None:
        """The pretraining's own part of the resume state (TrainingLoop restores the rest)."""
        if state is None:
            return
        self.history = list(state["history"])
        self.cost.restore(state.get("cost"))
        rng, masks = state["rng"], state["mask_rng"]
        # The mask generator is the same on every rank, so one state serves any world size.
        if isinstance(masks, list):  # a state written when each rank had its own mask stream
            masks = masks[0]
        self.mask_generator.set_state(masks.to("cpu"))
        if len(rng) == self.dist.world_size:
            runtime.set_rng_state(rng[self.dist.rank])
        else:
            log.warning("resume state was written by %d process(es), this job has %d: the "
                        "per-process random streams (dropout) restart from the seed (training "
                        "continues correctly, but not bit-identically)", len(rng),
                        self.dist.world_size)

    def _state_extras(self) -> dict[str, Any]:
        # Every rank contributes its RNG streams (a collective), rank 0 writes. The mask
        # generator is identical on all ranks: rank 0's state is the state.
        rng: list[Any] = [runtime.rng_state()]
        if self.dist.enabled:
            import torch.distributed as torch_dist

            rng = [None] * self.dist.world_size
            torch_dist.all_gather_object(rng, runtime.rng_state())
        return {"rng": rng, "mask_rng": self.mask_generator.get_state().cpu(),
                "history": self.history, "cost": self.cost.state()}

    # ------------------------------------------------------------------------------------- loop
    def run(self) -> dict[str, Any]:
        spec = self.spec
        data_dirs = [d["processed_dir"] for d in spec["data"]["datasets"]]
        with self.loop.tracked("pretrain", data_dirs=data_dirs) as run:
            if self.dist.is_main and self.loop.step == 0:
                run.set_tags({**self.precision_choice.tags(), "world_size": self.dist.world_size,
                              "method.kind": self.method["kind"]})
            self._train(run)
            if self.dist.is_main:
                return self._finish(run)
        return {}

    def _train(self, run: Any) -> None:
        loop = self.loop
        window = TermWindow()
        last_logged: dict[str, float] = {}
        first_step_of_process = True
        while loop.step < self.total_steps:
            started = time.perf_counter()
            images, valid = self.feed.next_batch()
            lr = self.optimizer.param_groups[0]["lr"]
            window.add(self.stepper.train_step(images, valid, self.mask_generator))
            loop.step += 1
            if not first_step_of_process:  # the first step of a process pays one-off set-up
                self.cost.add_step(time.perf_counter() - started)
            first_step_of_process = False
            if loop.due(self.spec["log_every"]):
                last_logged = window.pop_means()
                if not math.isfinite(last_logged.get("total", 0.0)):
                    terms = {k: v for k, v in last_logged.items() if not k.endswith("_weighted")}
                    raise FloatingPointError(
                        f"pretraining loss is {last_logged['total']} at step {loop.step} "
                        f"({terms}); lower optim.lr, keep optim.grad_clip > 0 or use precision "
                        f"bf16/fp32")
                self.history.append({"step": loop.step, "lr": lr, **last_logged})
                run.log_metrics({**{f"train/{k}": v for k, v in last_logged.items()}, "lr": lr,
                                 "cost/train_s": self.cost.train_s()}, loop.step)
            # Validation follows the checkpoint cadence.
            if self.val_dataset is not None and loop.due(loop.checkpoint_every):
                val = self.stepper.validate(self.val_dataset, self.seed + VALIDATION_SEED_OFFSET,
                                            int(self.spec["data"]["volumes_per_step"]))
                run.log_metrics({**{f"val/{k}": v for k, v in val.items()},
                                 "cost/train_s": self.cost.train_s()}, loop.step)
                self.history.append({"step": loop.step, **{f"val/{k}": v for k, v in val.items()}})
            loop.end_of_step(loss=last_logged.get("total", float("nan")), lr=lr)

    def _finish(self, run: Any) -> dict[str, Any]:
        spec, model = self.spec, self.model
        train_rows = [r for r in self.history if "total" in r]
        val_rows = [r for r in self.history if "val/total" in r]
        final = {k: v for k, v in (train_rows[-1] if train_rows else {}).items() if k != "step"}
        if val_rows:
            final.update({k: v for k, v in val_rows[-1].items() if k != "step"})
        timed = len(self.cost.step_seconds)
        seconds_per_step = self.cost.train_s() / timed if timed else None
        metrics = {**{f"final/{k}": v for k, v in final.items()}, "steps": self.loop.step}
        if seconds_per_step is not None:
            metrics["seconds_per_step"] = seconds_per_step
        metrics.update(self.cost.summary())
        run.log_metrics(metrics, self.loop.step)
        tags = run.client.get_run(run.run_id).data.tags if run.client is not None else {}
        datasets = spec["data"]["datasets"]
        meta = {
            "method": spec["method"].get("name", self.method["kind"]),
            "method_kind": self.method["kind"], "crop": self.geometry.crop,
            "geometry": dict(spec["geometry"]), "spacing": _corpus_spacing(datasets),
            "modality": datasets[0].get("modality"),
            "channels": int(spec["backbone"].get("in_channels", 1)), "labels": None,
            "window": datasets[0].get("window"),
            "preprocess": recorded_preprocess(datasets[0]["processed_dir"]),
            "data_hash": {d["name"]: tags.get(f"data_hash.{Path(d['processed_dir']).name}")
                          for d in datasets},
        }
        result = self.loop.publish(run, model.network_class, model.network_kwargs,
                                   model.network.state_dict(), meta, metrics,
                                   heads=model.heads_record())
        log.info("published %s (%d steps, %s s/step)", spec["out"], self.loop.step,
                 f"{seconds_per_step:.3f}" if seconds_per_step else "n/a")
        return result


def _corpus_spacing(datasets: list[dict[str, Any]]) -> list[float] | None:
    """The recipe spacing shared by the corpus' datasets (None if they differ or keep native)."""
    spacings = set()
    for ds in datasets:
        index = read_processed_index(ds["processed_dir"], missing_ok=True) or {}
        spacing = index.get("recipe", {}).get("spacing")
        spacings.add(tuple(spacing) if spacing else None)
    return list(next(iter(spacings))) if len(spacings) == 1 and None not in spacings else None
