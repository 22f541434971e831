"""The experiment tables and figures (ablations, cost, label efficiency, paired bootstrap) on a real
SQLite MLflow store: test_report's project, with per-case scores and cost metrics logged to its
runs the way the evaluate and pretrain jobs log them."""
from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from hybridmim.report import build_report, collect_runs
from hybridmim.report.experiment_tables import (ablation_table, paired_bootstrap,
                                                paired_difference, paired_table,
                                                pretrain_cost_long)

from test_report import DATASETS, SEEDS, build_project

CASES = ("case_a", "case_b", "case_c")


def case_dice(dataset: str, init: str, seed: int, case: str) -> float:
    return 0.5 + 0.1 * CASES.index(case) + (0.07 if init == "hybridmim" else 0) + 0.01 * seed \
        + (0.02 if dataset == "btcv" else 0)


@pytest.fixture(scope="module")
def experiments(tmp_path_factory):
    project = build_project(tmp_path_factory.mktemp("experiments") / "project", dvc=True)
    client = MlflowClient(project["uri"])
    runs = collect_runs(project["uri"], project["metrics_files"])
    folder = tmp_path_factory.mktemp("artifacts")
    for _, run in runs.iterrows():
        classes = DATASETS[run["dataset"]]
        rows = {"case": list(CASES)}
        for k, name in enumerate(classes):
            # The case's mean over classes is case_dice (+/- k offsets cancel over two classes).
            offset = (0.05 if k == 0 else -0.05) if len(classes) == 2 else 0.0
            rows[f"dice_{name.lower().replace(' ', '_')}"] = [
                case_dice(run["dataset"], run["init"], run["seed"], c) + offset for c in CASES]
        path = folder / run["run_id"] / "per_case.csv"
        path.parent.mkdir()
        pd.DataFrame(rows).to_csv(path, index=False)
        client.log_artifact(run["run_id"], str(path))
    pretrain_id = pd.read_json(project["pretrain_files"][0], typ="series")["run_id"]
    for name, value in (("cost/median_step_s", 0.5), ("cost/crops_per_s", 8.0),
                        ("cost/total_s", 70.0), ("cost/peak_mem_mb", 300.0)):
        client.log_metric(pretrain_id, name, value)
    written = build_report(project["uri"], project["metrics_files"], project["pretrain_files"],
                           project["root"] / "results")
    return project, runs, written


def test_bootstrap_is_seeded_and_brackets_the_mean():
    rng = np.random.default_rng(3)
    diffs = rng.normal(0.02, 0.05, size=40)
    mean, low, high = paired_bootstrap(diffs)
    assert (mean, low, high) == paired_bootstrap(diffs)  # seeded: the same interval every time
    assert low < mean < high and mean == pytest.approx(diffs.mean())
    assert paired_bootstrap(np.full(5, 0.1))[1:] == pytest.approx((0.1, 0.1))


def test_paired_differences_table_from_mlflow(experiments):
    project, _, written = experiments
    table = pd.read_csv(written["paired_differences.csv"])
    assert set(table["a"]) == {"hybridmim"} and set(table["b"]) == {"scratch"}
    for dataset in DATASETS:
        row = table.loc[table["dataset"] == dataset].iloc[0]
        expected = np.mean([case_dice(dataset, "hybridmim", s, c) - case_dice(dataset, "scratch",
                                                                             s, c)
                            for s, c in itertools.product(SEEDS, CASES)]) * 100
        assert row["diff"] == pytest.approx(expected)
        assert row["ci_low"] == pytest.approx(expected) and row["n_seeds"] == 2
        assert row["n_cases"] == 3 and len(row["run_ids"].split(";")) == 2
        # The row's mean is A's test Dice over the same runs, as the audit re-derives it.
        assert row["mean"] == pytest.approx(100 * np.mean([
            project["values"][(dataset, "hybridmim", s)]["test_dice_mean"] for s in SEEDS]))
    markdown = written["paired_differences.md"].read_text()
    assert "bootstrap" in markdown and "seed 0" in markdown


def test_small_cells_say_so_instead_of_claiming_significance(experiments):
    _, runs, _ = experiments
    one_seed = runs.loc[(runs["dataset"] == "btcv") & (runs["seed"] == 0)]
    cases = pd.DataFrame([{"run_id": r["run_id"], "case": c,
                           "dice": case_dice("btcv", r["init"], 0, c)}
                          for _, r in one_seed.iterrows() for c in CASES])
    result = paired_difference(one_seed, cases, "hybridmim", "scratch")
    assert result["n_seeds"] == 1 and "too few to judge" in result["note"]
    assert result["excludes_zero"] is False


