"""Pretraining heads on the encoder output: region count, region location, projection.

Region tokens: the encoder output (B, C, X', Y', Z') at stride s is average-pooled in (R/s)^3
windows, one window per region of side R (for SwinUNETR with R = s = 32 the pooling is the
identity: each bottleneck token is one region). The tokens are then flattened in the spatial
RASTER order of the region grid (Gx, Gy, Gz):

    region index = (i * Gy + j) * Gz + k   for region grid coordinates (i, j, k)

i.e. the first spatial axis varies slowest. The masking module must build its count/location
labels in this order (method.md's spatial grouping (B,6,6,6) -> (B,3,2,3,2,3,2) ->
(B,3,3,3,2,2,2) -> (B,27,8) produces exactly it).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class HybridMIMHeads(nn.Module):
    """Linear(C -> P+1) count, Linear(C -> P) location per region; Linear(C -> proj_dim) on the
    globally average-pooled encoder output for the contrastive loss.

    Constructor arguments are plain ints so a model file can rebuild the heads from its kwargs.
    """

    def __init__(self, channels: int, patches_per_region: int, proj_dim: int,
                 region_window: int) -> None:
        super().__init__()
        self.region_window = region_window
        self.count = nn.Linear(channels, patches_per_region + 1)
        self.location = nn.Linear(channels, patches_per_region)
        self.projection = nn.Linear(channels, proj_dim)
        self.kwargs = {"channels": channels, "patches_per_region": patches_per_region,
                       "proj_dim": proj_dim, "region_window": region_window}

    def region_tokens(self, encoded: torch.Tensor) -> torch.Tensor:
        """(B, C, X', Y', Z') encoder output -> (B, N_regions, C) in raster order."""
        # check_geometry made the region a multiple of the encoder stride: the windows tile.
        w = self.region_window
        pooled = F.avg_pool3d(encoded, kernel_size=w, stride=w) if w > 1 else encoded
        # flatten(2) walks (Gx, Gy, Gz) with the last axis fastest: the documented raster order.
        return pooled.flatten(2).transpose(1, 2)

    def project(self, encoded: torch.Tensor) -> torch.Tensor:
        """(B, C, ...) -> (B, proj_dim) from the global average of the encoder output."""
        return self.projection(encoded.mean(dim=(2, 3, 4)))

    def forward(self, encoded: torch.Tensor) -> dict[str, torch.Tensor]:
        tokens = self.region_tokens(encoded)
        return {"count_logits": self.count(tokens), "loc_logits": self.location(tokens),
                "proj": self.project(encoded)}
