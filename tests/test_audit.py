"""The audit: passes on a consistent project, fails naming the number and the reason after
tampering with a metrics file, a table, a checkpoint or the data (project from test_report)."""
from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pandas as pd
import pytest
import torch

from hybridmim.report import build_report
from hybridmim.report.audit import main

from test_report import build_project


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    project = build_project(tmp_path_factory.mktemp("audit") / "project")
    build_report(project["uri"], project["metrics_files"], project["pretrain_files"],
                 project["root"] / "results")
    return project


def run_audit(project) -> tuple[int, list[dict]]:
    results = project["root"] / "results"
    status = main(results, project["uri"], project["root"])
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
    assert all(c["status"] == "pass" for c in checks)
    numbers = [c for c in checks if c["check"] == "table number"]
    rows = sum(len(pd.read_csv(p)) for p in (project["root"] / "results" / "tables").glob("*.csv"))
    assert len(numbers) == rows  # every number of every table was re-derived
    kinds = {c["check"] for c in checks}
    assert {"metrics.json = MLflow", "data hash", "upstream checkpoint", "model meta run id",
            "git commit", "reported numbers"} <= kinds
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
    with tampered(path, text.replace("1111aaaa2222bbbb.dir", "9999ffff.dir").encode()):
        status, checks = run_audit(project)
    assert status == 1
    bad = failures(checks, "data hash")
    assert len(bad) == 9 and all("data btcv" in c["number"] for c in bad)
    assert all("1111aaaa2222bbbb.dir" in c["reason"] and "9999ffff.dir" in c["reason"]
               for c in bad)


def test_missing_tables_fail(tmp_path, project):
    status = main(tmp_path / "empty_results", project["uri"], project["root"])
    assert status == 1
    checks = json.loads((tmp_path / "empty_results" / "audit.json").read_text())["checks"]
    assert checks[0]["status"] == "fail" and "run the report first" in checks[0]["reason"]
