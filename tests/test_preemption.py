"""Preemption: a training job killed mid-run (SIGTERM as SLURM sends before a kill, or SIGKILL)
resumes from its last saved state when re-run, loses at most one checkpoint interval, and
finishes with complete outputs. Real processes, real signals, the real CLI."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from hybridmim import config as hcfg
from hybridmim.checkpoints import state_dir_for

pytestmark = pytest.mark.slow

STEPS, EVERY = 12, 3


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A working directory holding the processed demo spleen dataset."""
    from conftest import ROOT

    work = tmp_path_factory.mktemp("preempt")
    subprocess.run([sys.executable, "-m", "hybridmim.cli", "data", "prepare", "--config",
                    str(ROOT / "config" / "config.yaml"), "--dataset", "demo_spleen"],
                   cwd=work, check=True, capture_output=True, timeout=600)
    return work


def _spec(stage, name):
    from conftest import ROOT

    config = hcfg.load_config(ROOT / "config" / "config.yaml")
    config["pretraining"]["corpora"] = {"ct": {"datasets": ["demo_spleen"]}}
    config["backbones"]["unet"]["pretrain_optim"].update(steps=STEPS, warmup_steps=2)
    config["pretraining"].update(checkpoint_every=EVERY, log_every=1, crops_per_volume=1,
                                 val_volumes=0)
    config["finetuning"].update(datasets=["demo_spleen"], checkpoint_every=EVERY, val_every=100,
                                crop=48, crops_per_volume=1)
    config["finetuning"]["optim"].update(steps=STEPS, warmup_steps=2)
    if stage == "pretrain":
        spec = hcfg.pretrain_spec(config, "unet", "hybridmim", "ct")
    else:
        spec = hcfg.finetune_spec(config, "demo_spleen", "unet", "scratch", 1, 0)
    spec["out"] = spec["out"].replace("results/", f"results/{name}/")
    return spec


def _start(workdir, stage, spec):
    log = open(workdir / f"{Path(spec['out']).parent.name}-{stage}.log", "ab")
    return subprocess.Popen([sys.executable, "-m", "hybridmim.cli", stage, "--spec",
                             json.dumps(spec)], cwd=workdir, stdout=log, stderr=log)


def _saved_step(state_file):
    try:
        return torch.load(state_file, map_location="cpu", weights_only=False)["step"]
    except Exception:  # not written yet, or being renamed into place
        return None


def _wait_for_state(proc, state_file, min_step, timeout=300):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        step = _saved_step(state_file) if state_file.exists() else None
        if step is not None and step >= min_step:
            return step
        assert proc.poll() is None, "training ended before it could be interrupted"
        time.sleep(0.2)
    proc.kill()
    raise AssertionError(f"no state with step >= {min_step} within {timeout}s")


# Fine-tuning's graceful SIGTERM path is also covered in test_finetune.py.
@pytest.mark.parametrize("stage, sig", [("pretrain", signal.SIGTERM), ("pretrain", signal.SIGKILL),
                                        ("finetune", signal.SIGKILL)])
def test_killed_job_resumes_and_completes(workdir, stage, sig):
    spec = _spec(stage, f"{stage}-{sig.name}")
    out = workdir / spec["out"]
    state_file = state_dir_for(out) / "latest.pt"
    proc = _start(workdir, stage, spec)
    saved = _wait_for_state(proc, state_file, EVERY)
    os.kill(proc.pid, sig)
    code = proc.wait(timeout=120)
    assert code != 0, "an interrupted job must not report success"
    assert not out.exists(), "no published model after an interruption"
    step_at_stop = _saved_step(state_file)
    assert step_at_stop >= saved

    proc = _start(workdir, stage, spec)
    assert proc.wait(timeout=600) == 0
    metrics = json.loads((out.parent / "metrics.json").read_text())
    assert out.exists() and metrics["run_id"]
    log_text = (workdir / f"{out.parent.name}-{stage}.log").read_text()
    assert f"step {step_at_stop}" in log_text and "resum" in log_text.lower(), log_text[-3000:]
    assert _saved_step(state_file) == STEPS


