"""Where MLflow data lives, and creating it once, safely, from many processes at a time.

The store is a tracking URI plus an artifact root:

- default: ``sqlite:///results/mlflow/mlflow.db`` with artifacts under ``results/mlflow/artifacts``
  (MLflow 3 refuses the old file store). Fine on one machine, also with many local writers.
- on a cluster: an ``mlflow server`` (``scripts/mlflow_server.sh``) and
  ``MLFLOW_TRACKING_URI=http://host:port`` in the jobs' environment. SQLite on NFS with writers on
  several nodes is unsafe (file locks over NFS are unreliable), see docs/slurm.md.

SQLite tuning (measured on a VM disk with ~7 ms per fsync: 100 single ``log_metric`` calls took
4.3 s in the default rollback-journal mode, 1.4 s in WAL, 0.8 s in WAL + synchronous=NORMAL):
the DB is switched to WAL once (persistent, in the file) unless ``HYBRIDMIM_SQLITE_JOURNAL`` says
otherwise (``delete`` for a DB on a network file system, where WAL is not supported), and every
SQLite connection opened in a process that imported this module gets a 60 s busy timeout (instead
of 5 s, so 16+ concurrent writers wait instead of failing with "database is locked") and, in WAL
mode, synchronous=NORMAL (no fsync per commit; a power cut may lose the last commits, never
corrupts the DB).
"""
from __future__ import annotations

import logging
import os
import sqlite3
import time
import urllib.error
import urllib.request
from contextlib import closing
from pathlib import Path
from typing import Iterable
from urllib.parse import urlsplit

from sqlalchemy import event
from sqlalchemy.engine import Engine

log = logging.getLogger(__name__)

DEFAULT_TRACKING_URI = "sqlite:///results/mlflow/mlflow.db"
DEFAULT_ARTIFACT_ROOT = "results/mlflow/artifacts"
STAGES = ("pretrain", "finetune", "evaluate")
_SQLITE_PREFIX = "sqlite:///"
SQLITE_BUSY_TIMEOUT_MS = 60_000


class StoreError(RuntimeError):
    """The tracking store cannot be reached or created; the message says what to do."""


@event.listens_for(Engine, "connect")
def _tune_sqlite_connection(dbapi_connection, _record) -> None:
    if not isinstance(dbapi_connection, sqlite3.Connection):
        return
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
        if cursor.execute("PRAGMA journal_mode").fetchone()[0].lower() == "wal":
            cursor.execute("PRAGMA synchronous = NORMAL")
    finally:
        cursor.close()


# --------------------------------------------------------------------------------------- URIs
def resolve_tracking_uri(configured: str | None = None) -> str:
    """``$MLFLOW_TRACKING_URI`` > the config's ``tracking.uri`` (``configured``) > the default.

    A relative SQLite path is made absolute against the current working directory, so a job that
    changes directory (or runs on a node with another cwd) still writes to the same file.
    """
    uri = (os.environ.get("MLFLOW_TRACKING_URI") or configured or DEFAULT_TRACKING_URI).strip()
    if uri.startswith(_SQLITE_PREFIX):
        path, sep, query = uri[len(_SQLITE_PREFIX):].partition("?")
        if path and not path.startswith(("/", ":memory:")):
            uri = f"{_SQLITE_PREFIX}{Path(path).absolute()}{sep}{query}"
    elif "://" not in uri:
        raise StoreError(
            f"tracking URI {uri!r} is a plain path; MLflow 3 no longer accepts a file store. "
            f"Use {DEFAULT_TRACKING_URI!r} (SQLite) or http://host:port (a tracking server).")
    return uri


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (absolute after resolve), else None."""
    if not uri.startswith(_SQLITE_PREFIX):
        return None
    path = uri[len(_SQLITE_PREFIX):].partition("?")[0]
    if not path or path.startswith(":memory:"):
        return None
    return Path(path)


def artifact_location(artifact_root: str | os.PathLike[str], experiment: str = "") -> str:
    """``file://`` URI of ``<artifact_root>/<experiment>`` (absolute); remote roots pass through."""
    root = str(artifact_root)
    if "://" in root:  # s3://, gs://, mlflow-artifacts:/, file:// …
        return root.rstrip("/") + (f"/{experiment}" if experiment else "")
    return (Path(root).absolute() / experiment).as_uri()


# --------------------------------------------------------------------------------------- store
def init_store(uri: str, artifact_root: str | os.PathLike[str] = DEFAULT_ARTIFACT_ROOT,
               experiments: Iterable[str] = STAGES, timeout_s: float = 120.0) -> dict[str, str]:
    """Create the store (SQLite: DB file + tables) and the stage experiments; idempotent and safe
    from many processes at once. Returns ``{experiment name: experiment id}``. A server (http(s))
    owns its database: only the experiments are created, after waiting up to ``timeout_s``."""
    uri = resolve_tracking_uri(uri)
    if uri.startswith(("http://", "https://")):
        wait_for_server(uri, timeout_s)
    elif sqlite_path(uri) is not None:
        prepare_sqlite(uri, artifact_root, timeout_s)
    else:  # postgresql://, mysql://, in-memory SQLite: the database serialises creation itself
        _create_tables(uri, artifact_root)
    # get_or_create_experiment is race-safe by itself, so this needs no lock.
    return {n: get_or_create_experiment(n, artifact_root, tracking_uri=uri) for n in experiments}


