"""The pretraining model: a stock MONAI network (reconstruction head) plus the HybridMIM heads.

`forward(x)` returns, for a masked crop x of shape (B, C_in, crop, crop, crop):
  recon        (B, C_in, *box size) logits of the decoder run on the box only
  box          tuple of 3 spatial slices in crop voxel coordinates; the loss slices the target
               and the voxel mask with `t[(..., *box)]`
  count_logits (B, N_regions, P_per_region + 1)
  loc_logits   (B, N_regions, P_per_region)
  proj         (B, proj_dim)
Regions are in raster order of the region grid (see hybridmim.models.heads).

`project(x)` runs the encoder and the projection head only: the second, dropout-only-different
pass of the contrastive loss, which the loop runs under no_grad on the unwrapped module.

DDP: `forward` uses every parameter of the network and the heads, so DistributedDataParallel
needs no `find_unused_parameters` as long as the loss uses every output. A loss that switches
off the count/location/projection terms (the SimMIM baseline, the ablations) leaves those head
parameters without gradient: either wrap with `find_unused_parameters=True` or add the unused
outputs multiplied by 0 to the loss.
"""
from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn

from hybridmim.checkpoints import network_class_path
from hybridmim.models.backbones import (bottleneck_channels, build_segmentation_network,
                                        encoder_stride, resolve_backbone)
from hybridmim.models.geometry import MaskGeometry
from hybridmim.models.heads import HybridMIMHeads
from hybridmim.models.partial_decoding import ADAPTERS, EncoderFeatures


def check_geometry(backbone: dict[str, Any], geometry: dict[str, Any], box: str,
                   swin_bottleneck_slice: str = "before_encoder10") -> None:
    """Validate crop/region/patch against each other (MaskGeometry), the encoder stride and the
    box mode (``partial`` or ``full``, a spec schema enum)."""
    checked = MaskGeometry.coerce(geometry)
    crop, region = checked.crop, checked.region
    stride = encoder_stride(backbone)
    # One token per region: a region must cover whole encoder tokens. Regions smaller than the
    # stride would share a token and could not get distinct count/location predictions.
    if region % stride:
        raise ValueError(f"geometry: region {region} must be a multiple of the "
                         f"{backbone['name']} encoder stride {stride} (one token per region)")
    if box == "partial" and crop // region < 2:
        raise ValueError(f"method.box 'partial' needs at least 2 regions per axis (the box starts "
                         f"at region 1); crop {crop} / region {region} = {crop // region}")
    if (backbone["name"] == "swinunetr" and box == "partial"
            and swin_bottleneck_slice == "before_encoder10" and (crop - region) // stride < 2):
        # encoder10's InstanceNorm refuses a single voxel in training.
        raise ValueError(f"geometry: with method.swin_bottleneck_slice 'before_encoder10' the "
                         f"partial box must hold at least 2 bottleneck tokens per axis; crop "
                         f"{crop} - region {region} = {crop - region} < 2 x {stride}. Use a crop "
                         f"of at least {region + 2 * stride} or swin_bottleneck_slice "
                         f"'after_encoder10'")


class HybridMIMModel(nn.Module):
    def __init__(self, backbone: dict[str, Any], geometry: dict[str, Any], box: str = "partial",
                 proj_dim: int = 384, swin_bottleneck_slice: str = "before_encoder10") -> None:
        super().__init__()
        spec = resolve_backbone(backbone)
        check_geometry(spec, geometry, box, swin_bottleneck_slice)
        self.backbone = spec
        self.crop, region = geometry["crop"], geometry["region"]
        # The reconstruction head predicts the input intensities: out_channels = in_channels.
        self.network, self.network_class, self.network_kwargs = build_segmentation_network(
            spec, out_channels=spec["in_channels"], crop=self.crop)
        self._encode, self._decode = ADAPTERS[type(self.network)]
        if spec["name"] == "swinunetr":
            self._decode = functools.partial(self._decode, slice_bottleneck=swin_bottleneck_slice)
        self.heads = HybridMIMHeads(bottleneck_channels(spec), (region // geometry["patch"]) ** 3,
                                    proj_dim, region_window=region // encoder_stride(spec))
        # Region index 1 on each axis to the crop end (method.md); region % stride == 0 makes the
        # start a multiple of every skip level's stride.
        self.box_start = region if box == "partial" else 0
        self.box = (slice(self.box_start, self.crop),) * 3

    def heads_record(self) -> dict[str, Any]:
        """The `heads` entry of a published model file (docs/contracts.md)."""
        return {"class": network_class_path(self.heads), "kwargs": dict(self.heads.kwargs),
                "state_dict": {k: v.detach().cpu() for k, v in self.heads.state_dict().items()}}

    def encode(self, x: torch.Tensor) -> EncoderFeatures:
        expected = (self.backbone["in_channels"],) + (self.crop,) * 3
        if x.ndim != 5 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"HybridMIMModel expects input (B, {expected[0]}, {self.crop}, "
                             f"{self.crop}, {self.crop}) (geometry.crop), got {tuple(x.shape)}")
        return self._encode(self.network, x)

    def decode(self, feats: EncoderFeatures) -> torch.Tensor:
        """Reconstruction logits on the box (the whole crop for `box: full`)."""
        return self._decode(self.network, feats, self.box_start)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        return self.heads.project(self.encode(x).tokens)

    def forward(self, x: torch.Tensor) -> dict[str, Any]:
        feats = self.encode(x)
        return {"recon": self.decode(feats), "box": self.box, **self.heads(feats.tokens)}


def build_pretrain_model(backbone: dict[str, Any], geometry: dict[str, Any],
                         method: dict[str, Any]) -> HybridMIMModel:
    """Build from the pretrain spec's `backbone`, `geometry` and `method` (uses box, proj_dim)."""
    return HybridMIMModel(backbone, geometry, box=method.get("box", "partial"),
                          proj_dim=method.get("proj_dim", 384),
                          swin_bottleneck_slice=method.get("swin_bottleneck_slice",
                                                           "before_encoder10"))
