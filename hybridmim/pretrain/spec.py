"""Checks of the pretrain job spec (docs/contracts.md) and the method's resolved settings.

Errors name the spec key and say what to do, before any model or data is touched.
"""
from __future__ import annotations

import copy
import logging
from typing import Any

from hybridmim.pretrain.losses import (CONSISTENCY_FORMS, DEFAULT_WEIGHTS, LOSS_TERMS,
                                       PR_NORMALISATIONS)
from hybridmim.pretrain.masking import MASKING_MODES, REGION_GROUPINGS, MaskGeometry

log = logging.getLogger(__name__)

SWIN_SLICES = ("before_encoder10", "after_encoder10")

METHOD_KINDS = ("hybridmim", "simmim")
SIMMIM_WEIGHTS = {"pr": 1.0, "num": 0.0, "loc": 0.0, "con": 0.0, "cl": 0.0}
_HYBRIDMIM_DEFAULTS = {"box": "partial", "masking": "uniform", "mask_ratio": 0.4,
                       "region_grouping": "spatial", "loss_weights": DEFAULT_WEIGHTS,
                       "temperature": 0.5, "proj_dim": 384, "gather_negatives": False,
                       # Formulation choices: the first value of each is the authors' code.
                       "pr_normalisation": PR_NORMALISATIONS[0],
                       "consistency": CONSISTENCY_FORMS[0],
                       "swin_bottleneck_slice": "before_encoder10"}

_REQUIRED = {
    "": ("seed", "out", "backbone", "geometry", "method", "data", "optim", "checkpoint_every",
         "log_every"),
    "data": ("datasets", "crops_per_volume", "volumes_per_step"),
    "optim": ("lr", "weight_decay", "warmup_steps", "steps"),
}


class PretrainSpecError(ValueError):
    """The pretrain spec is incomplete or inconsistent; the message names the key."""


