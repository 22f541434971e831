"""Re-verify every reported number and the provenance chain behind it (docs/audit.md lists
every check and why).

Every file a reader sees is compared cell by cell with the report re-built from the live MLflow
runs (audit_files); every CSV table row with run ids is also re-derived here from the runs it
names; every run behind a table or figure, and each run upstream of it, is checked (audit_runs,
recompute). Each check is ``{"check", "number", "source", "status": pass|fail|warn|skip,
"reason"}`` (run checks add ``affects``: the table numbers resting on that run, through the
chain); the results go to ``<results>/audit.json`` and ``<results>/audit.md``.
"""
from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any

import pandas as pd

from hybridmim.report.audit_checks import check, summary, write_outputs
from hybridmim.report.audit_files import audit_report_files
from hybridmim.report.audit_runs import RunAuditor
from hybridmim.report.collect import ReportInputError, from_mlflow_value, same_number
from hybridmim.report.recompute import DEFAULT_SAMPLE
from hybridmim.report.tables import AUDITED_COLUMNS, RUN_ID_SEPARATOR, aggregate, load_paper_results

log = logging.getLogger(__name__)


def _run_ids(value: Any) -> list[str]:
    """The run ids of one ``run_ids`` cell, in the order the table lists them."""
    return [] if pd.isna(value) else [r for r in str(value).split(RUN_ID_SEPARATOR) if r]


def run_ids_of(table: pd.DataFrame, csv_path: Path, auditor: RunAuditor) -> set[str]:
    """The run ids of a table or figure data file (its ``run_ids`` column, if any); each is
    recorded as affecting the row (its ``cell``) it stands behind."""
    if "run_ids" not in table.columns:
        return set()
    ids: set[str] = set()
    for i, value in enumerate(table["run_ids"]):
        label = table["cell"].iloc[i] if "cell" in table.columns else f"row {i + 1}"
        for run_id in _run_ids(value):
            auditor.affects.setdefault(run_id, set()).add(f"{csv_path.name}: {label}")
            ids.add(run_id)
    return ids


def _check_number(csv_path: Path, row: pd.Series, auditor: RunAuditor) -> dict[str, str]:
    """A table row's mean, std and n, re-derived from the runs it names."""
    ids = _run_ids(row["run_ids"])
    number = f"{csv_path.name}: {row['cell']} = {row['mean']}"
    source = ", ".join(ids) or str(csv_path)
    if not ids:
        ok = pd.isna(row["mean"]) and int(row["n"]) == 0
        return check("table number", number, source, ok,
                     "no runs behind this cell, shown as n/a" if ok else
                     "the cell shows a number but names no MLflow run")
    values = []
    for run_id in ids:
        run = auditor.run(run_id)
        if run is None:
            return check("table number", number, source, False,
                         f"run {run_id} is not in the MLflow store {auditor.tracking_uri}")
        if row["metric"] not in run.data.metrics:
            return check("table number", number, source, False,
                         f"run {run_id} has no metric {row['metric']}")
        values.append(from_mlflow_value(run.data.metrics[row["metric"]]))
    mean, std, n = aggregate(values)
    scale = float(row["scale"])
    derived = {"mean": mean * scale, "std": std * scale, "n": n}
    wrong = [f"{key}: table says {row[key]}, MLflow runs give {derived[key]}"
             for key in ("mean", "std", "n") if not same_number(row[key], derived[key])]
    return check("table number", number, source, not wrong,
                 "; ".join(wrong) if wrong else
                 f"re-derived from {len(ids)} MLflow run(s): mean {derived['mean']:.6g}, "
                 f"std {derived['std']:.6g}, n {n}")


