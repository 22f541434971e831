"""The audit's check records and its outputs: ``<results>/audit.json`` (every check) and
``audit.md`` (summary, then every failure, warning and skipped check, with the table numbers a run
check affects)."""
from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from hybridmim.atomic import write_json, write_text


def check(kind: str, number: str, source: str, ok: bool | None | str,
          reason: str) -> dict[str, str]:
    """One check record. ``ok``: True pass, False fail, None warn, "skip" (not applicable here,
    with why)."""
    status = ok if ok == "skip" else "warn" if ok is None else ("pass" if ok else "fail")
    return {"check": kind, "number": number, "source": source, "status": status, "reason": reason}


def summary(checks: list[dict[str, str]]) -> dict[str, int]:
    counts = Counter(c["status"] for c in checks)
    return {status: counts.get(status, 0) for status in ("pass", "fail", "warn", "skip")}


def write_outputs(results_dir: Path, tracking_uri: str, checks: list[dict[str, str]]) -> None:
    totals = summary(checks)
    write_json(results_dir / "audit.json", {"tracking_uri": tracking_uri, "summary": totals,
                                            "checks": checks})
    lines = ["# Audit", "", f"MLflow store: `{tracking_uri}`", "",
             f"**{'FAILED' if totals['fail'] else 'PASSED'}** — {totals['pass']} passed, "
             f"{totals['fail']} failed, {totals['warn']} warnings, {totals['skip']} skipped "
             f"({len(checks)} checks; every check in audit.json).", ""]
    by_kind = Counter((c["check"], c["status"]) for c in checks)
    lines += ["| check | pass | fail | warn | skip |", "|---|---|---|---|---|"]
    for kind in dict.fromkeys(c["check"] for c in checks):
        lines.append(f"| {kind} | {by_kind[(kind, 'pass')]} | {by_kind[(kind, 'fail')]} | "
                     f"{by_kind[(kind, 'warn')]} | {by_kind[(kind, 'skip')]} |")
    for status, title in (("fail", "Failures"), ("warn", "Warnings"), ("skip", "Skipped")):
        listed = [c for c in checks if c["status"] == status]
        if listed:
            lines += ["", f"## {title}", ""]
            lines += [f"- **{c['check']}** — {c['number']} (source: `{c['source']}`): "
                      f"{c['reason']}{_affects_text(c)}" for c in listed]
    write_text(results_dir / "audit.md", "\n".join(lines) + "\n")


def _affects_text(check: dict[str, Any]) -> str:
    affects = check.get("affects") or []
    if not affects:
        return ""
    shown = "; ".join(affects[:3]) + (f"; … ({len(affects) - 3} more)" if len(affects) > 3 else "")
    return f" — affects {len(affects)} table number(s): {shown}"
