"""Report tables and figures built from a real SQLite MLflow store.

``build_project`` makes a small project in tmp: a git repo, two processed datasets (one versioned
in dvc.lock — by real DVC with ``dvc=True`` — one hashed as a tree), one pretraining run and
2 datasets x 2 inits x 2 seeds of finetune + evaluate runs, all created through ``tracked_run`` so
their tags are the real ones, plus their model.pt and metrics.json files. Each evaluation saves
its test predictions (small NIfTI label maps) beside its metrics.json, with the per-case Dice and
HD95 computed from them and the raw label files as an evaluate job does (contract 1).
test_audit.py reuses it.
"""
from __future__ import annotations

import itertools
import json
import math
import os
import re
import shutil
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from hybridmim.atomic import write_json
from hybridmim.checkpoints import publish_model
from hybridmim.hashing import sha256_file, spec_hash
from hybridmim.report import ReportInputError, build_report, collect_runs
from hybridmim.report.figures import plot_label_efficiency
from hybridmim.report.tables import comparison_table
from hybridmim.tracking.runs import tracked_run

from conftest import ROOT

DATASETS = {"btcv": ["Spleen", "Right kidney"], "msd_spleen": ["spleen"]}
CASES = ("case_a", "case_b")
SPACING = (1.5, 1.5, 2.0)
INITS = ("scratch", "hybridmim")
SEEDS = (0, 1)
LOSSES = ("train/total", "train/pr", "train/num", "train/loc", "train/con", "train/cl")


def _git(root: Path, *args: str) -> None:
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    subprocess.run(["git", *args], cwd=root, check=True, env=env, capture_output=True)


def _spec(root: Path, name: str, rule: str, wildcards: dict, **extra) -> dict:
    return {"run_name": name, "seed": int(wildcards.get("seed", 0)), "out": f"{name}/metrics.json",
            "tracking": {"uri": f"sqlite:///{root}/results/mlflow/mlflow.db",
                         "artifact_root": str(root / "results" / "mlflow" / "artifacts")},
            "provenance": {"rule": rule, "wildcards": wildcards}, **extra}


def _publish(path: Path, run_id: str, spec: dict, stage: str) -> None:
    net = torch.nn.Linear(2, 1)
    publish_model(path, "torch.nn.Linear", {"in_features": 2, "out_features": 1},
                  net.state_dict(), {"stage": stage, "mlflow_run_id": run_id,
                                     "spec_hash": spec_hash(spec)})


def _save_nifti(path: Path, array: np.ndarray) -> None:
    import nibabel as nib

    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array.astype(np.uint8), np.diag([*SPACING, 1.0])), str(path))


def raw_label(root: Path, dataset: str, case: str) -> str:
    """A raw ground-truth label map (one box per class, values 1..K); its path from the root."""
    rel = f"data/raw/{dataset}/labels/{case}.nii.gz"
    if not (root / rel).exists():
        rng = np.random.default_rng(zlib.crc32(f"{dataset}/{case}".encode()))
        label = np.zeros((12, 12, 8), np.uint8)
        for value in range(1, len(DATASETS[dataset]) + 1):
            x, y = rng.integers(1, 6, size=2)
            label[x:x + 5, y:y + 5, 2 * value - 1:2 * value + 3] = value
        _save_nifti(root / rel, label)
    return rel


def _predict(truth: np.ndarray, dataset: str, init: str, seed: int, case: str) -> np.ndarray:
    """A plausible prediction: the truth shifted by a voxel, some voxels lost; for btcv seed 1 the
    right kidney is missed entirely (Dice 0, HD95 undefined: exercises the NaN paths)."""
    rng = np.random.default_rng(zlib.crc32(f"{dataset}/{init}/{seed}/{case}".encode()))
    pred = np.roll(truth, int(rng.integers(0, 2)), axis=int(rng.integers(0, 3)))
    pred[rng.random(pred.shape) < (0.15 if init == "scratch" else 0.05)] = 0
    if dataset == "btcv" and seed == 1:
        pred[pred == 2] = 0
    return pred


