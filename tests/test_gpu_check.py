"""benchmarks/gpu_check.sh keeps working: run at its tiny size on the CPU (two backbones, to stay
cheap; the GPU run covers all three) and check the JSON and Markdown it writes."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_runs_at_tiny_size_and_writes_json_and_markdown(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--size", "tiny", "--device", "cpu",
                           "--threads", "1", "--backbones", "unet", "unetr",
                           "--out", str(tmp_path)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["size"] == "tiny" and report["crop"] == 64 and report["device"] == "cpu"
    assert report["precision_reason"] and report["peak_tflops"] is None
    assert [r["backbone"] for r in report["pretraining"]] == ["unet", "unetr"]
    for row in report["pretraining"]:
        for method in ("hybridmim", "simmim"):
            result = row[method]
            assert result["seconds_per_step"] > 0 and result["flops_per_step"] > 0
            assert result["crops_per_s"] == report["batch"] / result["seconds_per_step"]
        assert row["time_ratio"] > 0
    # HybridMIM decodes only a box: its step needs fewer FLOPs than SimMIM's full reconstruction.
    unet = report["pretraining"][0]
    assert unet["hybridmim"]["flops_per_step"] < unet["simmim"]["flops_per_step"]
    for row in report["finetune_inference"]:
        assert row["finetune"]["crops_per_s"] > 0 and row["inference"]["seconds_per_volume"] > 0
    fp16 = report["fp16_gradscaler"]
    assert fp16["finite"] and all(math.isfinite(v) for v in fp16["losses"])
    assert report["compile"] is None  # CPU without --compile
    summary = (tmp_path / "gpu_check.md").read_text()
    assert "| unet | hybridmim |" in summary and "## fp16 + GradScaler" in summary
    assert (tmp_path / "gpu_check.log").exists()
