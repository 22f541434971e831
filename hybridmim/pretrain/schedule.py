"""Learning-rate schedule of the authors' recipe: linear warm-up, then cosine decay to 0 (per
optimizer step)."""
from __future__ import annotations

import math

import torch


class WarmupCosine:
    """LR factor for optimizer step ``s`` (0-based): (s+1)/W during the W warm-up steps, then
    0.5·(1 + cos(π·t)) with t going from 0 at step W to 1 at step ``total_steps``.

    A class rather than a closure so that ``LambdaLR.state_dict()`` stores its two ints and a
    resumed job can check them.
    """

    def __init__(self, warmup_steps: int, total_steps: int):
        if total_steps <= 0:
            raise ValueError(f"optim.steps must be > 0, got {total_steps}")
        if not 0 <= warmup_steps <= total_steps:
            raise ValueError(f"optim.warmup_steps must be in [0, optim.steps={total_steps}], "
                             f"got {warmup_steps}")
        self.warmup_steps = int(warmup_steps)
        self.total_steps = int(total_steps)

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        decay_steps = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / decay_steps)
        return 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_cosine_scheduler(optimizer: torch.optim.Optimizer, warmup_steps: int,
                            total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupCosine(warmup_steps, total_steps))
