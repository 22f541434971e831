"""HybridMIM losses: what each term sees, where its gradient goes, and that switches work."""
from __future__ import annotations

import pytest
import torch
from monai.losses import ContrastiveLoss

from hybridmim.pretrain.losses import (HybridMIMLoss, consistency_loss, nt_xent_loss,
                                       partial_region_loss)
from hybridmim.pretrain.masking import (MaskGeometry, expand_to_voxels, region_labels,
                                        sample_patch_mask)

GEOM = MaskGeometry(crop=32, region=16, patch=8)  # 4³ patch grid, 8 regions of 8 patches
BOX = (slice(16, 32),) * 3                        # the partial box: from region index 1 to the end


def _batch(seed: int = 0, b: int = 3, c: int = 1):
    gen = torch.Generator().manual_seed(seed)
    target = torch.rand(b, c, 32, 32, 32, generator=gen) * 0.999 + 0.001
    patch_mask = sample_patch_mask(b, GEOM, 0.4, generator=gen)
    voxel_mask = expand_to_voxels(patch_mask, GEOM.patch)
    return target, patch_mask, voxel_mask


def _per_sample_mean(squared: torch.Tensor, selected: torch.Tensor) -> torch.Tensor:
    """L_PR's normalisation: mean over each sample's scored voxels, then over the samples."""
    return torch.stack([sq[sel].mean() for sq, sel in zip(squared, selected)]).mean()


def _logit(p: torch.Tensor) -> torch.Tensor:
    return torch.logit(p.clamp(1e-6, 1 - 1e-6).double())


def test_partial_region_loss_is_zero_for_a_perfect_reconstruction():
    target, _, voxel_mask = _batch()
    recon = _logit(target[(..., *BOX)])
    assert partial_region_loss(recon, target.double(), BOX, voxel_mask).item() < 1e-10


def test_partial_region_loss_ignores_unmasked_voxels_padding_and_outside_box():
    target, _, voxel_mask = _batch()
    valid = torch.ones_like(voxel_mask)
    valid[..., 28:] = False  # padding at the far end of the last axis
    recon = torch.randn(3, 1, 16, 16, 16, generator=torch.Generator().manual_seed(1))
    base = partial_region_loss(recon, target, BOX, voxel_mask, valid, "sample")

    changed = target.clone()
    changed[~voxel_mask.expand_as(target)] = 0.5      # unmasked voxels
    changed[~valid.expand_as(target)] = 0.9           # padding, masked or not
    changed[:, :, :16] = 0.1                          # outside the box
    assert torch.allclose(partial_region_loss(recon, changed, BOX, voxel_mask, valid, "sample"),
                          base)

    recon_changed = recon.clone()
    box_mask = (voxel_mask & valid)[(..., *BOX)]
    recon_changed[~box_mask] = 7.0                    # predictions where nothing is scored
    assert torch.allclose(partial_region_loss(recon_changed, target, BOX, voxel_mask, valid,
                                              "sample"), base)

    # ...whereas a masked, real voxel in the box does count.
    idx = box_mask.nonzero()[0].tolist()
    recon_changed[tuple(idx)] += 5.0
    assert not torch.allclose(partial_region_loss(recon_changed, target, BOX, voxel_mask, valid,
                                                  "sample"), base)

    # With "sample" normalisation the value is the mean squared error over exactly the scored
    # voxels, per sample, then averaged over the samples (tests/test_fidelity.py: "batch").
    expected = _per_sample_mean((torch.sigmoid(recon) - target[(..., *BOX)]) ** 2, box_mask)
    assert torch.allclose(base, expected)


def test_partial_region_loss_uses_the_mask_not_zero_intensity():
    target, _, voxel_mask = _batch()
    target[~voxel_mask.expand_as(target)] = 0.0       # real zeros that are NOT masked
    recon = torch.zeros(3, 1, 16, 16, 16)
    full = partial_region_loss(recon, target, BOX, voxel_mask, normalisation="sample")
    sel = voxel_mask[(..., *BOX)]
    assert torch.allclose(full, _per_sample_mean((0.5 - target[(..., *BOX)]) ** 2, sel))


def test_partial_region_loss_without_scored_voxels_is_zero_not_nan():
    target, _, voxel_mask = _batch()
    recon = torch.randn(3, 1, 16, 16, 16, requires_grad=True)
    loss = partial_region_loss(recon, target, BOX, torch.zeros_like(voxel_mask))
    assert loss.item() == 0.0 and not torch.isnan(loss)
    loss.backward()
    assert torch.equal(recon.grad, torch.zeros_like(recon))
    with pytest.raises(ValueError, match="does not match the target box"):
        partial_region_loss(recon[..., :8], target, BOX, voxel_mask)


