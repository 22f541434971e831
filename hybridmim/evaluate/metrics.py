"""Segmentation metrics: Dice and HD95 (millimetres) per class, per case, and their aggregates.

Both come from MONAI (``DiceMetric``; ``compute_hausdorff_distance`` at percentile 95 with the
voxel spacing). Empty classes follow MONAI's defaults, as the MONAI research-contributions BTCV
validation does (the source of the public reference Dice numbers we compare against):
``DiceMetric(ignore_empty=True)`` with ``get_not_nans`` aggregation:

=========================  ========  ========  ==============================================
ground truth / prediction  Dice      HD95      in the class mean?
=========================  ========  ========  ==============================================
both non-empty             computed  computed  yes
GT non-empty, pred empty   0         NaN       Dice yes; HD95 no (counted: ``hd95_undefined``)
GT empty (pred any)        NaN       NaN       no (counted: ``gt_empty``)
=========================  ========  ========  ==============================================

(That repository's BTCV *test script* scores an absent organ as Dice 0 instead; the published
numbers come from DiceMetric's convention.) A missed structure costs Dice; its HD95 is undefined
(no surface to measure from), so it is NaN rather than invented, counted next to the mean.
Aggregation: a class's value is the mean over the cases where it is defined; ``mean`` is the mean
of the class values (the "mean" column of a per-class table).
"""
from __future__ import annotations

import math
import re
import warnings
from typing import Any, Sequence

import numpy as np
import torch
from monai.metrics import DiceMetric, compute_hausdorff_distance
from monai.networks.utils import one_hot


def class_names(labels: dict[str, str], regions: dict[str, Sequence[int]] | None) -> list[str]:
    """The evaluated structures: region names for BraTS-style regions, else the foreground labels
    in order of their label value (channel ``i + 1`` of a label-map network is ``names[i]``)."""
    if regions:
        return list(regions)
    return [labels[key] for key in sorted(labels, key=int) if int(key) != 0]


def ground_truth_masks(label: torch.Tensor, num_classes: int, regions: bool) -> torch.Tensor:
    """A case's label as SegmentationDataset gives it → binary (K, X, Y, Z): region channels as
    they are, or a class-index map (values 0..K-1, with or without its channel axis) one-hot over
    all classes, background included, like a prediction."""
    if regions:
        return label.bool()
    index = label.reshape(label.shape[-3:]).long()
    check_class_indices(index, num_classes)
    return one_hot(index.unsqueeze(0), num_classes, dtype=torch.bool, dim=0)


def check_class_indices(index: torch.Tensor, num_classes: int) -> None:
    if index.numel() and (int(index.min()) < 0 or int(index.max()) >= num_classes):
        found = sorted(int(v) for v in torch.unique(index))
        raise ValueError(f"label classes {found} do not fit the {num_classes} classes of "
                         "dataset.labels; fix the label map in the config or the label files")


def foreground_masks(prediction: torch.Tensor, truth: torch.Tensor, regions: bool
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop the background channel of label-map one-hots; region masks have none."""
    if regions:
        return prediction.bool(), truth.bool()
    return prediction[1:].bool(), truth[1:].bool()


def dice_metric() -> DiceMetric:
    """Per-case, per-class Dice with the convention above; validation and the test set share it,
    so the checkpoint is chosen by the same Dice the evaluation reports."""
    return DiceMetric(include_background=True, reduction="none", ignore_empty=True)


def case_metrics(prediction: torch.Tensor, truth: torch.Tensor, spacing: Sequence[float],
                 names: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Dice and HD95 (mm) of one case as ``{name: {"dice", "hd95", "gt_empty", "pred_empty"}}``,
    NaN where undefined. ``prediction`` and ``truth`` are binary (K, X, Y, Z) masks, one channel
    per evaluated structure (no background); ``spacing`` is the voxel size in mm along X, Y, Z."""
    if prediction.shape != truth.shape:
        raise ValueError(f"prediction {tuple(prediction.shape)} and ground truth "
                         f"{tuple(truth.shape)} differ in shape")
    if prediction.shape[0] != len(names):
        raise ValueError(f"{prediction.shape[0]} channels but {len(names)} class names "
                         f"{list(names)}")
    if len(spacing) != prediction.ndim - 1:
        raise ValueError(f"spacing {list(spacing)} must have one value per spatial axis")
    y_pred = prediction.unsqueeze(0).float()
    y = truth.unsqueeze(0).float()
    dice = dice_metric()(y_pred, y)[0]
    with warnings.catch_warnings():
        # MONAI warns for every empty mask; the table above says what we do with them.
        warnings.simplefilter("ignore")
        hd95 = compute_hausdorff_distance(y_pred, y, include_background=True, percentile=95,
                                          spacing=[float(s) for s in spacing])[0]
    out: dict[str, dict[str, Any]] = {}
    for index, name in enumerate(names):
        gt_empty = not bool(truth[index].any())
        pred_empty = not bool(prediction[index].any())
        hd = float(hd95[index])
        if gt_empty or pred_empty or not math.isfinite(hd):
            hd = float("nan")
        out[name] = {"dice": float(dice[index]), "hd95": hd,
                     "gt_empty": gt_empty, "pred_empty": pred_empty}
    return out


def nanmean(values: list[float]) -> float:
    """Mean over the defined (non-NaN) values; NaN when none is (numpy would warn)."""
    return float(np.nanmean(values)) if not np.isnan(values).all() else float("nan")


def aggregate(per_case: list[dict[str, dict[str, Any]]], names: Sequence[str]) -> dict[str, Any]:
    """Class means over the cases where a value is defined, the mean over classes, and how many
    cases each class excluded and why (see the module docstring)."""
    if not per_case:
        raise ValueError("no cases to aggregate: the evaluated split is empty")
    dice = {n: nanmean([case[n]["dice"] for case in per_case]) for n in names}
    hd95 = {n: nanmean([case[n]["hd95"] for case in per_case]) for n in names}
    excluded = {n: {"gt_empty": sum(case[n]["gt_empty"] for case in per_case),
                    "hd95_undefined": sum(math.isnan(case[n]["hd95"]) for case in per_case)}
                for n in names}
    return {"dice": dice, "hd95": hd95,
            "dice_mean": nanmean(list(dice.values())), "hd95_mean": nanmean(list(hd95.values())),
            "cases": len(per_case), "excluded": excluded}


def metric_key(name: str) -> str:
    """A class name as an MLflow-safe metric suffix ("Right kidney" → right_kidney)."""
    key = re.sub(r"[^0-9a-z]+", "_", name.lower()).strip("_")
    return key or "class"


def json_number(value: float) -> float | None:
    """NaN is not JSON: undefined values are written as null."""
    return None if value is None or math.isnan(value) else float(value)
