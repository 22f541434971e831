"""One process per training job, and no training process without its workflow.

``guarded_job`` wraps a job's entry point (``run_pretraining``, ``run_finetuning``). While the job
runs it

- holds an exclusive lock (``flock``) on ``<state folder>/job.lock``, which records the holder's
  PID, host and start time. A second process on the same job waits up to
  ``HYBRIDMIM_LOCK_WAIT_S`` seconds (default 120: long enough for an orphan that noticed its
  workflow is gone to save its state and stop), then refuses with a message naming the holder.
  The kernel drops the lock when the holder dies, however it dies.
- watches the workflow that started it (the nearest ``snakemake`` ancestor process, else the
  parent): when that is gone, the job stops as on preemption (SIGTERM to itself: the loop saves
  its resume state and exits), so killing ``snakemake`` never leaves a trainer behind that keeps
  writing the state and log a re-run is about to use.
- writes every attempt's log to ``<state folder>/attempts/<UTC time>-<host>-<pid>.log``, so the log
  of a killed or preempted attempt is kept when the re-run's output replaces the rule's log file.

Under torchrun only rank 0 takes the lock and writes the attempt log; every rank watches its
parent. ``HYBRIDMIM_WATCH_PARENT=0`` switches the watch off.
"""
from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import signal
import socket
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator

import psutil

from hybridmim.checkpoints import state_dir_for
from hybridmim.progress import LOG_DATE_FORMAT, LOG_FORMAT

log = logging.getLogger(__name__)

LOCK_NAME = "job.lock"
ATTEMPTS_DIR = "attempts"
DEFAULT_WAIT_S = 120.0
POLL_S = 0.5
STOP_GRACE_S = 300.0  # after asking the loop to stop, how long before the process is ended hard


class JobLockedError(RuntimeError):
    """Another live process runs the same job; the message names its PID and host."""


# ------------------------------------------------------------------------------------------------
# The lock
def _holder(lock_path: Path) -> dict[str, Any]:
    try:
        return json.loads(lock_path.read_text() or "{}")
    except (OSError, ValueError):
        return {}


def _who(holder: dict[str, Any]) -> str:
    return (f"PID {holder.get('pid', '?')} on host {holder.get('host', '?')} "
            f"(since {holder.get('started', '?')})")


@contextlib.contextmanager
def job_lock(state_dir: str | os.PathLike, wait_s: float | None = None) -> Iterator[Path]:
    """Hold the job's lock for the duration of the block (see the module docstring)."""
    from filelock import FileLock, Timeout

    state_dir = Path(state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    lock_path = state_dir / LOCK_NAME
    wait_s = float(os.environ.get("HYBRIDMIM_LOCK_WAIT_S", DEFAULT_WAIT_S)) if wait_s is None \
        else wait_s
    # No soft (file-exists) fallback: such a lock outlives a SIGKILLed holder; keep the file,
    # it names the holder.
    lock = FileLock(lock_path, poll_interval=POLL_S, fallback_to_soft=False,
                    preserve_lock_file=True)
    try:
        try:
            lock.acquire(timeout=0)
        except Timeout:
            holder = _holder(lock_path)
            log.warning("%s: held by %s; waiting up to %.0f s for it to stop", state_dir,
                        _who(holder), wait_s)
            try:
                lock.acquire(timeout=wait_s)
            except Timeout:
                holder = _holder(lock_path) or holder
                raise JobLockedError(
                    f"{state_dir}: this job is already running as {_who(holder)}; two processes "
                    f"must not train the same job. Wait for it to finish, or stop it (on that "
                    f"host: kill {holder.get('pid', '<pid>')}) and run again.") from None
    except OSError as error:
        # Some cluster file systems refuse locks (Lustre without -o flock): run unlocked rather
        # than not at all, and say so.
        log.warning("%s: the file system refuses locks (%s); running without the job lock",
                    lock_path, error)
    try:
        started = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        lock_path.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                         "started": started}))
        yield lock_path
    finally:
        lock.release(force=True)


# ------------------------------------------------------------------------------------------------
# The parent watch
def _is_snakemake(process: psutil.Process) -> bool:
    """`snakemake ...`, `python /venv/bin/snakemake ...` or `python -m snakemake ...` (not a
    shell whose command line merely mentions the word)."""
    try:
        args = process.cmdline()[:3]
    except psutil.Error:
        return False
    return any(Path(arg).name == "snakemake" for arg in args)


def _alive(process: psutil.Process) -> bool:
    # is_running() also compares the start time, so a reused PID does not count as alive.
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@contextlib.contextmanager
def parent_watch() -> Iterator[None]:
    """A daemon thread that stops this process (SIGTERM to itself) once the workflow is gone:
    the nearest ancestor running snakemake, else the parent."""
    process = next((p for p in psutil.Process().parents() if _is_snakemake(p)), None)
    what = "parent process" if process is None else "snakemake"
    process = process or psutil.Process().parent()
    done = threading.Event()

    def watch() -> None:
        while not done.wait(POLL_S):
            if not _alive(process):
                log.warning("the workflow that started this job (%s, PID %d) is gone: saving "
                            "state and stopping", what, process.pid)
                os.kill(os.getpid(), signal.SIGTERM)
                if not done.wait(STOP_GRACE_S):
                    log.error("the job did not stop within %.0f s of its workflow's end; "
                              "ending it", STOP_GRACE_S)
                    os._exit(143)
                return

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()
    try:
        yield
    finally:
        done.set()


# ------------------------------------------------------------------------------------------------
# Attempt logs and the decorator
@contextlib.contextmanager
def attempt_log(state_dir: str | os.PathLike) -> Iterator[Path]:
    """Copy this attempt's log records to a file of its own in the state folder."""
    folder = Path(state_dir) / ATTEMPTS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    path = folder / f"{stamp}-{socket.gethostname()}-{os.getpid()}.log"
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter(LOG_FORMAT, LOG_DATE_FORMAT))  # the console's format
    root = logging.getLogger()
    root.addHandler(handler)
    if root.level > logging.INFO or root.level == logging.NOTSET:
        root.setLevel(logging.INFO)
    try:
        yield path
    except BaseException as exc:
        log.error("attempt ended by %s: %s", type(exc).__name__, exc)
        raise
    finally:
        root.removeHandler(handler)
        handler.close()


def guarded_job(func: Callable[..., Any]) -> Callable[..., Any]:
    """Decorate ``run_xxx(spec)``: lock, parent watch and attempt log around the whole job."""
    @functools.wraps(func)
    def wrapper(spec: dict[str, Any], *args: Any, **kwargs: Any):
        try:
            state_dir = state_dir_for(spec["out"])
        except (KeyError, TypeError):
            return func(spec, *args, **kwargs)  # no output path: the job's checks say so
        leader = os.environ.get("RANK", "0") == "0"
        watch = os.environ.get("HYBRIDMIM_WATCH_PARENT", "1") != "0"
        with contextlib.ExitStack() as stack:
            if leader:
                stack.enter_context(job_lock(state_dir))
                stack.enter_context(attempt_log(state_dir))
            if watch:
                stack.enter_context(parent_watch())
            return func(spec, *args, **kwargs)
    return wrapper
