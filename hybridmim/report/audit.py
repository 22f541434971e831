"""Re-verify every reported number and the provenance chain behind it (docs/audit.md).

Every file a reader sees — each table in every format, each figure's data, the HTML report's
embedded tables — is compared cell by cell with the report re-built from the live MLflow runs
(audit_files). For every row of every CSV table under ``<results>/tables`` with run ids the
number is also re-derived from the MLflow runs the row names. Every run behind a table or figure
is then checked, and so is each run upstream of it (evaluate → finetune → pretrain, through the
``upstream.*`` tags):

- it exists, is not deleted and FINISHED; its metrics.json (found under ``<results>``) agrees
  with MLflow, and its spec hash with the run's ``config_hash`` tag;
- provenance tags are present; the git commit is recorded (a dirty tree is a warning, a failure
  with ``strict``);
- every ``data_hash.<dataset>`` tag equals the current dvc.lock entry and DVC finds the files on
  disk unchanged (audit_data), or the recomputed tree hash when the run recorded one
  (``data_hash_source`` = sha256-tree);
- the upstream checkpoint on disk still has the recorded sha256 and its ``meta.mlflow_run_id``
  is the recorded upstream run, which exists in the store;
- an evaluate run's saved predictions have their sha256 and its per-case Dice/HD95 re-compute
  from them (recompute: a seeded sample of cases, or all).

Each check is ``{"check", "number", "source", "status": pass|fail|warn|skip, "reason"}`` (run
checks add ``affects``: the table numbers resting on that run, through the chain); the results go
to ``<results>/audit.json`` and ``<results>/audit.md``. ``main`` returns 1 if anything failed.
"""
from __future__ import annotations

import functools
import json
import logging
import math
import os
import subprocess
from pathlib import Path
from typing import Any

import pandas as pd

from hybridmim.hashing import sha256_file, tree_hash
from hybridmim.report.audit_data import DvcData, data_on_disk_check
from hybridmim.report.audit_files import audit_report_files
from hybridmim.report.audit_output import summary, write_outputs
from hybridmim.report.collect import (ReportInputError, from_mlflow_value, metric_disagreements,
                                      same_number)
from hybridmim.report.recompute import DEFAULT_SAMPLE, check_predictions
from hybridmim.report.tables import AUDITED_COLUMNS, RUN_ID_SEPARATOR, aggregate, load_paper_results

log = logging.getLogger(__name__)

# The order of the results folders (results/<stage>/<dataset>/<backbone>/...), for labels.
_WILDCARD_ORDER = ("dataset", "backbone", "method", "corpus", "init", "fraction", "seed")
_FOLDER_PREFIX = {"fraction": "frac", "seed": "seed"}
REQUIRED_TAGS = ("config_hash", "git_commit", "git_dirty", "device", "version.torch",
                 "version.monai", "version.hybridmim", "snakemake.rule")


def _check(kind: str, number: str, source: str, ok: bool | None | str,
           reason: str) -> dict[str, str]:
    """``ok``: True pass, False fail, None warn, "skip" (not applicable here, with why)."""
    status = ok if ok == "skip" else "warn" if ok is None else ("pass" if ok else "fail")
    return {"check": kind, "number": number, "source": source, "status": status, "reason": reason}


