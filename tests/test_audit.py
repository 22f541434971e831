"""The audit: passes on a consistent project, fails naming the number and the reason after
tampering with a metrics file, a table in any format, the HTML report, a figure's data, a
checkpoint, the data on disk, the runs' state, a saved prediction or a logged per-case value
(project from test_report, its btcv data versioned by real DVC)."""
from __future__ import annotations

import base64
import contextlib
import json
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from hybridmim.report import build_report
from hybridmim.report.audit import main

from test_report import build_project


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    project = build_project(tmp_path_factory.mktemp("audit") / "project", dvc=True)
    build_report(project["uri"], project["metrics_files"], project["pretrain_files"],
                 project["root"] / "results")
    return project


def run_audit(project, **options) -> tuple[int, list[dict]]:
    results = project["root"] / "results"
    status = main(results, project["uri"], project["root"], **options)
    return status, json.loads((results / "audit.json").read_text())["checks"]


@contextlib.contextmanager
def tampered(path: Path, new_bytes: bytes):
    original = path.read_bytes()
    path.write_bytes(new_bytes)
    try:
        yield
    finally:
        path.write_bytes(original)


def failures(checks: list[dict], kind: str) -> list[dict]:
    return [c for c in checks if c["status"] == "fail" and c["check"] == kind]


def test_consistent_project_passes_every_check(project):
    status, checks = run_audit(project)
    assert status == 0, [c for c in checks if c["status"] != "pass"]
    [html] = [c for c in checks if c["status"] != "pass"]  # no report.html here: skipped
    assert html["check"] == "html report" and html["status"] == "skip"
    assert all(c["status"] == "pass" for c in checks if c is not html)
    numbers = [c for c in checks if c["check"] == "table number"]
    rows = sum(len(pd.read_csv(p)) for p in (project["root"] / "results" / "tables").glob("*.csv"))
    assert len(numbers) == rows  # every number of every table was re-derived
    kinds = {c["check"] for c in checks}
    assert {"metrics.json = MLflow", "data hash", "upstream checkpoint", "model meta run id",
            "git commit", "reported numbers", "report re-built", "table file", "figure data",
            "data on disk", "run not deleted", "prediction file", "per-case = logged means",
            "per-case recompute"} <= kinds
    # every file of every table format and every figure's data was compared
    files = {c["number"] for c in checks if c["check"] in ("table file", "figure data")}
    assert {"tables/comparison.md", "tables/comparison.tex", "tables/per_class_btcv.csv",
            "figures/test_dice.csv", "figures/pretrain_losses.csv"} <= files
    # 2 datasets x 2 inits x 2 seeds, 2 cases each: all re-computed (fewer than the sample)
    assert len([c for c in checks if c["check"] == "per-case recompute"]) == 16
    # the chain was followed up to the pretraining run
    assert any("pretrain run" in c["number"] for c in checks)
    assert "PASSED" in (project["root"] / "results" / "audit.md").read_text()


def test_edited_metrics_file_fails_naming_metric_and_file(project):
    path = project["metrics_files"][0]
    payload = json.loads(path.read_text())
    payload["metrics"]["test_dice_mean"] += 0.1
    with tampered(path, json.dumps(payload).encode()):
        status, checks = run_audit(project)
    assert status == 1
    [bad] = failures(checks, "metrics.json = MLflow")
    assert bad["source"] == str(path) and "test_dice_mean" in bad["reason"]
    # the failure names the table numbers that rest on the run
    assert "comparison.csv: btcv / unet / frac 1 / scratch / test_dice_mean" in bad["affects"]
    assert "FAILED" in (project["root"] / "results" / "audit.md").read_text()


def test_edited_table_number_fails_naming_the_cell(project):
    path = project["root"] / "results" / "tables" / "comparison.csv"
    table = pd.read_csv(path)
    table.loc[0, "mean"] = table.loc[0, "mean"] + 1.0
    with tampered(path, table.to_csv(index=False).encode()):
        status, checks = run_audit(project)
    assert status == 1
    [bad] = failures(checks, "table number")
    assert table.loc[0, "cell"] in bad["number"] and "MLflow runs give" in bad["reason"]


def test_changed_checkpoint_fails(project):
    path = project["finetune_models"][0]
    blob = torch.load(path, weights_only=False)
    blob["state_dict"]["weight"] = blob["state_dict"]["weight"] + 1.0
    with contextlib.ExitStack() as stack:
        original = path.read_bytes()
        stack.callback(path.write_bytes, original)
        torch.save(blob, path)
        status, checks = run_audit(project)
    assert status == 1
    [bad] = failures(checks, "upstream checkpoint")
    assert bad["source"] == str(path) and "changed since the run" in bad["reason"]


