"""Record a dataset's raw and processed folders in dvc.lock (`dvc commit`) and report the hashes.

The Snakemake data rules build the data with the same CLI the DVC stages declare; committing the
stages afterwards makes dvc.lock hold the hashes, so `dvc status` is clean, `dvc push` shares the
data and every training run can tag the exact data version it read.
"""
from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

from hybridmim.atomic import write_json
from hybridmim.tracking.provenance import data_hash

STAGES = ("acquire", "preprocess")


def _dvc(args: list[str], cwd: Path, timeout: int = 1800) -> str:
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    proc = subprocess.run(["dvc", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"`dvc {' '.join(args)}` failed in {cwd} (exit {proc.returncode}):\n"
                           f"{proc.stdout}{proc.stderr}")
    return proc.stdout


def commit_dataset(name: str, project_root: str | os.PathLike = ".") -> dict[str, Any]:
    """`dvc commit` the dataset's stages and return the hashes dvc.lock now holds."""
    root = Path(project_root).resolve()
    stages = [f"{stage}@{name}" for stage in STAGES]
    listed = _dvc(["stage", "list", "--name-only"], root).split()
    missing = [s for s in stages if s not in listed]
    if missing:
        raise RuntimeError(f"dvc.yaml has no stages {missing}: add dataset {name!r} to the "
                           f"`datasets` list under vars: in dvc.yaml, or set "
                           f"data_versioning.dvc: false in the config")
    _dvc(["commit", "--force", *stages], root)
    result: dict[str, Any] = {"dataset": name, "stages": stages}
    for kind in ("raw", "processed"):
        info = data_hash(root / "data" / kind / name, root)
        if info["source"] != "dvc.lock":
            raise RuntimeError(f"dvc commit did not record data/{kind}/{name} in dvc.lock")
        result[kind] = info
    return result


def version_dataset(name: str, out: str | os.PathLike, project_root: str = ".") -> dict:
    result = commit_dataset(name, project_root)
    write_json(out, result)
    return result


PRETRAIN_STAGE = "preprocess_pretrain"


def version_pretrain_cache(name: str, out: str | os.PathLike, project_root: str = ".") -> dict:
    """`dvc commit` the native pretraining cache's stage (data/pretrain/<name>) and write the hash
    dvc.lock now holds to ``out``."""
    root = Path(project_root).resolve()
    stage = f"{PRETRAIN_STAGE}@{name}"
    if stage not in _dvc(["stage", "list", "--name-only"], root).split():
        raise RuntimeError(f"dvc.yaml has no stage {stage!r}: add dataset {name!r} to the "
                           f"`datasets` list under vars: in dvc.yaml, or set "
                           f"data_versioning.dvc: false in the config")
    _dvc(["commit", "--force", stage], root)
    info = data_hash(root / "data" / "pretrain" / name, root)
    if info["source"] != "dvc.lock":
        raise RuntimeError(f"dvc commit did not record data/pretrain/{name} in dvc.lock")
    result = {"dataset": name, "stages": [stage], "pretrain": info}
    write_json(out, result)
    return result
