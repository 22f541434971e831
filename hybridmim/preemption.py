"""Graceful stop on SIGTERM/SIGINT (SLURM sends SIGTERM before killing a preempted job).

The training loop polls ``guard.requested`` after each step; when set it saves its resume state
and exits with ``PREEMPTED_EXIT_CODE`` so that Snakemake marks the job failed and its retry (or
the next run) resumes instead of starting over.
"""
from __future__ import annotations

import logging
import signal
from types import FrameType

log = logging.getLogger(__name__)

PREEMPTED_EXIT_CODE = 143  # 128 + SIGTERM, what a killed job would report


class Preempted(SystemExit):
    def __init__(self) -> None:
        super().__init__(PREEMPTED_EXIT_CODE)


class TerminationGuard:
    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGUSR1)):
        self.requested = False
        self._signals = signals
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        log.warning("received signal %d: saving state and stopping after this step", signum)
        self.requested = True

    def __enter__(self) -> "TerminationGuard":
        for sig in self._signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, prev in self._previous.items():
            signal.signal(sig, prev)  # type: ignore[arg-type]
