"""The one progress helper in logs (no terminal): tqdm's meter, throttled, always the last step."""
import logging

from hybridmim.progress import StepProgress


def test_log_lines_are_throttled_and_the_last_step_is_always_shown(caplog):
    caplog.set_level(logging.INFO, logger="hybridmim.progress")
    progress = StepProgress(10, "preprocess demo", every_s=3600, unit="case")
    for step in range(1, 11):
        progress.update(step, case=f"case_{step}")
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2  # the first update, then nothing until the last step
    assert lines[0].startswith("preprocess demo") and "1/10" in lines[0] and "case_1" in lines[0]
    assert "10/10" in lines[-1] and "case/s" in lines[-1] and "case_10" in lines[-1]


def test_bytes_are_scaled_and_an_unknown_total_is_accepted(caplog):
    caplog.set_level(logging.INFO, logger="hybridmim.progress")
    StepProgress(None, "a.tar", start=1 << 20, every_s=0, unit="B").update(5 << 20)
    StepProgress(100 << 20, "b.tar", every_s=0, unit="B").update(50 << 20)
    first, second = (r.getMessage() for r in caplog.records)
    assert first.startswith("a.tar") and "5.00M" in first
    assert "50%" in second and "50.0M/100M" in second


def test_disabled_progress_is_silent(caplog):
    caplog.set_level(logging.INFO, logger="hybridmim.progress")
    StepProgress(3, "quiet", every_s=0, enabled=False).update(3)
    assert not caplog.records
