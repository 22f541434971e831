import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
REAL_CT = ROOT.parent / "shared" / "data" / "real_ct_small"

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
