"""What a pretraining run costs, measured inside the run: step times, throughput, time, memory.

The report's cost table compares methods by these numbers, so they are defined once here:
- ``cost/median_step_s``: median wall time of a training step (data + forward + backward +
  optimiser), excluding each process's first step (one-off set-up) and validation passes;
- ``cost/crops_per_s``: crops per step (all ranks) divided by that median;
- ``cost/total_s``: wall time of the whole job including start-up and validation, summed over
  resumed processes;
- ``cost/peak_mem_mb``: on a GPU, ``torch.cuda.max_memory_allocated``; on the CPU, the growth of
  the process's peak resident set size over its size when the meter started (the model, data and
  activations the training loop added), in MiB;
- ``cost/train_s`` (logged per step): cumulative training time, the x axis of time-to-quality.
"""
from __future__ import annotations

import resource
import statistics
import time
from typing import Any

import psutil
import torch


class CostMeter:
    """Collects step times and the memory peak of one pretraining process."""

    def __init__(self, device: torch.device, crops_per_step: int):
        self.device, self.crops_per_step = device, int(crops_per_step)
        self.started = time.perf_counter()
        self.previous_total_s, self.step_seconds = 0.0, []
        self.baseline_rss_mb = psutil.Process().memory_info().rss / 2**20
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)

    def restore(self, state: dict | None) -> None:
        """Continue the totals of an interrupted process (its ``state()``)."""
        self.previous_total_s = float((state or {}).get("total_s", 0.0))
        self.step_seconds = list((state or {}).get("step_seconds", []))

    def train_s(self) -> float:
        return float(sum(self.step_seconds))

    def add_step(self, seconds: float) -> None:
        self.step_seconds.append(float(seconds))

    def total_s(self) -> float:
        return self.previous_total_s + time.perf_counter() - self.started

    def state(self) -> dict[str, Any]:
        """What a resumed process continues from (saved with the training state)."""
        return {"total_s": self.total_s(), "step_seconds": list(self.step_seconds)}

    def peak_mem_mb(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
        return max(0.0, peak_mb - self.baseline_rss_mb)

    def summary(self) -> dict[str, float]:
        metrics = {"cost/total_s": self.total_s(), "cost/peak_mem_mb": self.peak_mem_mb(),
                   "cost/timed_steps": float(len(self.step_seconds))}
        if self.step_seconds:
            median = statistics.median(self.step_seconds)
            metrics["cost/median_step_s"] = median
            metrics["cost/crops_per_s"] = self.crops_per_step / median if median > 0 else 0.0
        return metrics
