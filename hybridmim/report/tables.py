"""Comparison tables from the collected evaluate runs: CSV (traceable) + Markdown + LaTeX.

Every CSV is "long": one row per reported number with the columns the audit re-derives it from —
``metric`` (MLflow metric name), ``scale`` (display factor: Dice is shown in %), ``mean``, ``std``
(sample std over seeds, ddof=1; empty with one seed), ``n`` (seeds with a value) and ``run_ids``
(";"-joined MLflow run ids of the cell). Markdown and LaTeX are the wide, human-facing views.
"""
from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd
import yaml

from hybridmim.atomic import write_text
from hybridmim.report.collect import ReportInputError

AUDITED_COLUMNS = ("cell", "metric", "scale", "mean", "std", "n", "run_ids")
SUMMARY_METRICS = ("test_dice_mean", "test_hd95_mean")
# Known inits first, in the order a reader expects; anything else follows alphabetically.
INIT_ORDER = ("scratch", "hybridmim", "simmim")
RUN_ID_SEPARATOR = ";"


def metric_unit(metric: str) -> tuple[float, str]:
    """Display scale and unit of an MLflow metric name."""
    if metric.startswith("test_dice_"):
        return 100.0, "Dice %"
    if metric.startswith("test_hd95_"):
        return 1.0, "HD95 mm"
    return 1.0, ""


def aggregate(values: Iterable[float]) -> tuple[float, float, int]:
    """Mean, sample std (ddof=1) and count over seeds; NaN values (not computed) are skipped.

    The audit re-derives every table number through this same definition.
    """
    defined = np.array([v for v in values if v is not None and not math.isnan(v)], float)
    n = int(defined.size)
    if n == 0:
        return math.nan, math.nan, 0
    mean = float(defined.mean())
    std = float(defined.std(ddof=1)) if n > 1 and np.isfinite(defined).all() else math.nan
    return mean, std, n


def order_inits(inits: Iterable[str]) -> list[str]:
    inits = set(inits)
    known = [name for name in INIT_ORDER if name in inits]
    return known + sorted(inits - set(known))


def summarise(runs: pd.DataFrame, metrics: Sequence[str], by: Sequence[str]) -> pd.DataFrame:
    """One long row per (group, metric): mean/std/n over seeds and the run ids behind them."""
    rows = []
    for keys, group in runs.groupby(list(by), sort=True):
        ident = dict(zip(by, keys))
        for metric in metrics:
            if metric not in group.columns:
                continue
            scale, unit = metric_unit(metric)
            with_value = group.loc[group[metric].notna()]
            if with_value.empty:
                continue
            mean, std, n = aggregate(with_value[metric].to_list())
            rows.append({**ident, "metric": metric, "unit": unit, "scale": scale,
                         "mean": mean * scale, "std": std * scale, "n": n,
                         "seeds": RUN_ID_SEPARATOR.join(str(s) for s in sorted(with_value["seed"])),
                         "run_ids": RUN_ID_SEPARATOR.join(with_value.sort_values("seed")["run_id"]),
                         "cell": " / ".join(f"frac {v:g}" if k == "fraction" else str(v)
                                            for k, v in ident.items()) + f" / {metric}"})
    return pd.DataFrame.from_records(rows, columns=[*by, "metric", "unit", "scale", "mean", "std",
                                                    "n", "seeds", "run_ids", "cell"])


def fraction_text(fraction: float) -> str:
    return f"{fraction * 100:.3g}%"


def format_cell(mean: float, std: float, n: int) -> str:
    if n == 0 or mean is None or math.isnan(mean):
        return "n/a"
    text = f"{mean:.2f}"
    if not math.isnan(std):
        text += f" ± {std:.2f}"
    return f"{text} (n={n})"


def format_cells(long: pd.DataFrame, prefix: str = "") -> list[str]:
    """'mean ± std (n=…)' of every row, from its columns ``<prefix>mean``, ``std`` and ``n``."""
    return [format_cell(m, s, n) for m, s, n in
            zip(long[f"{prefix}mean"], long[f"{prefix}std"], long[f"{prefix}n"])]


def escape_latex(text: str) -> str:
    return re.sub(r"([_%&#$\{\}])", r"\\\1", str(text))


def note_view(message: str) -> pd.DataFrame:
    """The rendered view of a table without rows: one line that says why."""
    return pd.DataFrame({"note": [message]}).set_index("note")


def wide_view(long: pd.DataFrame, index: list[str], columns: str,
              column_order: list[str] | None = None) -> pd.DataFrame:
    """Pivot long rows into a rendered table: one formatted 'mean ± std (n)' string per cell."""
    wide = long.assign(text=format_cells(long)).pivot_table(
        index=index, columns=columns, values="text", aggfunc="first", sort=True).fillna("n/a")
    wide = wide.reindex(columns=column_order or sorted(wide.columns), fill_value="n/a")
    if "fraction" in index:  # sorted as numbers above, shown as percentages
        wide = wide.rename(index=fraction_text, level="fraction")
    wide.columns.name = None
    return wide


