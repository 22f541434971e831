"""Tables and figures from MLflow, and the audit that re-verifies every reported number.

``build_report`` backs the CLI's ``report`` sub-command; ``hybridmim.report.audit.main`` backs
``audit`` (imported from its module: it needs torch to read model files).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Iterable

from hybridmim.report.collect import ReportInputError, collect_pretrain_runs, collect_runs
from hybridmim.resources import PAPER_RESULTS

log = logging.getLogger(__name__)

REPORT_INPUTS = "report_inputs.json"


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
    from hybridmim.report.experiment_figures import (plot_ablations, plot_finetune_curves,
                                                     plot_gallery, plot_per_class,
                                                     plot_time_to_quality)
    from hybridmim.report.experiment_tables import (ablation_table, label_efficiency_table,
                                                    paired_table, per_case_dice,
                                                    pretrain_cost_table)
    from hybridmim.report.figures import (plot_dice_by_init, plot_label_efficiency,
                                          plot_pretrain_losses)
    from hybridmim.report.tables import (comparison_table, load_paper_results, paper_table,
                                         per_class_tables, safe_name)

    from hybridmim.atomic import write_json

    out_dir, metrics_files = Path(out_dir), list(metrics_files)
    tables_dir, figures_dir = out_dir / "tables", out_dir / "figures"
    paper_results = paper_results or PAPER_RESULTS  # shipped inside the package
    paper = load_paper_results(paper_results)
    runs = collect_runs(tracking_uri, metrics_files)
    log.info("report: %d evaluate runs from %s", len(runs), tracking_uri)
    pretrain_files = list(pretrain_metrics_files)
    pretrain_runs = collect_pretrain_runs(tracking_uri, pretrain_files) if pretrain_files else None
    # Artifacts (per-case scores, overlays) are downloaded one by one: no progress bar each.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

    written: dict[str, Path] = {}

    def table(name: str, built: tuple[Any, dict[str, Path]]) -> Any:
        """Record a table's files (``<name>.csv``, ...); return its long frame."""
        long, paths = built
        written.update({f"{name}.{kind}": path for kind, path in paths.items()})
        return long

    comparison_long = table("comparison", comparison_table(runs, tables_dir))
    for dataset, paths in per_class_tables(runs, tables_dir).items():
        written.update({f"per_class_{dataset}.{kind}": path for kind, path in paths.items()})
    table("paper_vs_ours", paper_table(comparison_long, paper, tables_dir))
    written["test_dice"] = plot_dice_by_init(runs, figures_dir / "test_dice.png")
    written["label_efficiency"] = plot_label_efficiency(runs, figures_dir / "label_efficiency.png")
    written["pretrain_losses"] = plot_pretrain_losses(tracking_uri, pretrain_runs,
                                                      figures_dir / "pretrain_losses.png")
    cases = per_case_dice(tracking_uri, runs)
    cost_long = table("pretrain_cost", pretrain_cost_table(pretrain_runs, tables_dir))
    paired = paired_table(runs, cases, tables_dir)
    ablation_long = table("ablations", ablation_table(runs, paired[0], cost_long, tables_dir))
    table("label_efficiency", label_efficiency_table(runs, tables_dir))
    table("paired_differences", paired)
    written["ablations_figure"] = plot_ablations(ablation_long, figures_dir / "ablations.png")
    written["time_to_quality"] = plot_time_to_quality(tracking_uri, pretrain_runs,
                                                      figures_dir / "time_to_quality.png")
    written["finetune_curves"] = plot_finetune_curves(tracking_uri, runs,
                                                      figures_dir / "finetune_curves.png")
    written["per_class_dice"] = plot_per_class(runs, figures_dir / "per_class_dice.png")
    for dataset in sorted(runs["dataset"].unique()):
        written[f"gallery_{dataset}"] = plot_gallery(
            tracking_uri, runs, dataset, figures_dir / f"gallery_{safe_name(dataset)}.png")
    # Paths as given, i.e. relative to the working dir (the audit resolves them the same way).
    written["report_inputs"] = out_dir / REPORT_INPUTS
    write_json(written["report_inputs"], {
        "tracking_uri": tracking_uri, "metrics_files": [str(p) for p in metrics_files],
        "pretrain_metrics_files": [str(p) for p in pretrain_files],
        "paper_results": str(paper_results)})
    for name, path in written.items():
        log.info("report: wrote %s (%s)", path, name)
    return written


__all__ = ["ReportInputError", "build_report", "collect_runs"]
