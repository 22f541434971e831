"""Progress for long jobs: a tqdm bar on a terminal, a periodic one-line status with ETA in logs."""
from __future__ import annotations

import logging
import sys
import time

log = logging.getLogger("hybridmim.progress")
LOG_FORMAT, LOG_DATE_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"


def setup_logging(level: int = logging.INFO) -> None:
    """One format for every CLI command; Snakemake redirects stderr into the rule's log file."""
    logging.basicConfig(
        level=level,
        stream=sys.stderr,
        format=LOG_FORMAT,
        datefmt=LOG_DATE_FORMAT,
        force=True,
    )


class StepProgress:
    """Report `step/total`, rate, ETA and the latest scalars.

    On a TTY it draws a tqdm bar; otherwise (log files, SLURM) it logs tqdm's one-line meter at
    most every ``every_s`` seconds (``0``: every update) and always on the last step, so logs stay
    readable. ``unit="B"`` shows bytes scaled (KiB, MiB, ...); ``total`` may be unknown (None).
    """

    def __init__(self, total: int | None, desc: str, start: int = 0, every_s: float = 10.0,
                 enabled: bool = True, unit: str = "it"):
        self.total, self.desc, self.start, self.every_s = total, desc, start, every_s
        self.enabled, self.unit = enabled, unit
        self._scaled = dict(unit_scale=True, unit_divisor=1024) if unit == "B" else {}
        self._t0 = time.monotonic()
        self._last = 0.0
        self._bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=start, desc=desc, dynamic_ncols=True,
                             unit=unit, mininterval=0.5, **self._scaled)

    def update(self, step: int, **scalars: float) -> None:
        """``step`` is the number of completed steps (bytes for ``unit="B"``)."""
        if not self.enabled:
            return
        shown = {k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in scalars.items()}
        if self._bar is not None:
            if shown:
                self._bar.set_postfix(shown, refresh=False)
            self._bar.update(step - self._bar.n)
            return
        now = time.monotonic()
        last = self.total is not None and step >= self.total
        if not last and now - self._last < self.every_s:
            return
        self._last = now
        from tqdm import tqdm

        # the rate counts this run's steps only, so a resumed job's ETA is not too optimistic
        elapsed = now - self._t0
        meter = tqdm.format_meter(step, self.total, elapsed, prefix=self.desc, unit=self.unit,
                                  initial=self.start, ncols=0, **self._scaled)
        extras = " ".join(f"{k}={v}" for k, v in shown.items())
        log.info("%s %s", meter, extras) if extras else log.info("%s", meter)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
