"""HybridMIM losses: pixel (partial region prediction), region (count, location, consistency) and
sample level (contrastive), combined with config weights.

A term whose weight is 0 is not computed at all (its inputs may then be absent), which is how the
ablations and the SimMIM-style baseline (L_PR only) are built. Every term is computed in float32
whatever the autocast precision, because squared errors and log-sum-exps lose too much in 16 bits.

Why not ``monai.losses.ContrastiveLoss`` for L_CL: with ``target=z2.detach()`` it computes the
same symmetric NT-Xent for one process (tests/test_losses.py checks the equality), but it cannot
take negatives gathered from other DDP ranks (it requires input and target of equal shape and
finds positives on a fixed diagonal), and it divides raw exponentials instead of using a
log-sum-exp. The short cross-entropy form below does both.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

DEFAULT_WEIGHTS = {"pr": 1.0, "num": 0.1, "loc": 0.1, "con": 0.01, "cl": 0.1}
LOSS_TERMS = tuple(DEFAULT_WEIGHTS)


def _crop_box(t: torch.Tensor, box: tuple[slice, ...]) -> torch.Tensor:
    """Slice the spatial dims of a (B, C, *spatial) tensor with the model's voxel box."""
    return t[(slice(None), slice(None), *box)]


def partial_region_loss(recon_logits: torch.Tensor, target: torch.Tensor, box: tuple[slice, ...],
                        voxel_mask: torch.Tensor, valid: torch.Tensor | None = None,
                        normalisation: str = "batch") -> torch.Tensor:
    """MSE of sigmoid(recon) vs the original intensities over masked, real voxels in the box.

    ``target`` (B, C, *crop) is the unmasked input; ``voxel_mask`` (B, 1, *crop) True where masked;
    ``valid`` (B, 1|C, *crop) False on padding. Which voxels count comes from these boolean masks,
    never from ``input == 0``.

    ``normalisation`` (``method.pr_normalisation``):
    - ``batch`` (default, the authors' code): one mean over all scored voxels of the batch; a crop
      weighs as much as the number of its voxels that were scored.
    - ``sample``: the mean over each sample's own scored voxels, then over the B samples (a sample
      with no scored voxel contributes 0 and still counts in B). Every crop weighs the same, and
      under DDP the average of the ranks' losses (what gradient averaging computes) equals the
      loss of the global batch on one process, which ``batch`` does not guarantee.
    With no scored voxel at all the loss is 0 (and still differentiable).
    """
    target_box = _crop_box(target, box)
    if recon_logits.shape != target_box.shape:
        raise ValueError(f"reconstruction {tuple(recon_logits.shape)} does not match the target "
                         f"box {tuple(target_box.shape)} (box {box})")
    selected = _crop_box(voxel_mask, box)
    if valid is not None:
        selected = selected & _crop_box(valid, box)
    selected = selected.expand_as(target_box)
    squared = (torch.sigmoid(recon_logits.float()) - target_box.float()).square()
    # Multiply instead of boolean indexing: no host sync, and an empty selection gives 0/1 = 0.
    if normalisation == "batch":
        return (squared * selected).sum() / selected.sum().clamp_min(1)
    per_sample_dims = tuple(range(1, squared.dim()))
    count = selected.sum(per_sample_dims).clamp_min(1)
    return ((squared * selected).sum(per_sample_dims) / count).mean()