def check_paper_values(csv_path: Path, paper_yaml: Path) -> list[dict[str, str]]:
    """The reported column must equal config/paper_results.yaml (paper, then references)."""
    try:
        paper = load_paper_results(paper_yaml)
    except ReportInputError as exc:
        return [check("reported numbers", csv_path.name, str(paper_yaml), False, str(exc))]
    entries = paper["paper"] + paper["references"]
    table = pd.read_csv(csv_path)
    if len(table) != len(entries):
        return [check("reported numbers", csv_path.name, str(paper_yaml), False,
                      f"{len(table)} rows but {paper_yaml} has {len(entries)} entries; "
                      "re-run the report")]
    checks = []
    for (_, row), entry in zip(table.iterrows(), entries):
        expected = math.nan if entry["value"] is None else float(entry["value"])
        ok = same_number(row["reported"], expected)
        checks.append(check("reported numbers", f"{csv_path.name}: {row['cell']} reported",
                            str(paper_yaml), ok,
                            "equals the config entry" if ok else
                            f"table says {row['reported']}, {paper_yaml.name} says "
                            f"{entry['value']}; re-run the report"))
    return checks


def audit(results_dir: str | os.PathLike, tracking_uri: str | None,
          project_root: str | os.PathLike, strict: bool = False, recompute: bool = False,
          sample: int = DEFAULT_SAMPLE, sample_seed: int = 0,
          html: str | os.PathLike | None = None) -> list[dict[str, str]]:
    """Run every check, write ``<results>/audit.json`` and ``audit.md``, return the checks; the
    options are ``hybridmim audit``'s (its --help says what each does)."""
    from hybridmim.tracking.store import resolve_tracking_uri

    results_dir, project_root = Path(results_dir), Path(project_root).resolve()
    # An explicit URI wins; only without one do $MLFLOW_TRACKING_URI and the default apply.
    tracking_uri = tracking_uri or resolve_tracking_uri(None)
    auditor = RunAuditor(results_dir, tracking_uri, project_root,
                         sample=None if recompute else sample, sample_seed=sample_seed)
    tables = sorted((results_dir / "tables").glob("*.csv"))
    checks: list[dict[str, str]] = []
    if not tables:
        checks.append(check("tables", str(results_dir / "tables"), str(results_dir), False,
                            "no CSV tables to audit; run the report first"))
    run_ids: set[str] = set()
    for csv_path in tables:
        table = pd.read_csv(csv_path)
        run_ids |= run_ids_of(table, csv_path, auditor)
        # Tables of other shapes are audited by re-building them (audit_files) only.
        if all(c in table.columns for c in AUDITED_COLUMNS):
            checks += [_check_number(csv_path, row, auditor) for _, row in table.iterrows()]
        if csv_path.name == "paper_vs_ours.csv":
            checks += check_paper_values(csv_path, project_root / "config" / "paper_results.yaml")
    for csv_path in sorted((results_dir / "figures").glob("*.csv")):
        run_ids |= run_ids_of(pd.read_csv(csv_path), csv_path, auditor)
    if tables:
        checks += audit_report_files(results_dir, project_root, tracking_uri,
                                     Path(html) if html else None)
    checks += auditor.check_runs(run_ids)
    if strict:
        checks = [{**c, "status": "fail", "reason": f"{c['reason']} (a failure under --strict)"}
                  if c["status"] == "warn" else c for c in checks]
    write_outputs(results_dir, tracking_uri, checks)
    return checks


def exit_status(checks: list[dict[str, str]]) -> int:
    return 1 if any(c["status"] == "fail" for c in checks) else 0


def main(results_dir: str | os.PathLike = "results", tracking_uri: str | None = None,
         project_root: str | os.PathLike = ".", **options: Any) -> int:
    """CLI entry: audit (``options``: those of ``audit``), log the summary and each failure,
    return the exit status."""
    checks = audit(results_dir, tracking_uri, project_root, **options)
    for failed in (c for c in checks if c["status"] == "fail"):
        log.error("audit FAIL %s — %s: %s", failed["check"], failed["number"], failed["reason"])
    totals = summary(checks)
    log.info("audit: %d passed, %d failed, %d warnings → %s", totals["pass"], totals["fail"],
             totals["warn"], Path(results_dir) / "audit.md")
    return exit_status(checks)
