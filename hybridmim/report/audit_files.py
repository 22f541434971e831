"""Audit every file a reader sees: re-build the report from the live MLflow runs, compare.

Contract 3: the report is rebuilt by its own builder (``build_report``) from the inputs it
recorded in ``<results>/report_inputs.json``, into a temporary folder, and every file of
``<results>/tables`` and every figure's data (``<results>/figures/*.csv``) is parsed back and
compared number by number with its rebuilt twin (``readback``: tolerance = the rounding each file
shows). The HTML report (``snakemake --report``) embeds result files as data URIs; each embedded
table or figure-data file is compared the same way.
"""
from __future__ import annotations

import base64
import json
import re
import tempfile
from pathlib import Path
from typing import Any

from hybridmim.report.audit_checks import check
from hybridmim.report.readback import compare_cells, read_cells

HTML_REPORT = "report.html"
# The results block of Snakemake's HTML template (other scripts declare `var results` too).
_RESULTS_JS = re.compile(r'<script id="results">\s*var results = ')


def audited_files(results_dir: Path) -> dict[str, Path]:
    """{path relative to the results folder: path} of every table file and figure data file."""
    found = [path for path in sorted((results_dir / "tables").rglob("*"))
             if path.is_file() and not path.name.startswith(".")]
    found += sorted((results_dir / "figures").glob("*.csv"))
    return {path.relative_to(results_dir).as_posix(): path for path in found}


def rebuild_report(results_dir: Path, project_root: Path, tracking_uri: str, into: Path) -> None:
    """``build_report`` on the inputs the report recorded, with the audit's MLflow store."""
    from hybridmim.report import REPORT_INPUTS, build_report
    from hybridmim.report.collect import ReportInputError
    from hybridmim.report.figures import data_only

    manifest = results_dir / REPORT_INPUTS
    if not manifest.is_file():
        raise ReportInputError(f"{manifest} does not exist: the report's inputs are unknown; "
                               "re-run the report (hybridmim report) with this version")
    inputs = json.loads(manifest.read_text())
    # The recorded paths are relative to the project root or absolute (``/`` keeps those as-is).
    paper = inputs.get("paper_results")
    if not paper or not (project_root / paper).is_file():
        paper = project_root / "config" / "paper_results.yaml"
    with data_only():  # the images are not compared, only the numbers they plot
        build_report(tracking_uri, [project_root / p for p in inputs.get("metrics_files", [])],
                     [project_root / p for p in inputs.get("pretrain_metrics_files", [])], into,
                     paper_results=project_root / paper)


def compare_file(kind: str, label: str, source: str, shown_text: str | None,
                 rebuilt: Path | None) -> list[dict[str, str]]:
    """One check per difference (naming line, row, column), or one passing check. Every audited
    file is text the report writes (tables, figure data): bytes that are not UTF-8 are shown as
    replacement characters and then differ like any other edit."""
    if rebuilt is None or not rebuilt.is_file():
        return [check(kind, label, source, False,
                      "the report does not produce this file from the live MLflow runs: it is "
                      "stale or was added by hand — delete it and re-run the report")]
    if shown_text is None:
        return [check(kind, label, source, False,
                      "missing: the report writes it from the live MLflow runs; re-run the report")]
    # The shown file and its rebuilt twin share a name, so the rebuilt one's suffix picks the parser.
    problems = compare_cells(read_cells(rebuilt, shown_text), read_cells(rebuilt))
    if problems:
        return [check(kind, f"{label}: {where}", source, False,
                      f"{label}, {where}: {what} — the file no longer matches the MLflow runs; "
                      "re-run the report") for where, what in problems]
    return [check(kind, label, source, True,
                  "every number agrees with the report re-built from the MLflow runs "
                  "(tolerance: the rounding the file shows)")]


def audit_report_files(results_dir: Path, project_root: Path, tracking_uri: str,
                       html: Path | None) -> list[dict[str, str]]:
    """Checks for every table file, figure data file and the HTML report's embedded files."""
    from hybridmim.report.collect import ReportInputError

    shown = audited_files(results_dir)
    with tempfile.TemporaryDirectory(prefix="hybridmim-audit-") as tmp:
        rebuilt_dir = Path(tmp)
        try:
            rebuild_report(results_dir, project_root, tracking_uri, rebuilt_dir)
        except (ReportInputError, OSError, ValueError, KeyError) as exc:
            return [check("report re-built", str(results_dir), tracking_uri, False,
                          f"the report cannot be re-built from the live MLflow runs: {exc}")]
        rebuilt = audited_files(rebuilt_dir)
        checks = [check("report re-built", str(results_dir), tracking_uri, True,
                        f"{len(rebuilt)} table and figure data files re-built from the MLflow "
                        "runs the report recorded")]
        for rel in sorted(set(shown) | set(rebuilt)):
            path = shown.get(rel, results_dir / rel)
            text = path.read_text(encoding="utf-8", errors="replace") if rel in shown else None
            kind = "figure data" if rel.startswith("figures/") else "table file"
            checks += compare_file(kind, rel, str(path), text, rebuilt.get(rel))
        checks += audit_html(html or results_dir / HTML_REPORT, results_dir,
                             project_root, rebuilt_dir)
    return checks


def embedded_files(html_text: str) -> dict[str, bytes]:
    """{path as the workflow named it: bytes} of every result a Snakemake HTML report embeds."""
    found = _RESULTS_JS.search(html_text)
    if not found:
        raise ValueError("no embedded results (`var results = ...`) found: not a self-contained "
                         "Snakemake HTML report")
    results, _ = json.JSONDecoder().raw_decode(html_text, found.end())
    files = {}
    for path, entry in results.items():
        uri = str((entry or {}).get("data_uri", ""))
        header, sep, payload = uri.partition(";base64,")
        if header.startswith("data:") and sep:
            files[path] = base64.b64decode(payload)
    return files


def audit_html(html: Path, results_dir: Path, project_root: Path,
               rebuilt_dir: Path) -> list[dict[str, Any]]:
    if not html.is_file():
        return [check("html report", str(html), str(html), "skip",
                      f"{html} does not exist (made by `snakemake --report {html}` after the "
                      "workflow): not audited")]
    try:
        embedded = embedded_files(html.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        return [check("html report", str(html), str(html), False, str(exc))]
    checks, others = [], 0
    results_abs = results_dir.resolve()
    for name, payload in sorted(embedded.items()):
        path = (project_root / name).resolve()  # an absolute name stays as it is
        rel = path.relative_to(results_abs).as_posix() if path.is_relative_to(results_abs) else ""
        audited = rel.startswith("tables/") or (rel.startswith("figures/")
                                                and rel.endswith(".csv"))
        if not audited:
            others += 1  # figures and other media: their data is audited through figures/*.csv
            continue
        checks += compare_file("html report", f"{html.name} › {rel}", str(html),
                               payload.decode("utf-8", errors="replace"), rebuilt_dir / rel)
    if not checks:
        checks.append(check("html report", str(html), str(html), "skip",
                            "embeds no table or figure data: no number in it to compare"))
    checks.append(check("html report", f"{html.name}: other embedded files", str(html), True,
                        f"{others} embedded figure/media files not compared (their numbers are "
                        "audited through the figures' data CSVs)"))
    return checks
