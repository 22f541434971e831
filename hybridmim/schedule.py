"""Learning-rate schedule of the authors' recipe, shared by pretraining and fine-tuning: linear
warm-up, then cosine decay to 0, per optimizer step — MONAI's ``WarmupCosineSchedule``.

MONAI's warm-up factor is s/W (0 at the first step, 1 at step W); the project's own version was
(s+1)/W. From step W on the two are identical. The scheduler stores ``warmup_steps`` and
``t_total`` in its ``state_dict``, so a resumed job continues the same schedule exactly.
"""
from __future__ import annotations

import torch
from monai.optimizers import WarmupCosineSchedule


def warmup_cosine_scheduler(optimizer: torch.optim.Optimizer, warmup_steps: int,
                            total_steps: int) -> WarmupCosineSchedule:
    # MONAI clamps out-of-range values silently; a wrong spec should fail loudly instead.
    if total_steps <= 0:
        raise ValueError(f"optim.steps must be > 0, got {total_steps}")
    if not 0 <= warmup_steps <= total_steps:
        raise ValueError(f"optim.warmup_steps must be in [0, optim.steps={total_steps}], "
                         f"got {warmup_steps}")
    return WarmupCosineSchedule(optimizer, warmup_steps=int(warmup_steps), t_total=int(total_steps))
