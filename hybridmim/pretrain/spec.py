"""Checks of the pretrain job spec and the method's resolved settings.

The spec's keys, types and ranges are in workflow/schemas/pretrain_spec.schema.yaml; here are the
checks between keys a schema cannot express. Errors name the spec key and say what to do, before
any model or data is touched.
"""
from __future__ import annotations

import copy
import logging
from typing import Any

from hybridmim.config import SIMMIM_WEIGHTS
from hybridmim.pretrain.losses import DEFAULT_WEIGHTS, LOSS_TERMS
from hybridmim.pretrain.masking import MaskGeometry
from hybridmim.spec_schemas import SpecError, check_spec, config_defaults

log = logging.getLogger(__name__)


class PretrainSpecError(SpecError):
    """The pretrain spec is incomplete or inconsistent; the message names the key."""


def resolve_method(method: dict[str, Any]) -> dict[str, Any]:
    """The method block with defaults filled in and its ``kind`` (hybridmim|simmim) resolved.

    The defaults are the config schema's (definitions.method), so a spec's absent key means what
    it means in a config. ``kind`` falls back to ``name`` (a config may name an ablation e.g.
    ``hybridmim_no_cl`` and set ``kind: hybridmim``); the spec schema makes one of them hybridmim or
    simmim. SimMIM is defined, not configured: full box and L_PR only; a spec asking for anything
    else under that kind is refused rather than silently changed.
    """
    kind = method.get("kind") or method.get("name")
    resolved = {**config_defaults("method"), **copy.deepcopy(method), "kind": kind}
    if kind == "simmim":
        if method.get("box", "full") != "full":
            raise PretrainSpecError("pretrain spec: method 'simmim' reconstructs the full volume; "
                                    f"method.box must be 'full', got {method['box']!r}")
        weights = method.get("loss_weights", SIMMIM_WEIGHTS)
        if {t: float(weights.get(t, 0.0)) for t in LOSS_TERMS} != SIMMIM_WEIGHTS:
            raise PretrainSpecError("pretrain spec: method 'simmim' uses L_PR only; "
                                    f"method.loss_weights must be {SIMMIM_WEIGHTS}, got {weights}")
        resolved["box"], resolved["loss_weights"] = "full", dict(SIMMIM_WEIGHTS)
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
    check_spec(spec, "pretrain", PretrainSpecError)
    try:
        MaskGeometry.coerce(spec["geometry"])
    except ValueError as exc:
        raise PretrainSpecError(f"pretrain spec: {exc}") from None
    data, optim = spec["data"], spec["optim"]
    if optim["warmup_steps"] > optim["steps"]:
        raise PretrainSpecError(f"pretrain spec: optim.warmup_steps ({optim['warmup_steps']}) "
                                f"exceeds optim.steps ({optim['steps']})")
    method = resolve_method(spec["method"])
    # The schema checks each weight; the loss needs all five and one of them on.
    weights = method["loss_weights"]
    missing = [t for t in LOSS_TERMS if t not in weights]
    if missing:
        raise PretrainSpecError(f"pretrain spec: method.loss_weights is missing {missing}; give "
                                f"every term a weight (0 switches a term off)")
    if not any(weights.values()):
        raise PretrainSpecError("pretrain spec: method.loss_weights are all 0: at least one term "
                                "must be on")
    try:
        check_contrastive_views(spec["backbone"], method)
    except PretrainSpecError as exc:
        # A config with this is refused at parse time (hybridmim.config); a hand-written spec may
        # still do it on purpose (the DDP equivalence test needs dropout-free passes).
        log.warning("%s", exc)
    if weights["cl"] > 0:
        crops = data["crops_per_volume"]
        val_batch = min(data.get("val_volumes", 0), data["volumes_per_step"]) * crops
        if data["volumes_per_step"] * crops < 2 or 0 < val_batch < 2:
            raise PretrainSpecError(
                "pretrain spec: the contrastive term (method.loss_weights.cl > 0) needs at least "
                "2 crops per step; raise data.volumes_per_step or data.crops_per_volume "
                "(and data.val_volumes)")
