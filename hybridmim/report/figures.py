"""Report figures: Dice per init, label efficiency, pretraining loss curves, and what every figure
shares (more figures in experiment_figures.py).

Figures are drawn on ``matplotlib.figure.Figure`` objects (Agg canvas, no pyplot global state), so
a report built inside a long-lived process never opens a window or leaks figures. Every figure is
written as ``<name>.png`` and ``<name>.pdf`` with ``<name>.csv`` beside them holding exactly the
plotted numbers (long format, one row per value, ``run_ids`` where a value derives from runs);
every file is written atomically.
"""
from __future__ import annotations

import contextlib
import contextvars
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from hybridmim.atomic import atomic_path, write_text
from hybridmim.report.tables import RUN_ID_SEPARATOR, aggregate, fraction_text, order_inits

# The per-step loss terms the pretraining loop logs (hybridmim.pretrain.train).
LOSS_TERMS = ("train/total", "train/pr", "train/num", "train/loc", "train/con", "train/cl")


# Off while the audit re-builds the report: it compares the figures' data, not their pixels.
_RENDER = contextvars.ContextVar("render_figures", default=True)


@contextlib.contextmanager
def data_only() -> Iterator[None]:
    """Within the block the figure functions write their data CSVs but draw no image."""
    token = _RENDER.set(False)
    try:
        yield
    finally:
        _RENDER.reset(token)


def save_figure(fig: Figure, path: str | Path, data: pd.DataFrame | None = None) -> Path:
    """Write ``path`` (PNG), the same figure as PDF and, given ``data``, its numbers as CSV."""
    path = Path(path)
    if _RENDER.get():
        FigureCanvasAgg(fig)
        for fmt in ("png", "pdf"):
            with atomic_path(path.with_suffix(f".{fmt}"), suffix=f".{fmt}") as tmp:
                # The temporary name ends in .tmp, so the format must be given explicitly.
                fig.savefig(tmp, format=fmt, dpi=120, bbox_inches="tight")
    if data is not None:
        write_text(path.with_suffix(".csv"), data.to_csv(index=False))
    return path


def placeholder(path: str | Path, message: str, columns: list[str]) -> Path:
    """The workflow lists every figure name up front, so a figure without data is still written:
    it says in words what is missing and its CSV has the header only."""
    fig = Figure(figsize=(6, 1.5), layout="constrained")
    ax = fig.add_subplot()
    ax.text(0.5, 0.5, message, ha="center", va="center", fontsize=10, wrap=True)
    ax.axis("off")
    return save_figure(fig, path, pd.DataFrame(columns=columns))


