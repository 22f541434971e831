"""The demo workflow through `--executor slurm` on a real SLURM (CI starts a local one with
scripts/slurm_local.sh): every non-local job goes through sbatch, runs inside a SLURM
allocation, and the results are the same kind as a local run's."""
import os
import signal
import subprocess
import sys
import time

import pytest

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

TIMEOUT_S = 1500
LOCAL_RULES = {"init_tracking", "version_data", "report", "all"}


def test_demo_workflow_through_slurm(slurm, tmp_path):
    from conftest import copy_project, search_runs

    project = copy_project(tmp_path / "project")
    cmd = [sys.executable, "-m", "snakemake", "--profile", "workflow/profiles/slurm",
           "--configfile", "config/config.yaml", "tests/data/demo_fast.yaml",
           "tests/data/slurm_grid.yaml",
           "--jobs", "2", "--resources", "dvc=1",
           "--seconds-between-status-checks", "1", "--slurm-init-seconds-before-status-checks", "1"]
    if not slurm["accounting"]:
        cmd += ["--slurm-status-command", "squeue"]
    started = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=project, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        log, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        subprocess.run(["scancel", "--user", os.environ.get("USER", "root")], timeout=20)
        log, _ = proc.communicate()
        pytest.fail(f"demo through SLURM did not finish in {TIMEOUT_S} s:\n{log[-5000:]}")
    wall = time.monotonic() - started
    assert proc.returncode == 0, log[-6000:]
    (tmp_path / "slurm_demo_wall_s.txt").write_text(f"{wall:.0f}\n")
    print(f"demo through SLURM: {wall:.0f} s")

    submitted = log.count("has been submitted with SLURM jobid")
    # acquire 4 + preprocess 4 + pretrain 2 + finetune 8 + evaluate 8; the rest are localrules
    assert submitted == 26, log[-6000:]
    assert (project / "results/tables/comparison.csv").exists()
    assert (project / "results/figures/test_dice.png").exists()
    uri = f"sqlite:///{project}/results/mlflow/mlflow.db"
    for stage, count in {"pretrain": 2, "finetune": 8, "evaluate": 8}.items():
        runs = search_runs(uri, stage)
        assert len(runs) == count
        # each run knows the SLURM job it ran in: provenance reaches the scheduler
        assert runs["tags.slurm.job_id"].str.isdigit().all(), stage
