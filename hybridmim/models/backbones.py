"""Backbones: stock MONAI segmentation networks built from a spec's `backbone` dict.

A backbone dict (backbone.schema.yaml) names the architecture and its widths; this module turns it
into an instance of the stock MONAI class plus the JSON-serialisable kwargs that rebuild it
(`hybridmim.checkpoints.build_network`), so a published model.pt loads without this package's
pretraining code. Keys a backbone does not know are refused rather than ignored, so a typo in the
config cannot silently train the default architecture.
"""
from __future__ import annotations

import copy
import math
from typing import Any

from torch import nn

from hybridmim.checkpoints import import_class
from hybridmim.models.dropout import place_unet_dropout
from hybridmim.spec_schemas import schema_problem

# Paper defaults (method.md); a resolved job spec normally sets every key explicitly.
_DEFAULTS: dict[str, dict[str, Any]] = {
    "unet": {"filters": [64, 64, 128, 256, 512], "dropout": 0.1},
    "swinunetr": {"feature_size": 48, "drop_rate": 0.1, "depths": [2, 2, 2, 2],
                  "num_heads": [3, 6, 12, 24], "window_size": 7, "attn_drop_rate": 0.0,
                  "dropout_path_rate": 0.0, "use_checkpoint": False},
    "unetr": {"feature_size": 16, "hidden_size": 768, "mlp_dim": 3072, "num_heads": 12,
              "dropout_rate": 0.0},
}
_CLASS_PATHS = {
    "unet": "monai.networks.nets.DynUNet",
    "swinunetr": "monai.networks.nets.SwinUNETR",
    "unetr": "monai.networks.nets.UNETR",
}
# Three 2x poolings and a last stage without pooling (method.md): total stride 8.
UNET_STRIDES = [1, 2, 2, 2, 1]
# SwinUNETR: patch embedding (2) then four 2x patch mergings; UNETR: 16^3 ViT patches.
_ENCODER_STRIDE = {"unet": math.prod(UNET_STRIDES), "swinunetr": 32, "unetr": 16}


def resolve_backbone(backbone: dict[str, Any]) -> dict[str, Any]:
    """Fill defaults and check every key and width; returns a new dict (name, in_channels, ...).

    The keys of each architecture, their types and ranges are in
    workflow/schemas/backbone.schema.yaml; the widths that must divide each other are checked here.
    """
    problem = schema_problem(backbone, "backbone", prefix="backbone")
    if problem:
        raise ValueError(problem)
    name = backbone["name"]
    resolved = {"in_channels": 1, **copy.deepcopy(_DEFAULTS[name]), **backbone}
    if name == "swinunetr":
        for stage, heads in enumerate(resolved["num_heads"]):
            if (resolved["feature_size"] * 2 ** stage) % heads:
                raise ValueError(f"backbone 'swinunetr': stage {stage} width "
                                 f"{resolved['feature_size'] * 2 ** stage} is not divisible by "
                                 f"num_heads[{stage}]={heads}")
    elif name == "unetr" and resolved["hidden_size"] % resolved["num_heads"]:
        raise ValueError(f"backbone 'unetr': hidden_size {resolved['hidden_size']} must be "
                         f"divisible by num_heads {resolved['num_heads']}")
    # The model file's kwargs go through JSON: lists, not tuples, and every rate a float.
    resolved.update({key: list(v) for key, v in resolved.items() if isinstance(v, tuple)})
    for key in _ENCODER_DROPOUT_KEYS[name]:
        resolved[key] = float(resolved[key])
    return resolved


def encoder_stride(backbone: dict[str, Any]) -> int:
    """Total downsampling of the encoder: 8 (unet), 32 (swinunetr), 16 (unetr)."""
    return _ENCODER_STRIDE[backbone["name"]]


