"""Fetch the evaluate runs a report is built from, straight from MLflow.

The report never trusts a folder listing or "the latest run per configuration": it takes the run
ids written in the evaluate jobs' ``metrics.json`` files (the Snakemake outputs of this iteration)
and fetches exactly those runs from the MLflow store, so runs left over from earlier iterations
cannot leak into a table. Each file is cross-checked against its run: a run missing from the store
or a number that differs between the file and MLflow is an error that names the file.
"""
from __future__ import annotations

import json
import math
import os
import re
import sys
from pathlib import Path
from typing import Any, Iterable

import pandas as pd

WILDCARDS = ("dataset", "backbone", "init", "fraction", "seed")
_NUMBERS = {"fraction": float, "seed": int}  # the wildcards that are numbers in the frame
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
    return math.isclose(a, b, rel_tol=rel_tol, abs_tol=abs_tol)


def metric_disagreements(payload: dict[str, Any], mlflow_metrics: dict[str, float]) -> list[str]:
    """Human-readable differences between a metrics file and its MLflow run (empty: they agree).

    ``per_class`` repeats the class metrics under the class's display name; its MLflow name is
    ``test_<kind>_<metric_key(name)>`` (hybridmim.evaluate.metrics), so both copies are checked.
    """
    from hybridmim.evaluate.metrics import metric_key

    stated = [(f"metrics.{name}", name, value)
              for name, value in (payload.get("metrics") or {}).items()]
    for kind, values in (payload.get("per_class") or {}).items():
        for label, value in (values or {}).items():
            stated.append((f"per_class.{kind}.{label}", f"test_{kind}_{metric_key(label)}", value))
    problems = []
    for where, name, value in stated:
        if name not in mlflow_metrics:
            problems.append(f"{where}: file says {value}, MLflow run has no metric {name}")
        elif not same_number(value, mlflow_metrics[name]):
            problems.append(f"{where}: file says {value}, MLflow {name} is "
                            f"{from_mlflow_value(mlflow_metrics[name])}")
    return problems


def search_runs_by_id(tracking_uri: str, run_ids: Iterable[str], experiment: str) -> list[Any]:
    """The MLflow runs of these ids found in ``experiment``.

    The client's search is used rather than ``mlflow.search_runs``: the latter reads the
    process-global tracking URI, and setting it also rewrites $MLFLOW_TRACKING_URI, which would
    redirect every later job of this process.
    """
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise ReportInputError(f"MLflow store {tracking_uri} has no experiment {experiment!r}; "
                               "run the jobs first or pass the tracking URI that holds their runs")
    run_ids = sorted(set(run_ids))
    found = []
    for start in range(0, len(run_ids), _IDS_PER_QUERY):
        chunk = run_ids[start:start + _IDS_PER_QUERY]
        quoted = ", ".join(f"'{run_id}'" for run_id in chunk)
        found += client.search_runs([exp.experiment_id],
                                    filter_string=f"attributes.run_id IN ({quoted})",
                                    max_results=len(chunk))
    return found


def _listed_runs(tracking_uri: str, metrics_files: Iterable[str | os.PathLike], experiment: str,
                 what_to_do: str) -> tuple[dict[str, tuple[Path, dict]], list[Any]]:
    """({run id: (metrics file, its payload)}, their MLflow runs); a run missing from the store
    is an error naming its file and ending in ``what_to_do``."""
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
    found = search_runs_by_id(tracking_uri, listed, experiment)
    missing = sorted(set(listed) - {run.info.run_id for run in found})
    if missing:
        lines = "; ".join(f"run {run_id} listed in {listed[run_id][0]}" for run_id in missing)
        raise ReportInputError(f"not in the MLflow store {tracking_uri} (experiment "
                               f"{experiment!r}): {lines}{what_to_do}")
    return listed, found