def count_loss(count_logits: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of (B, Nr, P_r+1) count logits against (B, Nr) masked-patch counts."""
    return F.cross_entropy(count_logits.float().flatten(0, -2), count.long().flatten())


def location_loss(loc_logits: torch.Tensor, location: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy with logits of (B, Nr, P_r) location logits against 0/1 labels."""
    return F.binary_cross_entropy_with_logits(loc_logits.float(), location.float())


def consistency_loss(count_logits: torch.Tensor, loc_logits: torch.Tensor,
                     form: str = "authors") -> torch.Tensor:
    """Count head vs the count the location head implies (#sigmoid > 0.5); target is constant.

    ``form`` (``method.consistency``):
    - ``authors`` (default, the authors' code): ½·(CE + MSE(implied count, argmax of the count
      head)). The MSE has no gradient (both sides are thresholded or arg-maxed), so the term
      trains like ½·CE: half the effective weight of ``cross_entropy``; the MSE only shifts the
      logged value.
    - ``cross_entropy``: the CE alone (the paper's description).
    """
    with torch.no_grad():
        implied = (loc_logits > 0).sum(-1)  # sigmoid(x) > 0.5  <=>  x > 0
    ce = F.cross_entropy(count_logits.float().flatten(0, -2), implied.flatten())
    if form == "cross_entropy":
        return ce
    with torch.no_grad():
        argmax_gap = F.mse_loss(implied.float(), count_logits.argmax(-1).float())
    return (ce + argmax_gap) / 2


def _gather_across_ranks(z: torch.Tensor) -> tuple[torch.Tensor, int]:
    """All-gather (B, D) across DDP ranks, differentiably; returns (world·B, D) and the offset of
    the local rows.

    The gather is autograd-aware (``torch.distributed.nn``): in backward, the gradient every rank
    computed for rank q's rows is summed and sent to rank q. A local sample is a negative for the
    anchors of all ranks, so without that sum those terms of the gradient would be lost, and DDP's
    average of the rank gradients would not be the gradient of the global-batch loss. Needs equal
    batch sizes on every rank (the samplers drop the last incomplete batch).
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return z, 0
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(z), dim=0), dist.get_rank() * z.shape[0]


def nt_xent_loss(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.5,
                 gather_negatives: bool = False) -> torch.Tensor:
    """SimCLR NT-Xent over the 2B views; gradient through ``z1`` only (``z2`` is detached).

    Every local view is an anchor; its positive is the other view of the same sample, its
    negatives all other views of the batch, both views (validate_pretrain_spec makes sure a batch
    holds at least 2 samples).

    ``gather_negatives`` (DDP): the negatives are the views of the global batch (all ranks), and
    the gradient is exactly that of one process holding the global batch. Off (the default, as in
    the authors' code), every rank contrasts only its own samples: cheaper, but not equal to one
    process with the same global batch, since a sample's negatives depend on how the batch is cut.
    """
    z1 = F.normalize(z1.float(), dim=1)
    z2 = F.normalize(z2.detach().float(), dim=1)
    b = z1.shape[0]
    if gather_negatives:
        all1, offset = _gather_across_ranks(z1)
        all2, _ = _gather_across_ranks(z2)
    else:
        all1, all2, offset = z1, z2, 0
    total = all1.shape[0]
    anchors = torch.cat([z1, z2], dim=0)                       # (2b, D)
    candidates = torch.cat([all1, all2], dim=0)                # (2·total, D)
    logits = anchors @ candidates.T / temperature
    local = torch.arange(b, device=z1.device) + offset
    self_index = torch.cat([local, local + total])
    positive = torch.cat([local + total, local])
    rows = torch.arange(2 * b, device=z1.device)
    logits = logits.index_put((rows, self_index), torch.tensor(float("-inf"), device=z1.device))
    return F.cross_entropy(logits, positive)


class HybridMIMLoss(nn.Module):
    """L = w_pr L_PR + w_num L_Num + w_loc L_Loc + w_con L_Con + w_cl L_CL.

    ``forward`` returns ``(total, terms)`` where ``terms`` holds, for every enabled term ``t``,
    ``t`` (unweighted) and ``t_weighted`` (both detached), plus ``total``.
    """

    def __init__(self, weights: Mapping[str, float] | None = None, temperature: float = 0.5,
                 gather_negatives: bool = False, pr_normalisation: str = "batch",
                 consistency: str = "authors"):
        super().__init__()
        # The defaults are the authors' code (docs/method.md, fidelity table). The settings of a
        # job come checked: the spec schema and hybridmim.pretrain.spec.validate_pretrain_spec.
        self.pr_normalisation, self.consistency = pr_normalisation, consistency
        weights = weights if weights is not None else DEFAULT_WEIGHTS
        self.weights = {t: float(w) for t, w in weights.items()}
        self.temperature = float(temperature)
        self.gather_negatives = bool(gather_negatives)

    @classmethod
    def from_method(cls, method: Mapping[str, Any]) -> "HybridMIMLoss":
        """The loss of a resolved method block (hybridmim.pretrain.spec.resolve_method)."""
        return cls(method["loss_weights"], method["temperature"], method["gather_negatives"],
                   method["pr_normalisation"], method["consistency"])

    def enabled(self, term: str) -> bool:
        return self.weights[term] > 0

    @property
    def needs_region_labels(self) -> bool:
        return self.enabled("num") or self.enabled("loc")

    @property
    def needs_second_view(self) -> bool:
        return self.enabled("cl")

    def forward(self, outputs: Mapping[str, Any], target: torch.Tensor,
                voxel_mask: torch.Tensor | None = None, valid: torch.Tensor | None = None,
                count: torch.Tensor | None = None, location: torch.Tensor | None = None,
                proj_second: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        # PretrainStep passes the labels and the second view exactly when
        # needs_region_labels / needs_second_view ask for them.
        unweighted: dict[str, torch.Tensor] = {}
        if self.enabled("pr"):
            unweighted["pr"] = partial_region_loss(outputs["recon"], target, outputs["box"],
                                                   voxel_mask, valid, self.pr_normalisation)
        if self.enabled("num"):
            unweighted["num"] = count_loss(outputs["count_logits"], count)
        if self.enabled("loc"):
            unweighted["loc"] = location_loss(outputs["loc_logits"], location)
        if self.enabled("con"):
            unweighted["con"] = consistency_loss(outputs["count_logits"], outputs["loc_logits"],
                                                 self.consistency)
        if self.enabled("cl"):
            unweighted["cl"] = nt_xent_loss(outputs["proj"], proj_second, self.temperature,
                                            self.gather_negatives)
        weighted = {t: self.weights[t] * v for t, v in unweighted.items()}
        total = torch.stack(list(weighted.values())).sum()
        terms = {t: v.detach() for t, v in unweighted.items()}
        terms.update({f"{t}_weighted": v.detach() for t, v in weighted.items()})
        terms["total"] = total.detach()
        return total, terms