def evaluate_cases(root: Path, dataset: str, init: str, seed: int, out_dir: Path
                   ) -> tuple[dict, list[dict]]:
    """Save each case's prediction, score it against its raw label as the evaluate job does
    (hybridmim.evaluate.metrics), return (per-class values, per-case entries of metrics.json)."""
    import nibabel as nib

    from hybridmim.evaluate.metrics import aggregate, case_metrics, json_number

    names, per_case, entries = DATASETS[dataset], [], []
    for case in CASES:
        label = raw_label(root, dataset, case)
        truth = np.asarray(nib.load(str(root / label)).dataobj)
        pred = _predict(truth, dataset, init, seed, case)
        path = out_dir / "predictions" / f"{case}.nii.gz"
        _save_nifti(path, pred)
        masks = [torch.from_numpy(np.stack([a == v for v in range(1, len(names) + 1)]))
                 for a in (pred, truth)]
        values = case_metrics(*masks, SPACING, names)
        per_case.append(values)
        entries.append({"case": case, "prediction": path.relative_to(root).as_posix(),
                        "prediction_sha256": sha256_file(path), "label": label,
                        **{n: {k: json_number(values[n][k]) for k in ("dice", "hd95")}
                           for n in names}})
    summary = aggregate(per_case, names)
    return ({kind: {n: json_number(summary[kind][n]) for n in names} for kind in ("dice", "hd95")},
            entries)


def _metrics_payload(values: dict) -> dict:
    from hybridmim.evaluate.metrics import metric_key

    metrics = {"test_dice_mean": float(np.mean(list(values["dice"].values()))),
               "test_hd95_mean": float(np.mean([v for v in values["hd95"].values()
                                                if v is not None]))}
    for kind in ("dice", "hd95"):
        for name, value in values[kind].items():
            metrics[f"test_{kind}_{metric_key(name)}"] = value
    return metrics


def _log(run, metrics: dict) -> None:
    run.log_metrics({k: (math.nan if v is None else v) for k, v in metrics.items()}, step=0)


def _pretrain_job(root: Path, out: dict) -> None:
    pre_dir = root / "results" / "pretrain" / "unet" / "hybridmim" / "ct"
    spec = _spec(root, "pretrain/unet/hybridmim/ct", "pretrain",
                 {"backbone": "unet", "method": "hybridmim", "corpus": "ct"},
                 data={"datasets": [{"name": d, "processed_dir": f"data/processed/{d}"}
                                    for d in DATASETS]})
    with tracked_run("pretrain", spec, data_dirs=[f"data/processed/{d}" for d in DATASETS]) as run:
        for step in range(1, 21):
            run.log_metrics({k: 1.0 / step + i * 0.1 for i, k in enumerate(LOSSES)}, step)
    _publish(pre_dir / "model.pt", run.run_id, spec, "pretrain")
    write_json(pre_dir / "metrics.json", {"run_id": run.run_id, "stage": "pretrain",
                                           "metrics": {"train/total": 0.05},
                                           "spec_hash": spec_hash(spec)})
    out["pretrain_files"] = [pre_dir / "metrics.json"]


def _finetune_and_evaluate(root: Path, dataset: str, init: str, seed: int, out: dict) -> None:
    wildcards = {"dataset": dataset, "backbone": "unet", "init": init, "fraction": "1",
                 "seed": seed}
    rel = f"{dataset}/unet/{init}/frac1/seed{seed}"
    data_dirs = [f"data/processed/{dataset}"]
    checkpoint = "results/pretrain/unet/hybridmim/ct/model.pt" if init == "hybridmim" else None
    ft_spec = _spec(root, f"finetune/{rel}", "finetune", wildcards,
                    dataset={"processed_dir": data_dirs[0]},
                    init={"name": init, "checkpoint": checkpoint})
    with tracked_run("finetune", ft_spec, data_dirs=data_dirs, upstream_model=checkpoint) as ft:
        ft.log_metrics({"train_loss": 0.3}, 1)
    ft_model = f"results/finetune/{rel}/model.pt"
    _publish(root / ft_model, ft.run_id, ft_spec, "finetune")
    write_json((root / ft_model).with_name("metrics.json"),
               {"run_id": ft.run_id, "stage": "finetune", "metrics": {"val_dice_mean": 0.7},
                "spec_hash": spec_hash(ft_spec)})
    out["finetune_models"].append(root / ft_model)

    labels = {"0": "background", **{str(i): n for i, n in enumerate(DATASETS[dataset], 1)}}
    ev_spec = _spec(root, f"evaluate/{rel}", "evaluate", wildcards, model=ft_model, split="test",
                    dataset={"processed_dir": data_dirs[0], "labels": labels})
    path = root / "results" / "evaluate" / rel / "metrics.json"
    values, per_case = evaluate_cases(root, dataset, init, seed, path.parent)
    metrics = _metrics_payload(values)
    with tracked_run("evaluate", ev_spec, data_dirs=data_dirs, upstream_model=ft_model) as ev:
        ev.set_tags({"upstream.run_id": ft.run_id})
        _log(ev, metrics)
    write_json(path, {"run_id": ev.run_id, "stage": "evaluate", "metrics": metrics,
                      "per_class": values, "spec_hash": spec_hash(ev_spec), "grid": "original",
                      "per_case": per_case})
    out["metrics_files"].append(path)
    out["values"][(dataset, init, seed)] = metrics


