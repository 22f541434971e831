"""Progress for long jobs: a tqdm bar on a terminal, a periodic one-line status with ETA in logs."""
from __future__ import annotations

import logging
import sys
import time

log = logging.getLogger("hybridmim.progress")


def setup_logging(level: int = logging.INFO) -> None:
    """One format for every CLI command; Snakemake redirects stderr into the rule's log file."""
    logging.basicConfig(
        level=level,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        force=True,
    )


def _fmt_seconds(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h:d}:{m:02d}:{s:02d}" if h else f"{m:d}:{s:02d}"


class StepProgress:
    """Report `step/total`, rate, ETA and the latest scalars.

    On a TTY it draws a tqdm bar; otherwise (log files, SLURM) it logs one line at most every
    ``every_s`` seconds and always on the last step, so logs stay readable.
    """

    def __init__(self, total: int, desc: str, start: int = 0, every_s: float = 10.0,
                 enabled: bool = True):
        self.total, self.desc, self.start, self.every_s = total, desc, start, every_s
        self.enabled = enabled
        self._t0 = time.monotonic()
        self._last = 0.0
        self._bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=start, desc=desc, dynamic_ncols=True)

    def update(self, step: int, **scalars: float) -> None:
        """``step`` is the number of completed steps."""
        if not self.enabled:
            return
        shown = {k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in scalars.items()}
        if self._bar is not None:
            self._bar.n = step
            self._bar.set_postfix(shown, refresh=True)
            return
        now = time.monotonic()
        if step < self.total and now - self._last < self.every_s:
            return
        self._last = now
        done = step - self.start
        elapsed = now - self._t0
        rate = done / elapsed if elapsed > 0 and done > 0 else 0.0
        eta = (self.total - step) / rate if rate > 0 else float("nan")
        extras = " ".join(f"{k}={v}" for k, v in shown.items())
        eta_text = _fmt_seconds(eta) if rate > 0 else "?"
        log.info("%s %d/%d (%.0f%%) %.2f it/s elapsed %s ETA %s %s", self.desc, step, self.total,
                 100.0 * step / max(self.total, 1), rate, _fmt_seconds(elapsed), eta_text, extras)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
