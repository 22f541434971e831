"""Does the data on disk still hash to what DVC recorded? Asked of DVC itself.

A run tags the DVC hash (from dvc.lock) of the processed folder it read; the audit checks that tag
against dvc.lock, and here that the files on disk still match dvc.lock: DVC's own data status
(``dvc data status --granular``, through its Python API) lists every file that changed since the
stage was committed, and ``dvc status`` of the stage that wrote the folder names changed inputs
(the raw data it was preprocessed from) even where no DVC output tracks them file by file.
"""
from __future__ import annotations

import contextlib
import functools
import os
from pathlib import Path
from typing import Callable

import yaml

_CHANGES = ("modified", "added", "deleted", "renamed", "unknown")


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
        path = self.root / "dvc.lock"
        return (yaml.safe_load(path.read_text()) or {}).get("stages") or {} if path.exists() else {}

    def stage_of(self, folder: str) -> tuple[str, list[str]] | None:
        """The dvc.lock stage that outputs ``folder`` (relative path) and that stage's inputs."""
        for name, stage in self._lock.items():
            outs = [os.path.normpath(o.get("path", "")) for o in stage.get("outs") or []]
            if folder in outs:
                return name, [os.path.normpath(d.get("path", "")) for d in stage.get("deps") or []]
        return None

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
        """(changed files, changed stage inputs/outputs) under ``folder`` and the raw data its
        stage read; both empty when the disk matches dvc.lock."""
        rel = os.path.normpath(folder.resolve().relative_to(self.root.resolve()).as_posix())
        found = self.stage_of(rel)
        prefixes = [rel] + (found[1] if found else [])
        uncommitted = self._status.get("uncommitted") or {}
        files = sorted({f"{path} ({kind})" for kind in _CHANGES
                        for path in map(_path_of, uncommitted.get(kind) or [])
                        if not path.endswith("/") and any(_under(path, p) for p in prefixes)})
        stage_changes = self._stage_changes(found[0]) if found else []
        return files, stage_changes


def data_on_disk_check(check: Callable[..., dict[str, str]], dvc: DvcData, label: str, name: str,
                       folder: Path) -> dict[str, str]:
    """One check: the files on disk still hash to dvc.lock (DVC's own status), raw inputs
    included; a failure names the dataset and the changed files."""
    try:
        files, stage = dvc.changes(folder)
    except Exception as exc:  # dvc raises its own exception types (not a repo, no git, ...)
        return check("data on disk", label, str(folder), False,
                     f"DVC cannot check {folder} against dvc.lock: {exc}")
    if not files and not stage:
        return check("data on disk", label, str(folder), True,
                     "dvc data status: unchanged since dvc.lock (raw inputs included)")
    shown = files or stage
    listed = "; ".join(shown[:10]) + (f"; … ({len(shown) - 10} more)" if len(shown) > 10 else "")
    return check("data on disk", label, str(folder), False,
                 f"dataset {name}: data changed on disk since the run read it — {listed}. "
                 "Restore it (`dvc checkout`) or re-run the pipeline")


def _path_of(entry: str | dict) -> str:
    return str(entry.get("new") or entry.get("old")) if isinstance(entry, dict) else str(entry)


def _under(path: str, folder: str) -> bool:
    path = os.path.normpath(path)
    return path == folder or path.startswith(folder + os.sep)