def test_changed_tree_hashed_data_fails(project):
    path = project["root"] / "data" / "processed" / "msd_spleen" / "splits.json"
    with tampered(path, b'{"seed": 1, "test": []}'):
        status, checks = run_audit(project)
    assert status == 1
    bad = failures(checks, "data hash")
    # 4 finetune + 4 evaluate runs on msd_spleen, and the pretraining run that read it
    assert len(bad) == 9 and all("msd_spleen" in c["number"] for c in bad)
    assert all("data changed since the run" in c["reason"] for c in bad)


def test_changed_dvc_lock_hash_fails(project):
    path = project["root"] / "dvc.lock"
    text = path.read_text()
    [recorded] = re.findall(r"md5: (\w+\.dir)", text.split("data/processed/btcv")[1])[:1]
    with tampered(path, text.replace(recorded, "9999ffff.dir").encode()):
        status, checks = run_audit(project)
    assert status == 1
    bad = failures(checks, "data hash")
    assert len(bad) == 9 and all("data btcv" in c["number"] for c in bad)
    assert all(recorded in c["reason"] and "9999ffff.dir" in c["reason"] for c in bad)


def test_missing_tables_fail(tmp_path, project):
    status = main(tmp_path / "empty_results", project["uri"], project["root"])
    assert status == 1
    checks = json.loads((tmp_path / "empty_results" / "audit.json").read_text())["checks"]
    assert checks[0]["status"] == "fail" and "run the report first" in checks[0]["reason"]


# ------------------------------------------------------------------------------ every format
def _bump_first_cell(text: str, pattern: str) -> tuple[str, str]:
    """Add 0.01 to the first number matching ``pattern`` (a table cell); return (text, old)."""
    match = re.search(pattern, text)
    old = match.group(1)
    new = f"{float(old) + 0.01:.2f}"
    return text[:match.start(1)] + new + text[match.end(1):], old


def _assert_names_cell(bad: list[dict], file: str, column: str, old: str) -> None:
    assert bad and all(file in c["number"] for c in bad), bad
    assert any(f"column {column!r}" in c["reason"] and f"re-derived from the MLflow runs {old}"
               in c["reason"] and "line " in c["reason"] for c in bad), bad


def test_edited_markdown_cell_fails_naming_file_row_and_column(project):
    path = project["root"] / "results" / "tables" / "comparison.md"
    text, old = _bump_first_cell(path.read_text(), r"\| btcv .*?\| (\d+\.\d\d) ±")
    with tampered(path, text.encode()):
        status, checks = run_audit(project)
    assert status == 1
    bad = failures(checks, "table file")
    _assert_names_cell(bad, "tables/comparison.md", "scratch", old)
    assert "row 'btcv'" in bad[0]["reason"]


def test_edited_latex_cell_fails_naming_file_row_and_column(project):
    path = project["root"] / "results" / "tables" / "per_class_btcv.tex"
    text, old = _bump_first_cell(path.read_text(), r"& scratch & (\d+\.\d\d) ")
    with tampered(path, text.encode()):
        status, checks = run_audit(project)
    assert status == 1
    _assert_names_cell(failures(checks, "table file"), "tables/per_class_btcv.tex",
                       "Right kidney", old)


def test_edited_figure_data_fails(project):
    path = project["root"] / "results" / "figures" / "test_dice.csv"
    table = pd.read_csv(path)
    old = repr(float(table.loc[0, "mean"]))
    table.loc[0, "mean"] += 0.5
    with tampered(path, table.to_csv(index=False).encode()):
        status, checks = run_audit(project)
    assert status == 1
    [bad] = failures(checks, "figure data")
    assert "figures/test_dice.csv" in bad["number"] and "column 'mean'" in bad["reason"]
    assert old in bad["reason"]


@pytest.fixture(scope="module")
def html_report(project, tmp_path_factory):
    """A real `snakemake --report` of the project's tables and figures' data."""
    folder = tmp_path_factory.mktemp("html")
    results = project["root"] / "results"
    files = sorted(p.relative_to(project["root"]).as_posix()
                   for p in [*(results / "tables").glob("*"), *(results / "figures").glob("*")])
    outputs = "".join(f'        report("{f}", category="Results"),\n' for f in files)
    (folder / "Snakefile").write_text(f"rule report:\n    output:\n{outputs}    shell: 'true'\n")
    html = folder / "report.html"
    proc = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(folder / "Snakefile"),
                           "-d", str(project["root"]), "--report", str(html)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return html


def test_html_report_passes_and_an_edited_number_in_it_fails(project, html_report):
    status, checks = run_audit(project, html=html_report)
    assert status == 0, failures(checks, "html report")
    compared = [c for c in checks if c["check"] == "html report" and "›" in c["number"]]
    assert any("tables/comparison.md" in c["number"] for c in compared)
    # edit one number of the comparison table embedded in the report
    text = html_report.read_text()
    uri = re.search(r"filename=comparison\.md;base64,([A-Za-z0-9+/=]+)", text)
    table, old = _bump_first_cell(base64.b64decode(uri.group(1)).decode(),
                                  r"\| btcv .*?\| (\d+\.\d\d) ±")
    edited = text.replace(uri.group(1), base64.b64encode(table.encode()).decode())
    with tampered(html_report, edited.encode()):
        status, checks = run_audit(project, html=html_report)
    assert status == 1
    _assert_names_cell(failures(checks, "html report"), "report.html › tables/comparison.md",
                       "scratch", old)


