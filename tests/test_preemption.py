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
    config["pretraining"].update(checkpoint_every=EVERY, log_every=1, crops_per_volume=1)
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
