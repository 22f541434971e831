"""The paper's other claims as tables: ablations, pretraining cost, label efficiency, and paired
per-case differences with bootstrap confidence intervals.

Each builder is a function of the MLflow runs (the frames of hybridmim.report.collect and the
per-case Dice of the evaluate runs' ``per_case.csv`` artifacts) → one long DataFrame → the shared
CSV/Markdown/LaTeX writer (tables.write_table); ``build_report`` calls them all, so the audit
re-derives these files exactly as it does the comparison table.

Statistics: docs/method.md ("Ablations and statistics in the report"); paired_table's note says
them in the table itself.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from hybridmim.report.tables import (RUN_ID_SEPARATOR, aggregate, format_cells, fraction_text,
                                     note_view, order_inits, summarise, wide_view, write_table)

BOOTSTRAP_RESAMPLES = 10_000
BOOTSTRAP_SEED = 0
MIN_CASES = 10
COST_METRICS = {  # MLflow metric of the pretraining run → (column heading, decimals)
    "cost/median_step_s": ("median s/step", 4),
    "cost/crops_per_s": ("crops/s", 2),
    "cost/total_s": ("total time (s)", 1),
    "cost/peak_mem_mb": ("peak memory (MiB)", 1),
}
RATIO_METRIC = "cost/step_ratio_vs_simmim"
BASELINE_KIND = "simmim"


def _num(value: Any, decimals: int = 2, signed: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:+.{decimals}f}" if signed else f"{value:.{decimals}f}"


def _intervals(long: pd.DataFrame) -> list[str]:
    """'[low, high]' of each row's confidence interval, in signed percentage points."""
    return [f"[{_num(lo, signed=True)}, {_num(hi, signed=True)}]"
            for lo, hi in zip(long["ci_low"], long["ci_high"])]


def per_case_dice(tracking_uri: str, runs: pd.DataFrame) -> pd.DataFrame:
    """(run_id, case, dice): each evaluate run's per-case Dice (mean over the case's classes,
    undefined classes skipped), read from the run's ``per_case.csv`` artifact in MLflow."""
    import tempfile

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    frames = []
    with tempfile.TemporaryDirectory() as tmp:
        for run_id in runs["run_id"]:
            if "per_case.csv" not in {a.path for a in client.list_artifacts(run_id)}:
                continue  # no per-case scores: the run takes part in no paired comparison
            path = client.download_artifacts(run_id, "per_case.csv", f"{tmp}/{run_id}")
            table = pd.read_csv(path)
            dice = table[[c for c in table.columns if c.startswith("dice_")]]
            frames.append(pd.DataFrame({"run_id": run_id, "case": table["case"].astype(str),
                                        "dice": dice.mean(axis=1, skipna=True)}))
    if not frames:
        return pd.DataFrame(columns=["run_id", "case", "dice"])
    return pd.concat(frames, ignore_index=True)


def paired_bootstrap(differences: np.ndarray) -> tuple[float, float, float]:
    """Mean of per-case differences and its 95% percentile bootstrap interval (seeded)."""
    differences = np.asarray(differences, float)
    if differences.size == 0:
        return math.nan, math.nan, math.nan
    rng = np.random.default_rng(BOOTSTRAP_SEED)
    index = rng.integers(0, differences.size, size=(BOOTSTRAP_RESAMPLES, differences.size))
    means = differences[index].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(differences.mean()), float(low), float(high)