def test_full_box_and_multichannel_targets():
    target, _, voxel_mask = _batch(c=2)
    full = (slice(0, 32),) * 3
    recon = torch.zeros(3, 2, 32, 32, 32)
    loss = partial_region_loss(recon, target, full, voxel_mask, normalisation="sample")
    sel = voxel_mask.expand_as(target)
    assert torch.allclose(loss, _per_sample_mean((0.5 - target) ** 2, sel))


def test_contrastive_gradient_flows_through_view_one_only():
    z1 = torch.randn(4, 16, requires_grad=True)
    z2 = torch.randn(4, 16, requires_grad=True)
    nt_xent_loss(z1, z2, 0.5).backward()
    assert z1.grad is not None and z1.grad.abs().sum() > 0
    assert z2.grad is None


def test_contrastive_matches_monai_nt_xent_with_detached_second_view():
    gen = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(5, 32, generator=gen), torch.randn(5, 32, generator=gen)
    ours = nt_xent_loss(z1, z2, 0.5)
    monai = ContrastiveLoss(temperature=0.5)(z1, z2)
    assert torch.allclose(ours, monai, atol=1e-5)
    # Identical views of well-separated samples → low loss; swapped pairs → high loss.
    basis = torch.eye(4, 8) * 10
    assert nt_xent_loss(basis, basis, 0.5) < nt_xent_loss(basis, basis.roll(1, 0), 0.5)


def test_consistency_has_no_gradient_through_its_target():
    count_logits = torch.randn(2, 8, 9, requires_grad=True)
    loc_logits = torch.randn(2, 8, 8, requires_grad=True)
    loss = consistency_loss(count_logits, loc_logits, "cross_entropy")
    loss.backward()
    assert count_logits.grad.abs().sum() > 0
    assert loc_logits.grad is None
    implied = (torch.sigmoid(loc_logits) > 0.5).sum(-1)
    expected = torch.nn.functional.cross_entropy(count_logits.reshape(-1, 9), implied.reshape(-1))
    assert torch.allclose(loss, expected)


def _outputs(seed: int = 0, b: int = 3):
    gen = torch.Generator().manual_seed(seed)
    return {
        "recon": torch.randn(b, 1, 16, 16, 16, generator=gen).requires_grad_(),
        "box": BOX,
        "count_logits": torch.randn(b, 8, 9, generator=gen).requires_grad_(),
        "loc_logits": torch.randn(b, 8, 8, generator=gen).requires_grad_(),
        "proj": torch.randn(b, 12, generator=gen).requires_grad_(),
    }


def test_total_is_the_weighted_sum_and_each_switch_removes_exactly_its_term():
    target, patch_mask, voxel_mask = _batch()
    count, location = region_labels(patch_mask, GEOM)
    z2 = torch.randn(3, 12)
    kwargs = dict(target=target, voxel_mask=voxel_mask, count=count, location=location,
                  proj_second=z2)
    weights = {"pr": 1.0, "num": 0.1, "loc": 0.1, "con": 0.01, "cl": 0.1}
    outputs = _outputs()
    total, terms = HybridMIMLoss(weights)(outputs, **kwargs)
    expected = sum(weights[t] * terms[t] for t in weights)
    assert torch.allclose(total, expected)
    assert set(terms) == {*weights, *(f"{t}_weighted" for t in weights), "total"}
    for term in weights:
        off = dict(weights, **{term: 0.0})
        total_off, terms_off = HybridMIMLoss(off)(outputs, **kwargs)
        assert term not in terms_off and f"{term}_weighted" not in terms_off
        assert torch.allclose(total_off, total - weights[term] * terms[term], atol=1e-6)
        for other in weights:
            if other != term:
                assert torch.allclose(terms_off[other], terms[other])


def test_switched_off_terms_need_no_inputs():
    """The SimMIM baseline: L_PR only, no heads, no labels, no second view."""
    target, _, voxel_mask = _batch()
    loss = HybridMIMLoss({"pr": 1.0, "num": 0, "loc": 0, "con": 0, "cl": 0})
    assert not loss.needs_region_labels and not loss.needs_second_view
    outputs = _outputs()
    total, terms = loss({"recon": outputs["recon"], "box": BOX}, target, voxel_mask)
    total.backward()
    assert set(terms) == {"pr", "pr_weighted", "total"}
