"""The audit's checks of every run behind a reported number and of each run upstream of it
(evaluate → finetune → pretrain, through the ``upstream.*`` tags): docs/audit.md lists them.

Whether the data on disk still hashes to what DVC recorded is asked of DVC itself (DvcData): a
run tags the DVC hash (from dvc.lock) of the processed folder it read; the run check compares that
tag with dvc.lock, DVC's own data status (``dvc data status --granular``, through its Python API)
lists every file that changed since the stage was committed, and ``dvc status`` of the stage that
wrote the folder names changed inputs (the raw data it was preprocessed from) even where no DVC
output tracks them file by file.
"""
from __future__ import annotations

import contextlib
import functools
import json
import os
import subprocess
from pathlib import Path, PurePath
from typing import Any

from hybridmim.hashing import sha256_file, tree_hash
from hybridmim.report.audit_checks import check
from hybridmim.report.collect import metric_disagreements
from hybridmim.report.recompute import DEFAULT_SAMPLE, check_predictions
from hybridmim.tracking.provenance import data_hash, dvc_lock_stages

# The order of the results folders (results/<stage>/<dataset>/<backbone>/...), for labels.
_WILDCARD_ORDER = ("dataset", "backbone", "method", "corpus", "init", "fraction", "seed")
_FOLDER_PREFIX = {"fraction": "frac", "seed": "seed"}
REQUIRED_TAGS = ("config_hash", "git_commit", "git_dirty", "device", "version.torch",
                 "version.monai", "version.hybridmim", "snakemake.rule")
_CHANGES = ("modified", "added", "deleted", "renamed", "unknown")