def _version_with_dvc(root: Path) -> None:
    """Real DVC: btcv's raw and processed folders as the outputs of acquire/preprocess stages,
    committed to dvc.lock (as `hybridmim data version` does in the workflow)."""
    (root / "dvc.yaml").write_text(
        "stages:\n"
        "  acquire:\n    foreach: [btcv]\n    do:\n      cmd: hybridmim data acquire\n"
        "      outs:\n        - data/raw/${item}\n"
        "  preprocess:\n    foreach: [btcv]\n    do:\n      cmd: hybridmim data preprocess\n"
        "      deps:\n        - data/raw/${item}\n      outs:\n        - data/processed/${item}\n")
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    for args in (["init", "-q"], ["commit", "-f", "-q", "acquire@btcv", "preprocess@btcv"]):
        subprocess.run([sys.executable, "-m", "dvc", *args], cwd=root, check=True, env=env,
                       capture_output=True)


def build_project(root: Path, dvc: bool = False) -> dict:
    """Create the project; return {uri, root, metrics_files, pretrain_files, finetune_models,
    stale_run, values}. ``dvc``: version btcv with real DVC (else a hand-written dvc.lock)."""
    root.mkdir(parents=True)
    (root / "config").mkdir()
    shutil.copy(ROOT / "config" / "paper_results.yaml", root / "config" / "paper_results.yaml")
    (root / "README.md").write_text("test project\n")
    _git(root, "init", "-q", "-b", "main")
    _git(root, "add", "-A")
    _git(root, "commit", "-qm", "init")
    for dataset in DATASETS:
        folder = root / "data" / "processed" / dataset
        folder.mkdir(parents=True)
        (folder / "splits.json").write_text(json.dumps({"seed": 0, "test": [dataset]}))
    for dataset, case in itertools.product(DATASETS, CASES):
        raw_label(root, dataset, case)
    # btcv is versioned by DVC (its hash comes from dvc.lock); msd_spleen is hashed as a tree.
    if dvc:
        _version_with_dvc(root)
        _git(root, "add", "-A")  # dvc init staged its files: the runs' tree must be clean
        _git(root, "commit", "-qm", "data versions")
    else:
        (root / "dvc.lock").write_text(
            "schema: '2.0'\nstages:\n  preprocess@btcv:\n    cmd: hybridmim data preprocess\n"
            "    outs:\n    - path: data/processed/btcv\n      hash: md5\n"
            "      md5: 1111aaaa2222bbbb.dir\n")
    out = {"uri": f"sqlite:///{root}/results/mlflow/mlflow.db", "root": root,
           "metrics_files": [], "values": {}, "finetune_models": []}
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)  # jobs run in the project root: recorded paths are relative to it
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        _pretrain_job(root, out)
        for dataset, init, seed in itertools.product(DATASETS, INITS, SEEDS):
            _finetune_and_evaluate(root, dataset, init, seed, out)
        # A stale evaluate run of an earlier iteration: same wildcards, not in any file.
        stale_spec = _spec(root, "evaluate/btcv/unet/scratch/frac1/seed0", "evaluate",
                           {"dataset": "btcv", "backbone": "unet", "init": "scratch",
                            "fraction": "1", "seed": 0})
        with tracked_run("evaluate", stale_spec) as stale:
            _log(stale, {"test_dice_mean": 0.01, "test_hd95_mean": 99.0})
        out["stale_run"] = stale.run_id
    return out


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    return build_project(tmp_path_factory.mktemp("report") / "project")


@pytest.fixture(scope="module")
def report(project):
    written = build_report(project["uri"], project["metrics_files"], project["pretrain_files"],
                           project["root"] / "results")
    return written


def _expected(project, dataset, init, metric):
    values = [project["values"][(dataset, init, s)][metric] for s in SEEDS]
    values = np.array([v for v in values if v is not None], float)
    return values.mean() * 100, values.std(ddof=1) * 100, len(values)