def paired_difference(runs: pd.DataFrame, cases: pd.DataFrame, a: str, b: str
                      ) -> dict[str, Any] | None:
    """A vs B on the runs of one cell (same dataset, backbone, fraction): paired by seed and
    case, as paired_table's note says."""
    keyed = cases.merge(runs[["run_id", "init", "seed"]], on="run_id")
    left = keyed.loc[keyed["init"] == a]
    right = keyed.loc[keyed["init"] == b]
    pairs = left.merge(right, on=["seed", "case"], suffixes=("_a", "_b")).dropna(
        subset=["dice_a", "dice_b"])
    if pairs.empty:
        return None
    per_case = (pairs.assign(diff=pairs["dice_a"] - pairs["dice_b"])
                .groupby("case", sort=True)["diff"].mean())
    mean, low, high = paired_bootstrap(per_case.to_numpy())
    n_cases, n_seeds = int(per_case.size), int(pairs["seed"].nunique())
    small = n_seeds == 1 and n_cases < MIN_CASES
    excludes = bool(low > 0 or high < 0)
    if small:
        note = f"{n_seeds} seed, {n_cases} cases: too few to judge"
    else:
        note = "95% CI excludes 0" if excludes else "95% CI includes 0"
    return {"diff": mean * 100, "ci_low": low * 100, "ci_high": high * 100,
            "n_cases": n_cases, "n_seeds": n_seeds, "excludes_zero": excludes and not small,
            "note": note, "a_run_ids": sorted(set(pairs["run_id_a"])),
            "b_run_ids": sorted(set(pairs["run_id_b"]))}


def _variant_columns(runs: pd.DataFrame) -> pd.DataFrame:
    """init → (base, changes, pretrained_as) for the ablation variants among the runs."""
    cols = {"params.variant.of": "base", "params.variant.changes": "changes",
            "params.variant.pretrained_as": "pretrained_as"}
    if "params.variant.of" not in runs.columns:
        return pd.DataFrame(columns=["init", *cols.values()])
    found = runs.loc[runs["params.variant.of"].notna(), ["init", *[c for c in cols
                                                                   if c in runs.columns]]]
    return found.rename(columns=cols).drop_duplicates("init")


def comparisons(runs: pd.DataFrame) -> list[tuple[str, str, str]]:
    """(kind, a, b) pairs to compare: each pretrained init vs scratch, each variant vs base."""
    inits = set(runs["init"])
    variants = _variant_columns(runs)
    pairs = [("pretrained vs scratch", init, "scratch") for init in order_inits(inits)
             if init != "scratch" and "scratch" in inits and init not in set(variants["init"])]
    pairs += [("variant vs base", row["init"], row["base"]) for _, row in variants.iterrows()
              if row["base"] in inits]
    return pairs


def paired_table(runs: pd.DataFrame, cases: pd.DataFrame, tables_dir: Path
                 ) -> tuple[pd.DataFrame, dict[str, Path]]:
    rows = []
    for (dataset, backbone, fraction), part in runs.groupby(["dataset", "backbone", "fraction"],
                                                            sort=True):
        for kind, a, b in comparisons(part):
            result = paired_difference(part, cases, a, b)
            if result is None:
                continue
            # mean/std/n/run_ids describe A's runs (test_dice_mean, traceable like every table
            # row); the paired difference to B and its interval are the extra columns.
            a_runs = part.loc[part["run_id"].isin(result["a_run_ids"])]
            mean, std, n = aggregate(a_runs["test_dice_mean"].to_list())
            # The columns below pick the difference, interval, counts and note from ``result``.
            rows.append({"dataset": dataset, "backbone": backbone, "fraction": fraction,
                         "kind": kind, "a": a, "b": b, "metric": "test_dice_mean",
                         "scale": 100.0, "mean": mean * 100, "std": std * 100, "n": n, **result,
                         "run_ids": RUN_ID_SEPARATOR.join(a_runs.sort_values("seed")["run_id"]),
                         "b_run_ids": RUN_ID_SEPARATOR.join(result["b_run_ids"]),
                         "cell": f"{dataset} / {backbone} / frac {fraction:g} / {a} - {b}"})
    long = pd.DataFrame.from_records(rows, columns=[
        "dataset", "backbone", "fraction", "kind", "a", "b", "metric", "scale", "mean", "std",
        "n", "diff", "ci_low", "ci_high", "n_cases", "n_seeds", "excludes_zero", "note",
        "run_ids", "b_run_ids", "cell"])

    view = note_view("no pretrained-vs-scratch or variant-vs-base pair in this grid") \
        if long.empty else pd.DataFrame({
            "dataset": long["dataset"], "backbone": long["backbone"],
            "labels": long["fraction"].map(fraction_text),
            "comparison": [f"{a} − {b}" for a, b in zip(long["a"], long["b"])],
            "A: Dice (%)": format_cells(long),
            "Δ Dice (pp)": [_num(m, signed=True) + (" *" if e else "")
                            for m, e in zip(long["diff"], long["excludes_zero"])],
            "95% CI": _intervals(long),
            "cases × seeds": [f"{c} × {s}" for c, s in zip(long["n_cases"], long["n_seeds"])],
            "note": long["note"],
        }).set_index("dataset")
    note = ("Paired difference of test Dice (percentage points) between two inits over the same "
            "test cases: per case, Dice (mean over classes) under A minus under B, averaged over "
            f"the seeds both ran; mean over cases with a 95% percentile bootstrap interval over "
            f"cases ({BOOTSTRAP_RESAMPLES} resamples, numpy default_rng seed {BOOTSTRAP_SEED}). "
            f"* = interval excludes 0; cells with one seed and fewer than {MIN_CASES} cases say "
            "so and are never marked.")
    return long, write_table(long, {"Paired differences": view}, tables_dir / "paired_differences",
                             "Pretrained vs scratch and variant vs base: paired bootstrap", note)


