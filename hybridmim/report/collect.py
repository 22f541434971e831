"""Fetch the evaluate runs a report is built from, straight from MLflow.

The report never trusts a folder listing or "the latest run per configuration": it takes the run
ids written in the evaluate jobs' ``metrics.json`` files (the Snakemake outputs of this iteration)
and fetches exactly those runs from the MLflow store, so runs left over from earlier iterations
cannot leak into a table. Each file is cross-checked against its run: a run missing from the store
or a number that differs between the file and MLflow is an error that names the file.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import re
import sys
from pathlib import Path
from typing import Any, Iterable, Iterator

import pandas as pd

WILDCARDS = ("dataset", "backbone", "init", "fraction", "seed")
EVALUATE_EXPERIMENT = "evaluate"
# MLflow's SQL store saves +/-inf as +/-float max (and NaN with a flag); map it back.
_MLFLOW_INF = sys.float_info.max
# The contract path of an evaluate output; when a file sits at such a path its wildcards must
# agree with the run's tags (a file copied to the wrong folder is caught here).
_EVALUATE_PATH = re.compile(
    r"evaluate/(?P<dataset>[^/]+)/(?P<backbone>[^/]+)/(?P<init>[^/]+)/"
    r"frac(?P<fraction>[^/]+)/seed(?P<seed>[^/]+)/metrics\.json$")
# search_runs filters are SQL under the hood; keep each IN (...) list modest.
_IDS_PER_QUERY = 100


class ReportInputError(ValueError):
    """A metrics file, run or config entry the report cannot use; the message says what to do."""


def read_metrics_file(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ReportInputError(f"metrics file {path} does not exist; run the job that writes it")
    try:
        payload = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ReportInputError(f"metrics file {path} is not valid JSON ({exc}); "
                               "delete it and re-run the job that writes it") from exc
    if not isinstance(payload, dict) or not payload.get("run_id"):
        raise ReportInputError(f"metrics file {path} has no 'run_id'; it was not written by a "
                               "tracked job — re-run the job that writes it")
    if not isinstance(payload.get("metrics", {}), dict):
        raise ReportInputError(f"metrics file {path}: 'metrics' must be a mapping name -> value")
    return payload


def from_mlflow_value(value: float) -> float:
    value = float(value)
    if abs(value) == _MLFLOW_INF:
        return math.copysign(math.inf, value)
    return value


def same_number(a: Any, b: Any, rel_tol: float = 1e-9, abs_tol: float = 1e-12) -> bool:
    """Equality for reported numbers: NaN/None equal each other, inf survives MLflow's encoding."""
    a = math.nan if a is None else from_mlflow_value(a)
    b = math.nan if b is None else from_mlflow_value(b)
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    if math.isinf(a) or math.isinf(b):
        return a == b
    return math.isclose(a, b, rel_tol=rel_tol, abs_tol=abs_tol)


def expected_metrics(payload: dict[str, Any]) -> dict[str, Any]:
    """Every number a metrics file states, keyed by the MLflow metric name it was logged as."""
    expected = dict(payload.get("metrics") or {})
    for kind, values in (payload.get("per_class") or {}).items():
        for label, value in (values or {}).items():
            expected.setdefault(f"test_{kind}_{label}", value)
    return expected


def metric_disagreements(payload: dict[str, Any], mlflow_metrics: dict[str, float]) -> list[str]:
    """Human-readable differences between a metrics file and its MLflow run (empty: they agree)."""
    problems = []
    for name, value in expected_metrics(payload).items():
        if name not in mlflow_metrics:
            problems.append(f"{name}: file says {value}, MLflow run has no such metric")
        elif not same_number(value, mlflow_metrics[name]):
            problems.append(f"{name}: file says {value}, MLflow says "
                            f"{from_mlflow_value(mlflow_metrics[name])}")
    return problems


@contextlib.contextmanager
def tracking_uri_set(uri: str) -> Iterator[None]:
    """mlflow.search_runs reads the global tracking URI; set it only for the block."""
    import mlflow

    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous)


def search_runs_by_id(tracking_uri: str, run_ids: Iterable[str], experiment: str) -> pd.DataFrame:
    """One row per run id found in ``experiment`` (MLflow's column naming: metrics.*, tags.*)."""
    import mlflow
    from mlflow.tracking import MlflowClient

    run_ids = sorted(set(run_ids))
    if MlflowClient(tracking_uri=tracking_uri).get_experiment_by_name(experiment) is None:
        raise ReportInputError(f"MLflow store {tracking_uri} has no experiment {experiment!r}; "
                               "run the jobs first or pass the tracking URI that holds their runs")
    frames = []
    with tracking_uri_set(tracking_uri):
        for start in range(0, len(run_ids), _IDS_PER_QUERY):
            chunk = run_ids[start:start + _IDS_PER_QUERY]
            quoted = ", ".join(f"'{run_id}'" for run_id in chunk)
            frames.append(mlflow.search_runs(
                experiment_names=[experiment], filter_string=f"attributes.run_id IN ({quoted})",
                max_results=len(chunk), output_format="pandas"))
    frames = [frame for frame in frames if not frame.empty]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame({"run_id": []})