def latex_view(view: pd.DataFrame) -> pd.DataFrame:
    """The LaTeX twin of a rendered view: every cell, index label and column name escaped (a raw
    "%" in a heading would comment out the rest of its row), ± typeset."""
    latex = view.map(lambda text: escape_latex(text).replace(" ± ", r" $\pm$ "))
    return latex.rename(index=escape_latex, columns=escape_latex)


def write_table(long: pd.DataFrame, views: dict[str, pd.DataFrame], base: Path, title: str,
                note: str, caption_prefix: str = "") -> dict[str, Path]:
    """Atomically write ``base``.csv (long, audited), .md and .tex (one section per view;
    ``caption_prefix`` goes before each LaTeX caption)."""
    csv_path, md_path, tex_path = (base.with_suffix(s) for s in (".csv", ".md", ".tex"))
    write_text(csv_path, long.to_csv(index=False))
    md = [f"# {title}", "", note, "", f"Run ids per cell: `{csv_path.name}`.", ""]
    tex = [f"% {title}. {note}", f"% Run ids per cell: {csv_path.name}"]
    for heading, view in views.items():
        md += [f"## {heading}", "", view.reset_index().to_markdown(index=False), ""]
        caption = caption_prefix + heading
        tex += [f"% {caption}", latex_view(view).to_latex(
            escape=False, caption=escape_latex(caption))]
    write_text(md_path, "\n".join(md))
    write_text(tex_path, "\n".join(tex))
    return {"csv": csv_path, "md": md_path, "tex": tex_path}


def comparison_table(runs: pd.DataFrame, tables_dir: Path) -> tuple[pd.DataFrame, dict[str, Path]]:
    multi_fraction = runs["fraction"].nunique() > 1
    by = ["dataset", "backbone", "fraction", "init"]
    long = summarise(runs, SUMMARY_METRICS, by)
    index = ["dataset", "backbone", "fraction"] if multi_fraction else ["dataset", "backbone"]
    inits = order_inits(runs["init"])
    views = {heading: wide_view(long.loc[long["metric"] == metric], index, "init", inits)
             for metric, heading in (("test_dice_mean", "Mean Dice (%)"),
                                     ("test_hd95_mean", "Mean HD95 (mm)"))
             if (long["metric"] == metric).any()}
    note = ("Test split; mean ± sample standard deviation over seeds (n = seeds); columns are the "
            "encoder initialisations.")
    return long, write_table(long, views, tables_dir / "comparison",
                             "Segmentation results per initialisation", note)


def per_class_tables(runs: pd.DataFrame, tables_dir: Path) -> dict[str, dict[str, Path]]:
    written = {}
    multi_fraction = runs["fraction"].nunique() > 1
    for dataset, part in runs.groupby("dataset", sort=True):
        classes = _classes_in_order(part)
        metrics = [f"test_dice_{key}" for key in classes] + ["test_dice_mean"]
        long = summarise(part, metrics, ["dataset", "backbone", "fraction", "init"])
        names = {f"test_dice_{key}": name for key, name in classes.items()}
        long = long.assign(**{"class": long["metric"].map(lambda m: names.get(m, "mean"))})
        index = ["backbone", "init"] + (["fraction"] if multi_fraction else [])
        view = wide_view(long, index, "class", list(classes.values()) + ["mean"])
        note = (f"{dataset}, test split: Dice (%) per class, mean ± sample standard deviation over "
                "seeds (n = seeds); 'mean' is the runs' mean over classes.")
        written[str(dataset)] = write_table(
            long, {"Dice per class (%)": view}, tables_dir / f"per_class_{safe_name(dataset)}",
            f"Per-class Dice — {dataset}", note,
            caption_prefix=f"{dataset}: ")
    return written


