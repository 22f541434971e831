"""Metrics with known answers, the empty-class conventions, and the evaluation job end to end."""
import csv
import hashlib
import json
import math

import nibabel as nib
import numpy as np
import pytest
import torch

from hybridmim.checkpoints import publish_model
from hybridmim.evaluate.metrics import (aggregate, case_metrics, class_names, ground_truth_masks,
                                        metric_key)
from hybridmim.models.backbones import build_segmentation_network
from test_finetune import (CROP, LABELS, TINY_UNET, TOY_PREPROCESS, WINDOW,
                           make_processed_dataset, raw_dir_of, tracking_block)


def _masks(shape, *boxes):
    out = torch.zeros((len(boxes), *shape), dtype=torch.bool)
    for k, box in enumerate(boxes):
        if box is not None:
            out[(k, *box)] = True
    return out


def test_offset_cubes_dice_and_planes_hd95_in_millimetres():
    shape = (30, 30, 30)
    # Two 10^3 cubes offset by 2 voxels along z overlap in 10*10*8 voxels: Dice 2*800/2000.
    truth = _masks(shape, (slice(10, 20), slice(10, 20), slice(10, 20)))
    pred = _masks(shape, (slice(10, 20), slice(10, 20), slice(12, 22)))
    cube = case_metrics(pred, truth, spacing=(1.0, 1.0, 2.5), names=["cube"])["cube"]
    assert cube["dice"] == pytest.approx(0.8)
    # Every surface voxel is at most 2 voxels (5 mm along z) from the other surface.
    assert 0.0 < cube["hd95"] <= 5.0 + 1e-6

    # One-voxel-thick planes 3 voxels apart along z: every surface distance is 3 * 2.5 mm, so
    # HD95 is exactly 7.5 mm — it would be 3 or 2.4 mm if the wrong axis' spacing were used.
    plane_truth = _masks(shape, (slice(5, 15), slice(5, 15), slice(10, 11)))
    plane_pred = _masks(shape, (slice(5, 15), slice(5, 15), slice(13, 14)))
    z_planes = case_metrics(plane_pred, plane_truth, (0.8, 1.0, 2.5), ["p"])["p"]
    assert z_planes["dice"] == 0.0
    assert z_planes["hd95"] == pytest.approx(7.5)
    # The same along x: 4 voxels of 0.8 mm.
    x_truth = _masks(shape, (slice(10, 11), slice(5, 15), slice(5, 15)))
    x_pred = _masks(shape, (slice(14, 15), slice(5, 15), slice(5, 15)))
    assert case_metrics(x_pred, x_truth, (0.8, 1.0, 2.5), ["p"])["p"]["hd95"] == \
        pytest.approx(3.2)


def test_empty_class_conventions_and_aggregation():
    shape = (16, 16, 16)
    box = (slice(4, 10), slice(4, 10), slice(4, 10))
    names = ["a", "b", "c"]
    # a: perfect; b: GT present, prediction empty; c: both empty.
    first = case_metrics(_masks(shape, box, None, None), _masks(shape, box, box, None),
                         (1.0, 1.0, 1.0), names)
    assert first["a"] == {"dice": 1.0, "hd95": 0.0, "gt_empty": False, "pred_empty": False}
    assert first["b"]["dice"] == 0.0 and math.isnan(first["b"]["hd95"])
    assert math.isnan(first["c"]["dice"]) and math.isnan(first["c"]["hd95"])
    assert first["c"]["gt_empty"] and first["c"]["pred_empty"]
    # GT empty but something predicted: still undefined (MONAI ignore_empty), not a zero.
    second = case_metrics(_masks(shape, box, box, box), _masks(shape, box, box, None),
                          (1.0, 1.0, 1.0), names)
    assert math.isnan(second["c"]["dice"]) and math.isnan(second["c"]["hd95"])
    assert second["b"] == {"dice": 1.0, "hd95": 0.0, "gt_empty": False, "pred_empty": False}

    summary = aggregate([first, second], names)
    assert summary["dice"] == {"a": 1.0, "b": 0.5, "c": pytest.approx(float("nan"), nan_ok=True)}
    assert summary["hd95"]["b"] == 0.0  # only the defined case counts
    assert summary["dice_mean"] == pytest.approx(0.75)  # over the classes that are defined
    assert summary["excluded"]["b"] == {"gt_empty": 0, "hd95_undefined": 1}
    assert summary["excluded"]["c"] == {"gt_empty": 2, "hd95_undefined": 2}
    with pytest.raises(ValueError, match="split is empty"):
        aggregate([], names)