def pretrain_cost_long(pretrain_runs: pd.DataFrame | None) -> pd.DataFrame:
    """One row per (pretraining run, cost metric), plus its median s/step ratio to the SimMIM-style
    run on the same backbone, corpus and device."""
    columns = ["backbone", "corpus", "method", "kind", "device", "metric", "scale", "mean", "std",
               "n", "ratio_vs_simmim", "simmim_run_id", "run_ids", "cell"]
    if pretrain_runs is None or pretrain_runs.empty:
        return pd.DataFrame(columns=columns)

    def tag(name: str) -> pd.Series:  # "" where the runs lack the tag
        return pretrain_runs.get(f"tags.{name}", pd.Series("", index=pretrain_runs.index))

    ident = pd.DataFrame({"backbone": tag("snakemake.wildcard.backbone"),
                          "corpus": tag("snakemake.wildcard.corpus"),
                          "method": tag("snakemake.wildcard.method"),
                          "kind": tag("method.kind").fillna(""), "device": tag("device").fillna(""),
                          "run_ids": pretrain_runs["run_id"]})
    # Run by run, its metrics in COST_METRICS order; a metric the run did not log has no row.
    long = pd.concat([ident.assign(metric=metric, mean=pretrain_runs.get(f"metrics.{metric}",
                                                                         math.nan))
                      for metric in COST_METRICS]).sort_index(kind="stable").dropna(subset=["mean"])
    # Each metric row carries its ratio to the SimMIM-style run of the same backbone, corpus and
    # device (the table's rows stay one MLflow metric of one run each, like every table's).
    keys = ["backbone", "corpus", "device", "metric"]
    baseline = long.loc[long["kind"] == BASELINE_KIND].drop_duplicates(keys)
    long = long.merge(baseline[[*keys, "mean", "run_ids"]], on=keys, how="left",
                      suffixes=("", "_simmim"))
    long = long.assign(scale=1.0, std=math.nan, n=1,
                       ratio_vs_simmim=long["mean"] / long["mean_simmim"],
                       simmim_run_id=long["run_ids_simmim"].fillna(""),
                       cell=[f"{b} / {c} / {m} / {metric}" for b, c, m, metric in
                             zip(long["backbone"], long["corpus"], long["method"], long["metric"])])
    return long[columns].sort_values(["backbone", "corpus", "method", "metric"], ignore_index=True)


