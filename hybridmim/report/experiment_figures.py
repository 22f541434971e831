"""The report's experiment figures: ablations, time-to-quality, fine-tuning curves, per-class Dice
bars and one qualitative gallery per dataset.

Same rules as figures.py (Agg figures, PNG + PDF + the plotted numbers as CSV, atomic writes; a
figure without data is a placeholder that says what is missing).
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from hybridmim.report.figures import (_seed_stats, grouped_bars, metric_histories, panels,
                                      placeholder, save_figure, style_panel)
from hybridmim.report.tables import RUN_ID_SEPARATOR, fraction_text, order_inits


def plot_ablations(ablation_long: pd.DataFrame, path: str | Path) -> Path:
    """Per dataset × backbone: each variant's Dice difference to its base with the paired CI."""
    columns = ["dataset", "backbone", "fraction", "init", "base", "metric", "diff", "ci_low",
               "ci_high", "unit", "run_ids"]
    if ablation_long.empty:
        return placeholder(path, "No ablation variants in this grid (pretraining.variants).",
                           columns)
    fig, axes = panels(ablation_long, ["dataset", "backbone"],
                       height=0.5 * ablation_long["init"].nunique() + 2)
    for (dataset, backbone), ax, part in axes:
        labels = [f"{i} ({fraction_text(f)})" for i, f in zip(part["init"], part["fraction"])]
        y = np.arange(len(part))
        lower = (part["diff"] - part["ci_low"]).clip(lower=0).fillna(0)
        upper = (part["ci_high"] - part["diff"]).clip(lower=0).fillna(0)
        ax.barh(y, part["diff"], xerr=[lower, upper], capsize=3, color="tab:orange",
                label="variant − base (error bar: paired 95% CI)")
        ax.axvline(0, color="black", linewidth=0.8)
        ax.set_yticks(y, labels, fontsize=8)
        ax.set_xlabel(f"Δ test Dice vs {part['base'].iloc[0]} (percentage points)")
        style_panel(ax, f"{dataset} / {backbone}", grid="x", loc="lower right")
    fig.suptitle("Ablations: each variant vs full HybridMIM", fontsize=10)
    data = ablation_long.assign(unit="Dice percentage points",
                                run_ids=[RUN_ID_SEPARATOR.join(filter(None, (a, b)))
                                         for a, b in zip(ablation_long["run_ids"],
                                                         ablation_long["base_run_ids"])])
    return save_figure(fig, path, data[columns])


def plot_time_to_quality(tracking_uri: str, pretrain_runs: pd.DataFrame | None,
                         path: str | Path) -> Path:
    """Validation reconstruction loss against cumulative training time, one line per
    pretraining run, one panel per backbone × corpus (training loss where no validation)."""
    columns = ["backbone", "corpus", "method", "step", "train_s", "metric", "value", "run_ids"]
    if pretrain_runs is None or pretrain_runs.empty:
        return placeholder(path, "No pretraining runs in this grid.", columns)
    points = []
    for _, run in pretrain_runs.iterrows():
        history = metric_histories(tracking_uri, run["run_id"],
                                   ("val/pr", "train/pr", "cost/train_s"))
        loss_key = "val/pr" if "val/pr" in history else "train/pr"
        if "cost/train_s" not in history or loss_key not in history:
            continue
        joined = history[loss_key].merge(history["cost/train_s"], on="step",
                                         suffixes=("", "_clock"))
        points.append(pd.DataFrame({
            "backbone": run.get("tags.snakemake.wildcard.backbone", ""),
            "corpus": run.get("tags.snakemake.wildcard.corpus", ""),
            "method": run.get("tags.snakemake.wildcard.method", run["label"]),
            "step": joined["step"], "train_s": joined["value_clock"], "metric": loss_key,
            "value": joined["value"], "run_ids": run["run_id"]}))
    if not points:
        return placeholder(path, "The pretraining runs logged no training clock "
                                 "(cost/train_s).", columns)
    data = pd.concat(points, ignore_index=True)
    fig, axes = panels(data, ["backbone", "corpus"])
    for (backbone, corpus), ax, part in axes:
        for method, line in part.groupby("method", sort=True):
            style = "-" if method in ("hybridmim", "simmim") else ":"
            ax.plot(line["train_s"], line["value"], style, marker=".", label=method)
        metric = "validation" if (part["metric"] == "val/pr").all() else "training"
        ax.set(xlabel="training wall-clock time (s)",
               ylabel=f"{metric} reconstruction loss L_PR (MSE, unitless)")
        style_panel(ax, f"{backbone} / {corpus}")
    fig.suptitle("Time to quality: reconstruction loss against training time", fontsize=10)
    return save_figure(fig, path, data[columns])