class Auditor:
    def __init__(self, results_dir: Path, tracking_uri: str, project_root: Path,
                 sample: int | None = DEFAULT_SAMPLE, sample_seed: int = 0):
        from mlflow.tracking import MlflowClient

        self.results_dir, self.project_root = results_dir, project_root
        self.client = MlflowClient(tracking_uri=tracking_uri)
        self.tracking_uri = tracking_uri
        self._runs: dict[str, Any] = {}
        # run id → the table numbers that rest on it (directly or through a downstream run)
        self.affects: dict[str, set[str]] = {}
        self._metrics_files: dict[str, list[Path]] | None = None
        self.dvc = DvcData(project_root)
        # per-case recompute: cases per evaluate run (None: every case), and the sample's seed
        self.sample, self.sample_seed = sample, sample_seed

    # ----------------------------------------------------------------------------- lookups
    def run(self, run_id: str) -> Any | None:
        if run_id not in self._runs:
            try:
                self._runs[run_id] = self.client.get_run(run_id)
            except Exception:  # MlflowException(RESOURCE_DOES_NOT_EXIST) or a malformed id
                self._runs[run_id] = None
        return self._runs[run_id]

    def metrics_files(self) -> dict[str, list[Path]]:
        """run id → the metrics.json files under the results folder that name it."""
        if self._metrics_files is None:
            index: dict[str, list[Path]] = {}
            for path in sorted(self.results_dir.rglob("metrics.json")):
                try:
                    run_id = json.loads(path.read_text()).get("run_id")
                except (OSError, ValueError, AttributeError):
                    continue
                if run_id:
                    index.setdefault(str(run_id), []).append(path)
            self._metrics_files = index
        return self._metrics_files

    def on_disk(self, recorded: str) -> Path:
        """A path recorded by a job (relative to the workflow's working dir = project root)."""
        path = Path(recorded)
        return path if path.is_absolute() else self.project_root / path

    @functools.lru_cache(maxsize=None)
    def sha256(self, path: Path) -> str:
        return sha256_file(path)

    @functools.lru_cache(maxsize=None)
    def tree(self, path: Path) -> str:
        return tree_hash(path)

    @functools.lru_cache(maxsize=None)
    def model_meta(self, path: Path) -> dict[str, Any]:
        from hybridmim.checkpoints import load_model_file

        return load_model_file(path).get("meta") or {}

    # ----------------------------------------------------------------------------- tables
    def check_table(self, csv_path: Path) -> tuple[list[dict], set[str]]:
        source = str(csv_path)
        table = pd.read_csv(csv_path)
        absent = [c for c in AUDITED_COLUMNS if c not in table.columns]
        if absent:
            # Tables of other shapes are audited by re-building them (audit_files); their run
            # ids still feed the run checks.
            return [], self.run_ids_of(table, csv_path)
        checks, run_ids = [], set()
        for _, row in table.iterrows():
            ids = [] if pd.isna(row["run_ids"]) else [
                r for r in str(row["run_ids"]).split(RUN_ID_SEPARATOR) if r]
            run_ids.update(ids)
            for run_id in ids:
                self.affects.setdefault(run_id, set()).add(f"{csv_path.name}: {row['cell']}")
            checks.append(self._check_number(csv_path, row, ids))
        return checks, run_ids

    def run_ids_of(self, table: pd.DataFrame, csv_path: Path) -> set[str]:
        """The run ids of a table or figure data file (its ``run_ids`` column, if any)."""
        if "run_ids" not in table.columns:
            return set()
        ids: set[str] = set()
        for i, value in enumerate(table["run_ids"]):
            row = {r for r in ("" if pd.isna(value) else str(value)).split(RUN_ID_SEPARATOR) if r}
            label = table["cell"].iloc[i] if "cell" in table.columns else f"row {i + 1}"
            for run_id in row:
                self.affects.setdefault(run_id, set()).add(f"{csv_path.name}: {label}")
            ids |= row
        return ids

    def _check_number(self, csv_path: Path, row: pd.Series, ids: list[str]) -> dict[str, str]:
        number = f"{csv_path.name}: {row['cell']} = {row['mean']}"
        source = ", ".join(ids) or str(csv_path)
        if not ids:
            ok = pd.isna(row["mean"]) and int(row["n"]) == 0
            return _check("table number", number, source, ok,
                          "no runs behind this cell, shown as n/a" if ok else
                          "the cell shows a number but names no MLflow run")
        values = []
        for run_id in ids:
            run = self.run(run_id)
            if run is None:
                return _check("table number", number, source, False,
                              f"run {run_id} is not in the MLflow store {self.tracking_uri}")
            if row["metric"] not in run.data.metrics:
                return _check("table number", number, source, False,
                              f"run {run_id} has no metric {row['metric']}")
            values.append(from_mlflow_value(run.data.metrics[row["metric"]]))
        mean, std, n = aggregate(values)
        scale = float(row["scale"])
        derived = {"mean": mean * scale, "std": std * scale, "n": n}
        wrong = [f"{key}: table says {row[key]}, MLflow runs give {derived[key]}"
                 for key in ("mean", "std", "n") if not same_number(row[key], derived[key])]
        return _check("table number", number, source, not wrong,
                      "; ".join(wrong) if wrong else
                      f"re-derived from {len(ids)} MLflow run(s): mean {derived['mean']:.6g}, "
                      f"std {derived['std']:.6g}, n {n}")

    def check_paper_values(self, csv_path: Path, paper_yaml: Path) -> list[dict[str, str]]:
        """The reported column must equal config/paper_results.yaml (paper, then references)."""
        try:
            paper = load_paper_results(paper_yaml)
        except ReportInputError as exc:
            return [_check("reported numbers", csv_path.name, str(paper_yaml), False, str(exc))]
        entries = paper["paper"] + paper["references"]
        table = pd.read_csv(csv_path)
        if len(table) != len(entries):
            return [_check("reported numbers", csv_path.name, str(paper_yaml), False,
                           f"{len(table)} rows but {paper_yaml} has {len(entries)} entries; "
                           "re-run the report")]
        checks = []
        for (_, row), entry in zip(table.iterrows(), entries):
            expected = math.nan if entry["value"] is None else float(entry["value"])
            ok = same_number(row["reported"], expected)
            checks.append(_check("reported numbers", f"{csv_path.name}: {row['cell']} reported",
                                 str(paper_yaml), ok,
                                 "equals the config entry" if ok else
                                 f"table says {row['reported']}, {paper_yaml.name} says "
                                 f"{entry['value']}; re-run the report"))
        return checks

    # ----------------------------------------------------------------------------- runs
    def check_runs(self, run_ids: set[str]) -> list[dict[str, Any]]:
        """Check the runs and, breadth first, the runs upstream of them; every check lists the
        table numbers that rest on its run (``affects``)."""
        checks, queue, seen = [], sorted(run_ids), set()
        while queue:
            run_id = queue.pop(0)
            if run_id in seen:
                continue
            seen.add(run_id)
            run = self.run(run_id)
            if run is None:
                checks.append(_check("run exists", f"run {run_id}", self.tracking_uri, False,
                                     "not in the MLflow store"))
                continue
            run_checks, upstream = self._check_run(run)
            affects = sorted(self.affects.get(run_id, ()))
            checks += [{**check, "affects": affects} for check in run_checks]
            if upstream:
                self.affects.setdefault(upstream, set()).update(affects)
                queue.append(upstream)
        return checks

    def _check_run(self, run: Any) -> tuple[list[dict[str, str]], str | None]:
        tags, run_id = run.data.tags, run.info.run_id
        stage = tags.get("stage", "?")
        wildcards = "/".join(_FOLDER_PREFIX.get(k, "") + tags[f"snakemake.wildcard.{k}"]
                             for k in _WILDCARD_ORDER if f"snakemake.wildcard.{k}" in tags)
        who = f"{stage} run {run_id} ({wildcards})"
        deleted = run.info.lifecycle_stage == "deleted"
        checks = [_check("run finished", who, run_id, run.info.status == "FINISHED",
                         f"status {run.info.status}" + ("" if run.info.status == "FINISHED" else
                                                        ": its numbers are not final results")),
                  _check("run not deleted", who, run_id, not deleted,
                         "deleted from the MLflow store (restore it with `mlflow runs restore` or "
                         "re-run the job)" if deleted else "active")]
        absent = [t for t in REQUIRED_TAGS if not tags.get(t)]
        checks.append(_check("provenance tags", who, run_id, not absent,
                             f"missing tags {absent}" if absent else "all recorded"))
        checks += self._check_git(who, run_id, tags)
        checks += self._check_metrics_file(who, run)
        checks += self._check_data(who, run)
        if stage == "evaluate":
            checks += self._check_predictions(who, run)
        upstream_checks, upstream = self._check_upstream(who, run)
        return checks + upstream_checks, upstream

    def _check_git(self, who: str, run_id: str, tags: dict[str, str]) -> list[dict[str, str]]:
        commit = tags.get("git_commit", "")
        if not commit or commit == "unknown":
            return [_check("git commit", who, run_id, False,
                           "no git commit recorded: the code version is unknown")]
        checks = [_check("git commit", who, run_id, True, f"commit {commit}")]
        known = subprocess.run(["git", "cat-file", "-e", f"{commit}^{{commit}}"],
                               cwd=self.project_root, capture_output=True).returncode == 0
        if not known:
            checks.append(_check("git commit", who, run_id, None,
                                 f"commit {commit} is not in the repository at "
                                 f"{self.project_root} (fetch it to reproduce this run)"))
        if tags.get("git_dirty") != "false":
            checks.append(_check("git dirty", who, run_id, None,
                                 f"run made with uncommitted changes on top of {commit} "
                                 f"(git_dirty={tags.get('git_dirty')}): the commit alone does "
                                 "not reproduce it"))
        return checks

    def _check_metrics_file(self, who: str, run: Any) -> list[dict[str, str]]:
        run_id = run.info.run_id
        files = self.metrics_files().get(run_id, [])
        if not files:
            ok = False if run.data.tags.get("stage") == "evaluate" else None
            return [_check("metrics.json", who, run_id, ok,
                           f"no metrics.json under {self.results_dir} names this run")]
        checks = []
        for path in files:
            payload = json.loads(path.read_text())
            if run.data.tags.get("stage") == "evaluate":
                problems = metric_disagreements(payload, run.data.metrics)
                checks.append(_check("metrics.json = MLflow", who, str(path), not problems,
                                     "; ".join(problems) if problems else
                                     "every number in the file equals the run's metric"))
            recorded, tagged = payload.get("spec_hash"), run.data.tags.get("config_hash")
            if recorded:
                checks.append(_check("spec hash", who, str(path), recorded == tagged,
                                     f"file {recorded}, run config_hash {tagged}"))
        return checks

    def _check_predictions(self, who: str, run: Any) -> list[dict[str, str]]:
        files = self.metrics_files().get(run.info.run_id, [])
        if not files:
            return []  # _check_metrics_file already failed it
        payload = json.loads(files[0].read_text())
        return check_predictions(_check, who, run, files[0], payload, self.on_disk, self.sha256,
                                 self.sample, self.sample_seed)

    def _data_folder(self, run: Any, name: str) -> Path:
        """The folder a data_hash.<name> tag hashed, from the run's params (the job spec)."""
        params = run.data.params
        candidates = [v for k, v in params.items() if k.endswith("processed_dir")]
        try:
            candidates += [d.get("processed_dir", "") for d in
                           json.loads(params.get("data.datasets", "[]")) if isinstance(d, dict)]
        except ValueError:
            pass
        for candidate in candidates:
            if candidate and Path(candidate).name == name:
                return self.on_disk(candidate)
        return self.project_root / "data" / "processed" / name

    def _check_data(self, who: str, run: Any) -> list[dict[str, str]]:
        from hybridmim.tracking.provenance import data_hash

        tags, run_id = run.data.tags, run.info.run_id
        names = sorted(k.removeprefix("data_hash.") for k in tags if k.startswith("data_hash."))
        if not names:
            return [_check("data hash", who, run_id, False, "no data_hash.<dataset> tag recorded")]
        checks = []
        for name in names:
            recorded, source = tags[f"data_hash.{name}"], tags.get(f"data_hash_source.{name}", "")
            folder = self._data_folder(run, name)
            label = f"{who} data {name}"
            if source == "dvc.lock":
                current = data_hash(folder, self.project_root)
                if current["source"] != "dvc.lock":
                    checks.append(_check("data hash", label, str(self.project_root / "dvc.lock"),
                                         False, f"dvc.lock has no entry for {folder} any more"))
                    continue
                checks.append(data_on_disk_check(_check, self.dvc, label, name, folder))
                ok, now = current["hash"] == recorded, current["hash"]
                where = str(self.project_root / "dvc.lock")
            elif source == "sha256-tree":
                if not folder.is_dir():
                    checks.append(_check("data hash", label, str(folder), False,
                                         f"{folder} does not exist: the tree hash cannot be "
                                         "re-computed (restore the data, e.g. dvc pull)"))
                    continue
                ok, now, where = self.tree(folder) == recorded, self.tree(folder), str(folder)
            else:
                checks.append(_check("data hash", label, run_id, False,
                                     f"unknown data_hash_source {source!r}"))
                continue
            checks.append(_check("data hash", label, where, ok,
                                 f"{source} {recorded}" if ok else
                                 f"run used {recorded} ({source}) but it is {now} now: the data "
                                 "changed since the run — re-run it or check out that data "
                                 "version"))
        return checks

    def _check_upstream(self, who: str, run: Any) -> tuple[list[dict[str, str]], str | None]:
        tags, run_id = run.data.tags, run.info.run_id
        recorded_path = tags.get("upstream.checkpoint_path")
        if not recorded_path:
            needs = tags.get("stage") == "evaluate" or run.data.params.get(
                "init.checkpoint", "null") not in ("null", "None", "")
            return ([_check("upstream checkpoint", who, run_id, False,
                            "the run loaded a model but recorded no upstream checkpoint")]
                    if needs else []), None
        path = self.on_disk(recorded_path)
        if not path.is_file():
            return [_check("upstream checkpoint", who, str(path), False,
                           f"{path} does not exist any more")], None
        recorded, now = tags.get("upstream.checkpoint_sha256", ""), self.sha256(path)
        checks = [_check("upstream checkpoint", who, str(path), recorded == now,
                         f"sha256 {now}" if recorded == now else
                         f"the run used sha256 {recorded or '(none recorded)'} but the file is "
                         f"{now} now: the checkpoint changed since the run — re-run it")]
        try:
            meta = self.model_meta(path)
        except (ValueError, OSError, RuntimeError) as exc:
            return checks + [_check("model meta", who, str(path), False, str(exc))], None
        upstream_id, meta_id = tags.get("upstream.run_id", ""), str(meta.get("mlflow_run_id", ""))
        checks.append(_check("model meta run id", who, str(path),
                             bool(meta_id) and meta_id == upstream_id,
                             f"model.pt meta.mlflow_run_id {meta_id or '(none)'}, run's "
                             f"upstream.run_id {upstream_id or '(none)'}"))
        upstream = self.run(meta_id) if meta_id else None
        if meta_id and upstream is None:
            checks.append(_check("upstream run", who, str(path), False,
                                 f"run {meta_id} named by the model file is not in the store"))
            return checks, None
        if upstream is not None and meta.get("spec_hash"):
            tagged = upstream.data.tags.get("config_hash")
            checks.append(_check("model meta spec hash", who, str(path),
                                 meta["spec_hash"] == tagged,
                                 f"model.pt meta.spec_hash {meta['spec_hash']}, run {meta_id} "
                                 f"config_hash {tagged}"))
        return checks, meta_id or None


