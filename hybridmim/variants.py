"""Ablation variants: declared overrides of a base pretraining method, named by what they change.

``pretraining.variants`` maps a base method to a list of overrides; each override becomes a
method of its own whose name is the base's name followed by what it changes
(``hybridmim-no_cl``, ``hybridmim-mask0.6``, ``hybridmim-patch8``). The name is generated, never
typed twice, so it cannot disagree with what the variant does. A variant never copies its base: it
is resolved as base ⊕ overrides each time the config is read, so a change of the base reaches
every variant. Nothing here imports torch.
"""
from __future__ import annotations

import copy
from typing import Any

# The keys a variant may override (those of a method block, except its kind; the config schema's
# method_override refuses any other), each with the part it adds to the variant's name, in name
# order; loss_weights and geometry are named per term / key.
NAME_PARTS = {"box": "box_{}", "masking": "{}_masking", "mask_ratio": "mask{}",
              "region_grouping": "{}_grouping", "temperature": "temp{}", "proj_dim": "proj{}",
              "gather_negatives": None,  # a flag: gathered_negatives / local_negatives
              "pr_normalisation": "pr_{}_mean", "consistency": "con_{}",
              "swin_bottleneck_slice": "swin_slice_{}"}
LOSS_TERMS = ("pr", "num", "loc", "con", "cl")
GEOMETRY_KEYS = ("crop", "region", "patch")


class VariantError(ValueError):
    """A variant override is unknown or impossible; the message names the key."""


def _number(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def change_parts(overrides: dict[str, Any]) -> list[str]:
    """The readable parts of a variant's name, one per changed key, in a fixed order."""
    parts: list[str] = []
    weights = overrides.get("loss_weights") or {}
    auxiliary = [t for t in LOSS_TERMS if t != "pr"]
    if all(t in weights and float(weights[t]) == 0.0 for t in auxiliary):
        parts.append("pr_only")  # the pixel-reconstruction-only ablation
        weights = {t: v for t, v in weights.items() if t == "pr"}
    for term in LOSS_TERMS:
        if term in weights:
            parts.append(f"no_{term}" if float(weights[term]) == 0.0
                         else f"{term}{_number(weights[term])}")
    for key, part in NAME_PARTS.items():
        if key == "gather_negatives" and key in overrides:
            parts.append("gathered_negatives" if overrides[key] else "local_negatives")
        elif key in overrides:
            parts.append(part.format(_number(overrides[key])))
    for key in GEOMETRY_KEYS:
        if key in (overrides.get("geometry") or {}):
            parts.append(f"{key}{overrides['geometry'][key]}")
    return parts


def variant_name(base: str, overrides: dict[str, Any]) -> str:
    return "-".join([base, *change_parts(overrides)])


def check_geometry(geometry: dict[str, Any], where: str) -> None:
    """The masking geometry's constraints between its keys (the schema checked each one), named
    by the config key that set them."""
    if geometry["crop"] % geometry["region"]:
        raise VariantError(f"{where}: crop ({geometry['crop']}) must be a multiple of region "
                           f"({geometry['region']}); change {where}.crop or {where}.region")
    if geometry["region"] % geometry["patch"]:
        raise VariantError(f"{where}: region ({geometry['region']}) must be a multiple of patch "
                           f"({geometry['patch']}); change {where}.region or {where}.patch")
    if geometry["crop"] // geometry["region"] < 2:
        raise VariantError(f"{where}: crop ({geometry['crop']}) holds a single region "
                           f"({geometry['region']}); the partial box and the location task need "
                           f"at least 2 regions per axis — lower {where}.region")


def _merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def resolve_variants(pretraining: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """{variant name: {"of", "changes", "overrides", "method", "geometry"}} in declaration order.

    ``pretraining`` has passed the config schema (each override's keys and values). ``method`` is the base's block with the overrides applied (geometry excluded), ``geometry``
    the experiment geometry with the variant's geometry overrides applied. Every error names the
    key under ``pretraining.variants``.
    """
    methods = pretraining.get("methods") or {}
    default_geometry = pretraining.get("geometry") or {}
    resolved: dict[str, dict[str, Any]] = {}
    for base, entries in (pretraining.get("variants") or {}).items():
        where_base = f"pretraining.variants.{base}"
        if base not in methods:
            raise VariantError(f"{where_base}: {base!r} is not under pretraining.methods "
                               f"({sorted(methods)}); a variant overrides a declared method")
        if (methods[base].get("kind") or "hybridmim") != "hybridmim":
            raise VariantError(f"{where_base}: only HybridMIM methods have ablations; {base!r} "
                               f"is of kind {methods[base].get('kind')!r}")
        for i, overrides in enumerate(entries):
            where = f"{where_base}[{i}]"
            name = variant_name(base, overrides)
            if name in methods:
                raise VariantError(f"{where} is named {name!r}, which is also a method under "
                                   f"pretraining.methods; remove one of them")
            if name in resolved:
                raise VariantError(f"{where} repeats the variant {name!r}; remove the duplicate")
            geometry = {**default_geometry, **(overrides.get("geometry") or {})}
            check_geometry(geometry, f"{where}.geometry" if "geometry" in overrides
                           else "pretraining.geometry")
            method = _merge(methods[base], {k: v for k, v in overrides.items()
                                            if k != "geometry"})
            resolved[name] = {"of": base, "changes": "-".join(change_parts(overrides)),
                              "overrides": copy.deepcopy(overrides), "method": method,
                              "geometry": geometry}
    return resolved
