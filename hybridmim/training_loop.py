"""What the pretraining and fine-tuning loops share, so each keeps only its own step:
pretrain/train.py adds masking and the HybridMIM losses, finetune/train.py the segmentation step,
validation and the best model. The resume state's layout is in docs/contracts.md.

Graceful stop: SLURM sends SIGTERM (or USR1) before it kills a preempted job. The loop finishes
the step, saves its state and exits with ``PREEMPTED_EXIT_CODE``, so Snakemake marks the job
failed and its retry (or the next run) resumes instead of starting over. Test/ops hook:
``HYBRIDMIM_PREEMPT_AT_STEP=k`` behaves like a SIGTERM arriving during step k; it is an
environment variable, not a spec key, so the interrupted and the resumed job share one spec hash.
"""
from __future__ import annotations

import contextlib
import logging
import os
import signal
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch
from monai.optimizers import WarmupCosineSchedule

from hybridmim import checkpoints, runtime
from hybridmim.atomic import write_json
from hybridmim.progress import StepProgress
from hybridmim.tracking.runs import TrackedRun, tracked_run

log = logging.getLogger(__name__)

PREEMPT_ENV = "HYBRIDMIM_PREEMPT_AT_STEP"
PREEMPTED_EXIT_CODE = 143  # 128 + SIGTERM, what a killed job would report
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preempted(SystemExit):
    """The job stopped on request after saving its state; a re-run resumes."""

    def __init__(self) -> None:
        super().__init__(PREEMPTED_EXIT_CODE)


def warmup_cosine_scheduler(optimizer: torch.optim.Optimizer, warmup_steps: int,
                            total_steps: int) -> WarmupCosineSchedule:
    """The authors' schedule, per optimizer step: linear warm-up, then cosine decay to 0.

    MONAI's warm-up factor is s/W (0 at the first step, 1 at step W); from step W on it equals
    the project's former (s+1)/W. The scheduler's ``state_dict`` holds ``warmup_steps`` and
    ``t_total``, so a resumed job continues the same schedule exactly.
    """
    # MONAI clamps out-of-range values silently; a wrong spec should fail loudly instead.
    if total_steps <= 0:
        raise ValueError(f"optim.steps must be > 0, got {total_steps}")
    if not 0 <= warmup_steps <= total_steps:
        raise ValueError(f"optim.warmup_steps must be in [0, optim.steps={total_steps}], "
                         f"got {warmup_steps}")
    return WarmupCosineSchedule(optimizer, warmup_steps=int(warmup_steps), t_total=int(total_steps))


def optimisation(parameters: Iterable[torch.nn.Parameter], optim: dict[str, Any],
                 total_steps: int, device: torch.device, precision: str):
    """AdamW with linear warm-up and cosine decay, and the gradient scaler (active for fp16
    only): the optimisation of every training job. Returns (optimizer, scheduler, scaler)."""
    optimizer = torch.optim.AdamW(parameters, lr=float(optim["lr"]),
                                  weight_decay=float(optim["weight_decay"]))
    scheduler = warmup_cosine_scheduler(optimizer, int(optim.get("warmup_steps", 0)), total_steps)
    # Only fp16 needs loss scaling; a disabled scaler keeps one code path and a state to checkpoint.
    return optimizer, scheduler, torch.amp.GradScaler(device.type, enabled=precision == "fp16")


def optimiser_step(loss: torch.Tensor, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                   scheduler: Any, scaler: torch.amp.GradScaler,
                   grad_clip: float) -> torch.Tensor | None:
    """Backward pass, gradient clipping to the global norm ``grad_clip`` (``optim.grad_clip``;
    0 = off, the authors' pretraining) and one optimizer and scheduler step, with the loss scaled
    for fp16; returns the gradient norm before clipping (None when clipping is off)."""
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    grad_norm = None
    if grad_clip > 0:
        scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip).detach()
    scaler.step(optimizer)
    scaler.update()
    scheduler.step()
    return grad_norm


