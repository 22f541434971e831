"""What does the audit catch on a real workflow run, and what does it cost?

Run on a project where the workflow has finished (the demo, e.g. a copy made by the tests'
``copy_project`` and ``snakemake --cores 2``). Each tampering a sceptical reader could worry about
is applied to the project, the audit is run, and the tampering is undone; the table says whether
the audit failed and with which message. Then ``hybridmim audit`` (the CLI, as a user runs it) is
timed with and without ``--recompute``, alternating, ``--repeats`` times each:

    python benchmarks/audit_catch_table.py --project /tmp/demo/project

The HTML row needs a Snakemake HTML report; with ``--make-html`` one is made from the tables and
figures' data with ``snakemake --report`` (a throw-away Snakefile) when the workflow made none.
"""
from __future__ import annotations

import argparse
import base64
import contextlib
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator

import pandas as pd


@contextlib.contextmanager
def edited(path: Path, change: Callable[[bytes], bytes]) -> Iterator[None]:
    original = path.read_bytes()
    path.write_bytes(change(original))
    try:
        yield
    finally:
        path.write_bytes(original)


def bump_first(text: str, pattern: str) -> str:
    match = re.search(pattern, text)
    new = f"{float(match.group(1)) + 0.01:.2f}"
    return text[:match.start(1)] + new + text[match.end(1):]