def test_label_maps_regions_and_bad_labels():
    labels = {"0": "background", "1": "NCR", "2": "ED", "4": "ET"}
    assert class_names(labels, None) == ["NCR", "ED", "ET"]
    assert class_names(labels, {"TC": [1, 4], "WT": [1, 2, 4], "ET": [4]}) == ["TC", "WT", "ET"]
    # Class-index labels (what SegmentationDataset yields) become one-hot over all classes.
    masks = ground_truth_masks(torch.tensor([0, 1, 3, 3]).view(1, 1, 1, 4), 4, regions=False)
    assert masks.shape == (4, 1, 1, 4) and masks.sum(0).eq(1).all() and masks[3, 0, 0, 2]
    with pytest.raises(ValueError, match=r"label classes \[0, 4\] do not fit the 4 classes"):
        ground_truth_masks(torch.tensor([0, 4]).view(1, 1, 2), 4, regions=False)
    assert metric_key("Right kidney / RK") == "right_kidney_rk"
    with pytest.raises(ValueError, match="one value per spatial axis"):
        case_metrics(torch.zeros(1, 4, 4, 4, dtype=torch.bool),
                     torch.zeros(1, 4, 4, 4, dtype=torch.bool), (1.0, 1.0), ["x"])


def _publish_random_model(path, run_id="upstream123"):
    torch.manual_seed(3)
    net, class_path, kwargs = build_segmentation_network(TINY_UNET, len(LABELS), CROP)
    meta = {"stage": "finetune", "crop": CROP, "labels": LABELS, "regions": None,
            "window": WINDOW, "mlflow_run_id": run_id}
    publish_model(path, class_path, kwargs, net.state_dict(), meta)