def pretrain_cost_table(pretrain_runs: pd.DataFrame | None, tables_dir: Path
                        ) -> tuple[pd.DataFrame, dict[str, Path]]:
    long = pretrain_cost_long(pretrain_runs)
    headings = {**COST_METRICS, RATIO_METRIC: ("s/step ÷ SimMIM-style", 2)}
    steps = long.loc[long["metric"] == "cost/median_step_s"]
    shown = pd.concat([long, steps.assign(metric=RATIO_METRIC, mean=steps["ratio_vs_simmim"])])

    if long.empty:
        view = note_view("no pretraining runs in this grid")
    else:
        # Every (run, metric) row has a value; an all-NaN ratio column is re-added by reindex.
        wide = shown.dropna(subset=["mean"]).pivot_table(
            index=["backbone", "corpus", "method", "device"], columns="metric", values="mean",
            aggfunc="first", sort=True).reindex(columns=list(headings))
        view = pd.DataFrame({heading: wide[metric].map(lambda v, d=decimals: _num(v, d))
                             for metric, (heading, decimals) in headings.items()})
    note = ("Measured inside each pretraining run (hybridmim/pretrain/cost.py): median wall time "
            "per training step excluding each process's first step and validation passes; "
            "crops per second at that median; total job time incl. start-up and validation; "
            "peak memory = CUDA max allocated on a GPU, growth of the peak resident set size on "
            "the CPU; ratio = median s/step over the SimMIM-style run's on the same backbone, "
            "corpus and device (n/a without one). On a shared machine the times are noisy.")
    return long, write_table(long, {"Pretraining cost": view}, tables_dir / "pretrain_cost",
                             "Pretraining cost per method", note)


def ablation_table(runs: pd.DataFrame, paired_long: pd.DataFrame, cost_long: pd.DataFrame,
                   tables_dir: Path) -> tuple[pd.DataFrame, dict[str, Path]]:
    """Each variant's Dice next to its base (same dataset, backbone, fraction) with the
    difference, its paired 95% CI (the variant-vs-base row of ``paired_long``, paired_table's
    frame), and the variant's pretraining s/step relative to the base's."""
    cell = ["dataset", "backbone", "fraction"]
    summary = summarise(runs, ["test_dice_mean"], [*cell, "init"])
    base = summary[[*cell, "init", "mean", "std", "n", "run_ids"]].rename(
        columns=lambda c: c if c in cell else "base" if c == "init" else f"base_{c}")
    paired = paired_long.rename(columns={"a": "init", "b": "base", "note": "ci_note"})
    paired = paired[[*cell, "init", "base", "ci_low", "ci_high", "ci_note"]].astype(
        {"fraction": float, "ci_low": float, "ci_high": float})  # object when there is no pair
    # The variants in order of appearance, each cell of a variant beside its base's same cell.
    long = (_variant_columns(runs).merge(summary, on="init").merge(base, on=[*cell, "base"])
            .merge(paired, on=[*cell, "init", "base"], how="left"))
    steps = cost_long.loc[cost_long["metric"] == "cost/median_step_s"]
    corpus_of = _corpus_by_run(runs)
    costs = [_cost_ratio(row, steps, corpus_of.get((row["dataset"], row["init"])))
             for _, row in long.iterrows()]
    long = long.assign(
        metric="test_dice_mean", scale=100.0, diff=long["mean"] - long["base_mean"],
        ci_note=long["ci_note"].fillna("no paired cases"),
        cost_ratio=[ratio for ratio, _ in costs], cost_run_ids=[ids for _, ids in costs],
        cell=[f"{d} / {b} / frac {f:g} / {i}" for d, b, f, i in
              zip(long["dataset"], long["backbone"], long["fraction"], long["init"])],
    )[["dataset", "backbone", "fraction", "init", "base", "changes", "metric", "scale", "mean",
       "std", "n", "base_mean", "base_std", "base_n", "diff", "ci_low", "ci_high", "ci_note",
       "cost_ratio", "cost_run_ids", "run_ids", "base_run_ids", "cell"]]

    views = {f"{dataset} / {backbone}": pd.DataFrame({
        "variant": part["init"], "changes": part["changes"],
        "labels": part["fraction"].map(fraction_text), "Dice (%)": format_cells(part),
        "base Dice (%)": [f"{b}: {cell}" for b, cell in
                          zip(part["base"], format_cells(part, prefix="base_"))],
        "Δ (pp)": part["diff"].map(lambda v: _num(v, signed=True)),
        "paired 95% CI": _intervals(part),
        "pretrain s/step ÷ base": part["cost_ratio"].map(lambda v: _num(v, 2)),
        "note": part["ci_note"],
    }).set_index("variant") for (dataset, backbone), part in long.groupby(["dataset", "backbone"],
                                                                           sort=True)}
    if long.empty:
        views = {"Ablations": note_view("no ablation variants in this grid")}
    note = ("Each ablation variant of a base method (pretraining.variants) next to its base on "
            "the same dataset, backbone and label fraction: test Dice mean ± std over seeds, "
            "difference in percentage points, paired 95% bootstrap CI over test cases (see "
            "paired_differences), and the variant's median pretraining s/step relative to the "
            "base's (1.00 when the variant reused the base's pretraining).")
    return long, write_table(long, views, tables_dir / "ablations",
                             "Ablations of HybridMIM", note)