def test_cost_table_and_every_figure_with_its_data(experiments):
    _, _, written = experiments
    cost = pd.read_csv(written["pretrain_cost.csv"])
    assert dict(zip(cost["metric"], cost["mean"])) == {
        "cost/crops_per_s": 8.0, "cost/median_step_s": 0.5, "cost/peak_mem_mb": 300.0,
        "cost/total_s": 70.0}
    assert cost["ratio_vs_simmim"].isna().all()  # no SimMIM-style run here: no ratio
    markdown = written["pretrain_cost.md"].read_text()
    assert "n/a" in markdown and markdown.count("| unet ") == 1  # one row per pretraining run
    figures = [p for name, p in written.items() if p.suffix == ".png"]
    assert {p.stem for p in figures} >= {"test_dice", "label_efficiency", "pretrain_losses",
                                        "ablations", "time_to_quality", "finetune_curves",
                                        "per_class_dice", "gallery_btcv", "gallery_msd_spleen"}
    for png in figures:
        assert png.with_suffix(".pdf").read_bytes().startswith(b"%PDF")
        data = pd.read_csv(png.with_suffix(".csv"))
        if len(data) and "run_ids" in data:
            assert data["run_ids"].astype(str).str.len().gt(0).all(), png
    bars = pd.read_csv(written["per_class_dice"].with_suffix(".csv"))
    assert set(bars["dataset"]) == {"btcv"}  # the only multi-class task
    assert set(bars["class"]) == set(DATASETS["btcv"])


def test_ablation_rows_pair_each_variant_with_its_base():
    def run(init, seed, dice, variant=None):
        row = {"run_id": f"{init}-{seed}", "dataset": "d", "backbone": "unet", "fraction": 1.0,
               "init": init, "seed": seed, "test_dice_mean": dice}
        if variant:
            row.update({"params.variant.of": "hybridmim", "params.variant.changes": variant,
                        "params.variant.pretrained_as": init, "params.variant.corpus": "ct"})
        return row
    runs = pd.DataFrame([run("hybridmim", 0, 0.80), run("hybridmim", 1, 0.82),
                         run("hybridmim-no_cl", 0, 0.75, "no_cl"),
                         run("hybridmim-no_cl", 1, 0.77, "no_cl"),
                         run("scratch", 0, 0.6), run("scratch", 1, 0.6)])
    cases = pd.DataFrame([{"run_id": r["run_id"], "case": c, "dice": r["test_dice_mean"] + k / 100}
                          for _, r in runs.iterrows() for k, c in enumerate(CASES)])
    cost = pretrain_cost_long(pd.DataFrame([
        {"run_id": "p1", "tags.snakemake.wildcard.backbone": "unet",
         "tags.snakemake.wildcard.method": "hybridmim", "tags.snakemake.wildcard.corpus": "ct",
         "tags.method.kind": "hybridmim", "tags.device": "cpu", "metrics.cost/median_step_s": 0.4},
        {"run_id": "p2", "tags.snakemake.wildcard.backbone": "unet",
         "tags.snakemake.wildcard.method": "hybridmim-no_cl", "tags.snakemake.wildcard.corpus": "ct",
         "tags.method.kind": "hybridmim", "tags.device": "cpu", "metrics.cost/median_step_s": 0.3},
        {"run_id": "p3", "tags.snakemake.wildcard.backbone": "unet",
         "tags.snakemake.wildcard.method": "simmim", "tags.snakemake.wildcard.corpus": "ct",
         "tags.method.kind": "simmim", "tags.device": "cpu", "metrics.cost/median_step_s": 0.8},
    ]))
    ratios = cost.loc[cost["metric"] == "cost/median_step_s"].set_index("method")[
        "ratio_vs_simmim"]
    assert ratios.to_dict() == pytest.approx({"hybridmim": 0.5, "hybridmim-no_cl": 0.375,
                                              "simmim": 1.0})
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        paired, _ = paired_table(runs, cases, Path(tmp))
        long, paths = ablation_table(runs, paired, cost, Path(tmp))
        markdown = paths["md"].read_text()
    row = long.iloc[0]
    assert (row["init"], row["base"], row["changes"]) == ("hybridmim-no_cl", "hybridmim", "no_cl")
    assert row["diff"] == pytest.approx(-5.0) and row["cost_ratio"] == pytest.approx(0.75)
    assert row["ci_low"] == pytest.approx(-5.0) and "too few to judge" not in row["ci_note"]
    assert "d / unet" in markdown and "-5.00" in markdown


def test_the_audit_re_derives_every_new_table_row(experiments):
    import json

    from hybridmim.report.audit import main

    project, _, written = experiments
    results = project["root"] / "results"
    status = main(results, project["uri"], project["root"])
    checks = json.loads((results / "audit.json").read_text())["checks"]
    assert status == 0, [c for c in checks if c["status"] != "pass"]
    audited = {c["number"].split(":")[0] for c in checks if c["check"] == "table number"}
    assert {"paired_differences.csv", "pretrain_cost.csv"} <= audited