# ------------------------------------------------------------------------------ data on disk
def test_changed_processed_file_fails_naming_dataset_and_file(project):
    path = project["root"] / "data" / "processed" / "btcv" / "splits.json"
    with tampered(path, b'{"seed": 0, "test": ["other"]}'):
        status, checks = run_audit(project)
    assert status == 1
    bad = failures(checks, "data on disk")
    # 4 finetune + 4 evaluate runs on btcv, and the pretraining run that read it
    assert len(bad) == 9 and all("dataset btcv" in c["reason"] for c in bad)
    assert all("data/processed/btcv/splits.json (modified)" in c["reason"] for c in bad)


def test_changed_raw_file_fails_through_dvc(project):
    path = project["root"] / "data" / "raw" / "btcv" / "labels" / "case_a.nii.gz"
    with tampered(path, (project["root"] / "data" / "raw" / "btcv" / "labels"
                         / "case_b.nii.gz").read_bytes()):
        status, checks = run_audit(project)
    assert status == 1
    bad = failures(checks, "data on disk")
    assert len(bad) == 9 and all("data/raw/btcv/labels/case_a.nii.gz (modified)" in c["reason"]
                                 for c in bad)


# ------------------------------------------------------------------------------ run state
def _client(project):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=project["uri"])


def _evaluate_run_id(project, index: int = 0) -> str:
    return json.loads(project["metrics_files"][index].read_text())["run_id"]


def test_deleted_run_fails(project):
    client, run_id = _client(project), _evaluate_run_id(project)
    client.delete_run(run_id)
    try:
        status, checks = run_audit(project)
    finally:
        client.restore_run(run_id)
    assert status == 1
    [bad] = failures(checks, "run not deleted")
    assert run_id in bad["number"] and "deleted from the MLflow store" in bad["reason"]
    [rebuilt] = failures(checks, "report re-built")
    assert run_id in rebuilt["reason"]  # the report cannot be re-derived without it


def test_failed_run_fails(project):
    client, run_id = _client(project), _evaluate_run_id(project, 1)
    client.set_terminated(run_id, "FAILED")
    try:
        status, checks = run_audit(project)
    finally:
        client.set_terminated(run_id, "FINISHED")
    assert status == 1
    [bad] = failures(checks, "run finished")
    assert run_id in bad["number"] and "status FAILED" in bad["reason"]


def test_dirty_tree_is_a_warning_and_strict_makes_it_a_failure(project):
    client, run_id = _client(project), _evaluate_run_id(project, 2)
    client.set_tag(run_id, "git_dirty", "true")
    try:
        status, checks = run_audit(project)
        strict_status, strict_checks = run_audit(project, strict=True)
    finally:
        client.set_tag(run_id, "git_dirty", "false")
    [warn] = [c for c in checks if c["check"] == "git dirty"]
    assert status == 0 and warn["status"] == "warn" and run_id in warn["number"]
    commit = client.get_run(run_id).data.tags["git_commit"]
    assert commit in warn["reason"]
    assert strict_status == 1 and failures(strict_checks, "git dirty")


# ------------------------------------------------------------------------------ predictions
def test_overwritten_prediction_fails(project):
    payload = json.loads(project["metrics_files"][3].read_text())
    entry = payload["per_case"][1]
    path = project["root"] / entry["prediction"]
    with tampered(path, (project["root"] / entry["label"]).read_bytes()):
        status, checks = run_audit(project)
    assert status == 1
    [bad] = failures(checks, "prediction file")
    assert bad["source"] == str(path) and "overwritten since the run" in bad["reason"]
    assert f"case {entry['case']}" in bad["number"]


def test_wrong_logged_per_case_dice_is_caught_by_recomputing(project):
    path = project["metrics_files"][4]
    payload = json.loads(path.read_text())
    case = payload["per_case"][0]
    name = next(k for k, v in case.items() if isinstance(v, dict))
    case[name]["dice"] = round(case[name]["dice"] * 0.5, 6)  # a wrong value, as if mis-logged
    with tampered(path, json.dumps(payload).encode()):
        status, checks = run_audit(project, recompute=True)
    assert status == 1
    [bad] = failures(checks, "per-case recompute")
    assert f"case {case['case']}" in bad["number"] and payload["run_id"] in bad["number"]
    assert f"{name} dice: logged {case[name]['dice']}, re-computed" in bad["reason"]
