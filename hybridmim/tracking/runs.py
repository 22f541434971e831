"""The MLflow run context used by every pretrain / finetune / evaluate job.

A run records: the resolved job spec as params, provenance as tags (provenance.py), metrics and
artifacts. Metrics go through MLflow's asynchronous logging, which batches them in a background
thread (a training step does not wait for a SQLite write); ending the run drains the queue. On
rank != 0 of a DDP job the context is a no-op, so only one run exists per job. A resumed job
continues its earlier run.
"""
from __future__ import annotations

import contextlib
import json
import logging
import time
from pathlib import Path
from typing import Any, Iterator

from hybridmim.hashing import spec_hash as compute_spec_hash
from hybridmim.tracking import catalog
from hybridmim.tracking.provenance import provenance_tags

log = logging.getLogger(__name__)

_PARAM_MAX = 6000


def flatten(spec: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested spec → dotted MLflow params; lists stay JSON so they read back unambiguously."""
    flat: dict[str, str] = {}
    for key, value in spec.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, name + "."))
        else:
            text = value if isinstance(value, str) else json.dumps(value, default=str)
            flat[name] = text[:_PARAM_MAX]
    return flat


class TrackedRun:
    def __init__(self, client: Any, run_id: str):
        self.client, self.run_id = client, run_id

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, int(step))
                                                    for k, v in metrics.items()],
                              synchronous=False)

    def set_tags(self, tags: dict[str, Any]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_artifact(self, path: str | Path) -> None:
        self.client.log_artifact(self.run_id, str(path))

    def log_dict(self, obj: Any, name: str) -> None:
        self.client.log_dict(self.run_id, obj, name)


class NullRun(TrackedRun):
    """Stand-in for non-zero DDP ranks: same interface, records nothing."""

    def __init__(self) -> None:
        super().__init__(client=None, run_id="")

    def _record_nothing(self, *args: Any, **kwargs: Any) -> None:
        pass

    log_metrics = set_tags = log_artifact = log_dict = _record_nothing


@contextlib.contextmanager
def tracked_run(stage: str, spec: dict[str, Any], data_dirs: list[str] | tuple[str, ...] = (),
                upstream_model: str | None = None, device: str = "cpu", enabled: bool = True,
                resume_run_id: str | None = None) -> Iterator[TrackedRun]:
    """Open (or continue) the MLflow run of one job; close it FINISHED, FAILED or KILLED."""
    if not enabled:
        yield NullRun()
        return
    from mlflow.entities import Param
    from mlflow.tracking import MlflowClient

    from hybridmim.tracking.store import init_store, resolve_tracking_uri

    tracking = spec.get("tracking") or {}
    uri = resolve_tracking_uri(tracking.get("uri"))
    artifact_root = tracking.get("artifact_root", "results/mlflow/artifacts")
    # Only this job's experiment: looking up every stage's experiment in every job was most of a
    # job's MLflow set-up time (`hybridmim tracking init` creates them all once).
    experiment_id = init_store(uri, artifact_root, experiments=(stage,))[stage]
    client = MlflowClient(tracking_uri=uri)
    shash = compute_spec_hash(spec)
    run_id = None
    if resume_run_id:
        try:
            client.update_run(resume_run_id, status="RUNNING")
            run_id = resume_run_id
            log.info("continuing MLflow run %s", run_id)
        except Exception:
            log.warning("MLflow run %s not found in %s; opening a new run", resume_run_id, uri)
    if run_id is None:
        tags = provenance_tags(spec, shash, list(data_dirs), upstream_model, device)
        tags.update(stage=stage, **catalog.source_tags(spec, stage, tags))
        # MLflow records the run name as the mlflow.runName tag itself.
        run = client.create_run(experiment_id, tags=tags, run_name=spec.get("run_name", stage))
        run_id = run.info.run_id
        catalog.log_datasets(client, run_id, list(data_dirs), tags,
                             "training" if stage in catalog.TRAINING_STAGES else "evaluation")
        # log_batch splits the params into batches of MLflow's size limit itself.
        client.log_batch(run_id, params=[Param(k, v) for k, v in flatten(spec).items()])
        client.log_dict(run_id, spec, "spec.json")
    tracked = TrackedRun(client, run_id)
    interval = tracking.get("system_metrics_interval", 10) if stage in catalog.TRAINING_STAGES \
        else 0
    status = "FAILED"
    try:
        with catalog.system_metrics(run_id, uri, interval):
            yield tracked
        status = "FINISHED"
    except SystemExit:  # the job stopped on request (SIGTERM: training_loop.Preempted)
        status = "KILLED"
        raise
    finally:
        # Also waits for the asynchronously logged metrics to be written.
        client.set_terminated(run_id, status=status)
