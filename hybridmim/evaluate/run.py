"""Test-set evaluation of a fine-tuned model.pt (docs/contracts.md, "Evaluate spec").

Sliding-window inference (the model's crop, Gaussian blending, the spec's overlap) on every case
of the split, Dice and HD95 per class (evaluate/metrics.py for the empty-class conventions), then:
MLflow metrics ``test_dice_<class>``, ``test_hd95_<class>``, ``test_dice_mean``,
``test_hd95_mean`` in the ``evaluate`` experiment; ``metrics.json`` (undefined values as null),
``per_case.csv`` and ``overlays.png`` beside it, also logged as artifacts.
"""
from __future__ import annotations

import csv
import logging
import time
from pathlib import Path
from typing import Any

import torch

from hybridmim import runtime
from hybridmim.atomic import atomic_path, write_json
from hybridmim.checkpoints import build_network, load_model_file
from hybridmim.evaluate.metrics import (aggregate, case_metrics, class_names, foreground_masks,
                                        ground_truth_masks, json_number, metric_key)
from hybridmim.evaluate.overlays import overlay_slice, save_overlay_figure
from hybridmim.finetune.inference import predict_volume, probabilities_to_masks
from hybridmim.hashing import spec_hash as compute_spec_hash
from hybridmim.models.backbones import backbone_of_class
from hybridmim.performance import prepare_network
from hybridmim.progress import StepProgress

log = logging.getLogger(__name__)

REQUIRED_KEYS = ("run_name", "out", "tracking", "dataset", "model", "split", "sw_overlap")
OVERLAY_CASES = 3


def _check_spec(spec: dict[str, Any]) -> None:
    missing = [key for key in REQUIRED_KEYS if key not in spec]
    for key in ("processed_dir", "labels"):
        if key not in (spec.get("dataset") or {}):
            missing.append(f"dataset.{key}")
    if missing:
        raise KeyError(f"evaluate spec is missing {missing} (docs/contracts.md, Evaluate spec); "
                       "rebuild the spec with hybridmim.config")


def _check_model_matches(meta: dict[str, Any], dataset: dict[str, Any], model: str) -> None:
    """A model trained on another label map or window would give meaningless numbers."""
    for key in ("labels", "regions", "window"):
        wanted = dataset.get(key) or None
        trained = meta.get(key) or None
        if key in dataset and wanted != trained:
            raise ValueError(f"{model} was fine-tuned with {key}={trained!r} but the evaluate "
                             f"spec's dataset.{key} is {wanted!r}; evaluate it on the dataset "
                             "it was trained for")