def plot_finetune_curves(tracking_uri: str, runs: pd.DataFrame, path: str | Path) -> Path:
    """Validation Dice against step during fine-tuning (mean over seeds), scratch vs each
    pretrained init, at the largest label fraction; one panel per dataset × backbone."""
    columns = ["dataset", "backbone", "fraction", "init", "step", "mean", "n", "unit", "run_ids"]
    upstream = "tags.upstream.run_id"
    if upstream not in runs.columns:
        return placeholder(path, "The evaluate runs name no fine-tuning run.", columns)
    points = []
    for (dataset, backbone), part in runs.groupby(["dataset", "backbone"], sort=True):
        part = part.loc[part["fraction"] == part["fraction"].max()]
        for _, run in part.iterrows():
            finetune_id = run[upstream]
            if not isinstance(finetune_id, str) or not finetune_id:
                continue
            history = metric_histories(tracking_uri, finetune_id, ("val_dice_mean",))
            if "val_dice_mean" in history:
                points.append(history["val_dice_mean"].assign(
                    dataset=dataset, backbone=backbone, fraction=run["fraction"],
                    init=run["init"], run_id=finetune_id))
    if not points:
        return placeholder(path, "No fine-tuning run logged a validation Dice.", columns)
    raw = pd.concat(points, ignore_index=True)
    data = (raw.groupby(["dataset", "backbone", "fraction", "init", "step"], sort=True)
            .agg(mean=("value", "mean"), n=("value", "size"),
                 run_ids=("run_id", lambda ids: RUN_ID_SEPARATOR.join(sorted(ids))))
            .reset_index())
    data["mean"] *= 100
    data["unit"] = "Dice %"
    fig, axes = panels(data, ["dataset", "backbone"])
    for (dataset, backbone), ax, part in axes:
        for init in order_inits(part["init"]):
            line = part.loc[part["init"] == init]
            ax.plot(line["step"], line["mean"], marker=".",
                    linestyle="--" if init == "scratch" else "-", label=init)
        ax.set(xlabel="fine-tuning step", ylabel="validation Dice (%)", ylim=(0, 100))
        style_panel(ax, f"{dataset} / {backbone} (labels "
                        f"{fraction_text(part['fraction'].iloc[0])})")
    fig.suptitle("Fine-tuning curves (mean over seeds)", fontsize=10)
    return save_figure(fig, path, data[columns])


def plot_per_class(runs: pd.DataFrame, path: str | Path) -> Path:
    """Per-class test Dice bars per init for the multi-class tasks (largest label fraction)."""
    columns = ["dataset", "backbone", "fraction", "init", "class", "metric", "mean", "std", "n",
               "unit", "run_ids"]
    frames = []
    for (dataset, backbone), part in runs.groupby(["dataset", "backbone"], sort=True):
        part = part.loc[part["fraction"] == part["fraction"].max()]
        classes = part["classes"].iloc[0]
        if len(classes) < 2:
            continue
        for key, name in classes.items():
            metric = f"test_dice_{key}"
            if metric not in part:
                continue
            stats = _seed_stats(part, ["init"], metric)
            frames.append(stats.assign(dataset=dataset, backbone=backbone,
                                       fraction=part["fraction"].iloc[0], **{"class": name}))
    if not frames:
        return placeholder(path, "No multi-class task in this grid.", columns)
    data = pd.concat(frames, ignore_index=True).assign(unit="Dice %")
    fig, axes = panels(data, ["dataset", "backbone"], width=5.5)
    for (dataset, backbone), ax, part in axes:
        names = list(dict.fromkeys(part["class"]))
        means, stds = (part.pivot(index="class", columns="init", values=v)
                       .reindex(index=names, columns=order_inits(part["init"]))
                       for v in ("mean", "std"))
        x = grouped_bars(ax, means, stds, capsize=2)
        ax.set_xticks(x, names, rotation=45, ha="right", fontsize=7)
        ax.set(ylabel="test Dice (%)", ylim=(0, 100))
        style_panel(ax, f"{dataset} / {backbone} (labels "
                        f"{fraction_text(part['fraction'].iloc[0])})", grid="y", title="init")
    fig.suptitle("Per-class test Dice (error bars: std over seeds)", fontsize=10)
    return save_figure(fig, path, data[columns])


def plot_gallery(tracking_uri: str, runs: pd.DataFrame, dataset: str, path: str | Path) -> Path:
    """The evaluate runs' overlay figures of one dataset stacked by init (largest label
    fraction, lowest seed): the same test cases and slices in every row (evaluate/overlays.py
    picks them from the ground truth), CT in radiological orientation."""
    from matplotlib.image import imread
    from mlflow.tracking import MlflowClient

    columns = ["dataset", "backbone", "fraction", "seed", "init", "artifact", "run_ids"]
    part = runs.loc[runs["dataset"] == dataset]
    if part.empty:
        return placeholder(path, f"No evaluation of {dataset}.", columns)
    part = part.loc[part["fraction"] == part["fraction"].max()]
    part = part.loc[part["seed"] == part["seed"].min()]
    client = MlflowClient(tracking_uri=tracking_uri)
    images, rows = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for backbone in sorted(part["backbone"].unique()):
            chosen = part.loc[part["backbone"] == backbone]
            for init in order_inits(chosen["init"]):
                run = chosen.loc[chosen["init"] == init].iloc[0]
                if "overlays.png" not in {a.path for a in client.list_artifacts(run["run_id"])}:
                    continue
                local = client.download_artifacts(run["run_id"], "overlays.png",
                                                  f"{tmp}/{run['run_id']}")
                images.append((f"{backbone} / {init}", imread(local)))
                rows.append({"dataset": dataset, "backbone": backbone,
                             "fraction": run["fraction"], "seed": run["seed"], "init": init,
                             "artifact": "overlays.png", "run_ids": run["run_id"]})
    if not images:
        return placeholder(path, f"The evaluations of {dataset} saved no overlay figure.",
                           columns)
    height = sum(img.shape[0] / img.shape[1] * 9 for _, img in images)
    fig = Figure(figsize=(9, height + 0.4 * len(images)), layout="constrained")
    for k, (title, img) in enumerate(images):
        ax = fig.add_subplot(len(images), 1, k + 1)
        ax.imshow(img)
        ax.set_title(title, fontsize=10, loc="left")
        ax.axis("off")
    fig.suptitle(f"{dataset}: test cases (rows of each panel: image | ground truth | "
                 f"prediction), labels {fraction_text(part['fraction'].iloc[0])}, seed "
                 f"{part['seed'].iloc[0]}", fontsize=10)
    return save_figure(fig, path, pd.DataFrame.from_records(rows, columns=columns))