def _wildcards(run: Any, path: Path) -> dict[str, Any]:
    run_id, values = run.info.run_id, {}
    for name in WILDCARDS:
        values[name] = run.data.tags.get(f"snakemake.wildcard.{name}", "")
        if not values[name]:
            raise ReportInputError(
                f"run {run_id} (listed in {path}) has no tag snakemake.wildcard.{name}; "
                "it was not created by the workflow's evaluate rule — re-run that job")
    try:
        values.update({name: number(values[name]) for name, number in _NUMBERS.items()})
    except ValueError as exc:
        raise ReportInputError(
            f"run {run_id} (listed in {path}): fraction/seed tags "
            f"{values['fraction']!r}/{values['seed']!r} are not numbers") from exc
    match = _EVALUATE_PATH.search(Path(path).resolve().as_posix())
    if match:
        for name, text in match.groupdict().items():
            try:  # the folder name read as the tag was ("frac1" and 1.0 agree)
                agrees = _NUMBERS.get(name, str)(text) == values[name]
            except ValueError:
                agrees = False
            if not agrees:
                raise ReportInputError(
                    f"metrics file {path} sits in the folder of {name}={text} but its run "
                    f"{run_id} is tagged {name}={values[name]}; the file was copied or "
                    "moved — delete it and re-run the evaluate job")
    return values


def collect_runs(tracking_uri: str, metrics_files: Iterable[str | os.PathLike],
                 experiment: str = EVALUATE_EXPERIMENT) -> pd.DataFrame:
    """The listed evaluate runs as a frame: one row per run.

    Columns: ``run_id``, ``metrics_file``, ``status``, the wildcards (dataset, backbone, init,
    fraction: float, seed: int), ``classes`` ({metric key: class name} of the file's per_class
    Dice, in its order) and one float column per MLflow metric (``test_dice_mean``,
    ``test_dice_<class>``, ...; inf restored), plus MLflow's ``tags.*`` columns.
    """
    from hybridmim.evaluate.metrics import metric_key

    listed, found = _listed_runs(
        tracking_uri, metrics_files, experiment,
        ". Point the report at the store the jobs logged to, or re-run those evaluate jobs")
    records = []
    for run in found:
        path, payload = listed[run.info.run_id]
        problems = metric_disagreements(payload, run.data.metrics)
        if problems:
            raise ReportInputError(
                f"metrics file {path} disagrees with its MLflow run {run.info.run_id}: "
                + "; ".join(problems) + ". One of them was edited or comes from another run — "
                "re-run the evaluate job")
        records.append({
            "run_id": run.info.run_id, "metrics_file": str(path), "status": run.info.status,
            **_wildcards(run, path),
            "classes": {metric_key(name): name
                        for name in (payload.get("per_class") or {}).get("dice") or {}},
            **{name: from_mlflow_value(value) for name, value in run.data.metrics.items()},
            **{f"tags.{key}": value for key, value in run.data.tags.items()},
            # An ablation variant's evaluate spec names its base (params variant.of, .changes, ...).
            **{f"params.{key}": value for key, value in run.data.params.items()
               if key.startswith("variant.")}})
    return pd.DataFrame.from_records(records).sort_values(list(WILDCARDS), ignore_index=True)


def collect_pretrain_runs(tracking_uri: str, metrics_files: Iterable[str | os.PathLike],
                          experiment: str = "pretrain") -> pd.DataFrame:
    """The listed pretraining runs (run_id, metrics_file, label, tags.*); a missing run is an
    error naming its file."""
    listed, runs = _listed_runs(tracking_uri, metrics_files, experiment,
                                "; re-run those pretraining jobs")
    # mlflow.search_runs' column naming (metrics.*, params.*, tags.*): json_normalize joins the
    # nested keys with "." and pads what a run lacks with NaN.
    found = pd.json_normalize([{"run_id": run.info.run_id, "experiment_id": run.info.experiment_id,
                                "status": run.info.status, **run.data.to_dictionary()}
                               for run in runs])
    wildcard_columns = sorted(c for c in found.columns if c.startswith("tags.snakemake.wildcard."))

    def label(row: pd.Series) -> str:
        parts = [str(row[c]) for c in wildcard_columns if not pd.isna(row[c])]
        return "/".join(parts) or str(row.get("tags.mlflow.runName", row["run_id"]))

    frame = found.assign(metrics_file=found["run_id"].map(lambda r: str(listed[r][0])),
                         label=found.apply(label, axis=1))
    return frame.sort_values("label", ignore_index=True)