def _cost_ratio(variant: pd.Series, steps: pd.DataFrame, corpus: str | None
                ) -> tuple[float, str]:
    """The variant's median pretraining s/step over its base's (same backbone and corpus) and
    the ids of the two pretraining runs; (nan, "") unless both were measured."""
    pick = steps.loc[(steps["backbone"] == variant["backbone"]) & (steps["corpus"] == corpus)]
    mine = pick.loc[pick["method"] == variant.get("pretrained_as", variant["init"])]
    base = pick.loc[pick["method"] == variant["base"]]
    if corpus is None or mine.empty or base.empty:
        return math.nan, ""
    return (float(mine["mean"].iloc[0] / base["mean"].iloc[0]),
            RUN_ID_SEPARATOR.join(dict.fromkeys([mine["run_ids"].iloc[0],
                                                 base["run_ids"].iloc[0]])))


def _corpus_by_run(runs: pd.DataFrame) -> dict[tuple[str, str], str]:
    """(dataset, init) → the pretraining corpus of a variant's runs (their ``variant.corpus``)."""
    if "params.variant.corpus" not in runs.columns:
        return {}
    named = runs.loc[runs["params.variant.corpus"].map(lambda c: isinstance(c, str) and c != "")]
    return dict(zip(zip(named["dataset"], named["init"]), named["params.variant.corpus"]))


def label_efficiency_runs(runs: pd.DataFrame) -> pd.DataFrame:
    """The runs that make label-efficiency curves: inits run at ≥ 2 label fractions on their
    dataset × backbone (an ablation at one fraction is no curve)."""
    curves = runs.groupby(["dataset", "backbone", "init"])["fraction"].transform("nunique")
    return runs.loc[curves >= 2]


def label_efficiency_table(runs: pd.DataFrame, tables_dir: Path
                           ) -> tuple[pd.DataFrame, dict[str, Path]]:
    """Test Dice per label fraction and init, for each dataset × backbone run at ≥ 2 fractions."""
    long = summarise(label_efficiency_runs(runs), ["test_dice_mean"],
                     ["dataset", "backbone", "fraction", "init"])
    views = {"Label efficiency": note_view(
        "no dataset was fine-tuned at two or more label fractions")} if long.empty else {
        "Test Dice (%) by label fraction": wide_view(long, ["dataset", "backbone", "fraction"],
                                                     "init", order_inits(long["init"]))}
    note = ("Test Dice (%) against the fraction of training labels, mean ± sample std over "
            "seeds (n = seeds), for each dataset and backbone fine-tuned at two or more "
            "fractions; columns are the encoder initialisations.")
    return long, write_table(long, views, tables_dir / "label_efficiency",
                             "Label efficiency", note)