def audit(results_dir: str | os.PathLike, tracking_uri: str | None,
          project_root: str | os.PathLike, strict: bool = False, recompute: bool = False,
          sample: int = DEFAULT_SAMPLE, sample_seed: int = 0,
          html: str | os.PathLike | None = None) -> list[dict[str, str]]:
    """Run every check, write ``<results>/audit.json`` and ``audit.md``, return the checks.

    ``strict``: warnings (a run from a dirty tree, a commit missing here) fail. ``recompute``:
    re-compute every case's Dice/HD95, not a ``sample`` of cases per run (seeded by
    ``sample_seed``). ``html``: the Snakemake HTML report (default ``<results>/report.html``;
    skipped with a note when absent).
    """
    from hybridmim.tracking.store import resolve_tracking_uri

    results_dir, project_root = Path(results_dir), Path(project_root).resolve()
    # An explicit URI wins; only without one do $MLFLOW_TRACKING_URI and the default apply.
    tracking_uri = tracking_uri or resolve_tracking_uri(None)
    auditor = Auditor(results_dir, tracking_uri, project_root,
                      sample=None if recompute else sample, sample_seed=sample_seed)
    tables = sorted((results_dir / "tables").glob("*.csv"))
    checks: list[dict[str, str]] = []
    if not tables:
        checks.append(_check("tables", str(results_dir / "tables"), str(results_dir), False,
                             "no CSV tables to audit; run the report first"))
    run_ids: set[str] = set()
    for csv_path in tables:
        table_checks, ids = auditor.check_table(csv_path)
        checks += table_checks
        run_ids |= ids
        if csv_path.name == "paper_vs_ours.csv":
            checks += auditor.check_paper_values(csv_path,
                                                 project_root / "config" / "paper_results.yaml")
    for csv_path in sorted((results_dir / "figures").glob("*.csv")):
        run_ids |= auditor.run_ids_of(pd.read_csv(csv_path), csv_path)
    if tables:
        checks += audit_report_files(_check, results_dir, project_root, tracking_uri,
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
    for check in checks:
        if check["status"] == "fail":
            log.error("audit FAIL %s — %s: %s", check["check"], check["number"], check["reason"])
    totals = summary(checks)
    log.info("audit: %d passed, %d failed, %d warnings → %s", totals["pass"], totals["fail"],
             totals["warn"], Path(results_dir) / "audit.md")
    return exit_status(checks)
