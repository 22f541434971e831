"""Test-set evaluation of a fine-tuned model.pt (spec: workflow/schemas/evaluate_spec.schema.yaml).

Every case of the split is segmented from its RAW files the way `hybridmim predict` does it
(hybridmim/predict/pipeline.py: the model's preprocessing, sliding windows with the model's crop,
Gaussian blending and the spec's overlap, inverted back onto the image's own grid) and the label
map is written to ``predictions/<case>.nii.gz`` beside metrics.json. Dice and HD95 per class
(evaluate/metrics.py for the empty-class conventions) are computed against the raw label file on
that original grid — the Decathlon / nnU-Net protocol — or, with ``grid: resampled``, on the
preprocessed grid as MONAI's tutorials report them; metrics.json and the run's ``grid`` tag say
which. Outputs: MLflow metrics ``test_dice_<class>``, ``test_hd95_<class>``, ``test_dice_mean``,
``test_hd95_mean`` in the ``evaluate`` experiment; ``metrics.json`` (undefined values as null),
``per_case.csv`` and ``overlays.png`` beside it, also logged as artifacts.
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import torch

from hybridmim import runtime
from hybridmim.atomic import atomic_path, write_json
from hybridmim.checkpoints import LoadedModel
from hybridmim.evaluate.metrics import (aggregate, case_metrics, class_names, json_number,
                                        metric_key)
from hybridmim.evaluate.overlays import overlay_slice, save_overlay_figure
from hybridmim.hashing import sha256_file, spec_hash as compute_spec_hash
from hybridmim.predict.inference import prepare_for_inference, probabilities_to_masks
from hybridmim.predict.pipeline import (CasePredictor, check_preprocess, masks_from_label_values,
                                        recorded_preprocess, save_label_map)
from hybridmim.progress import StepProgress
from hybridmim.spec_schemas import check_spec

log = logging.getLogger(__name__)

OVERLAY_CASES = 3


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
    from hybridmim.data.prepare.splits import load_splits
    from hybridmim.tracking.runs import tracked_run

    check_spec(spec, "evaluate")
    started = time.monotonic()
    runtime.configure_threads(spec.get("threads"))
    runtime.seed_everything(int(spec.get("seed", 0)))
    dataset = spec["dataset"]
    processed_dir = dataset["processed_dir"]
    model_path = str(spec["model"])
    loaded = LoadedModel.from_file(model_path)
    meta = loaded.meta
    if meta.get("stage") != "finetune" or "crop" not in meta:
        raise ValueError(f"{model_path} is a {meta.get('stage')!r} model, not a fine-tuned "
                         "segmentation model; evaluate the model.pt of a finetune job")
    _check_model_matches(meta, dataset, model_path)
    regions = meta.get("regions") or None
    labels = meta.get("labels") or dataset["labels"]
    names = class_names(labels, regions)
    keys = [metric_key(n) for n in names]
    if len(set(keys)) != len(keys):
        raise ValueError(f"class names {names} collide as metric names {keys}; rename labels")
    window = meta.get("window") or dataset.get("window")
    forward, device, precision_choice = prepare_for_inference(
        loaded, spec.get("precision", "auto"), spec)

    split = spec["split"]
    splits = load_splits(processed_dir)
    if not splits.get(split):
        raise ValueError(f"{processed_dir}/splits.json has no cases in split {split!r}; "
                         f"available: {[k for k in splits if isinstance(splits[k], list)]}")
    case_ids_wanted = list(splits[split])
    raw_cases = raw_case_files(dataset, case_ids_wanted)
    grid = spec.get("grid", "original")
    recipe = model_recipe(meta, dataset, model_path)
    channels = meta.get("channels") or len(dataset.get("channels") or ["image"])
    predictor = CasePredictor(forward, {**meta, "window": window, "labels": labels,
                                        "channels": channels}, recipe,
                              overlap=float(spec["sw_overlap"]), device=device,
                              precision=precision_choice.precision)
    upstream_run_id = spec.get("upstream_run_id") or meta.get("mlflow_run_id") or ""
    out = Path(spec["out"])
    csv_path, figure_path = out.parent / "per_case.csv", out.parent / "overlays.png"
    predictions_dir = out.parent / "predictions"
    project_root = Path(spec.get("project_root") or Path.cwd())

    with tracked_run("evaluate", spec, data_dirs=[processed_dir], upstream_model=model_path,
                     device=runtime.device_name(device)) as run:
        run.set_tags({"upstream.run_id": upstream_run_id, "split": split,
                      "cases": len(case_ids_wanted), "grid": grid,
                      **precision_choice.tags()})
        per_case, overlay_rows, files = [], [], []
        progress = StepProgress(len(case_ids_wanted), f"evaluate {spec['run_name']}", every_s=30)
        for index, case_id in enumerate(case_ids_wanted):
            case = raw_cases[case_id]
            result = predictor(case.images, case.label)
            prediction_path = predictions_dir / f"{case_id}.nii.gz"
            save_label_map(result.label, case.images[0], prediction_path)
            masks = probabilities_to_masks(result.resampled_probs, bool(regions))
            pred_resampled = masks if regions else masks[1:]  # no background channel
            truth_resampled = masks_from_label_values(result.resampled_label, labels, regions)
            if grid == "original":
                truth_original, spacing = read_label_file(case.label)
                pred = masks_from_label_values(torch.from_numpy(result.label), labels, regions)
                truth = masks_from_label_values(truth_original, labels, regions)
            else:
                pred, truth, spacing = (pred_resampled, truth_resampled,
                                        result.resampled_spacing)
            per_case.append(case_metrics(pred, truth, spacing, names))
            files.append({"prediction": os.path.relpath(prediction_path, project_root),
                          "prediction_sha256": sha256_file(prediction_path),
                          "label": os.path.relpath(case.label, project_root)})
            if len(overlay_rows) < OVERLAY_CASES:
                overlay_rows.append(overlay_slice(result.resampled_image, truth_resampled,
                                                  pred_resampled, case_id))
            progress.update(index + 1)
        progress.close()
        for stale in set(predictions_dir.glob("*.nii.gz")) - {
                predictions_dir / f"{c}.nii.gz" for c in case_ids_wanted}:
            stale.unlink()  # a case no longer in the split must not look evaluated

        summary = aggregate(per_case, names)
        metrics = {"test_dice_mean": summary["dice_mean"], "test_hd95_mean": summary["hd95_mean"],
                   **{f"test_{metric}_{key}": summary[metric][name]
                      for name, key in zip(names, keys) for metric in ("dice", "hd95")}}
        run.log_metrics(metrics, step=0)

        write_per_case_csv(csv_path, case_ids_wanted, per_case, names)
        save_overlay_figure(overlay_rows, names, figure_path,
                            radiological=spec["dataset"].get("modality") == "CT")
        result = {
            "run_id": run.run_id, "stage": "evaluate", "split": split, "model": model_path,
            "upstream_run_id": upstream_run_id, "spec_hash": compute_spec_hash(spec),
            "cases": len(per_case),
            "metrics": {k: json_number(v) for k, v in metrics.items()},
            "per_class": {metric: {n: json_number(summary[metric][n]) for n in names}
                          for metric in ("dice", "hd95")},
            "excluded": summary["excluded"],
            "grid": grid,
            "per_case": [{"case": cid, **f, **{n: {"dice": json_number(c[n]["dice"]),
                                                   "hd95": json_number(c[n]["hd95"])}
                                               for n in names}}
                         for cid, c, f in zip(case_ids_wanted, per_case, files)],
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


def model_recipe(meta: dict[str, Any], dataset: dict[str, Any], model: str) -> dict[str, Any]:
    """The preprocessing the model was trained with; the dataset's must be the same one."""
    # The cache records the recipe as applied (a config's "median" spacing resolved to numbers).
    dataset_recipe = recorded_preprocess(dataset["processed_dir"]) or dataset.get("preprocess")
    checked = check_preprocess(meta.get("preprocess") or dataset_recipe, model)
    if meta.get("preprocess") and dataset_recipe:
        wanted = check_preprocess(dataset_recipe, "evaluate spec dataset")
        if wanted != checked:
            raise ValueError(f"{model} was trained on data preprocessed as {checked} but the "
                             f"evaluate spec's dataset.preprocess is {wanted}; evaluate it on "
                             "the dataset it was trained for")
    return checked