def tamperings(root: Path, uri: str, html: Path | None) -> dict[str, Callable]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    results = root / "results"
    metrics = sorted((results / "evaluate").rglob("metrics.json"))
    payloads = [json.loads(p.read_text()) for p in metrics]
    run_id = payloads[0]["run_id"]
    row_number = r"\n\| demo\w+ .*?\| (\d+\.\d\d) [(±]"

    @contextlib.contextmanager
    def run_state(apply: Callable, undo: Callable) -> Iterator[None]:
        apply()
        try:
            yield
        finally:
            undo()

    def csv_cell(data: bytes) -> bytes:
        table = pd.read_csv(results / "tables" / "comparison.csv")
        table.loc[0, "mean"] += 1.0
        return table.to_csv(index=False).encode()

    def figure_cell(data: bytes) -> bytes:
        table = pd.read_csv(results / "figures" / "test_dice.csv")
        table.loc[0, "mean"] += 0.5
        return table.to_csv(index=False).encode()

    def html_cell(data: bytes) -> bytes:
        text = data.decode()
        uri_match = re.search(r"filename=comparison\.md;base64,([A-Za-z0-9+/=]+)", text)
        table = bump_first(base64.b64decode(uri_match.group(1)).decode(), row_number)
        return text.replace(uri_match.group(1), base64.b64encode(table.encode()).decode()).encode()

    def per_case_dice(data: bytes) -> bytes:
        payload = json.loads(data)
        case = payload["per_case"][0]
        name = next(k for k, v in case.items() if isinstance(v, dict) and v.get("dice"))
        case[name]["dice"] = round(case[name]["dice"] * 0.5, 6)
        return json.dumps(payload).encode()

    def aggregate_dice(data: bytes) -> bytes:
        payload = json.loads(data)
        payload["metrics"]["test_dice_mean"] += 0.01
        return json.dumps(payload).encode()

    processed = sorted(p for p in (root / "data" / "processed").rglob("*") if p.is_file())
    raw = sorted(p for p in (root / "data" / "raw").rglob("*.nii.gz"))
    prediction = root / payloads[1]["per_case"][0]["prediction"]
    other = root / payloads[1]["per_case"][-1]["prediction"]
    checkpoint = sorted((results / "finetune").rglob("model.pt"))[0]
    old_metric = client.get_run(run_id).data.metrics["test_dice_mean"]
    cases = {
        "CSV table cell": lambda: edited(results / "tables" / "comparison.csv", csv_cell),
        "Markdown table cell": lambda: edited(
            results / "tables" / "comparison.md",
            lambda b: bump_first(b.decode(), row_number).encode()),
        "LaTeX table cell": lambda: edited(
            results / "tables" / "comparison.tex",
            lambda b: bump_first(b.decode(), r"& (\d+\.\d\d) [($]").encode()),
        "figure data (test_dice.csv)": lambda: edited(results / "figures" / "test_dice.csv",
                                                      figure_cell),
        "processed data file": lambda: edited(processed[len(processed) // 2],
                                              lambda b: b + b"\0"),
        "raw data file": lambda: edited(raw[0], lambda b: raw[1].read_bytes()),
        "deleted MLflow run": lambda: run_state(lambda: client.delete_run(run_id),
                                                lambda: client.restore_run(run_id)),
        "FAILED MLflow run": lambda: run_state(lambda: client.set_terminated(run_id, "FAILED"),
                                               lambda: client.set_terminated(run_id, "FINISHED")),
        "MLflow metric re-logged": lambda: run_state(
            lambda: client.log_metric(run_id, "test_dice_mean", old_metric + 0.01, step=1),
            lambda: client.log_metric(run_id, "test_dice_mean", old_metric, step=2)),
        "metrics.json aggregate": lambda: edited(metrics[2], aggregate_dice),
        "overwritten prediction file": lambda: edited(prediction, lambda b: other.read_bytes()),
        "wrong logged per-case Dice (--recompute)": lambda: edited(metrics[3], per_case_dice),
        "changed fine-tuned checkpoint": lambda: edited(checkpoint, lambda b: b + b"\0"),
    }
    if html is not None:
        cases["HTML report number"] = lambda: edited(html, html_cell)
    return cases


def make_html(root: Path) -> Path:
    """`snakemake --report` of the tables and figures' data, through a throw-away Snakefile."""
    folder = Path(tempfile.mkdtemp(prefix="audit-html-"))
    files = sorted(p.relative_to(root).as_posix() for p in
                   [*(root / "results/tables").glob("*"), *(root / "results/figures").glob("*")])
    outputs = "".join(f'        report("{f}", category="Results"),\n' for f in files)
    (folder / "Snakefile").write_text(f"rule report:\n    output:\n{outputs}    shell: 'true'\n")
    html = folder / "report.html"
    subprocess.run([sys.executable, "-m", "snakemake", "-s", str(folder / "Snakefile"), "-d",
                    str(root), "--report", str(html)], check=True, capture_output=True)
    return html


def audit_once(root: Path, uri: str, html: Path | None, **options) -> tuple[int, list[dict]]:
    from hybridmim.report.audit import audit, exit_status

    checks = audit(root / "results", uri, root, html=html, **options)
    return exit_status(checks), checks


def time_cli(root: Path, uri: str, repeats: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {"default": [], "--recompute": []}
    for _ in range(repeats):
        for label, extra in (("default", []), ("--recompute", ["--recompute"])):
            start = time.perf_counter()
            subprocess.run(["hybridmim", "audit", "--results", "results", "--tracking-uri", uri,
                            *extra], cwd=root, check=True, capture_output=True)
            times[label].append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--project", required=True, type=Path)
    parser.add_argument("--tracking-uri", default=None,
                        help="default: sqlite:///<project>/results/mlflow/mlflow.db")
    parser.add_argument("--make-html", action="store_true")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    root = args.project.resolve()
    uri = args.tracking_uri or f"sqlite:///{root}/results/mlflow/mlflow.db"
    html = root / "results" / "report.html"
    html = html if html.is_file() else (make_html(root) if args.make_html else None)

    status, checks = audit_once(root, uri, html)
    print(f"untouched project: exit {status}, {len(checks)} checks, "
          f"{sum(c['status'] == 'fail' for c in checks)} failed\n")
    print("| tampering | caught | first failure |\n|---|---|---|")
    for name, tamper in tamperings(root, uri, html).items():
        with tamper():
            status, checks = audit_once(root, uri, html, recompute="recompute" in name)
        failed = [c for c in checks if c["status"] == "fail"]
        first = (f"**{failed[0]['check']}** — {failed[0]['number']}: {failed[0]['reason']}"
                 if failed else "")
        print(f"| {name} | {'yes' if status else 'NO'} ({len(failed)} failed checks) | "
              f"{first[:400].replace('|', '/')} |")
    status, _ = audit_once(root, uri, html)
    print(f"\nafter restoring everything: exit {status}")
    if html is not None and html.parent != root / "results":
        shutil.rmtree(html.parent, ignore_errors=True)
    times = time_cli(root, uri, args.repeats)
    default, full = statistics.median(times["default"]), statistics.median(times["--recompute"])
    print(f"\n`hybridmim audit` wall time, median of {args.repeats} (alternating): default "
          f"{default:.1f} s, --recompute {full:.1f} s (ratio {full / default:.2f})")


if __name__ == "__main__":
    main()
