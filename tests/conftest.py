import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
# The small real CT lives beside the project (../shared), never inside it; an environment
# variable points elsewhere when a checkout sits somewhere else.
REAL_CT = Path(os.environ.get("HYBRIDMIM_REAL_CT_DIR",
                              ROOT.parent / "shared" / "data" / "real_ct_small"))

# Workflow shell commands call `hybridmim`, `dvc` and `snakemake` from PATH.
os.environ["PATH"] = f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}"
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("MPLBACKEND", "Agg")


def copy_project(dest: Path) -> Path:
    """Copy the project's tracked (and not ignored) files to ``dest`` and commit them: what a
    fresh clone of the current working tree looks like."""
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"],
                           cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    for rel in files:
        src = ROOT / rel
        if src.is_file():
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, target)
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    for cmd in (["git", "init", "-q", "-b", "main"], ["git", "add", "-A"],
                ["git", "commit", "-qm", "test copy"]):
        subprocess.run(cmd, cwd=dest, check=True, env=env)
    return dest


@pytest.fixture
def project_copy(tmp_path):
    return copy_project(tmp_path / "project")


def run_quick(cmd: list[str], timeout: float = 20) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def slurm() -> dict:
    """What the running cluster offers; skips the module when there is none — or fails, when
    HYBRIDMIM_REQUIRE_SLURM=1 (CI starts a cluster and must not skip these tests silently)."""
    if os.environ.get("HYBRIDMIM_REQUIRE_SLURM") == "1":
        real_skip = pytest.fail
    else:
        real_skip = pytest.skip
    return _probe_slurm(real_skip)


def _probe_slurm(skip) -> dict:
    if shutil.which("sinfo") is None:
        skip("no SLURM here (sinfo not found); start one: sudo scripts/slurm_local.sh start")
    try:
        info = run_quick(["sinfo", "-h", "-o", "%P %T"], timeout=20)
    except subprocess.TimeoutExpired:
        skip("sinfo did not answer within 20 s (slurmctld down?); "
                    "see scripts/slurm_local.sh status")
    states = info.stdout.split()
    if info.returncode != 0 or not any(s in states for s in ("idle", "mixed", "allocated")):
        skip(f"SLURM has no usable node (sinfo rc={info.returncode}: "
                    f"{(info.stdout + info.stderr).strip()[:200]}); `scripts/slurm_local.sh start`")
    try:
        probe = run_quick(["sacct", "-n", "-X", "-S", "now-1minutes", "-o", "JobID"])
        accounting = probe.returncode == 0
    except (FileNotFoundError, subprocess.TimeoutExpired):
        accounting = False
    return {"accounting": accounting}




def search_runs(uri: str, experiment: str):
    """Runs of one experiment as a DataFrame shaped like mlflow.search_runs' (run_id, status,
    tags.*, metrics.*), without touching MLflow's global tracking URI (which would leak into
    the environment of later subprocesses)."""
    import pandas as pd
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"no experiment {experiment!r} in {uri}"
    rows = []
    for run in client.search_runs([exp.experiment_id], max_results=50000):
        row = {"run_id": run.info.run_id, "status": run.info.status}
        row.update({f"tags.{k}": v for k, v in run.data.tags.items()})
        row.update({f"metrics.{k}": v for k, v in run.data.metrics.items()})
        rows.append(row)
    return pd.DataFrame(rows)


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """Training jobs apply their spec's thread count process-wide; give each test its own."""
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def set_nested(spec: dict, dotted: str, value, sep: str = ".") -> None:
    """spec["a"]["b"] = value for dotted == "a.b" (test overrides of job specs)."""
    *parents, last = dotted.split(sep)
    for part in parents:
        spec = spec[part]
    spec[last] = value


def demo_config_with(tmp_path: Path, mutate) -> Path:
    """config/config.yaml changed by ``mutate(dict)``, written to ``tmp_path``/c.yaml."""
    import yaml

    cfg = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    mutate(cfg)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path