def run_evaluation(spec: dict[str, Any]) -> dict[str, Any]:
    """Evaluate spec["model"] on spec["split"]; return the metrics.json content."""
    from hybridmim.data.loading import SegmentationDataset
    from hybridmim.data.splits import load_splits
    from hybridmim.tracking.runs import tracked_run

    _check_spec(spec)
    started = time.monotonic()
    runtime.configure_threads(spec.get("threads"))
    runtime.seed_everything(int(spec.get("seed", 0)))
    dataset = spec["dataset"]
    processed_dir = dataset["processed_dir"]
    model_path = str(spec["model"])
    blob = load_model_file(model_path)
    meta = blob.get("meta") or {}
    if meta.get("stage") != "finetune" or "crop" not in meta:
        raise ValueError(f"{model_path} is a {meta.get('stage')!r} model, not a fine-tuned "
                         "segmentation model; evaluate the model.pt of a finetune job")
    _check_model_matches(meta, dataset, model_path)
    regions = meta.get("regions") or None
    names = class_names(meta.get("labels") or dataset["labels"], regions)
    keys = [metric_key(n) for n in names]
    if len(set(keys)) != len(keys):
        raise ValueError(f"class names {names} collide as metric names {keys}; rename labels")
    crop = int(meta["crop"])
    window = meta.get("window") or dataset.get("window")
    device = runtime.select_device()
    precision_choice = runtime.precision_choice(spec.get("precision", "auto"), device,
                                                backbone_of_class(blob["network"]["class"]))
    precision = precision_choice.precision
    network = build_network(blob).to(device).eval()
    forward = prepare_network(network, device, precision, spec)

    split = spec["split"]
    splits = load_splits(processed_dir)
    if not splits.get(split):
        raise ValueError(f"{processed_dir}/splits.json has no cases in split {split!r}; "
                         f"available: {[k for k in splits if isinstance(splits[k], list)]}")
    cases = SegmentationDataset(processed_dir, list(splits[split]), window=window, crop=crop,
                                num_samples=1, train=False, regions=regions)
    upstream_run_id = spec.get("upstream_run_id") or meta.get("mlflow_run_id") or ""
    out = Path(spec["out"])
    csv_path, figure_path = out.parent / "per_case.csv", out.parent / "overlays.png"

    with tracked_run("evaluate", spec, data_dirs=[processed_dir], upstream_model=model_path,
                     device=runtime.device_name(device)) as run:
        run.set_tags({"upstream.run_id": upstream_run_id, "split": split,
                      "cases": len(cases), **precision_choice.tags()})
        per_case, case_ids, overlay_rows = [], [], []
        progress = StepProgress(len(cases), f"evaluate {spec['run_name']}", every_s=30)
        for index in range(len(cases)):
            item = cases[index]
            image = torch.as_tensor(item["image"])
            probs = predict_volume(forward, image, crop, overlap=float(spec["sw_overlap"]),
                                   mode="gaussian", device=device, precision=precision,
                                   regions=bool(regions))
            pred = probabilities_to_masks(probs, bool(regions))
            truth = ground_truth_masks(torch.as_tensor(item["label"]), probs.shape[0],
                                       bool(regions))
            pred, truth = foreground_masks(pred, truth, bool(regions))
            spacing = [float(s) for s in torch.as_tensor(item["spacing"]).flatten().tolist()]
            case_id = str(item["case"])
            per_case.append(case_metrics(pred, truth, spacing, names))
            case_ids.append(case_id)
            if len(overlay_rows) < OVERLAY_CASES:
                overlay_rows.append(overlay_slice(image, truth, pred, case_id))
            progress.update(index + 1)
        progress.close()

        summary = aggregate(per_case, names)
        metrics = {"test_dice_mean": summary["dice_mean"], "test_hd95_mean": summary["hd95_mean"]}
        for name, key in zip(names, keys):
            metrics[f"test_dice_{key}"] = summary["dice"][name]
            metrics[f"test_hd95_{key}"] = summary["hd95"][name]
        run.log_metrics(metrics, step=0)

        write_per_case_csv(csv_path, case_ids, per_case, names)
        save_overlay_figure(overlay_rows, names, figure_path)
        result = {
            "run_id": run.run_id, "stage": "evaluate", "split": split, "model": model_path,
            "upstream_run_id": upstream_run_id, "spec_hash": compute_spec_hash(spec),
            "cases": len(per_case),
            "metrics": {k: json_number(v) for k, v in metrics.items()},
            "per_class": {"dice": {n: json_number(summary["dice"][n]) for n in names},
                          "hd95": {n: json_number(summary["hd95"][n]) for n in names}},
            "excluded": summary["excluded"],
            "per_case": [{"case": cid, **{n: {"dice": json_number(c[n]["dice"]),
                                              "hd95": json_number(c[n]["hd95"])}
                                          for n in names}}
                         for cid, c in zip(case_ids, per_case)],
            "conventions": "Dice/HD95 NaN (null) where the ground truth is empty; HD95 null "
                           "where the prediction is empty; class values average the defined "
                           "cases, means average the classes (hybridmim/evaluate/metrics.py)",
            "seconds": time.monotonic() - started,
        }
        write_json(out, result)
        for path in (out, csv_path, figure_path):
            run.log_artifact(path)
    log.info("evaluated %d %s cases: mean Dice %.4f, mean HD95 %.2f mm → %s", len(per_case), split,
             summary["dice_mean"], summary["hd95_mean"], out)
    return result


def write_per_case_csv(path: Path, case_ids: list[str], per_case: list[dict],
                       names: list[str]) -> None:
    """One row per case: dice_<class>, hd95_<class> (empty cell = undefined)."""
    columns = ["case"] + [f"{m}_{metric_key(n)}" for n in names for m in ("dice", "hd95")]
    with atomic_path(path, suffix=".csv") as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        for case_id, case in zip(case_ids, per_case):
            row = [case_id]
            for name in names:
                for metric in ("dice", "hd95"):
                    value = json_number(case[name][metric])
                    row.append("" if value is None else repr(value))
            writer.writerow(row)
