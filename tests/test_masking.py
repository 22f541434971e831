"""Masking: exact counts, the hierarchical rules, region labels (spatial vs raster), voxel masks."""
from __future__ import annotations

import pytest
import torch

from hybridmim.pretrain.masking import (MaskGeometry, apply_mask, expand_to_voxels, group_patches,
                                        masked_patch_count, region_labels, sample_patch_mask,
                                        ungroup_patches)

PAPER = MaskGeometry(crop=96, region=32, patch=16)
DEMO = MaskGeometry(crop=64, region=32, patch=16)  # 8 regions of 8 patches, 4×4×4 patch grid


def test_geometry_properties_and_validation():
    assert (PAPER.patch_grid, PAPER.num_patches, PAPER.num_regions, PAPER.patches_per_region) \
        == (6, 216, 27, 8)
    assert (DEMO.num_patches, DEMO.num_regions, DEMO.patches_per_region) == (64, 8, 8)
    with pytest.raises(ValueError, match=r"geometry.crop \(100\).*multiple of geometry.region"):
        MaskGeometry(crop=100, region=32, patch=16)
    with pytest.raises(ValueError, match=r"geometry.region \(32\).*multiple of geometry.patch"):
        MaskGeometry(crop=96, region=32, patch=12)


def test_masked_patch_count_follows_ceil_convention():
    assert masked_patch_count(216, 0.4) == 87
    assert masked_patch_count(64, 0.4) == 26
    assert masked_patch_count(5, 0.6) == 3  # float noise must not add a patch
    assert masked_patch_count(216, 0.0) == 0 and masked_patch_count(216, 1.0) == 216


@pytest.mark.parametrize("mode", ["uniform", "hierarchical"])
def test_every_sample_has_exactly_k_masked_patches(mode):
    gen = torch.Generator().manual_seed(0)
    mask = sample_patch_mask(64, PAPER, 0.4, mode=mode, generator=gen)
    assert mask.dtype == torch.bool and mask.shape == (64, 6, 6, 6)
    assert (mask.flatten(1).sum(1) == 87).all()
    # Different samples get different masks.
    assert len({tuple(m.flatten().tolist()) for m in mask}) == 64