def panels(data: pd.DataFrame, keys: list[str], width: float = 4.4, height: float = 3.4
           ) -> tuple[Figure, list[tuple[tuple, Axes, pd.DataFrame]]]:
    """One panel per group of ``data`` by ``keys``, in first-seen order, at most three a row:
    (key, axes, rows)."""
    groups = list(data.groupby(keys, sort=False, dropna=False))
    cols = max(1, min(3, len(groups)))
    rows = max(1, -(-len(groups) // cols))
    fig = Figure(figsize=(width * cols, height * rows), layout="constrained")
    return fig, [(key, fig.add_subplot(rows, cols, k + 1), part)
                 for k, (key, part) in enumerate(groups)]


def style_panel(ax: Axes, heading: str, grid: str = "both", **legend: str) -> None:
    """The look every panel shares: a small heading, a light grid (on ``grid``), a small legend
    (``legend``: its options)."""
    ax.set_title(heading, fontsize=9)
    ax.grid(axis=grid, alpha=0.3)
    ax.legend(fontsize=7, **legend)


def grouped_bars(ax: Axes, means: pd.DataFrame, stds: pd.DataFrame, capsize: float) -> np.ndarray:
    """One group of bars per row of ``means``, one bar per column (init) with ``stds`` as error
    bars; a single seed has no spread: no error bar rather than a misleading zero-width one."""
    x, width = np.arange(len(means)), 0.8 / len(means.columns)
    for i, init in enumerate(means.columns):
        yerr = None if stds[init].isna().all() else stds[init].fillna(0)
        ax.bar(x + (i - (len(means.columns) - 1) / 2) * width, means[init], width, yerr=yerr,
               capsize=capsize, label=init)
    return x


def _seed_stats(runs: pd.DataFrame, by: list[str], metric: str) -> pd.DataFrame:
    rows = []
    for keys, group in runs.groupby(by, sort=True):
        mean, std, n = aggregate(group[metric].to_list())
        ids = RUN_ID_SEPARATOR.join(group.sort_values("seed")["run_id"]) \
            if "run_id" in group else ""
        rows.append({**dict(zip(by, keys)), "metric": metric, "mean": mean * 100,
                     "std": std * 100, "n": n, "run_ids": ids})
    return pd.DataFrame.from_records(rows)


def plot_dice_by_init(runs: pd.DataFrame, path: str | Path,
                      metric: str = "test_dice_mean") -> Path:
    """Grouped bars: one group per dataset (× backbone), one bar per init, error bar = std."""
    # With several label fractions the bars show the full-label setting (the largest fraction).
    full = runs.loc[runs["fraction"] == runs["fraction"].max()]
    stats = _seed_stats(full, ["dataset", "backbone", "init"], metric)
    inits = order_inits(stats["init"])
    means, stds = (stats.pivot(index=["dataset", "backbone"], columns="init", values=v)
                   .reindex(columns=inits) for v in ("mean", "std"))
    fig = Figure(figsize=(max(5.0, 0.7 * len(means) * len(inits) + 2), 4.0),
                 layout="constrained")
    ax = fig.add_subplot()
    x = grouped_bars(ax, means, stds, capsize=3)
    multi_backbone = stats["backbone"].nunique() > 1
    ax.set_xticks(x, [f"{d}\n{b}" if multi_backbone else d for d, b in means.index])
    ax.set(ylabel="test Dice (%)", ylim=(0, 100))
    ax.set_title(f"Test Dice per initialisation (labels {fraction_text(full['fraction'].max())}, "
                 "error bars: std over seeds)", fontsize=9)
    ax.legend(title="init", fontsize=8, loc="lower right")
    ax.grid(axis="y", alpha=0.3)
    return save_figure(fig, path, stats.assign(fraction=full["fraction"].max(), unit="Dice %"))


def plot_label_efficiency(runs: pd.DataFrame, path: str | Path,
                          metric: str = "test_dice_mean") -> Path:
    """Dice vs label fraction per init, one panel per dataset × backbone, for the inits run at
    two or more label fractions (experiment_tables.label_efficiency_runs)."""
    from hybridmim.report.experiment_tables import label_efficiency_runs

    curves = label_efficiency_runs(runs)
    if curves.empty:
        return placeholder(path, "No dataset was fine-tuned at two or more label fractions.",
                           ["dataset", "backbone", "init", "fraction", "metric", "mean", "std",
                            "n", "run_ids"])
    stats = _seed_stats(curves, ["dataset", "backbone", "init", "fraction"], metric)
    fig, axes = panels(stats, ["dataset", "backbone"], width=4.2)
    for (dataset, backbone), ax, panel in axes:
        for init in order_inits(panel["init"]):
            line = panel.loc[panel["init"] == init].sort_values("fraction")
            ax.errorbar(line["fraction"] * 100, line["mean"], yerr=line["std"].fillna(0),
                        marker="o", capsize=3, label=init)
        ax.set(xscale="log", xlabel="training labels (%)", ylabel="test Dice (%)")
        ticks = sorted(panel["fraction"].unique() * 100)
        ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
        style_panel(ax, f"{dataset} / {backbone}")
    fig.suptitle("Label efficiency (error bars: std over seeds)", fontsize=10)
    return save_figure(fig, path, stats.assign(unit="Dice %"))


def metric_histories(tracking_uri: str, run_id: str,
                     keys: tuple[str, ...] = LOSS_TERMS) -> dict[str, pd.DataFrame]:
    """Per-step history of each key the run logged (step, value), sorted by step."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    logged = client.get_run(run_id).data.metrics
    histories = {}
    for key in keys:
        if key not in logged:
            continue  # a switched-off loss term (ablation) is simply not logged
        points = client.get_metric_history(run_id, key)
        frame = pd.DataFrame({"step": [p.step for p in points], "value": [p.value for p in points]})
        # A resumed run re-logs the steps after its last checkpoint; keep the latest value per step.
        histories[key] = frame.drop_duplicates("step", keep="last").sort_values("step")
    return histories


def plot_pretrain_losses(tracking_uri: str, pretrain_runs: pd.DataFrame | None,
                         path: str | Path) -> Path:
    """One panel per loss term, one line per pretraining run (``label`` column of the frame)."""
    runs = pd.DataFrame() if pretrain_runs is None else pretrain_runs
    points = [frame.assign(run=run["label"], metric=key, run_ids=run["run_id"])
              for _, run in runs.iterrows()
              for key, frame in metric_histories(tracking_uri, run["run_id"]).items()]
    if not points:
        return placeholder(path, "No pretraining loss was logged.",
                           ["run", "metric", "step", "value", "run_ids"])
    data = pd.concat(points, ignore_index=True)[["run", "metric", "step", "value", "run_ids"]]
    # Panels in LOSS_TERMS order (panels keeps first-seen order), lines in run order.
    in_term_order = data.sort_values("metric", key=lambda m: m.map(LOSS_TERMS.index), kind="stable")
    fig, axes = panels(in_term_order, ["metric"], width=4.2, height=3.2)
    for k, ((term,), ax, part) in enumerate(axes):
        for (label, _), line in part.groupby(["run", "run_ids"], sort=False):
            ax.plot(line["step"], line["value"], label=label, linewidth=1)
        if (part["value"] > 0).all():
            ax.set_yscale("log")
        ax.set_title(term, fontsize=9)
        ax.set(xlabel="step", ylabel="loss (unitless)")
        ax.grid(alpha=0.3)
        if k == 0:
            ax.legend(fontsize=7)
    fig.suptitle("Pretraining losses (MLflow metric history)", fontsize=10)
    return save_figure(fig, path, data)
