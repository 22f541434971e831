"""Two-level masking for HybridMIM: the crop is cut into regions (sub-volumes) made of patches.

Everything here runs on the training device inside the training step (never in the data loader),
so the masks follow the model's device and a seeded ``torch.Generator`` whose state is part of
the resume checkpoint.

Shapes (crop C, region R, patch P; paper: 96, 32, 16):
- patch grid ``G = C // P`` per axis, ``N = G³`` patches (216);
- region grid ``g = C // R`` per axis, ``Nr = g³`` regions (27);
- patches per region ``p = R // P`` per axis, ``P_r = p³`` (8).
Region index = raster order over the region grid, ``(i*g + j)*g + k``; inside a region the patch
index is the raster order over its ``p×p×p`` block. This is the order the region tokens of the
model use, so the spatial labels line up with the token they are attached to.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import torch

from hybridmim.models.geometry import MaskGeometry


def masked_patch_count(num_patches: int, ratio: float) -> int:
    """Patches masked per sample: ceil(ratio·N), the SimMIM/authors' convention (0.4·216 → 87).

    A tiny tolerance keeps float noise (0.6·5 = 3.0000000000000004) from adding a patch.
    """
    return min(num_patches, math.ceil(float(ratio) * num_patches - 1e-9))


def _rank(scores: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Rank of each entry along ``dim`` (0 = smallest); for random scores a uniform order."""
    return scores.argsort(dim=dim).argsort(dim=dim)


def group_patches(grid: torch.Tensor, geometry: MaskGeometry, grouping: str = "spatial"
                  ) -> torch.Tensor:
    """(B, G, G, G) patch grid → (B, Nr, P_r) patches grouped per region."""
    b = grid.shape[0]
    g, p = geometry.region_grid, geometry.patches_per_region_axis
    if grouping == "raster":
        # Authors' code: consecutive runs of P_r patches in the flattened raster order. Such a run
        # is a strip along the last axis, not the sub-volume whose token carries the label.
        return grid.reshape(b, geometry.num_regions, geometry.patches_per_region)
    blocks = grid.reshape(b, g, p, g, p, g, p).permute(0, 1, 3, 5, 2, 4, 6)
    return blocks.reshape(b, geometry.num_regions, geometry.patches_per_region)


def ungroup_patches(grouped: torch.Tensor, geometry: MaskGeometry) -> torch.Tensor:
    """Inverse of the spatial ``group_patches``: (B, Nr, P_r) → (B, G, G, G)."""
    b = grouped.shape[0]
    g, p, big = geometry.region_grid, geometry.patches_per_region_axis, geometry.patch_grid
    blocks = grouped.reshape(b, g, g, g, p, p, p).permute(0, 1, 4, 2, 5, 3, 6)
    return blocks.reshape(b, big, big, big)


def sample_patch_mask(batch: int, geometry: MaskGeometry | Mapping[str, Any], ratio: float,
                      mode: str = "uniform", generator: torch.Generator | None = None
                      ) -> torch.Tensor:
    """Boolean patch mask (B, G, G, G); True = masked. Both modes mask exactly ceil(ratio·N).

    ``uniform`` (authors' code, default): the K = ceil(ratio·N) patches are a uniformly random
    K-subset of the N patches; the count per region is whatever the draw gives.

    ``hierarchical`` (the paper's wording), per sample:
      1. how many regions: m uniformly from the feasible range [ceil(K/P_r), min(Nr, K)]
         (every picked region holds at least one and at most P_r masked patches, and the total
         must be K, so this is the whole range that can reach K);
      2. which regions: a uniformly random m-subset of the Nr regions;
      3. how many patches per picked region: one each, plus the K-m remaining ones spread over the
         m·(P_r-1) free places of the picked regions uniformly at random (a multivariate
         hypergeometric draw), so every count lies in 1..P_r and the counts sum to K;
      4. which patches: for each picked region a uniformly random subset of that size.
    The total is therefore exactly K, the same as ``uniform``, but masked patches cluster in
    fewer regions, with a wide spread of counts per region.

    The mask is drawn on the device of ``generator`` (CPU without one).
    """
    geometry = MaskGeometry.coerce(geometry)
    device = generator.device if generator is not None else "cpu"
    n = geometry.num_patches
    k = masked_patch_count(n, ratio)

    def rand(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=generator, device=device)

    if mode == "uniform" or k == 0:
        mask = _rank(rand(batch, n)) < k
        return mask.reshape(batch, geometry.patch_grid, geometry.patch_grid, geometry.patch_grid)

    nr, pr = geometry.num_regions, geometry.patches_per_region
    m_low, m_high = math.ceil(k / pr), min(nr, k)
    # 1. number of masked regions per sample, uniform over the feasible range.
    m = m_low + (rand(batch) * (m_high - m_low + 1)).floor().long().clamp_max(m_high - m_low)
    # 2. which regions.
    picked = _rank(rand(batch, nr)) < m[:, None]                                   # (B, Nr)
    # 3. counts: one per picked region + (K - m) of the picked regions' free places.
    free_scores = rand(batch, nr, max(pr - 1, 1))[..., : pr - 1]
    free_scores = free_scores.masked_fill(~picked[..., None], float("inf"))
    extra = _rank(free_scores.reshape(batch, -1)) < (k - m)[:, None]
    counts = picked.long() + extra.reshape(batch, nr, pr - 1).sum(-1)            # (B, Nr)
    # 4. which patches inside each region.
    grouped = _rank(rand(batch, nr, pr)) < counts[..., None]                       # (B, Nr, P_r)
    return ungroup_patches(grouped, geometry)


def region_labels(mask: torch.Tensor, geometry: MaskGeometry | Mapping[str, Any],
                  grouping: str = "spatial") -> tuple[torch.Tensor, torch.Tensor]:
    """Region-level targets from a patch mask (B, G, G, G).

    Returns ``count`` (B, Nr) long in 0..P_r and ``location`` (B, Nr, P_r) float in {0, 1}.
    ``spatial`` groups each region's p×p×p block of patches (matches the region token);
    ``raster`` groups runs of P_r consecutive patches in raster order (authors' code, kept only
    for bug-compatible reproduction).
    """
    location = group_patches(mask.bool(), MaskGeometry.coerce(geometry), grouping)
    return location.sum(-1), location.float()


def expand_to_voxels(mask: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, G, G, G) patch mask → (B, 1, G·patch, G·patch, G·patch) voxel mask (a view, no copy)."""
    b, gx, gy, gz = mask.shape
    view = mask.bool()[:, None, :, None, :, None, :, None]
    return view.expand(b, 1, gx, patch, gy, patch, gz, patch).reshape(
        b, 1, gx * patch, gy * patch, gz * patch)


def apply_mask(x: torch.Tensor, voxel_mask: torch.Tensor) -> torch.Tensor:
    """Return ``x`` with masked voxels set to 0 (all channels); no learnable mask token."""
    return x.masked_fill(voxel_mask, 0)
