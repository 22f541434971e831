"""The shared warm-up + cosine LR schedule (MONAI's WarmupCosineSchedule behind a checked factory)."""
import math

import pytest
import torch

from hybridmim.training_loop import warmup_cosine_scheduler


def _optimizer(lr=1.0):
    return torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=lr)


def _lrs(scheduler, optimizer, steps):
    out = []
    for _ in range(steps):
        out.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return out


def test_linear_warmup_then_cosine_to_zero():
    optimizer = _optimizer()
    lrs = _lrs(warmup_cosine_scheduler(optimizer, 4, 12), optimizer, 13)
    assert lrs[:5] == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0])
    decay = lrs[4:]
    assert all(a > b for a, b in zip(decay, decay[1:]))
    assert lrs[8] == pytest.approx(0.5)  # half-way through the decay
    assert lrs[12] == pytest.approx(0.0, abs=1e-12)
    assert lrs[6] == pytest.approx(0.5 * (1 + math.cos(math.pi * 2 / 8)))


def test_no_warmup_starts_at_full_rate():
    optimizer = _optimizer(0.1)
    assert _lrs(warmup_cosine_scheduler(optimizer, 0, 4), optimizer, 1) == [pytest.approx(0.1)]


@pytest.mark.parametrize("warmup,total,key", [(13, 12, "warmup_steps"), (-1, 12, "warmup_steps"),
                                              (0, 0, "optim.steps")])
def test_out_of_range_settings_are_rejected(warmup, total, key):
    with pytest.raises(ValueError, match=key):
        warmup_cosine_scheduler(_optimizer(), warmup, total)


def test_resume_from_state_dict_continues_the_same_schedule():
    optimizer = _optimizer()
    straight = _lrs(warmup_cosine_scheduler(optimizer, 3, 10), optimizer, 10)

    optimizer = _optimizer()
    first = warmup_cosine_scheduler(optimizer, 3, 10)
    head = _lrs(first, optimizer, 4)
    saved_opt, saved_sched = optimizer.state_dict(), first.state_dict()
    # the resumed job is built with other numbers: the saved state must win
    optimizer = _optimizer()
    resumed = warmup_cosine_scheduler(optimizer, 0, 99)
    optimizer.load_state_dict(saved_opt)
    resumed.load_state_dict(saved_sched)
    assert head + _lrs(resumed, optimizer, 6) == straight