def _positive_int(value: Any, key: str, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise PretrainSpecError(f"pretrain spec: {key} must be an integer >= {minimum}, "
                                f"got {value!r}")


def resolve_method(method: dict[str, Any]) -> dict[str, Any]:
    """The method block with defaults filled in and its ``kind`` (hybridmim|simmim) resolved.

    ``kind`` falls back to ``name`` (a config may name an ablation e.g. ``hybridmim_no_cl`` and set
    ``kind: hybridmim``). SimMIM is defined, not configured: full box and L_PR only; a spec asking
    for anything else under that kind is refused rather than silently changed.
    """
    if not isinstance(method, dict):
        raise PretrainSpecError(f"pretrain spec: method must be a dict, got {method!r}")
    kind = method.get("kind") or method.get("name")
    if kind not in METHOD_KINDS:
        raise PretrainSpecError(f"pretrain spec: method.kind (or method.name) must be one of "
                                f"{list(METHOD_KINDS)}, got {kind!r}")
    resolved = {**copy.deepcopy(_HYBRIDMIM_DEFAULTS), **copy.deepcopy(method), "kind": kind}
    if kind == "simmim":
        if method.get("box", "full") != "full":
            raise PretrainSpecError("pretrain spec: method 'simmim' reconstructs the full volume; "
                                    f"method.box must be 'full', got {method['box']!r}")
        weights = method.get("loss_weights", SIMMIM_WEIGHTS)
        if {t: float(weights.get(t, 0.0)) for t in LOSS_TERMS} != SIMMIM_WEIGHTS:
            raise PretrainSpecError("pretrain spec: method 'simmim' uses L_PR only; "
                                    f"method.loss_weights must be {SIMMIM_WEIGHTS}, got {weights}")
        resolved["box"], resolved["loss_weights"] = "full", dict(SIMMIM_WEIGHTS)
    if resolved["masking"] not in MASKING_MODES:
        raise PretrainSpecError(f"pretrain spec: method.masking must be one of "
                                f"{list(MASKING_MODES)}, got {resolved['masking']!r}")
    if resolved["region_grouping"] not in REGION_GROUPINGS:
        raise PretrainSpecError(f"pretrain spec: method.region_grouping must be one of "
                                f"{list(REGION_GROUPINGS)}, got {resolved['region_grouping']!r}")
    for key, allowed in (("pr_normalisation", PR_NORMALISATIONS),
                         ("consistency", CONSISTENCY_FORMS),
                         ("swin_bottleneck_slice", SWIN_SLICES)):
        if resolved[key] not in allowed:
            raise PretrainSpecError(f"pretrain spec: method.{key} must be one of "
                                    f"{list(allowed)}, got {resolved[key]!r}")
    ratio = resolved["mask_ratio"]
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio < 1:
        raise PretrainSpecError(f"pretrain spec: method.mask_ratio must be in (0, 1), "
                                f"got {ratio!r}")
    return resolved


def check_contrastive_views(backbone: dict[str, Any], method: dict[str, Any],
                            where: str = "pretrain spec") -> None:
    """Refuse L_CL on an encoder without dropout: its two views would be identical.

    The second view of the contrastive term is the same masked input through the same weights; only
    dropout makes it differ. Without encoder dropout z1 == z2: the positive pair gives no gradient
    and the term only pushes the samples of a batch apart, which is not the method (UNETR's MONAI
    default dropout_rate is 0.0).
    """
    from hybridmim.models.backbones import encoder_dropout

    if method.get("kind", method.get("name")) == "simmim":
        return
    weight = {**DEFAULT_WEIGHTS, **(method.get("loss_weights") or {})}["cl"]
    try:
        rates = encoder_dropout(backbone)
    except ValueError as exc:  # an invalid backbone block
        raise PretrainSpecError(f"{where}: {exc}") from None
    if weight > 0 and not any(rates.values()):
        keys = " or ".join(f"backbone.{k}" for k in rates)
        raise PretrainSpecError(
            f"{where}: method {method.get('name', method.get('kind'))!r} has a contrastive term "
            f"(loss_weights.cl = {weight}) but backbone {backbone['name']!r} has no encoder "
            f"dropout ({rates}): its two views are identical, so L_CL has no positive-pair signal "
            f"left. Set {keys} > 0 (the paper uses 0.1) or loss_weights.cl to 0")


def validate_pretrain_spec(spec: dict[str, Any]) -> None:
    if not isinstance(spec, dict):
        raise PretrainSpecError(f"pretrain spec must be a JSON object, got {type(spec).__name__}")
    for section, keys in _REQUIRED.items():
        block = spec.get(section, {}) if section else spec
        if not isinstance(block, dict):
            raise PretrainSpecError(f"pretrain spec: {section} must be a dict, got {block!r}")
        missing = [f"{section}.{k}" if section else k for k in keys if k not in block]
        if missing:
            raise PretrainSpecError(f"pretrain spec is missing {missing}; build the spec with "
                                    f"`hybridmim spec pretrain ...` from a validated config")
    try:
        MaskGeometry.coerce(spec["geometry"])
    except ValueError as exc:
        raise PretrainSpecError(f"pretrain spec: {exc}") from None
    data, optim = spec["data"], spec["optim"]
    _positive_int(data["crops_per_volume"], "data.crops_per_volume")
    _positive_int(data["volumes_per_step"], "data.volumes_per_step")
    _positive_int(data.get("val_volumes", 0), "data.val_volumes", minimum=0)
    _positive_int(data.get("num_workers", 0), "data.num_workers", minimum=0)
    _positive_int(optim["steps"], "optim.steps")
    _positive_int(optim["warmup_steps"], "optim.warmup_steps", minimum=0)
    _positive_int(spec["checkpoint_every"], "checkpoint_every")
    _positive_int(spec["log_every"], "log_every")
    if optim["warmup_steps"] > optim["steps"]:
        raise PretrainSpecError(f"pretrain spec: optim.warmup_steps ({optim['warmup_steps']}) "
                                f"exceeds optim.steps ({optim['steps']})")
    for key in ("lr", "weight_decay"):
        if not isinstance(optim[key], (int, float)) or optim[key] < 0:
            raise PretrainSpecError(f"pretrain spec: optim.{key} must be a number >= 0, "
                                    f"got {optim[key]!r}")
    method = resolve_method(spec["method"])
    try:
        check_contrastive_views(spec["backbone"], method)
    except PretrainSpecError as exc:
        # A config with this is refused at parse time (hybridmim.config); a hand-written spec may
        # still do it on purpose (the DDP equivalence test needs dropout-free passes).
        log.warning("%s", exc)
    if method["loss_weights"].get("cl", 0) > 0:
        crops = data["crops_per_volume"]
        val_batch = min(data.get("val_volumes", 0), data["volumes_per_step"]) * crops
        if data["volumes_per_step"] * crops < 2 or 0 < val_batch < 2:
            raise PretrainSpecError(
                "pretrain spec: the contrastive term (method.loss_weights.cl > 0) needs at least "
                "2 crops per step; raise data.volumes_per_step or data.crops_per_volume "
                "(and data.val_volumes)")
    datasets = data["datasets"]
    if not isinstance(datasets, list) or not datasets:
        raise PretrainSpecError("pretrain spec: data.datasets must be a non-empty list of "
                                "{name, processed_dir, modality, window}")
    for i, ds in enumerate(datasets):
        missing = [k for k in ("name", "processed_dir", "window") if k not in ds]
        if missing:
            raise PretrainSpecError(f"pretrain spec: data.datasets[{i}] is missing {missing}")
