"""The whole demo workflow through Snakemake in a temporary copy of the project: outputs,
MLflow runs and their provenance, DVC state (status, push, pull), and a no-op re-run."""
import json
import shutil
import subprocess
import sys

import pytest
import yaml

pytestmark = pytest.mark.slow

EXPERIMENTS = {"pretrain": 6, "finetune": 14, "evaluate": 14}


def run(cmd, cwd, timeout=1200):
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
    return proc.stdout + proc.stderr


def snakemake(project, *args):
    return run([sys.executable, "-m", "snakemake", "--cores", "2", "--configfile",
                "config/config.yaml", "tests/data/demo_fast.yaml", *args], project)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    from conftest import copy_project

    project = copy_project(tmp_path_factory.mktemp("wf") / "project")
    snakemake(project)
    return project


def test_table_and_figure(demo_run):
    import pandas as pd

    table = pd.read_csv(demo_run / "results/tables/comparison.csv")
    assert len(table) >= 4  # one row per dataset x backbone
    text = (demo_run / "results/tables/comparison.md").read_text()
    for ds in ("demo_btcv", "demo_liver", "demo_spleen", "demo_brats"):
        assert ds in text
    png = (demo_run / "results/figures/test_dice.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 5000


def test_html_report_holds_every_table_and_figure(demo_run):
    # Built from the demo's outputs like a user does after a run (scripts/demo.sh).
    snakemake(demo_run, "--report", "results/report.html")
    html = (demo_run / "results/report.html").read_text()
    tables = sorted((demo_run / "results/tables").glob("*.csv"))
    figures = sorted((demo_run / "results/figures").glob("*.png"))
    assert {t.stem for t in tables} >= {"comparison", "paper_vs_ours", "ablations", "pretrain_cost",
                                       "label_efficiency", "paired_differences"}
    assert {f.stem for f in figures} >= {"test_dice", "ablations", "time_to_quality",
                                        "label_efficiency", "finetune_curves", "per_class_dice",
                                        "gallery_demo_spleen"}
    missing = [p.name for p in [*tables, *figures] if p.name not in html]
    assert not missing, f"not in report.html: {missing}"
    assert "audit.md" in html
    for figure in figures:  # every figure has its PDF and its numbers beside it
        assert figure.with_suffix(".pdf").is_file() and figure.with_suffix(".csv").is_file()
    # The demo's arms fill the experiment tables with real rows.
    import pandas as pd

    ablations = pd.read_csv(demo_run / "results/tables/ablations.csv")
    assert set(ablations["init"]) == {"hybridmim-no_cl", "hybridmim-mask0.6",
                                      "hybridmim-hierarchical_masking"}
    cost = pd.read_csv(demo_run / "results/tables/pretrain_cost.csv")
    steps = cost.loc[cost["metric"] == "cost/median_step_s"].set_index("method")
    assert steps.loc["simmim", "ratio_vs_simmim"] == 1.0
    assert steps["mean"].gt(0).all() and len(steps) == 6
    efficiency = pd.read_csv(demo_run / "results/tables/label_efficiency.csv")
    assert sorted(efficiency["fraction"].unique()) == [0.25, 1.0]


def test_audit_passes_on_the_real_run(demo_run):
    audit = json.loads((demo_run / "results/audit.json").read_text())
    assert audit["summary"]["fail"] == 0
    assert audit["summary"]["pass"] > 50


def test_rerun_is_a_no_op(demo_run):
    # Before the DVC test below: `dvc pull` restores files with new mtimes.
    out = snakemake(demo_run, "-n")
    assert "Nothing to be done" in out, out


def test_mlflow_runs_and_provenance(demo_run):
    from mlflow.tracking import MlflowClient

    from conftest import search_runs

    uri = f"sqlite:///{demo_run}/results/mlflow/mlflow.db"
    head = run(["git", "rev-parse", "HEAD"], demo_run).strip()
    lock = yaml.safe_load((demo_run / "dvc.lock").read_text())
    dvc_hashes = {out["path"]: out["md5"] for st in lock["stages"].values() for out in st["outs"]}
    for stage, count in EXPERIMENTS.items():
        runs = search_runs(uri, stage)
        assert len(runs) == count, stage
        assert set(runs["status"]) == {"FINISHED"}
        assert set(runs["tags.git_commit"]) == {head}
        for _, row in runs.iterrows():
            data_tags = {k: v for k, v in row.items()
                         if str(k).startswith("tags.data_hash.") and isinstance(v, str)}
            assert data_tags, f"{stage} run without data hash"
            for key, value in data_tags.items():
                assert value == dvc_hashes[f"data/processed/{key.split('.')[-1]}"]
    finetuned = search_runs(uri, "finetune")
    pretrained = finetuned[finetuned["tags.snakemake.wildcard.init"] == "hybridmim"]
    assert len(pretrained) == 5  # 4 datasets + demo_spleen's scarce label fraction
    assert pretrained["tags.upstream.checkpoint_sha256"].str.len().eq(64).all()
    # Per-step losses were logged, not only a final value.
    client = MlflowClient(uri)
    pre = search_runs(uri, "pretrain")
    history = client.get_metric_history(pre["run_id"].iloc[0], "train/total")
    assert len(history) >= 3


def test_metrics_files_match_mlflow(demo_run):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{demo_run}/results/mlflow/mlflow.db"
    for path in (demo_run / "results/evaluate").rglob("metrics.json"):
        data = json.loads(path.read_text())
        run_ = MlflowClient(uri).get_run(data["run_id"])
        assert run_.data.metrics["test_dice_mean"] == pytest.approx(
            data["metrics"]["test_dice_mean"])


def test_dvc_status_push_pull(demo_run):
    stages = [f"{s}@{d}" for s in ("acquire", "preprocess")
              for d in ("demo_brats", "demo_btcv", "demo_liver", "demo_spleen")]
    status = run(["dvc", "status", *stages], demo_run)
    assert "changed" not in status and "modified" not in status, status
    lock_before = (demo_run / "dvc.lock").read_text()
    run(["dvc", "push"] + stages, demo_run)
    shutil.rmtree(demo_run / "data")
    shutil.rmtree(demo_run / ".dvc" / "cache")
    run(["dvc", "pull"] + stages, demo_run)
    assert (demo_run / "data/processed/demo_btcv/splits.json").exists()
    status = run(["dvc", "status", *stages], demo_run)
    assert "changed" not in status and "modified" not in status, status
    assert (demo_run / "dvc.lock").read_text() == lock_before
