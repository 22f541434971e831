"""Provenance captured for every run: code, data, config, upstream checkpoint, software, hardware."""
from __future__ import annotations

import functools
import os
import platform
import socket
import subprocess
from pathlib import Path
from typing import Any

import yaml

from hybridmim.hashing import sha256_file, tree_hash


def _git(args: list[str], cwd: Path) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def git_state(cwd: str | os.PathLike = ".") -> dict[str, str]:
    """Commit and dirty flag of the repository that holds ``cwd`` (the workflow's working dir)."""
    # Cached per resolved folder: a process that changes directory must not see another repo's.
    return dict(_git_state_at(str(Path(cwd).resolve())))


@functools.lru_cache(maxsize=None)
def _git_state_at(folder: str) -> tuple[tuple[str, str], ...]:
    path = Path(folder)
    commit = _git(["rev-parse", "HEAD"], path)
    if commit is None:
        return (("git_commit", "unknown"), ("git_dirty", "unknown"))
    # Generated outputs are git-ignored, so any change listed here is a change to tracked code,
    # config or pointers.
    status = _git(["status", "--porcelain", "--untracked-files=no"], path) or ""
    return (("git_commit", commit), ("git_dirty", str(bool(status.strip())).lower()))


def dvc_lock_stages(lock_path: Path) -> dict[str, dict[str, Any]]:
    """{stage name: its entry (deps, outs with their md5)} of a dvc.lock; {} without one."""
    if not lock_path.exists():
        return {}
    return (yaml.safe_load(lock_path.read_text()) or {}).get("stages") or {}


# Stages of datasets declared only in a config live in this folder's dvc.yaml (data/versioning.py).
CONFIG_STAGES_DIR = "datasets"


def data_hash(folder: str | os.PathLike, project_root: str | os.PathLike = ".") -> dict[str, str]:
    """Hash of a data folder: DVC's (from dvc.lock) when DVC versions it, else computed here.

    The source is recorded with the hash so the audit knows which one to re-verify.
    """
    root = Path(project_root).resolve()
    folder = Path(folder).resolve()
    try:
        rel = os.path.normpath(folder.relative_to(root).as_posix())
    except ValueError:
        rel = None
    if rel is not None:
        for lock in (root / "dvc.lock", root / CONFIG_STAGES_DIR / "dvc.lock"):
            for stage in dvc_lock_stages(lock).values():
                for out in stage.get("outs") or []:
                    if os.path.normpath(out["path"]) == rel and out.get("md5"):
                        return {"hash": out["md5"], "source": "dvc.lock"}
    return {"hash": tree_hash(folder), "source": "sha256-tree"}


def software_versions() -> dict[str, str]:
    import monai
    import torch

    from hybridmim import __version__

    return {"torch": torch.__version__, "monai": monai.__version__, "hybridmim": __version__,
            "python": platform.python_version()}


def provenance_tags(spec: dict[str, Any], spec_hash: str, data_dirs: list[str],
                    upstream_model: str | None, device: str) -> dict[str, str]:
    tags: dict[str, str] = {
        "config_hash": spec_hash,
        "seed": str(spec.get("seed", "")),
        "host": socket.gethostname(),
        "device": device,
        **git_state(),
        **{f"version.{k}": v for k, v in software_versions().items()},
    }
    prov = spec.get("provenance") or {}
    if prov.get("rule"):
        tags["snakemake.rule"] = str(prov["rule"])
    for key, value in (prov.get("wildcards") or {}).items():
        tags[f"snakemake.wildcard.{key}"] = str(value)
    if os.environ.get("SLURM_JOB_ID"):
        tags["slurm.job_id"] = os.environ["SLURM_JOB_ID"]
    for folder in data_dirs:
        name = Path(folder).name
        info = data_hash(folder)
        tags[f"data_hash.{name}"] = info["hash"]
        tags[f"data_hash_source.{name}"] = info["source"]
    if upstream_model:
        tags["upstream.checkpoint_sha256"] = sha256_file(upstream_model)
        tags["upstream.checkpoint_path"] = str(upstream_model)
        try:
            import torch

            meta = torch.load(upstream_model, map_location="cpu", weights_only=False)["meta"]
            tags["upstream.run_id"] = str(meta.get("mlflow_run_id", ""))
        except Exception:
            tags["upstream.run_id"] = "unreadable"
    return tags