def test_collect_takes_exactly_the_listed_runs(project):
    runs = collect_runs(project["uri"], project["metrics_files"])
    assert len(runs) == len(DATASETS) * len(INITS) * len(SEEDS)
    assert project["stale_run"] not in set(runs["run_id"])
    assert set(runs["init"]) == set(INITS) and set(runs["seed"]) == set(SEEDS)
    assert runs["fraction"].eq(1.0).all()
    row = runs.loc[(runs["dataset"] == "btcv") & (runs["init"] == "hybridmim")
                   & (runs["seed"] == 1)]
    assert row["test_dice_mean"].item() == pytest.approx(
        project["values"][("btcv", "hybridmim", 1)]["test_dice_mean"])


def test_collect_names_the_file_of_a_missing_run(project, tmp_path):
    payload = json.loads(project["metrics_files"][0].read_text())
    payload["run_id"] = "0" * 32
    bad = tmp_path / "metrics.json"
    bad.write_text(json.dumps(payload))
    with pytest.raises(ReportInputError, match=f"{'0' * 32} listed in {bad}"):
        collect_runs(project["uri"], [*project["metrics_files"][1:], bad])


def test_collect_names_the_file_that_disagrees_with_mlflow(project, tmp_path):
    payload = json.loads(project["metrics_files"][0].read_text())
    payload["metrics"]["test_dice_mean"] += 0.05
    bad = tmp_path / "metrics.json"
    bad.write_text(json.dumps(payload))
    with pytest.raises(ReportInputError, match=rf"{bad} disagrees.*test_dice_mean"):
        collect_runs(project["uri"], [*project["metrics_files"][1:], bad])


def test_comparison_table_equals_values_computed_from_the_inputs(project, report):
    table = pd.read_csv(report["comparison.csv"])
    dice = table.loc[table["metric"] == "test_dice_mean"]
    assert len(dice) == len(DATASETS) * len(INITS)
    for _, row in dice.iterrows():
        mean, std, n = _expected(project, row["dataset"], row["init"], "test_dice_mean")
        assert row["mean"] == pytest.approx(mean, rel=1e-12)
        assert row["std"] == pytest.approx(std, rel=1e-12)
        assert row["n"] == n == 2
        assert project["stale_run"] not in row["run_ids"]
        assert len(row["run_ids"].split(";")) == 2
    markdown = report["comparison.md"].read_text()
    mean, std, _ = _expected(project, "btcv", "hybridmim", "test_dice_mean")
    assert f"{mean:.2f} ± {std:.2f} (n=2)" in markdown
    assert "\\begin{tabular}" in report["comparison.tex"].read_text()


def test_per_class_tables_and_mean_hd95_with_an_undefined_class(project, report):
    table = pd.read_csv(report["per_class_btcv.csv"])
    kidney = table.loc[(table["class"] == "Right kidney") & (table["init"] == "scratch")]
    mean, std, n = _expected(project, "btcv", "scratch", "test_dice_right_kidney")
    assert kidney["mean"].item() == pytest.approx(mean)
    assert kidney["std"].item() == pytest.approx(std)
    assert "Right kidney" in report["per_class_btcv.md"].read_text()
    assert set(pd.read_csv(report["per_class_msd_spleen.csv"])["class"]) == {"spleen", "mean"}
    hd95 = pd.read_csv(report["comparison.csv"])
    btcv_hd = hd95.loc[(hd95["metric"] == "test_hd95_mean") & (hd95["dataset"] == "btcv")]
    assert btcv_hd["n"].eq(2).all()  # the mean HD95 is defined even when one class's is not


def test_paper_cells_stay_empty_and_references_are_labelled(project, report):
    table = pd.read_csv(report["paper_vs_ours.csv"])
    paper = table.loc[table["kind"] == "HybridMIM paper"]
    assert len(paper) > 0 and paper["reported"].isna().all()
    ours = paper.loc[(paper["dataset"] == "btcv") & (paper["backbone"] == "unet")
                     & (paper["init"] == "scratch")]
    assert ours["mean"].item() == pytest.approx(_expected(project, "btcv", "scratch",
                                                          "test_dice_mean")[0])
    refs = table.loc[table["kind"] != "HybridMIM paper"]
    assert refs["kind"].str.contains("not the paper").all()
    # A reference is labelled with what it is, never with our method's name.
    assert not refs["label"].str.lower().str.contains("hybridmim").any()
    assert "SSL (Tang et al.)" in set(refs["label"])
    assert refs["reported_source"].str.len().gt(0).all() and refs["split"].str.len().gt(0).all()
    spleen = refs.loc[refs["dataset"] == "msd_spleen"]
    assert spleen["reported"].item() == pytest.approx(96.1) and spleen["n"].item() == 2
    markdown = report["paper_vs_ours.md"].read_text()
    paper_lines = [line for line in markdown.splitlines() if line.startswith("| HybridMIM paper")]
    assert paper_lines and all("| n/a " in line for line in paper_lines)