def _load_listed(metrics_files: Iterable[str | os.PathLike]) -> dict[str, tuple[Path, dict]]:
    listed: dict[str, tuple[Path, dict]] = {}
    for raw in metrics_files:
        path = Path(raw)
        payload = read_metrics_file(path)
        run_id = str(payload["run_id"])
        if run_id in listed:
            raise ReportInputError(f"metrics files {listed[run_id][0]} and {path} name the same "
                                   f"run {run_id}; one of them is a stale copy — delete it")
        listed[run_id] = (path, payload)
    if not listed:
        raise ReportInputError("no metrics files given: the report needs the evaluate jobs' "
                               "metrics.json files")
    return listed


def _wildcards(row: pd.Series, path: Path) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for name in WILDCARDS:
        tag = row.get(f"tags.snakemake.wildcard.{name}")
        if tag is None or pd.isna(tag) or str(tag) == "":
            raise ReportInputError(
                f"run {row['run_id']} (listed in {path}) has no tag snakemake.wildcard.{name}; "
                "it was not created by the workflow's evaluate rule — re-run that job")
        values[name] = str(tag)
    try:
        values["fraction"] = float(values["fraction"])
        values["seed"] = int(values["seed"])
    except ValueError as exc:
        raise ReportInputError(f"run {row['run_id']} (listed in {path}): fraction/seed tags "
                               f"{values['fraction']!r}/{values['seed']!r} are not numbers") from exc
    match = _EVALUATE_PATH.search(Path(path).resolve().as_posix())
    if match:
        for name, text in match.groupdict().items():
            if str(values[name]) != text and not _numbers_equal_text(values[name], text):
                raise ReportInputError(
                    f"metrics file {path} sits in the folder of {name}={text} but its run "
                    f"{row['run_id']} is tagged {name}={values[name]}; the file was copied or "
                    "moved — delete it and re-run the evaluate job")
    return values


def _numbers_equal_text(value: Any, text: str) -> bool:
    try:
        return float(text) == float(value)
    except ValueError:
        return False


def collect_runs(tracking_uri: str, metrics_files: Iterable[str | os.PathLike],
                 experiment: str = EVALUATE_EXPERIMENT) -> pd.DataFrame:
    """The listed evaluate runs as a frame: one row per run.

    Columns: ``run_id``, ``metrics_file``, ``status``, the wildcards (dataset, backbone, init,
    fraction: float, seed: int), ``classes`` (JSON list of the per-class names in label order,
    from the file) and one float column per MLflow metric (``test_dice_mean``,
    ``test_dice_<class>``, ...; inf restored), plus MLflow's ``tags.*`` columns.
    """
    listed = _load_listed(metrics_files)
    found = search_runs_by_id(tracking_uri, listed, experiment)
    missing = sorted(set(listed) - set(found["run_id"]))
    if missing:
        lines = "; ".join(f"run {run_id} listed in {listed[run_id][0]}" for run_id in missing)
        raise ReportInputError(
            f"not in the MLflow store {tracking_uri} (experiment {experiment!r}): {lines}. "
            "Point the report at the store the jobs logged to, or re-run those evaluate jobs")
    metric_columns = [c for c in found.columns if c.startswith("metrics.")]
    tag_columns = [c for c in found.columns if c.startswith("tags.")]
    records = []
    for _, row in found.iterrows():
        path, payload = listed[row["run_id"]]
        mlflow_metrics = {c.removeprefix("metrics."): row[c] for c in metric_columns
                          if not pd.isna(row[c]) or _logged_nan(payload, c)}
        problems = metric_disagreements(payload, mlflow_metrics)
        if problems:
            raise ReportInputError(
                f"metrics file {path} disagrees with its MLflow run {row['run_id']}: "
                + "; ".join(problems) + ". One of them was edited or comes from another run — "
                "re-run the evaluate job")
        record = {"run_id": row["run_id"], "metrics_file": str(path), "status": row["status"],
                  **_wildcards(row, path),
                  "classes": json.dumps(list((payload.get("per_class") or {}).get("dice", {})))}
        record.update({name: from_mlflow_value(value) for name, value in mlflow_metrics.items()})
        record.update({c: row[c] for c in tag_columns})
        records.append(record)
    frame = pd.DataFrame.from_records(records)
    return frame.sort_values(list(WILDCARDS), ignore_index=True)


def _logged_nan(payload: dict[str, Any], column: str) -> bool:
    """A NaN cell is a logged NaN only if the file states that metric (search_runs pads others)."""
    return column.removeprefix("metrics.") in expected_metrics(payload)


def collect_pretrain_runs(tracking_uri: str, metrics_files: Iterable[str | os.PathLike],
                          experiment: str = "pretrain") -> pd.DataFrame:
    """The listed pretraining runs (run_id, metrics_file, label, tags.*); missing runs are errors."""
    listed = _load_listed(metrics_files)
    found = search_runs_by_id(tracking_uri, listed, experiment)
    missing = sorted(set(listed) - set(found["run_id"]))
    if missing:
        lines = "; ".join(f"run {run_id} listed in {listed[run_id][0]}" for run_id in missing)
        raise ReportInputError(f"not in the MLflow store {tracking_uri} (experiment "
                               f"{experiment!r}): {lines}; re-run those pretraining jobs")
    wildcard_columns = sorted(c for c in found.columns if c.startswith("tags.snakemake.wildcard."))

    def label(row: pd.Series) -> str:
        parts = [str(row[c]) for c in wildcard_columns if not pd.isna(row[c])]
        return "/".join(parts) or str(row.get("tags.mlflow.runName", row["run_id"]))

    frame = found.assign(metrics_file=found["run_id"].map(lambda r: str(listed[r][0])),
                         label=found.apply(label, axis=1))
    return frame.sort_values("label", ignore_index=True)
