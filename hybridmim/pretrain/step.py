"""One pretraining step (mask on device → forward → losses → optimizer) and the validation pass."""
from __future__ import annotations

import copy
from typing import Any

import torch
from monai.networks.utils import eval_mode
from torch.utils.data import DataLoader, Dataset

from hybridmim import runtime
from hybridmim.pretrain.feed import flatten_volumes
from hybridmim.pretrain.losses import HybridMIMLoss
from hybridmim.pretrain.masking import (MaskGeometry, apply_mask, expand_to_voxels, region_labels,
                                        sample_patch_mask)
from hybridmim.training_loop import optimiser_step


class TermWindow:
    """Sums the loss terms of the steps since the last log on the device (no host sync per step)."""

    def __init__(self) -> None:
        self._sums: dict[str, torch.Tensor] = {}
        self._count = 0

    def add(self, terms: dict[str, torch.Tensor]) -> None:
        for name, value in terms.items():
            self._sums[name] = self._sums.get(name, 0.0) + value.float()
        self._count += 1

    def pop_means(self) -> dict[str, float]:
        means = {k: float(v) / self._count for k, v in self._sums.items()} if self._count else {}
        self._sums, self._count = {}, 0
        return means


class PretrainStep:
    def __init__(self, model: torch.nn.Module, forward_model: torch.nn.Module,
                 loss_fn: HybridMIMLoss, optimizer: torch.optim.Optimizer, scheduler: Any,
                 scaler: torch.amp.GradScaler, geometry: MaskGeometry, method: dict[str, Any],
                 device: torch.device, precision: str, grad_clip: float,
                 global_batch: int | None = None, mask_rows: torch.Tensor | None = None):
        # ``forward_model`` is the DDP wrapper when distributed (gradient sync), else ``model``.
        # Under DDP every rank draws the masks of the whole ``global_batch`` from an identically
        # seeded generator and keeps ``mask_rows``, the rows of its own crops
        # (feed.global_crop_rows): the masks then do not depend on how the batch is split.
        self.global_batch = global_batch
        self.mask_rows = mask_rows.to(device) if mask_rows is not None else None
        self.model, self.forward_model, self.loss_fn = model, forward_model, loss_fn
        self.optimizer, self.scheduler, self.scaler = optimizer, scheduler, scaler
        self.geometry, self.method = geometry, method
        self.device, self.precision, self.grad_clip = device, precision, grad_clip
        # Validation runs on rank 0 alone: its contrastive term must not wait for other ranks.
        self.val_loss_fn = copy.copy(loss_fn)
        self.val_loss_fn.gather_negatives = False

    def _losses(self, images: torch.Tensor, valid: torch.Tensor, generator: torch.Generator,
                forward_model: torch.nn.Module, loss_fn: HybridMIMLoss,
                global_batch: int | None = None, rows: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        patch_mask = sample_patch_mask(global_batch or images.shape[0], self.geometry,
                                       self.method["mask_ratio"], self.method["masking"],
                                       generator=generator)
        if rows is not None:  # the feed's batches always hold the rows' crops (StepFeed)
            patch_mask = patch_mask[rows]
        voxel_mask = expand_to_voxels(patch_mask, self.geometry.patch)
        masked = apply_mask(images, voxel_mask)
        count = location = None
        if loss_fn.needs_region_labels:
            count, location = region_labels(patch_mask, self.geometry,
                                            self.method["region_grouping"])
        with runtime.autocast(self.device, self.precision):
            outputs = forward_model(masked)
            second = None
            if loss_fn.needs_second_view:
                # Second view: same masked input, same weights, different dropout draw (the
                # module is in train mode), no gradient (SimCSE-style).
                with torch.no_grad():
                    second = self.model.project(masked)
        return loss_fn(outputs, images, voxel_mask, valid, count, location, second)

    def train_step(self, images: torch.Tensor, valid: torch.Tensor,
                   generator: torch.Generator) -> dict[str, torch.Tensor]:
        self.model.train()
        total, terms = self._losses(images, valid, generator, self.forward_model, self.loss_fn,
                                    self.global_batch, self.mask_rows)
        grad_norm = optimiser_step(total, self.model, self.optimizer, self.scheduler, self.scaler,
                                   self.grad_clip)
        if grad_norm is not None:
            terms["grad_norm"] = grad_norm
        return terms

    def validate(self, dataset: Dataset, seed: int, volumes_per_batch: int) -> dict[str, float]:
        """Mean loss terms on the held-out volumes with the same crops and masks every time.

        Runs on the unwrapped model of rank 0 in eval mode (no dropout: the contrastive term then
        compares two identical views, so it only measures how well samples are told apart).
        """
        generator = torch.Generator(device=self.device)
        generator.manual_seed(seed)
        window = TermWindow()
        # Whole batches like training (the contrastive term needs other samples as negatives).
        batch = min(volumes_per_batch, len(dataset))  # type: ignore[arg-type]
        with eval_mode(self.model):
            for item in DataLoader(dataset, batch_size=batch, shuffle=False, drop_last=True):
                images, valid = flatten_volumes(item, self.device)
                _, terms = self._losses(images, valid, generator, self.model, self.val_loss_fn)
                window.add(terms)
        return window.pop_means()
