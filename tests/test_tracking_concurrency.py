"""Many jobs writing to MLflow at once lose nothing: the local SQLite store and a real server.

16 writer processes (released together by a barrier) each create a run with params, 100 metric
values logged one call at a time (the worst case: one write each) and a tag. The processes come
from a forkserver that has imported mlflow once: 16 fresh `import mlflow` (~5 s CPU each) would
take ~80 s of a 2-core machine; forked children are still separate processes with their own DB
connections, like the jobs of a workflow.
Afterwards every run and every value must be there. Also: ``init_store`` from 4 processes at once
on a fresh DB (without its file lock MLflow's table creation races and fails).
"""
from __future__ import annotations

import multiprocessing as mp
import os
import socket
import subprocess
from pathlib import Path

import pytest

from hybridmim.tracking.store import (STAGES, init_store, resolve_tracking_uri, sqlite_path,
                                      wait_for_server)

ROOT = Path(__file__).resolve().parent.parent
WRITERS = 16
VALUES = 100
CTX = mp.get_context("forkserver")
# imported once in the (single-threaded) fork server, before any DB connection exists
CTX.set_forkserver_preload(["mlflow.tracking", "hybridmim.tracking.store"])


# ----------------------------------------------------------------------------------- workers
def _writer(uri: str, experiment_id: str, index: int, barrier, results) -> None:
    try:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=uri)
        barrier.wait(timeout=180)
        run = client.create_run(experiment_id, run_name=f"writer-{index}")
        run_id = run.info.run_id
        client.log_param(run_id, "writer", index)
        client.log_param(run_id, "lr", 1e-4 * (index + 1))
        for step in range(VALUES):
            client.log_metric(run_id, "loss", index * 1000 + step, step=step)
        client.set_tag(run_id, "writer_tag", f"w{index}")
        client.set_terminated(run_id, "FINISHED")
        results.put((index, run_id, None))
    except BaseException as err:  # noqa: BLE001 - reported to the parent, which fails the test
        results.put((index, None, f"{type(err).__name__}: {err}"))


def _init_worker(uri: str, artifact_root: str, barrier, results) -> None:
    try:
        barrier.wait(timeout=180)
        results.put(("ok", init_store(uri, artifact_root)))
    except BaseException as err:  # noqa: BLE001
        results.put(("error", f"{type(err).__name__}: {err}"))


def _run_all(target, args_for) -> list:
    """Start one process per args tuple, release them together, collect one result each."""
    n = len(args_for)
    barrier, results = CTX.Barrier(n), CTX.Queue()
    procs = [CTX.Process(target=target, args=(*args, barrier, results)) for args in args_for]
    for p in procs:
        p.start()
    try:
        out = [results.get(timeout=240) for _ in procs]
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    return out


def _write_and_verify(uri: str, artifact_root: Path) -> None:
    from mlflow.tracking import MlflowClient

    experiment_id = init_store(uri, str(artifact_root))["finetune"]
    out = _run_all(_writer, [(uri, experiment_id, i) for i in range(WRITERS)])
    errors = [e for _, _, e in out if e]
    assert not errors, errors
    run_ids = {i: rid for i, rid, _ in out}
    assert sorted(run_ids) == list(range(WRITERS))

    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([experiment_id], max_results=1000)
    assert len(runs) == WRITERS, f"lost runs: {WRITERS - len(runs)}"
    for index, run_id in run_ids.items():
        run = client.get_run(run_id)
        assert run.info.status == "FINISHED"
        assert run.data.params["writer"] == str(index)
        assert run.data.tags["writer_tag"] == f"w{index}"
        history = client.get_metric_history(run_id, "loss")
        assert sorted((m.step, m.value) for m in history) == \
            [(s, float(index * 1000 + s)) for s in range(VALUES)], f"lost metric values in {run_id}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------------- tests
def test_resolve_tracking_uri_precedence(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_tracking_uri(None) == f"sqlite:///{tmp_path}/results/mlflow/mlflow.db"
    assert resolve_tracking_uri("sqlite:///x/db.sqlite") == f"sqlite:///{tmp_path}/x/db.sqlite"
    assert resolve_tracking_uri("sqlite:////abs/db.sqlite") == "sqlite:////abs/db.sqlite"
    assert resolve_tracking_uri("http://h:5000") == "http://h:5000"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://server:1234")
    assert resolve_tracking_uri("sqlite:///x/db.sqlite") == "http://server:1234"
    assert sqlite_path(f"sqlite:///{tmp_path}/a.db") == tmp_path / "a.db"


def test_init_store_from_four_processes_on_a_fresh_db(tmp_path):
    uri = f"sqlite:///{tmp_path}/fresh/mlflow.db"
    out = _run_all(_init_worker, [(uri, str(tmp_path / "artifacts"))] * 4)
    assert [status for status, _ in out] == ["ok"] * 4, out
    ids = [value for _, value in out]
    assert all(i == ids[0] for i in ids) and sorted(ids[0]) == sorted(STAGES)

    from mlflow.tracking import MlflowClient

    experiments = {e.name: e for e in MlflowClient(uri).search_experiments()}
    for stage in STAGES:
        assert experiments[stage].artifact_location == (tmp_path / "artifacts" / stage).as_uri()
    assert init_store(uri, str(tmp_path / "artifacts")) == ids[0]   # idempotent


def test_sixteen_writers_sqlite_store(tmp_path):
    _write_and_verify(f"sqlite:///{tmp_path}/mlflow.db", tmp_path / "artifacts")


def test_sixteen_writers_tracking_server(tmp_path):
    port = _free_port()
    env = {**os.environ, "MLFLOW_SERVER_PORT": str(port),
           "MLFLOW_SERVER_DIR": str(tmp_path / "srv"),
           "MLFLOW_SERVER_BACKEND_URI": f"sqlite:///{tmp_path}/server/mlflow.db",
           "MLFLOW_SERVER_ARTIFACTS": str(tmp_path / "artifacts"), "MLFLOW_SERVER_TIMEOUT": "90"}
    script = ROOT / "scripts" / "mlflow_server.sh"
    started = subprocess.run([str(script), "start"], env=env, capture_output=True, text=True,
                             timeout=150)
    try:
        assert started.returncode == 0, started.stderr[-3000:]
        uri = f"http://127.0.0.1:{port}"
        assert f"MLFLOW_TRACKING_URI={uri}" in started.stdout
        wait_for_server(uri, 10)
        _write_and_verify(uri, tmp_path / "artifacts")
        # the server, not the jobs, wrote the database
        assert (tmp_path / "server" / "mlflow.db").stat().st_size > 0
    finally:
        stopped = subprocess.run([str(script), "stop"], env=env, capture_output=True, text=True,
                                 timeout=120)
        assert stopped.returncode == 0, stopped.stderr
    status = subprocess.run([str(script), "status"], env=env, capture_output=True, text=True,
                            timeout=30)
    assert status.returncode == 3


def test_wait_for_server_gives_up_with_a_clear_error():
    from hybridmim.tracking.store import StoreError

    with pytest.raises(StoreError, match="did not answer"):
        wait_for_server(f"http://127.0.0.1:{_free_port()}", timeout_s=1)