def test_paper_value_without_its_table_is_rejected(tmp_path):
    from hybridmim.report.tables import load_paper_results

    bad = tmp_path / "paper_results.yaml"
    bad.write_text("paper:\n  - {dataset: btcv, backbone: unet, init: hybridmim, fraction: 1.0,"
                   " value: 80.1, table: null}\n")
    with pytest.raises(ReportInputError, match=r"paper\[0\].*table"):
        load_paper_results(bad)
    bad.write_text("references:\n  - {dataset: btcv, backbone: unet, init: hybridmim, fraction: 1,"
                   " value: 80.1, source: x, split: y, setting: z, label: HybridMIM}\n")
    with pytest.raises(ReportInputError, match=r"references\[0\].label"):
        load_paper_results(bad)


def _assert_png(path: Path) -> None:
    assert path.is_file() and path.stat().st_size > 0
    with Image.open(path) as image:
        image.verify()
        assert image.format == "PNG"


def test_figures_are_valid_pngs(report):
    for name in ("test_dice", "pretrain_losses", "label_efficiency"):
        _assert_png(report[name])  # label efficiency with one fraction: a figure that says so
    assert not list(report["test_dice"].parent.glob(".*.tmp"))  # atomic writes left nothing


def test_label_efficiency_plot_with_several_fractions(tmp_path):
    rows = [{"dataset": "btcv", "backbone": "unet", "init": init, "fraction": frac, "seed": seed,
             "test_dice_mean": 0.5 + frac / 4 + (0.05 if init == "hybridmim" else 0) + seed / 100}
            for init in INITS for frac in (0.1, 0.5, 1.0) for seed in SEEDS]
    path = plot_label_efficiency(pd.DataFrame(rows), tmp_path / "label_efficiency.png")
    _assert_png(path)
    assert len(pd.read_csv(path.with_suffix(".csv"))) == len(INITS) * 3  # init x fraction
    # One fraction is no curve: a figure that says so, with no plotted numbers.
    none = plot_label_efficiency(pd.DataFrame(rows[:1]), tmp_path / "none.png")
    _assert_png(none)
    assert pd.read_csv(none.with_suffix(".csv")).empty


def test_several_fractions_become_rows_in_numeric_order(tmp_path):
    rows = [{"run_id": f"r{i}", "dataset": "btcv", "backbone": "unet", "init": init,
             "fraction": frac, "seed": 0, "test_dice_mean": 0.4 + frac / 2,
             "test_hd95_mean": 10.0}
            for i, (init, frac) in enumerate(itertools.product(INITS, (1.0, 0.1, 0.5)))]
    long, paths = comparison_table(pd.DataFrame(rows), tmp_path)
    assert set(long["fraction"]) == {0.1, 0.5, 1.0}
    dice = paths["md"].read_text().split("## Mean HD95")[0]
    lines = [line for line in dice.splitlines() if line.startswith("| btcv")]
    assert [line.split("|")[3].strip() for line in lines] == ["10%", "50%", "100%"]
    assert "65.00 (n=1)" in lines[1]  # one seed: no ± part


def test_latex_table_keeps_the_cells_of_names_it_escapes(tmp_path):
    # An ablation variant's init name holds "_": LaTeX escapes it, and its cells must survive.
    rows = [{"run_id": f"r{i}", "dataset": "btcv", "backbone": "unet", "init": init,
             "fraction": 1.0, "seed": 0, "test_dice_mean": dice, "test_hd95_mean": 10.0}
            for i, (init, dice) in enumerate((("scratch", 0.5), ("hybridmim-no_cl", 0.9)))]
    _, paths = comparison_table(pd.DataFrame(rows), tmp_path)
    header, row = [line for line in paths["tex"].read_text().splitlines()
                   if "scratch" in line or line.startswith("btcv")][:2]
    assert header.split("&")[-1].strip(" \\") == r"hybridmim-no\_cl"
    assert row.split("&")[-1].strip(" \\") == "90.00 (n=1)"


def test_latex_tables_escape_every_percent_sign(report):
    # A raw "%" inside a tabular (a heading such as "reported Dice (%)") comments out the rest
    # of its row and breaks the table in LaTeX.
    for name, path in report.items():
        if path.suffix == ".tex":
            tabulars = [part.split(r"\end{tabular}")[0]
                        for part in path.read_text().split(r"\begin{tabular}")[1:]]
            assert tabulars and not re.search(r"(?<!\\)%", "".join(tabulars)), name