def raw_case_files(dataset: dict[str, Any], case_ids: list[str]) -> dict[str, Any]:
    """The raw image/label files of the evaluated cases (the canonical layout's dataset.json)."""
    from hybridmim.data.layout import list_cases, read_index

    raw_dir = Path(dataset["raw_dir"])
    cases = {c.case: c for c in list_cases(raw_dir, read_index(raw_dir), False)}
    missing = [case for case in case_ids if case not in cases or cases[case].label is None]
    if missing:
        raise KeyError(f"{raw_dir}/dataset.json lists no labelled raw case {missing[:5]} of the "
                       "evaluated split; the raw and processed folders disagree (re-run "
                       "hybridmim data prepare)")
    return cases


def read_label_file(path: str | Path) -> tuple[torch.Tensor, list[float]]:
    """A raw label file as integer values in its stored voxel order, and its voxel size (mm)."""
    import nibabel as nib
    import numpy as np

    image = nib.load(str(path))
    values = np.rint(np.asarray(image.dataobj)).astype(np.int64)
    spacing = [float(s) for s in np.linalg.norm(image.affine[:3, :3], axis=0)]
    return torch.from_numpy(values.reshape(values.shape[:3])), spacing


def write_per_case_csv(path: Path, case_ids: list[str], per_case: list[dict],
                       names: list[str]) -> None:
    """One row per case: dice_<class>, hd95_<class> (empty cell = undefined)."""
    import pandas as pd

    rows = [{"case": case_id, **{f"{metric}_{metric_key(name)}": case[name][metric]
                                 for name in names for metric in ("dice", "hd95")}}
            for case_id, case in zip(case_ids, per_case)]
    with atomic_path(path, suffix=".csv") as tmp:
        # CRLF line ends, as Python's csv module writes them (and earlier files have them).
        pd.DataFrame(rows).to_csv(tmp, index=False, lineterminator="\r\n")