def test_uniform_mask_is_seeded_and_covers_all_patches():
    a = sample_patch_mask(8, PAPER, 0.4, generator=torch.Generator().manual_seed(3))
    b = sample_patch_mask(8, PAPER, 0.4, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    many = sample_patch_mask(2000, PAPER, 0.4, generator=torch.Generator().manual_seed(1))
    freq = many.float().mean(0)
    # Every patch masked with probability 87/216 ≈ 0.403 (binomial sd ≈ 0.011).
    assert (freq - 87 / 216).abs().max() < 0.06


def test_hierarchical_mask_respects_its_rules():
    gen = torch.Generator().manual_seed(7)
    mask = sample_patch_mask(500, PAPER, 0.4, mode="hierarchical", generator=gen)
    count, _ = region_labels(mask, PAPER)
    regions_hit = (count > 0).sum(1)
    # Feasible number of regions for K=87, 8 patches per region: ceil(87/8)=11 .. 27.
    assert regions_hit.min() >= 11 and regions_hit.max() <= 27
    # m is drawn uniformly over 11..27: both ends and the middle occur in 500 draws.
    assert regions_hit.min() <= 12 and regions_hit.max() >= 26
    assert (count.sum(1) == 87).all() and (count <= 8).all()
    # Unlike uniform masking, hierarchical masks leave whole regions untouched and fill others.
    uniform = sample_patch_mask(500, PAPER, 0.4, generator=gen)
    ucount, _ = region_labels(uniform, PAPER)
    assert (count == 0).float().mean() > 3 * (ucount == 0).float().mean()


def test_hierarchical_demo_geometry_and_edge_ratios():
    gen = torch.Generator().manual_seed(0)
    for ratio, k in [(0.4, 26), (0.01, 1), (1.0, 64), (0.0, 0)]:
        mask = sample_patch_mask(20, DEMO, ratio, mode="hierarchical", generator=gen)
        assert (mask.flatten(1).sum(1) == k).all()
    # region == patch: one patch per region, still exact.
    tiny = MaskGeometry(crop=32, region=16, patch=16)
    mask = sample_patch_mask(5, tiny, 0.5, mode="hierarchical", generator=gen)
    assert (mask.flatten(1).sum(1) == 4).all()


def _demo_mask_by_hand() -> torch.Tensor:
    """A 4×4×4 patch mask for the 64³ demo crop with a known region content."""
    mask = torch.zeros(1, 4, 4, 4, dtype=torch.bool)
    mask[0, 0:2, 0:2, 0:2] = True          # region 0 (block i<2, j<2, k<2): fully masked
    mask[0, 0, 0, 2] = True                # region 1 (k block 1): one patch, local (0,0,0)
    mask[0, 3, 3, 3] = True                # region 7: local patch (1,1,1) = index 7
    mask[0, 2, 1, 0] = True                # region 4 (i block 1): local (0,1,0) = index 2
    return mask


def test_spatial_region_labels_match_a_hand_built_mask():
    count, location = region_labels(_demo_mask_by_hand(), DEMO, grouping="spatial")
    assert count.dtype == torch.long and location.dtype == torch.float32
    assert count.tolist() == [[8, 1, 0, 0, 1, 0, 0, 1]]
    assert location[0, 0].tolist() == [1.0] * 8
    assert location[0, 1].tolist() == [1, 0, 0, 0, 0, 0, 0, 0]
    assert location[0, 4].tolist() == [0, 0, 1, 0, 0, 0, 0, 0]
    assert location[0, 7].tolist() == [0, 0, 0, 0, 0, 0, 0, 1]
    assert (count == location.sum(-1)).all()


def test_raster_grouping_gives_the_authors_different_answer():
    mask = _demo_mask_by_hand()
    count, location = region_labels(mask, DEMO, grouping="raster")
    # Raster "region" r = flattened patches 8r..8r+7 = rows i, j in {2r//4.., } of the grid:
    # r=0 → (0,0,*),(0,1,*): 2+2 from region 0's block +1 for (0,0,2) → 5.
    # r=1 → (0,2,*),(0,3,*): 0.  r=2 → (1,0,*),(1,1,*): 4.  r=4 → (2,0,*),(2,1,*): 1 ((2,1,0)).
    # r=7 → (3,2,*),(3,3,*): 1 ((3,3,3) at local index 7).
    assert count.tolist() == [[5, 0, 4, 0, 1, 0, 0, 1]]
    assert location[0, 0].tolist() == [1, 1, 1, 0, 1, 1, 0, 0]
    spatial_count, _ = region_labels(mask, DEMO, grouping="spatial")
    assert not torch.equal(count, spatial_count)
    # Both groupings see the same total.
    assert count.sum() == spatial_count.sum() == mask.sum()


def test_group_and_ungroup_are_inverse():
    mask = sample_patch_mask(3, PAPER, 0.4, generator=torch.Generator().manual_seed(5))
    assert torch.equal(ungroup_patches(group_patches(mask, PAPER), PAPER), mask)


def test_expand_to_voxels_and_apply_mask():
    mask = _demo_mask_by_hand()
    voxels = expand_to_voxels(mask, 16)
    assert voxels.shape == (1, 1, 64, 64, 64) and voxels.dtype == torch.bool
    assert voxels[0, 0, :32, :32, :32].all()
    assert voxels[0, 0, 0:16, 0:16, 32:48].all() and not voxels[0, 0, 0:16, 0:16, 48:].any()
    assert voxels.sum() == mask.sum() * 16 ** 3
    x = torch.rand(1, 2, 64, 64, 64) + 0.001
    masked = apply_mask(x, voxels)
    assert (masked[voxels.expand_as(x)] == 0).all()
    assert torch.equal(masked[~voxels.expand_as(x)], x[~voxels.expand_as(x)])


def test_spatial_labels_line_up_with_the_models_region_tokens():
    """Region r of the spatial labels is the r-th token the heads pool (raster over the region
    grid); the raster grouping is not."""
    from hybridmim.models.heads import HybridMIMHeads

    heads = HybridMIMHeads(channels=1, patches_per_region=8, proj_dim=4, region_window=32)
    gen = torch.Generator().manual_seed(11)
    mask = sample_patch_mask(4, DEMO, 0.4, generator=gen)
    # Pool the voxel mask like an encoder map at stride 1: token r = masked fraction of region r.
    tokens = heads.region_tokens(expand_to_voxels(mask, DEMO.patch).float())[..., 0]
    count, _ = region_labels(mask, DEMO, grouping="spatial")
    assert torch.allclose(tokens * 8, count.float())
    raster_count, _ = region_labels(mask, DEMO, grouping="raster")
    assert not torch.allclose(tokens * 8, raster_count.float())
