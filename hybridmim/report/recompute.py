"""Re-compute per-case Dice and HD95 from the saved test predictions (contract 1).

An evaluate job saves each test prediction (``predictions/<case>.nii.gz``: a uint8 label map on
the raw image's grid, raw label values) and names, per case in metrics.json, the prediction, its
sha256 and the raw ground-truth file it was scored against. The audit checks every prediction's
sha256 (cheap) and that the logged per-case values average to the run's logged class and mean
metrics, and re-computes Dice and HD95 with the evaluation's own code (its label reader and masks,
``case_metrics``: MONAI's ``DiceMetric`` and ``compute_hausdorff_distance`` with the label file's
voxel spacing) for a sample of cases per run, or every case with ``--recompute``.

Tolerance: Dice ±1e-6 (it is a ratio of voxel counts); HD95 ±1e-3 mm or 1e-4 relative (distance
transforms on another device may differ in the last bits).

Default sample: ``DEFAULT_SAMPLE`` = 3 cases per run. An error that touches every case (a wrong
grid, spacing, label mapping or class order) is caught by any one case; a wrong value in one case
out of N is caught with probability 3/N per audit; the cost stays bounded on full-size CT (an
original-grid HD95 takes seconds per case on CPU). The sample is seeded by ``--sample-seed`` and
the run id, so a re-run audits the same cases.
"""
from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd

from hybridmim.report.audit_checks import check
from hybridmim.report.collect import same_number

DEFAULT_SAMPLE = 3
# same_number's tolerances for a re-computed value (module doc): Dice absolute, HD95 in mm.
TOLERANCES = {"dice": {"rel_tol": 0.0, "abs_tol": 1e-6},
              "hd95": {"rel_tol": 1e-4, "abs_tol": 1e-3}}


def classes_of_run(params: dict[str, str]) -> tuple[dict[str, str], dict[str, list[int]] | None]:
    """The evaluate spec's label map and regions, from the run's (flattened) params."""
    labels = {k.removeprefix("dataset.labels."): v for k, v in params.items()
              if k.startswith("dataset.labels.")}
    regions = {k.removeprefix("dataset.regions."): json.loads(v) for k, v in params.items()
               if k.startswith("dataset.regions.")}
    if not labels:
        raise ValueError("the run has no dataset.labels params: its classes are unknown")
    return labels, regions or None


def recompute_case(prediction: Path, label: Path, labels: dict[str, str],
                   regions: dict[str, list[int]] | None) -> dict[str, dict[str, Any]]:
    """Dice and HD95 of one case, its files read and scored by the evaluation's own code."""
    import nibabel as nib

    from hybridmim.evaluate.metrics import case_metrics, class_names
    from hybridmim.evaluate.run import read_label_file
    from hybridmim.predict.pipeline import masks_from_label_values

    pred_image, truth_image = nib.load(str(prediction)), nib.load(str(label))
    for path, image in ((prediction, pred_image), (label, truth_image)):
        if len(image.shape) < 3 or any(n != 1 for n in image.shape[3:]):
            raise ValueError(f"{path} has shape {image.shape}; a 3-D label map was expected")
    shape, truth_shape = pred_image.shape[:3], truth_image.shape[:3]
    if shape != truth_shape or not np.allclose(pred_image.affine, truth_image.affine, atol=1e-4):
        raise ValueError(f"prediction {prediction} (shape {shape}) is not on the grid of "
                         f"its label {label} (shape {truth_shape}) — shapes or affines differ")
    (pred, _), (truth, spacing) = read_label_file(prediction), read_label_file(label)
    return case_metrics(masks_from_label_values(pred, labels, regions),
                        masks_from_label_values(truth, labels, regions), spacing,
                        class_names(labels, regions))


def _number(value: Any) -> float:
    return math.nan if value is None else float(value)


def sample_cases(cases: list[str], run_id: str, sample: int | None, seed: int) -> list[str]:
    """The cases to re-compute: all (``sample`` None) or a sample seeded by seed and run id."""
    if sample is None or sample >= len(cases):
        return list(cases)
    return sorted(random.Random(f"{seed}:{run_id}").sample(sorted(cases), sample))