def prepare_sqlite(uri: str, artifact_root: str | os.PathLike[str] = DEFAULT_ARTIFACT_ROOT,
                   timeout_s: float = 120.0) -> Path:
    """Create a SQLite store's file and tables (and switch it to WAL) without any experiment.

    MLflow's tracking store creates a fresh DB's tables without any lock (mlflow 3.17
    SqlAlchemyStore.__init__), so two processes opening a fresh DB at once fail with "table ...
    already exists": an exclusive ``flock`` on ``<db>.lock`` serialises the creation. Also used
    by scripts/mlflow_server.sh before the server starts, so that the server's SQLite file is in
    WAL mode too. Returns the DB path.
    """
    from filelock import FileLock, Timeout

    uri = resolve_tracking_uri(uri)
    db = sqlite_path(uri)
    if db is None:
        raise StoreError(f"{uri} is not a sqlite:/// file URI")
    db.parent.mkdir(parents=True, exist_ok=True)
    lock_path = db.with_name(db.name + ".lock")
    try:
        with FileLock(lock_path, fallback_to_soft=False, preserve_lock_file=True,
                      timeout=timeout_s):
            _set_journal_mode(db)  # first, so that MLflow's ~40 migrations run in WAL (12 s -> 2 s)
            if not _has_schema(db):  # opening the SQL store costs ~1.5 s even with nothing to do
                _create_tables(uri, artifact_root)
    except Timeout:
        raise StoreError(f"could not lock {lock_path} within {timeout_s:.0f} s: another process "
                         "is initialising the MLflow store (or hangs holding the lock)") from None
    return db


def _has_schema(db: Path) -> bool:
    """True when MLflow's migrations completed on ``db`` (an alembic version row exists)."""
    with closing(sqlite3.connect(db, timeout=SQLITE_BUSY_TIMEOUT_MS / 1000)) as conn:
        try:
            return conn.execute("SELECT count(*) FROM alembic_version").fetchone()[0] > 0
        except sqlite3.OperationalError:  # no such table: fresh or half-created DB
            return False


def _set_journal_mode(db: Path) -> None:
    journal = os.environ.get("HYBRIDMIM_SQLITE_JOURNAL", "wal").lower()
    if journal not in {"wal", "delete", "truncate", "persist"}:
        raise StoreError(f"HYBRIDMIM_SQLITE_JOURNAL={journal!r}: use wal (default) or delete")
    with closing(sqlite3.connect(db, timeout=SQLITE_BUSY_TIMEOUT_MS / 1000)) as conn:
        try:
            if conn.execute("PRAGMA journal_mode").fetchone()[0].lower() != journal:
                mode = conn.execute(f"PRAGMA journal_mode = {journal}").fetchone()[0]
                log.info("SQLite store %s: journal_mode=%s", db, mode)
        except sqlite3.OperationalError as err:  # another process holds the DB open: keep its mode
            log.warning("could not set journal_mode=%s on %s: %s", journal, db, err)


def _create_tables(uri: str, artifact_root: str | os.PathLike[str]) -> None:
    """Open the SQL store once, which creates/migrates the tables: directly, not through
    MlflowClient, so that MLflow's "Default" experiment also gets its artifacts under
    ``artifact_root`` instead of ``./mlruns``."""
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    SqlAlchemyStore(uri, artifact_location(artifact_root)).engine.dispose()


def get_or_create_experiment(name: str,
                             artifact_root: str | os.PathLike[str] = DEFAULT_ARTIFACT_ROOT,
                             tracking_uri: str | None = None, attempts: int = 5) -> str:
    """Id of experiment ``name``, created if needed (artifacts under ``artifact_root/name``) and
    restored if deleted. Race-safe (another process may create it first); transient "database is
    locked" errors are retried ``attempts`` times."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=resolve_tracking_uri(tracking_uri))
    for attempt in range(1, attempts + 1):
        try:
            experiment = client.get_experiment_by_name(name)
            if experiment is not None:
                if experiment.lifecycle_stage == "deleted":
                    log.warning("restoring deleted MLflow experiment %r", name)
                    client.restore_experiment(experiment.experiment_id)
                return experiment.experiment_id
            from hybridmim.tracking.catalog import EXPERIMENT_DESCRIPTIONS

            note = EXPERIMENT_DESCRIPTIONS.get(name)  # shown on the UI's experiment page
            return client.create_experiment(
                name, artifact_location=artifact_location(artifact_root, name),
                tags={"mlflow.note.content": note} if note else None)
        except MlflowException as err:
            if err.error_code == "RESOURCE_ALREADY_EXISTS":
                continue  # someone else won the race: read theirs on the next pass
            if "locked" in str(err).lower() and attempt < attempts:
                time.sleep(0.2 * attempt)
                continue
            raise
    raise StoreError(f"could not create or read MLflow experiment {name!r} in {tracking_uri}")


# --------------------------------------------------------------------------------------- server
def wait_for_server(uri: str, timeout_s: float = 60.0) -> None:
    """Block until ``<uri>/health`` answers 200, or raise StoreError after ``timeout_s``."""
    parts = urlsplit(uri)
    health = f"{parts.scheme}://{parts.netloc}{parts.path.rstrip('/')}/health"
    deadline = time.monotonic() + timeout_s
    while True:
        try:  # urlopen raises HTTPError for any answer but a success
            with urllib.request.urlopen(health, timeout=min(5.0, max(0.5, timeout_s))):
                return
        except urllib.error.HTTPError as err:
            last = f"HTTP {err.code}"
        except OSError as err:  # URLError (refused, unknown host), timeouts
            last = str(getattr(err, "reason", err))
        if time.monotonic() >= deadline:
            raise StoreError(
                f"MLflow server {uri} did not answer {health} within {timeout_s:.0f} s ({last}). "
                "Start it with scripts/mlflow_server.sh start, or unset MLFLOW_TRACKING_URI to "
                "use the local SQLite store.")
        time.sleep(0.25)