def safe_name(text: str) -> str:
    """``text`` as part of a file name."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", str(text))


def _classes_in_order(runs: pd.DataFrame) -> dict[str, str]:
    """{metric key: class name} over the runs, in first-seen order."""
    classes: dict[str, str] = {}
    for of_run in runs["classes"]:
        for key, name in of_run.items():
            classes.setdefault(key, name)
    return classes


def load_paper_results(path: str | os.PathLike) -> dict[str, list[dict[str, Any]]]:
    """Read and validate config/paper_results.yaml (see the file's header for the format)."""
    path = Path(path)
    if not path.is_file():
        raise ReportInputError(f"{path} does not exist; it lists the paper's reported numbers "
                               "(empty cells allowed) and the public reference anchors")
    data = yaml.safe_load(path.read_text()) or {}
    out = {"paper": list(data.get("paper") or []), "references": list(data.get("references") or [])}
    for section, required in (("paper", ("dataset", "backbone", "init", "fraction", "value",
                                         "table")),
                              ("references", ("dataset", "backbone", "init", "label", "fraction",
                                              "value", "source", "split", "setting"))):
        for i, entry in enumerate(out[section]):
            where = f"{path}: {section}[{i}]"
            absent = [key for key in required if key not in entry]
            if absent:
                raise ReportInputError(f"{where} lacks {', '.join(absent)}")
            value = entry["value"]
            if value is not None and not (isinstance(value, (int, float)) and 0 <= value <= 100):
                raise ReportInputError(f"{where}.value must be a Dice in % (0-100) or null, "
                                       f"got {value!r}")
            if section == "paper" and value is not None and not entry.get("table"):
                raise ReportInputError(f"{where}: a paper value needs 'table' (which table of the "
                                       "paper it comes from); enter both or leave value null")
            if section == "references" and value is None:
                raise ReportInputError(f"{where}.value is null; a reference needs its number")
            if section == "references" and "hybridmim" in str(entry["label"]).lower():
                raise ReportInputError(f"{where}.label is {entry['label']!r}: a public reference "
                                       "is labelled with what it is (e.g. 'SSL (Tang et al.)'), "
                                       "never with our method's name")
    return out


def paper_table(comparison_long: pd.DataFrame, paper_results: dict[str, list[dict[str, Any]]],
                tables_dir: Path) -> tuple[pd.DataFrame, dict[str, Path]]:
    """Reported numbers next to our matching cell (same dataset, backbone, init, label fraction)."""
    ours = comparison_long.loc[comparison_long["metric"] == "test_dice_mean"]
    rows = []
    for kind, entries in (("HybridMIM paper", paper_results["paper"]),
                          ("public reference (not the paper)", paper_results["references"])):
        for entry in entries:
            match = ours.loc[(ours["dataset"] == entry["dataset"])
                             & (ours["backbone"] == entry["backbone"])
                             & (ours["init"] == entry["init"])
                             & np.isclose(ours["fraction"].astype(float), float(entry["fraction"]))]
            hit = match.iloc[0] if len(match) else {"mean": math.nan, "std": math.nan, "n": 0,
                                                     "run_ids": ""}
            what = (f"{entry['table']}" if kind == "HybridMIM paper" and entry.get("table")
                    else entry.get("setting", ""))
            rows.append({
                "kind": kind, "dataset": entry["dataset"], "backbone": entry["backbone"],
                "label": (f"HybridMIM paper: {entry['init']}" if kind == "HybridMIM paper"
                          else str(entry["label"])),
                "init": entry["init"], "fraction": float(entry["fraction"]),
                "reported": math.nan if entry["value"] is None else float(entry["value"]),
                "reported_source": entry.get("source") or ("" if entry["value"] is None
                                                           else "HybridMIM paper"),
                "reported_table": entry.get("table") or "", "split": entry.get("split", ""),
                "setting": what,
                "metric": "test_dice_mean", "scale": 100.0,
                "mean": hit["mean"], "std": hit["std"], "n": int(hit["n"]),
                "run_ids": hit["run_ids"],
                "cell": f"{kind}: {entry['dataset']} / {entry['backbone']} / {entry['init']} / "
                        f"frac {float(entry['fraction']):g}"})
    long = pd.DataFrame.from_records(rows, columns=[
        "kind", "dataset", "backbone", "label", "init", "fraction", "reported", "reported_source",
        "reported_table", "split", "setting", "metric", "scale", "mean", "std", "n", "run_ids",
        "cell"])

    view = pd.DataFrame({
        "kind": long["kind"], "dataset": long["dataset"], "backbone": long["backbone"],
        "reported for": long["label"], "labels": long["fraction"].map(fraction_text),
        "reported Dice (%)": long["reported"].map(lambda v: "n/a" if math.isnan(v) else f"{v:.2f}"),
        "source / table": [" ".join(filter(None, (s, t))) or "n/a" for s, t in
                           zip(long["reported_source"], long["reported_table"])],
        "split, setting": [", ".join(filter(None, (s, t))) for s, t in
                           zip(long["split"], long["setting"])],
        "ours: init": long["init"], "ours (test)": format_cells(long),
    }).set_index("kind")
    note = ("The HybridMIM paper's cells stay n/a until entered from the paper (with its table) in "
            "config/paper_results.yaml. Public reference rows are sanity anchors from other "
            "sources, settings and splits (often validation, not test) — not the paper's numbers. "
            "'ours' is our mean Dice ± std over seeds on our test split.")
    return long, write_table(long, {"Reported vs ours": view}, tables_dir / "paper_vs_ours",
                             "HybridMIM paper and public references vs this reproduction", note)