class TrainingLoop:
    """Step counter, resume state, cadence, preemption, progress and MLflow run of one job.

    Use: ``saved = loop.resume(model=..., optimizer=..., scheduler=..., scaler=...)`` once the
    objects exist (``loop.saved`` can be read before, e.g. to skip a pretrained initialisation);
    then inside ``with loop.tracked(stage, ...) as run:`` run ``while loop.step < total``: one
    step, ``loop.step += 1``, ``loop.due(every)`` for the job's own logging, and
    ``loop.end_of_step(...)``. Under DDP every rank runs the loop; only rank 0 writes.
    """

    def __init__(self, spec: dict[str, Any], spec_hash: str, total_steps: int,
                 state_extras: Callable[[], dict[str, Any]], device: torch.device,
                 dist: runtime.DistInfo | None = None):
        self.spec, self.spec_hash, self.total_steps = spec, spec_hash, total_steps
        self.state_extras, self.device = state_extras, device
        self.dist = dist or runtime.DistInfo()
        self.state_dir = checkpoints.state_dir_for(spec["out"])
        self.checkpoint_every = max(1, int(spec["checkpoint_every"]))
        self.step, self.run_id = 0, None
        self.objects: dict[str, Any] = {}
        self.stop_signalled = False
        self.progress: StepProgress | None = None
        self.stage = ""
        self.saved = checkpoints.load_state(self.state_dir, spec_hash)

    def resume(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
               scaler: torch.amp.GradScaler) -> dict[str, Any] | None:
        """Take the objects a checkpoint holds and load the saved state into them; returns that
        state (the job restores its own entries) or None on a fresh start."""
        self.objects = {"model": model, "optimizer": optimizer, "scheduler": scheduler,
                        "scaler": scaler}
        if self.saved is not None:
            for name, obj in self.objects.items():
                obj.load_state_dict(self.saved[name])
            self.step, self.run_id = int(self.saved["step"]), self.saved.get("mlflow_run_id")
        return self.saved

    def due(self, every: int) -> bool:
        """Whether a cadence of ``every`` steps falls on this step (the last step always)."""
        return self.step % max(1, int(every)) == 0 or self.step == self.total_steps

    def save(self) -> None:
        """Write ``state/latest.pt``. A collective under DDP: every rank computes its extras
        (e.g. gathers its RNG streams), rank 0 writes."""
        extras = self.state_extras()
        if not self.dist.is_main:
            return
        checkpoints.save_state(self.state_dir, {
            **{name: obj.state_dict() for name, obj in self.objects.items()},
            "step": self.step, "mlflow_run_id": self.run_id, **extras}, self.spec_hash)

    @contextlib.contextmanager
    def tracked(self, stage: str, **run_options: Any) -> Iterator[TrackedRun]:
        """The job's MLflow run (the saved one continues on resume), with the stop signals
        caught and the progress line running for the block."""
        if not self.objects:
            raise RuntimeError("TrainingLoop.resume must be called before the loop runs")
        previous = {sig: signal.signal(sig, self._signalled) for sig in STOP_SIGNALS}
        try:
            self.stage = stage
            with tracked_run(stage, self.spec, device=runtime.device_name(self.device),
                             enabled=self.dist.is_main, resume_run_id=self.run_id,
                             **run_options) as run:
                self.run_id = run.run_id or self.run_id
                self.progress = StepProgress(self.total_steps,
                                             f"{stage} {self.spec.get('run_name', '')}",
                                             start=self.step, enabled=self.dist.is_main)
                yield run
                self.progress.close()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def publish(self, run: TrackedRun, network_class: str, network_kwargs: dict[str, Any],
                state_dict: dict[str, torch.Tensor], meta: dict[str, Any],
                metrics: dict[str, Any], heads: dict[str, Any] | None = None,
                registered_name: str | None = None, **result: Any) -> dict[str, Any]:
        """Write model.pt (``meta`` plus the provenance every model records), log the network
        as the run's MLflow model, and write metrics.json beside it; returns its content."""
        from hybridmim.tracking import catalog
        from hybridmim.tracking.provenance import git_state

        out = Path(self.spec["out"])
        meta = {"stage": self.stage, **meta, **git_state(), "mlflow_run_id": run.run_id,
                "spec_hash": self.spec_hash, "steps": self.step}
        checkpoints.publish_model(out, network_class, network_kwargs, state_dict, meta,
                                  heads=heads)
        catalog.log_network_model(run, out, registered_name)
        result = {"run_id": run.run_id, "stage": self.stage, "metrics": metrics, **result,
                  "spec_hash": self.spec_hash}
        write_json(out.parent / "metrics.json", result)
        run.log_artifact(out.parent / "metrics.json")
        return result

    def _signalled(self, signum: int, _frame: Any) -> None:
        log.warning("received signal %d: saving state and stopping after this step", signum)
        self.stop_signalled = True

    def end_of_step(self, **progress_scalars: float) -> None:
        """After each step: the progress line, the state at the checkpoint cadence, and on a
        stop request the state saved and the exit with the preemption code."""
        self.progress.update(self.step, **progress_scalars)
        stop = self._stop_requested()
        if stop or self.due(self.checkpoint_every):
            self.save()
        if stop and self.step < self.total_steps:
            log.warning("stopped after step %d of %d; state saved in %s, a re-run resumes",
                        self.step, self.total_steps, self.state_dir)
            raise Preempted()

    def _stop_requested(self) -> bool:
        requested = self.stop_signalled or os.environ.get(PREEMPT_ENV, "") == str(self.step)
        if self.dist.enabled:  # all ranks must stop at the same step, or the next collective hangs
            import torch.distributed as torch_dist

            flag = torch.tensor([float(requested)], device=self.device)
            torch_dist.all_reduce(flag, op=torch_dist.ReduceOp.MAX)
            requested = bool(flag.item())
        return requested