def check_predictions(who: str, run: Any, metrics_path: Path, payload: dict, root: Path,
                      sha256: Callable[[Path], str], sample: int | None, seed: int
                      ) -> list[dict[str, str]]:
    """Checks of one evaluate run's saved predictions and per-case values; the recorded paths
    are relative to ``root`` (the project root) or absolute."""
    from hybridmim.evaluate.metrics import metric_key

    run_id, source = run.info.run_id, str(metrics_path)
    per_case = payload.get("per_case") or []
    saved = [entry for entry in per_case if entry.get("prediction")]
    if not per_case or len(saved) != len(per_case):
        return [check("predictions", who, source, False,
                      f"{metrics_path} names no saved prediction for {len(per_case) - len(saved)}"
                      f" of {len(per_case)} cases: the per-case numbers cannot be re-computed — "
                      "re-run the evaluate job with this version")]
    checks = [_check_means(who, source, run, per_case, metric_key)]
    changed = set()
    for entry in per_case:
        path, case = root / entry["prediction"], str(entry.get("case"))
        if not path.is_file():
            problem = f"{path} does not exist any more; re-run the evaluate job"
        elif sha256(path) != entry.get("prediction_sha256"):
            problem = (f"{path} has sha256 {sha256(path)} but the run recorded "
                       f"{entry.get('prediction_sha256')}: the prediction was overwritten "
                       "since the run — re-run the evaluate job")
        else:
            continue
        changed.add(case)
        checks.append(check("prediction file", f"{who} case {case}", str(path), False, problem))
    if not changed:
        checks.append(check("prediction file", who, source, True,
                            f"all {len(per_case)} predictions have their recorded sha256"))
    grid = payload.get("grid", "original")
    if grid != "original":
        checks.append(check("per-case recompute", who, source, "skip",
                            f"metrics computed on the {grid} grid: the original-grid "
                            "predictions cannot reproduce them"))
        return checks
    try:
        labels, regions = classes_of_run(run.data.params)
    except ValueError as exc:
        return checks + [check("per-case recompute", who, run_id, False, str(exc))]
    chosen = set(sample_cases([str(e.get("case")) for e in per_case], run_id, sample, seed))
    return checks + [_recompute_one(f"{who} case {e.get('case')}", e, root, labels, regions)
                     for e in per_case if str(e.get("case")) in chosen - changed]


def _check_means(who: str, source: str, run: Any, per_case: list[dict],
                 metric_key: Callable[[str], str]) -> dict[str, str]:
    """The logged per-case values must average (class: over defined cases; mean: over classes)
    to the run's logged metrics, so that the per-case numbers are the ones behind the tables."""
    names = [k for k in per_case[0] if isinstance(per_case[0][k], dict)]
    wrong = []
    for kind in ("dice", "hd95"):
        # pandas' mean skips the undefined (NaN) values, and is NaN where none is defined.
        values = pd.DataFrame([[_number(e.get(name, {}).get(kind)) for name in names]
                               for e in per_case], columns=names).mean()
        expected = {f"test_{kind}_{metric_key(n)}": v for n, v in values.items()}
        expected[f"test_{kind}_mean"] = values.mean()
        for metric, value in expected.items():
            logged = run.data.metrics.get(metric)
            if logged is None or not same_number(logged, value, rel_tol=1e-7):
                wrong.append(f"{metric}: per-case values give {value}, MLflow has {logged}")
    return check("per-case = logged means", who, source, not wrong,
                 "; ".join(wrong) if wrong else
                 f"{len(per_case)} cases average to the run's logged class and mean metrics")


def _recompute_one(label: str, entry: dict, root: Path, labels: dict[str, str],
                   regions: dict[str, list[int]] | None) -> dict[str, str]:
    prediction, truth = root / entry["prediction"], root / str(entry.get("label", ""))
    if not entry.get("label") or not truth.is_file():
        return check("per-case recompute", label, str(truth), False,
                     f"ground truth {truth} is missing: restore the raw data (dvc pull)")
    try:
        now = recompute_case(prediction, truth, labels, regions)
    except (ValueError, OSError) as exc:
        return check("per-case recompute", label, str(prediction), False, str(exc))
    wrong = []
    for name, values in now.items():
        for kind in ("dice", "hd95"):
            logged = _number((entry.get(name) or {}).get(kind))
            if not same_number(logged, values[kind], **TOLERANCES[kind]):
                wrong.append(f"{name} {kind}: logged {logged}, re-computed {values[kind]}")
    return check("per-case recompute", label, str(prediction), not wrong,
                 "; ".join(wrong) + f" (from {prediction} and {truth})" if wrong else
                 f"Dice and HD95 of {len(now)} classes re-computed from {prediction.name}")
