"""Record a dataset's raw and processed folders in dvc.lock (`dvc commit`) and report the hashes.

The Snakemake data rules build the data with the same CLI the DVC stages declare; committing the
stages afterwards makes dvc.lock hold the hashes, so `dvc status` is clean, `dvc push` shares the
data and every training run can tag the exact data version it read.

The built-in datasets have their stages in the project's dvc.yaml. A dataset declared only in a
config gets its two stages written into ``datasets/dvc.yaml`` (one parametrised stage pair over
every such dataset, the same shape as dvc.yaml's, with the dataset's config block in the command),
so that the tracked dvc.yaml is never edited and the runs stay "clean" for the audit. Commit
``datasets/dvc.yaml`` and ``datasets/dvc.lock`` with your config to share the data version.
"""
from __future__ import annotations

import json
import os
import shlex
import subprocess
from pathlib import Path
from typing import Any, Mapping

import yaml

from hybridmim.atomic import write_json, write_text
from hybridmim.tracking.provenance import CONFIG_STAGES_DIR, data_hash

STAGES = ("acquire", "preprocess")


def _dvc(args: list[str], cwd: Path, timeout: int = 1800) -> str:
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    proc = subprocess.run(["dvc", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"`dvc {' '.join(args)}` failed in {cwd} (exit {proc.returncode}):\n"
                           f"{proc.stdout}{proc.stderr}")
    return proc.stdout


_HEADER = ("# Written by `hybridmim data version` for the datasets declared only in a config (the\n"
           "# built-in ones are in ../dvc.yaml). Same stages as dvc.yaml's; the command carries the\n"
           "# dataset's config block. Commit this file and dvc.lock beside it to share the data.\n")


def write_config_stages(name: str, block: Mapping[str, Any], project_root: Path) -> Path:
    """Add (or update) dataset ``name`` in datasets/dvc.yaml; other entries are kept."""
    path = project_root / CONFIG_STAGES_DIR / "dvc.yaml"
    document = yaml.safe_load(path.read_text()) if path.exists() else None
    datasets = dict(((document or {}).get("vars") or [{}])[0].get("datasets") or {})
    arg = shlex.quote(json.dumps(dict(block), sort_keys=True))
    datasets[name] = {stage: f"hybridmim data {stage} --dataset {name} --dataset-json {arg}"
                      for stage in STAGES}
    document = {"vars": [{"datasets": dict(sorted(datasets.items()))}], "stages": {
        "acquire": {"foreach": "${datasets}", "do": {
            "wdir": "..", "cmd": "${item.acquire}", "outs": ["data/raw/${key}"]}},
        "preprocess": {"foreach": "${datasets}", "do": {
            "wdir": "..", "cmd": "${item.preprocess}", "deps": ["data/raw/${key}"],
            "outs": ["data/processed/${key}"]}}}}
    write_text(path, _HEADER + yaml.safe_dump(document, sort_keys=False, width=1000))
    return path


def _commit(root: Path, name: str, stages: list[str], outputs: dict[str, Path],
            out: str | os.PathLike) -> dict[str, Any]:
    """`dvc commit` ``stages``; write to ``out`` (and return) the hash dvc.lock now holds for
    each of ``outputs``."""
    _dvc(["commit", "--force", *stages], root)
    result = {"dataset": name, "stages": stages}
    for kind, folder in outputs.items():
        result[kind] = data_hash(folder, root)
        if result[kind]["source"] != "dvc.lock":
            raise RuntimeError(f"dvc commit did not record {folder.relative_to(root).as_posix()} "
                               "in dvc.lock")
    write_json(out, result)
    return result


def version_dataset(name: str, out: str | os.PathLike, project_root: str = ".",
                    block: Mapping[str, Any] | None = None) -> dict:
    """`dvc commit` the dataset's stages and write the hashes dvc.lock now holds to ``out``. A
    dataset that dvc.yaml does not list is versioned through datasets/dvc.yaml, written from its
    config ``block``."""
    root = Path(project_root).resolve()
    stages = [f"{stage}@{name}" for stage in STAGES]
    listed = _dvc(["stage", "list", "--name-only"], root).split()
    missing = [s for s in stages if s not in listed]
    if missing and block is None:
        raise RuntimeError(f"dvc.yaml has no stages {missing} and no config block of dataset "
                           f"{name!r} was given (hybridmim data version --dataset-json) to "
                           f"version it through {CONFIG_STAGES_DIR}/dvc.yaml; or set "
                           f"data_versioning.dvc: false in the config")
    if missing:
        stage_file = write_config_stages(name, block, root).relative_to(root).as_posix()
        stages = [f"{stage_file}:{stage}" for stage in stages]
    return _commit(root, name, stages, {kind: root / "data" / kind / name
                                        for kind in ("raw", "processed")}, out)


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
    return _commit(root, name, [stage], {"pretrain": root / "data" / "pretrain" / name}, out)