def network_kwargs(backbone: dict[str, Any], out_channels: int, crop: int) -> tuple[str, dict]:
    """(class path, JSON-serialisable kwargs) of the stock MONAI network for this backbone.

    ``out_channels`` and ``crop`` are positive integers (the job spec schemas). The crop must tile
    into encoder tokens, with at least 2 per axis: InstanceNorm layers at the bottleneck refuse a
    single spatial element in training mode.
    """
    spec = resolve_backbone(backbone)
    name = spec["name"]
    stride = _ENCODER_STRIDE[name]
    if crop % stride or crop < 2 * stride:
        raise ValueError(f"crop {crop} does not fit backbone {name!r}: it must be a "
                         f"multiple of the encoder stride {stride} and at least {2 * stride}")
    common = {"spatial_dims": 3, "in_channels": spec["in_channels"], "out_channels": out_channels}
    if name == "unet":
        kwargs = {
            **common,
            "kernel_size": [3] * len(UNET_STRIDES),
            "strides": list(UNET_STRIDES),
            # DynUNet's transposed convs undo strides[1:]; the last (stride-1) stage needs kernel 1.
            "upsample_kernel_size": list(UNET_STRIDES[1:]),
            "filters": spec["filters"],
            # DynUNet puts this rate after every convolution; build_segmentation_network keeps
            # it in the first block and the decoder only (hybridmim.models.dropout).
            "dropout": spec["dropout"],
            # Lists, not tuples, so the kwargs survive a JSON round trip (MONAI accepts both).
            "norm_name": ["INSTANCE", {"affine": True}],
            "act_name": ["leakyrelu", {"inplace": True, "negative_slope": 0.1}],
            "res_block": False,
        }
    elif name == "swinunetr":
        kwargs = {**common, **{k: spec[k] for k in _DEFAULTS["swinunetr"]}}
    else:
        kwargs = {**common, "img_size": [crop] * 3, **{k: spec[k] for k in _DEFAULTS["unetr"]}}
    return _CLASS_PATHS[name], kwargs


def backbone_of_class(class_path: str) -> str | None:
    """The backbone name of a model file's network class (None for a class we do not build)."""
    return next((name for name, path in _CLASS_PATHS.items() if path == class_path), None)


def build_segmentation_network(backbone: dict[str, Any], out_channels: int,
                               crop: int) -> tuple[nn.Module, str, dict[str, Any]]:
    """Build the stock MONAI network; returns (network, class path, kwargs) for model files."""
    class_path, kwargs = network_kwargs(backbone, out_channels, crop)
    network = import_class(class_path)(**kwargs)
    if backbone["name"] == "unet":
        place_unet_dropout(network)
    # Freeze the parameters the stock forward never uses: MONAI's TransformerBlock (UNETR's ViT)
    # always creates `norm_cross_attn` but uses it only with cross-attention, which UNETR never
    # enables. Left trainable, they get no gradient and DistributedDataParallel fails unless
    # `find_unused_parameters=True` (slower); frozen, DDP ignores them. The state dict is
    # unchanged, so model files are unaffected.
    for module in network.modules():
        if hasattr(module, "norm_cross_attn") and not getattr(module, "with_cross_attention", True):
            module.norm_cross_attn.requires_grad_(False)
    return network, class_path, kwargs


# The rates that make two passes of the ENCODER differ (the two views of the contrastive loss).
# UNet: the method's dropout sits in the first block (encoder) and the decoder.
_ENCODER_DROPOUT_KEYS = {"unet": ("dropout",),
                         "swinunetr": ("drop_rate", "attn_drop_rate", "dropout_path_rate"),
                         "unetr": ("dropout_rate",)}


def encoder_dropout(backbone: dict[str, Any]) -> dict[str, float]:
    """{key: rate} of the backbone's encoder dropout settings (all 0 = deterministic encoder)."""
    spec = resolve_backbone(backbone)
    return {k: spec[k] for k in _ENCODER_DROPOUT_KEYS[spec["name"]]}


def bottleneck_channels(spec: dict[str, Any]) -> int:
    """Channels of the encoder output the region and projection heads read (resolved backbone)."""
    if spec["name"] == "unet":
        return spec["filters"][-1]
    if spec["name"] == "swinunetr":
        return 16 * spec["feature_size"]
    return spec["hidden_size"]