class RunAuditor:
    """Checks runs and, through their upstream tags, the runs before them; one per audit (its
    look-ups are cached)."""

    def __init__(self, results_dir: Path, tracking_uri: str, project_root: Path,
                 sample: int | None = DEFAULT_SAMPLE, sample_seed: int = 0):
        from mlflow.tracking import MlflowClient

        # A path a job recorded is absolute or relative to the workflow's working dir, the project
        # root: ``project_root / path`` is the file either way (``/`` keeps an absolute one).
        self.results_dir, self.project_root = results_dir, project_root
        self.client = MlflowClient(tracking_uri=tracking_uri)
        self.tracking_uri = tracking_uri
        # run id → the table numbers that rest on it (directly or through a downstream run)
        self.affects: dict[str, set[str]] = {}
        self.dvc = DvcData(project_root)
        # per-case recompute: cases per evaluate run (None: every case), and the sample's seed
        self.sample, self.sample_seed = sample, sample_seed
        # Per audit, each file is hashed or loaded once however many runs name it.
        self.sha256 = functools.cache(sha256_file)
        self.tree = functools.cache(tree_hash)
        self.model_meta = functools.cache(_model_meta)

    @functools.lru_cache(maxsize=None)
    def run(self, run_id: str) -> Any | None:
        try:
            return self.client.get_run(run_id)
        except Exception:  # MlflowException(RESOURCE_DOES_NOT_EXIST) or a malformed id
            return None

    @functools.cached_property
    def metrics_files(self) -> dict[str, list[tuple[Path, dict[str, Any]]]]:
        """run id → (file, its content) of each metrics.json under the results folder naming it."""
        index: dict[str, list[tuple[Path, dict[str, Any]]]] = {}
        for path in sorted(self.results_dir.rglob("metrics.json")):
            try:
                payload = json.loads(path.read_text())
                run_id = payload.get("run_id")
            except (OSError, ValueError, AttributeError):
                continue
            if run_id:
                index.setdefault(str(run_id), []).append((path, payload))
        return index

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
                checks.append(check("run exists", f"run {run_id}", self.tracking_uri, False,
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
        checks = [check("run finished", who, run_id, run.info.status == "FINISHED",
                        f"status {run.info.status}" + ("" if run.info.status == "FINISHED" else
                                                       ": its numbers are not final results")),
                  check("run not deleted", who, run_id, not deleted,
                        "deleted from the MLflow store (restore it with `mlflow runs restore` or "
                        "re-run the job)" if deleted else "active")]
        absent = [t for t in REQUIRED_TAGS if not tags.get(t)]
        checks.append(check("provenance tags", who, run_id, not absent,
                            f"missing tags {absent}" if absent else "all recorded"))
        checks += self._check_git(who, run_id, tags)
        files = self.metrics_files.get(run_id, [])
        checks += self._check_metrics_files(who, run, files)
        checks += self._check_data(who, run)
        if stage == "evaluate" and files:  # without a metrics.json the check above failed
            path, payload = files[0]
            checks += check_predictions(who, run, path, payload, self.project_root, self.sha256,
                                        self.sample, self.sample_seed)
        upstream_checks, upstream = self._check_upstream(who, run)
        return checks + upstream_checks, upstream

    def _check_git(self, who: str, run_id: str, tags: dict[str, str]) -> list[dict[str, str]]:
        commit = tags.get("git_commit", "")
        if not commit or commit == "unknown":
            return [check("git commit", who, run_id, False,
                          "no git commit recorded: the code version is unknown")]
        checks = [check("git commit", who, run_id, True, f"commit {commit}")]
        known = subprocess.run(["git", "cat-file", "-e", f"{commit}^{{commit}}"],
                               cwd=self.project_root, capture_output=True).returncode == 0
        if not known:
            checks.append(check("git commit", who, run_id, None,
                                f"commit {commit} is not in the repository at "
                                f"{self.project_root} (fetch it to reproduce this run)"))
        if tags.get("git_dirty") != "false":
            checks.append(check("git dirty", who, run_id, None,
                                f"run made with uncommitted changes on top of {commit} "
                                f"(git_dirty={tags.get('git_dirty')}): the commit alone does "
                                "not reproduce it"))
        return checks

    def _check_metrics_files(self, who: str, run: Any, files: list[tuple[Path, dict[str, Any]]]
                             ) -> list[dict[str, str]]:
        if not files:
            ok = False if run.data.tags.get("stage") == "evaluate" else None
            return [check("metrics.json", who, run.info.run_id, ok,
                          f"no metrics.json under {self.results_dir} names this run")]
        checks = []
        for path, payload in files:
            if run.data.tags.get("stage") == "evaluate":
                problems = metric_disagreements(payload, run.data.metrics)
                checks.append(check("metrics.json = MLflow", who, str(path), not problems,
                                    "; ".join(problems) if problems else
                                    "every number in the file equals the run's metric"))
            recorded, tagged = payload.get("spec_hash"), run.data.tags.get("config_hash")
            if recorded:
                checks.append(check("spec hash", who, str(path), recorded == tagged,
                                    f"file {recorded}, run config_hash {tagged}"))
        return checks

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
                return self.project_root / candidate
        return self.project_root / "data" / "processed" / name

    def _check_data(self, who: str, run: Any) -> list[dict[str, str]]:
        tags, run_id = run.data.tags, run.info.run_id
        names = sorted(k.removeprefix("data_hash.") for k in tags if k.startswith("data_hash."))
        if not names:
            return [check("data hash", who, run_id, False, "no data_hash.<dataset> tag recorded")]
        checks = []
        for name in names:
            recorded, source = tags[f"data_hash.{name}"], tags.get(f"data_hash_source.{name}", "")
            folder = self._data_folder(run, name)
            label = f"{who} data {name}"
            if source == "dvc.lock":
                current = data_hash(folder, self.project_root)
                if current["source"] != "dvc.lock":
                    checks.append(check("data hash", label, str(self.project_root / "dvc.lock"),
                                        False, f"dvc.lock has no entry for {folder} any more"))
                    continue
                checks.append(self.dvc.check(label, name, folder))
                now, where = current["hash"], str(self.project_root / "dvc.lock")
            elif source == "sha256-tree":
                if not folder.is_dir():
                    checks.append(check("data hash", label, str(folder), False,
                                        f"{folder} does not exist: the tree hash cannot be "
                                        "re-computed (restore the data, e.g. dvc pull)"))
                    continue
                now, where = self.tree(folder), str(folder)
            else:
                checks.append(check("data hash", label, run_id, False,
                                    f"unknown data_hash_source {source!r}"))
                continue
            ok = now == recorded
            checks.append(check("data hash", label, where, ok,
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
            return ([check("upstream checkpoint", who, run_id, False,
                           "the run loaded a model but recorded no upstream checkpoint")]
                    if needs else []), None
        path = self.project_root / recorded_path
        if not path.is_file():
            return [check("upstream checkpoint", who, str(path), False,
                          f"{path} does not exist any more")], None
        recorded, now = tags.get("upstream.checkpoint_sha256", ""), self.sha256(path)
        checks = [check("upstream checkpoint", who, str(path), recorded == now,
                        f"sha256 {now}" if recorded == now else
                        f"the run used sha256 {recorded or '(none recorded)'} but the file is "
                        f"{now} now: the checkpoint changed since the run — re-run it")]
        try:
            meta = self.model_meta(path)
        except (ValueError, OSError, RuntimeError) as exc:
            return checks + [check("model meta", who, str(path), False, str(exc))], None
        upstream_id, meta_id = tags.get("upstream.run_id", ""), str(meta.get("mlflow_run_id", ""))
        checks.append(check("model meta run id", who, str(path),
                            bool(meta_id) and meta_id == upstream_id,
                            f"model.pt meta.mlflow_run_id {meta_id or '(none)'}, run's "
                            f"upstream.run_id {upstream_id or '(none)'}"))
        upstream = self.run(meta_id) if meta_id else None
        if meta_id and upstream is None:
            checks.append(check("upstream run", who, str(path), False,
                                f"run {meta_id} named by the model file is not in the store"))
            return checks, None
        if upstream is not None and meta.get("spec_hash"):
            tagged = upstream.data.tags.get("config_hash")
            checks.append(check("model meta spec hash", who, str(path),
                                meta["spec_hash"] == tagged,
                                f"model.pt meta.spec_hash {meta['spec_hash']}, run {meta_id} "
                                f"config_hash {tagged}"))
        return checks, meta_id or None


class DvcData:
    """Lazily asks DVC once per audit; every method answers for one data folder."""

    def __init__(self, project_root: Path):
        self.root = project_root

    @functools.cached_property
    def _status(self) -> dict:
        from dvc.repo import Repo

        # DVC resolves paths and targets against the working directory, as its CLI does.
        with contextlib.chdir(self.root), Repo(str(self.root)) as repo:
            return repo.data_status(granular=True, untracked_files="no")

    @functools.cached_property
    def _lock(self) -> dict:
        return dvc_lock_stages(self.root / "dvc.lock")

    @functools.lru_cache(maxsize=None)  # noqa: B019 (one DvcData per audit)
    def _stage_changes(self, stage: str) -> list[str]:
        from dvc.repo import Repo

        with contextlib.chdir(self.root), Repo(str(self.root)) as repo:
            status = repo.status(targets=[stage])
        changed = []
        for entry in status.get(stage, []):
            if isinstance(entry, dict):
                for kind in ("changed deps", "changed outs"):
                    changed += [f"{path} ({what})"
                                for path, what in (entry.get(kind) or {}).items()]
        return changed

    def changes(self, folder: Path) -> tuple[list[str], list[str]]:
        """(changed files, changed stage inputs/outputs) under ``folder`` and the raw data read
        by the dvc.lock stage that outputs it; both empty when the disk matches dvc.lock."""
        rel = os.path.normpath(folder.resolve().relative_to(self.root.resolve()).as_posix())
        stage, prefixes = None, [rel]
        for name, entry in self._lock.items():
            if rel in [os.path.normpath(o.get("path", "")) for o in entry.get("outs") or []]:
                stage = name
                prefixes += [os.path.normpath(d.get("path", "")) for d in entry.get("deps") or []]
                break
        uncommitted = self._status.get("uncommitted") or {}
        files = sorted({f"{path} ({kind})" for kind in _CHANGES
                        for path in map(_path_of, uncommitted.get(kind) or [])
                        if not path.endswith("/")
                        and any(PurePath(path).is_relative_to(p) for p in prefixes)})
        return files, self._stage_changes(stage) if stage else []

    def check(self, label: str, name: str, folder: Path) -> dict[str, str]:
        """One check: the files on disk still hash to dvc.lock (DVC's own status), raw inputs
        included; a failure names the dataset and the changed files."""
        try:
            files, stage = self.changes(folder)
        except Exception as exc:  # dvc raises its own exception types (not a repo, no git, ...)
            return check("data on disk", label, str(folder), False,
                         f"DVC cannot check {folder} against dvc.lock: {exc}")
        if not files and not stage:
            return check("data on disk", label, str(folder), True,
                         "dvc data status: unchanged since dvc.lock (raw inputs included)")
        shown = files or stage
        more = f"; … ({len(shown) - 10} more)" if len(shown) > 10 else ""
        listed = "; ".join(shown[:10]) + more
        return check("data on disk", label, str(folder), False,
                     f"dataset {name}: data changed on disk since the run read it — {listed}. "
                     "Restore it (`dvc checkout`) or re-run the pipeline")


def _model_meta(path: Path) -> dict[str, Any]:
    from hybridmim.checkpoints import load_model_file

    return load_model_file(path).get("meta") or {}


def _path_of(entry: str | dict) -> str:
    return str(entry.get("new") or entry.get("old")) if isinstance(entry, dict) else str(entry)