def test_evaluation_writes_metrics_equal_to_mlflow(tmp_path):
    from mlflow.tracking import MlflowClient

    processed = make_processed_dataset(tmp_path / "processed" / "toy", n_cases=5)
    model = tmp_path / "finetune" / "model.pt"
    _publish_random_model(model)
    out = tmp_path / "evaluate" / "metrics.json"
    spec = {"run_name": "eval-test", "seed": 0, "out": str(out), "precision": "fp32",
            "threads": 1, "tracking": tracking_block(tmp_path), "provenance": {"rule": "t"},
            "dataset": {"name": "toy", "processed_dir": str(processed), "modality": "CT",
                        "window": WINDOW, "labels": LABELS, "regions": None,
                        "raw_dir": str(raw_dir_of(processed)), "preprocess": TOY_PREPROCESS},
            "model": str(model), "split": "test", "sw_overlap": 0.25,
            "upstream_run_id": "upstream123", "project_root": str(tmp_path)}
    result = run_evaluation_spec(spec)
    written = json.loads(out.read_text())
    assert written == json.loads(json.dumps(result))
    run = MlflowClient(spec["tracking"]["uri"]).get_run(written["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.tags["upstream.run_id"] == "upstream123"
    assert set(run.data.metrics) == set(written["metrics"]) == {
        "test_dice_mean", "test_hd95_mean", "test_dice_cube", "test_hd95_cube"}
    for name, value in written["metrics"].items():
        recorded = run.data.metrics[name]
        assert (value is None and math.isnan(recorded)) or recorded == pytest.approx(value)
    test_ids = json.loads((processed / "splits.json").read_text())["test"]
    assert [c["case"] for c in written["per_case"]] == test_ids
    rows = list(csv.DictReader((out.parent / "per_case.csv").read_text().splitlines()))
    assert [r["case"] for r in rows] == test_ids
    for row, case in zip(rows, written["per_case"]):
        assert float(row["dice_cube"]) == pytest.approx(case["cube"]["dice"])
    assert (out.parent / "overlays.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    artifacts = {a.path for a in MlflowClient(spec["tracking"]["uri"]).list_artifacts(
        written["run_id"])}
    assert {"metrics.json", "per_case.csv", "overlays.png"} <= artifacts
    assert written["grid"] == "original" and run.data.tags["grid"] == "original"
    for case in written["per_case"]:  # contract 1: the scored prediction, on the raw grid
        # Paths are relative to the project root (the working directory, here the spec's).
        name = f"{case['case']}.nii.gz"
        assert tmp_path / case["prediction"] == out.parent / "predictions" / name
        assert tmp_path / case["label"] == raw_dir_of(processed) / "labelsTr" / name
        prediction = nib.load(tmp_path / case["prediction"])
        label = nib.load(tmp_path / case["label"])
        assert hashlib.sha256((tmp_path / case["prediction"]).read_bytes()).hexdigest() == \
            case["prediction_sha256"]
        assert prediction.shape == label.shape and np.allclose(prediction.affine, label.affine)
        assert prediction.get_data_dtype() == np.uint8
        pred, truth = np.asarray(prediction.dataobj) == 1, np.asarray(label.dataobj) == 1
        dice = 2 * (pred & truth).sum() / (pred.sum() + truth.sum())
        assert case["cube"]["dice"] == pytest.approx(dice)


def test_evaluation_refuses_model_of_another_label_map(tmp_path):
    processed = make_processed_dataset(tmp_path / "processed" / "toy", n_cases=5)
    model = tmp_path / "model.pt"
    _publish_random_model(model)
    spec = {"run_name": "e", "out": str(tmp_path / "m.json"), "tracking": tracking_block(tmp_path),
            "dataset": {"processed_dir": str(processed), "raw_dir": str(raw_dir_of(processed)),
                        "labels": {"0": "background", "1": "liver"}},
            "model": str(model), "split": "test", "sw_overlap": 0.5}
    with pytest.raises(ValueError, match="fine-tuned with labels="):
        run_evaluation_spec(spec)
    with pytest.raises(ValueError, match=r"evaluate spec: missing \['sw_overlap'\]"):
        run_evaluation_spec({k: v for k, v in spec.items() if k != "sw_overlap"})
    assert not (tmp_path / "m.json").exists()


def run_evaluation_spec(spec):
    from hybridmim.evaluate.run import run_evaluation

    return run_evaluation(spec)


def test_ct_overlays_are_in_radiological_orientation(tmp_path):
    from PIL import Image

    from hybridmim.evaluate.overlays import overlay_slice, save_overlay_figure

    # RAS cache: X grows towards the patient's right; make the patient's right half bright.
    image = torch.zeros(1, 24, 24, 3)
    image[0, 12:] = 1.0
    truth = torch.zeros(1, 24, 24, 3, dtype=torch.bool)
    truth[0, 10:14, 10:14] = True
    row = overlay_slice(image, truth, truth, "case")
    sides = {}
    for radiological in (True, False):
        path = tmp_path / f"{radiological}.png"
        save_overlay_figure([row], ["organ"], path, radiological=radiological)
        pixels = np.asarray(Image.open(path).convert("L"), float)
        height, width = pixels.shape
        panel = pixels[height // 4: height // 2, : width // 3]  # the image panel of the row
        half = panel.shape[1] // 2
        sides[radiological] = panel[:, :half].mean() > panel[:, half:].mean()
    # Radiological: the patient's right (bright) on the image's left; otherwise on the right.
    assert sides == {True: True, False: False}
