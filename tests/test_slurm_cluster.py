"""The SLURM profile on a real SLURM (a local one: `scripts/slurm_local.sh start`, as root).

Skipped, with the reason, when no SLURM answers. Runs a 2-rule chain through
`--executor slurm` with workflow/profiles/slurm and checks that each job went through sbatch
(SLURM knows it, it ran inside a SLURM allocation) and that the outputs exist.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

ROOT = Path(__file__).resolve().parent.parent
PROFILE = ROOT / "workflow" / "profiles" / "slurm"
SNAKEMAKE = Path(sys.executable).parent / "snakemake"
WORKFLOW_TIMEOUT_S = 300

SNAKEFILE = """
localrules: all

rule all:
    input: "out/b.txt"

rule make_a:
    output: "out/a.txt"
    resources: mem_mb=300, runtime=5
    shell: "echo job=$SLURM_JOB_ID cpus=$SLURM_CPUS_PER_TASK > {output}"

rule make_b:
    input: "out/a.txt"
    output: "out/b.txt"
    resources: mem_mb=300, runtime=5
    shell: "cat {input} > {output} && echo job=$SLURM_JOB_ID >> {output}"
"""


from conftest import run_quick as _run  # noqa: E402


def _job_ids(text: str) -> list[str]:
    return [w.split("=", 1)[1] for w in text.split() if w.startswith("job=")]


def test_profile_runs_a_workflow_through_sbatch(slurm, tmp_path):
    (tmp_path / "Snakefile").write_text(SNAKEFILE)
    cmd = [str(SNAKEMAKE), "--profile", str(PROFILE), "--jobs", "2",
           # fastest polling for a test; the profile's own values suit real clusters
           "--seconds-between-status-checks", "1", "--slurm-init-seconds-before-status-checks", "1",
           "--slurm-keep-successful-logs"]
    if not slurm["accounting"]:
        cmd += ["--slurm-status-command", "squeue"]   # sacct without slurmdbd: snakemake would hang
    env = {**os.environ, "PATH": f"{SNAKEMAKE.parent}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        log, _ = proc.communicate(timeout=WORKFLOW_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        log, _ = proc.communicate()
        pytest.fail(f"workflow through SLURM did not finish in {WORKFLOW_TIMEOUT_S} s:\n"
                    f"{log[-4000:]}")
    assert proc.returncode == 0, log[-4000:]

    b = (tmp_path / "out" / "b.txt").read_text()
    ids = _job_ids(b)
    assert len(ids) == 2 and all(i.isdigit() for i in ids) and ids[0] != ids[1], b
    assert "cpus=1" in b   # cpus_per_task: threads (1) from the profile's default-resources
    assert log.count("has been submitted with SLURM jobid") == 2, log[-4000:]
    for rule in ("make_a", "make_b"):   # the sbatch --output logs the plugin asked for
        assert list((tmp_path / ".snakemake" / "slurm_logs" / f"rule_{rule}").glob("*.log")), rule

    # SLURM itself knows both jobs, each under the rule's name as comment, COMPLETED
    if slurm["accounting"]:
        out = _run(["sacct", "-X", "-n", "-P", "-j", ",".join(ids), "-o", "JobIDRaw,State"]).stdout
    else:
        out = _run(["squeue", "-h", "--states=all", "-j", ",".join(ids), "-o", "%i|%T"]).stdout
    states = dict(line.split("|", 1) for line in out.split())
    assert states == {ids[0]: "COMPLETED", ids[1]: "COMPLETED"}, out
    # the plugin's sbatch --comment names the rule (visible to squeue for MinJobAge seconds)
    comments = _run(["squeue", "-h", "--states=all", "-j", ",".join(ids), "-o", "%k"]).stdout
    if comments.strip():
        assert sorted(comments.split()) == ["rule_make_a", "rule_make_b"], comments