# ------------------------------------------------------------------------------------------------
# One process per job (hybridmim.jobguard): the workflow's end stops its trainer; a second
# process on a running job refuses (or waits); every attempt keeps its own log.
LONG_STEPS = 30
_PARENT = ("import subprocess, sys\n"
           "child = subprocess.Popen([sys.executable, '-m', 'hybridmim.cli', sys.argv[1], "
           "'--spec-file', sys.argv[2]], stdout=open(sys.argv[3], 'ab'), stderr=subprocess.STDOUT)\n"
           "print(child.pid, flush=True)\n"
           "child.wait()\n")


def _alive(pid):
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] not in "ZX"
    except OSError:
        return False


def test_killed_workflow_stops_its_trainer_and_the_rerun_completes(workdir):
    stage = "finetune"
    spec = _spec(stage, "parent-killed")
    spec["optim"]["steps"] = LONG_STEPS  # more than the orphan gets through before it notices
    spec["crop"] = 32
    out = workdir / spec["out"]
    state_dir = state_dir_for(out)
    spec_file = workdir / "parent-killed.json"
    spec_file.write_text(json.dumps(spec))
    log = workdir / "parent-killed.log"
    # Stands in for snakemake: the trainer's parent, killed without a chance to clean up.
    parent = subprocess.Popen([sys.executable, "-c", _PARENT, stage, str(spec_file), str(log)],
                              cwd=workdir, stdout=subprocess.PIPE, text=True)
    trainer = int(parent.stdout.readline())
    _wait_for_state(parent, state_dir / "latest.pt", EVERY)
    parent.kill()
    parent.wait()
    # The re-run starts at once, as after `snakemake --unlock`, while the orphan may still run.
    rerun = subprocess.Popen([sys.executable, "-m", "hybridmim.cli", stage, "--spec-file",
                              str(spec_file)], cwd=workdir, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while _alive(trainer) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _alive(trainer), "the trainer kept running after its workflow was killed"
    _, err = rerun.communicate(timeout=600)
    assert rerun.returncode == 0, err[-3000:]
    assert out.exists() and _saved_step(state_dir / "latest.pt") == LONG_STEPS
    # Both attempts' logs are kept: the orphan's says it stopped (and it never published), the
    # re-run's that it resumed from the orphan's saved state instead of starting over.
    attempts = sorted((state_dir / "attempts").glob("*.log"), key=lambda p: p.stat().st_mtime)
    assert len(attempts) == 2, attempts
    orphan_log, rerun_log = (p.read_text() for p in attempts)
    assert attempts[0].name.endswith(f"-{trainer}.log")
    assert "is gone: saving state and stopping" in orphan_log, orphan_log[-2000:]
    assert "published" not in orphan_log
    assert "resum" in rerun_log.lower() and "published" in rerun_log, rerun_log[-2000:]


def test_second_process_on_a_running_job_refuses_naming_pid_and_host(workdir):
    import socket

    from hybridmim.jobguard import job_lock

    spec = _spec("finetune", "locked")
    state_dir = state_dir_for(workdir / spec["out"])
    with job_lock(state_dir):  # this test process holds the job, as a running trainer would
        second = subprocess.run([sys.executable, "-m", "hybridmim.cli", "finetune", "--spec",
                                 json.dumps(spec)], cwd=workdir, capture_output=True, text=True,
                                timeout=300, env={**os.environ, "HYBRIDMIM_LOCK_WAIT_S": "0"})
    assert second.returncode == 2, second.stderr[-2000:]
    assert f"already running as PID {os.getpid()} on host {socket.gethostname()}" in second.stderr
    assert "Traceback" not in second.stderr
    assert not (state_dir / "latest.pt").exists() and not (state_dir / "attempts").exists()
