"""Tables and figures from MLflow, and the audit that re-verifies every reported number.

``build_report`` backs the CLI's ``report`` sub-command; ``hybridmim.report.audit.main`` backs
``audit`` (imported from its module: it needs torch to read model files).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Iterable

from hybridmim.report.collect import ReportInputError, collect_pretrain_runs, collect_runs
from hybridmim.resources import PAPER_RESULTS

log = logging.getLogger(__name__)

REPORT_INPUTS = "report_inputs.json"
DEFAULT_PAPER_RESULTS = PAPER_RESULTS  # config/paper_results.yaml, shipped inside the package


def build_report(tracking_uri: str, metrics_files: Iterable[str | os.PathLike],
                 pretrain_metrics_files: Iterable[str | os.PathLike],
                 out_dir: str | os.PathLike,
                 paper_results: str | os.PathLike | None = None) -> dict[str, Path]:
    """Write ``out_dir``/tables/* and ``out_dir``/figures/*; return {name: path} of every file.

    ``metrics_files``: the evaluate jobs' metrics.json (their run ids select the MLflow runs).
    ``pretrain_metrics_files``: the pretraining jobs' metrics.json (loss curves; may be empty).
    ``paper_results``: defaults to config/paper_results.yaml of this checkout.
    The inputs are recorded in ``out_dir``/report_inputs.json: the audit rebuilds the report from
    them (contract 3).
    """
    from hybridmim.report.figures import write_figures
    from hybridmim.report.tables import (comparison_table, load_paper_results, paper_table,
                                         per_class_tables)

    out_dir, metrics_files = Path(out_dir), list(metrics_files)
    tables_dir, figures_dir = out_dir / "tables", out_dir / "figures"
    paper = load_paper_results(paper_results or DEFAULT_PAPER_RESULTS)
    runs = collect_runs(tracking_uri, metrics_files)
    log.info("report: %d evaluate runs from %s", len(runs), tracking_uri)
    pretrain_files = list(pretrain_metrics_files)
    pretrain_runs = collect_pretrain_runs(tracking_uri, pretrain_files) if pretrain_files else None

    written: dict[str, Path] = {}
    comparison_long, paths = comparison_table(runs, tables_dir)
    written.update({f"comparison.{k}": p for k, p in paths.items()})
    for dataset, paths in per_class_tables(runs, tables_dir).items():
        written.update({f"per_class_{dataset}.{k}": p for k, p in paths.items()})
    _, paths = paper_table(comparison_long, paper, tables_dir)
    written.update({f"paper_vs_ours.{k}": p for k, p in paths.items()})
    written.update(write_figures(tracking_uri, runs, pretrain_runs, figures_dir))
    written.update(write_experiments(tracking_uri, runs, pretrain_runs, tables_dir, figures_dir))
    written["report_inputs"] = write_report_inputs(
        out_dir, tracking_uri, metrics_files, pretrain_files,
        paper_results or DEFAULT_PAPER_RESULTS)
    for name, path in written.items():
        log.info("report: wrote %s (%s)", path, name)
    return written


def write_experiments(tracking_uri: str, runs, pretrain_runs, tables_dir: Path,
                      figures_dir: Path) -> dict[str, Path]:
    """The ablation, cost, label-efficiency and paired-statistics tables and their figures,
    the fine-tuning curves, per-class bars and one overlay gallery per dataset."""
    from hybridmim.report import experiments as ex, plots

    # Artifacts (per-case scores, overlays) are downloaded one by one: no progress bar each.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    written: dict[str, Path] = {}
    cases = ex.per_case_dice(tracking_uri, runs)
    cost_long, paths = ex.pretrain_cost_table(pretrain_runs, tables_dir)
    written.update({f"pretrain_cost.{k}": p for k, p in paths.items()})
    ablation_long, paths = ex.ablation_table(runs, cases, cost_long, tables_dir)
    written.update({f"ablations.{k}": p for k, p in paths.items()})
    _, paths = ex.label_efficiency_table(runs, tables_dir)
    written.update({f"label_efficiency.{k}": p for k, p in paths.items()})
    _, paths = ex.paired_table(runs, cases, tables_dir)
    written.update({f"paired_differences.{k}": p for k, p in paths.items()})
    written["ablations_figure"] = plots.plot_ablations(ablation_long, figures_dir / "ablations.png")
    written["time_to_quality"] = plots.plot_time_to_quality(tracking_uri, pretrain_runs,
                                                            figures_dir / "time_to_quality.png")
    written["finetune_curves"] = plots.plot_finetune_curves(tracking_uri, runs,
                                                            figures_dir / "finetune_curves.png")
    written["per_class_dice"] = plots.plot_per_class(runs, figures_dir / "per_class_dice.png")
    for dataset in sorted(runs["dataset"].unique()):
        written[f"gallery_{dataset}"] = plots.plot_gallery(
            tracking_uri, runs, dataset, figures_dir / f"gallery_{ex.safe_name(dataset)}.png")
    return written


def write_report_inputs(out_dir: Path, tracking_uri: str, metrics_files: list,
                        pretrain_files: list, paper_results: str | os.PathLike) -> Path:
    """Record what a report was built from (paths as given, i.e. relative to the working dir)."""
    from hybridmim.atomic import write_json

    path = out_dir / REPORT_INPUTS
    write_json(path, {"tracking_uri": tracking_uri,
                      "metrics_files": [str(p) for p in metrics_files],
                      "pretrain_metrics_files": [str(p) for p in pretrain_files],
                      "paper_results": str(paper_results)})
    return path


__all__ = ["ReportInputError", "build_report", "collect_runs"]
