"""Step-indexed feeding of pretraining crops: seeded shuffling that can resume mid-epoch.

The DataLoader yields volumes (each item: ``crops_per_volume`` random crops of one volume); a
step takes ``volumes_per_step`` volumes and flattens them into one batch of crops. The order is a
``DistributedSampler`` (also on one process: one code path, seeded, ``set_epoch`` per epoch), so
step ``s`` always reads the same volumes whatever happened before — which is what lets a resumed
job skip the volumes it has already seen without loading them.

Under DDP, rank r of W gets the sampler's permutation ``perm[r::W]``, so its j-th volume of step
s (s counted inside the epoch, v = ``volumes_per_step``) is ``perm[(s·v + j)·W + r]``: the W ranks
together read ``perm[s·v·W : (s+1)·v·W]``, exactly the volumes one process with ``v·W`` volumes
per step reads at step s, where that volume is the step's volume ``j·W + r``.
``global_crop_rows`` turns this into the row of every local crop in that single-process batch.
"""
from __future__ import annotations

import itertools
import logging
from typing import Any, Iterator

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from hybridmim.runtime import DistInfo

log = logging.getLogger(__name__)


class _SkipFirst(Sampler[int]):
    """The indices of ``base`` for the current epoch, without the first ``skip`` ones."""

    def __init__(self, base: DistributedSampler, skip: int):
        self.base, self.skip = base, skip

    def __iter__(self) -> Iterator[int]:
        return itertools.islice(self.base, self.skip, None)

    def __len__(self) -> int:
        return max(0, len(self.base) - self.skip)


class StepFeed:
    """Yields ``(images, valid)`` batches on ``device`` for steps ``start_step, start_step+1, ...``.

    ``images`` (V·K, C, crop³) float, ``valid`` (V·K, 1, crop³) bool (False on padding).
    """

    def __init__(self, dataset: Dataset, volumes_per_step: int, dist: DistInfo, seed: int,
                 device: torch.device, num_workers: int = 0, start_step: int = 0):
        self.dataset, self.volumes_per_step, self.device = dataset, volumes_per_step, device
        self.num_workers = num_workers
        self.sampler = DistributedSampler(dataset, num_replicas=dist.world_size, rank=dist.rank,
                                          shuffle=True, seed=seed, drop_last=True)
        self.steps_per_epoch = len(self.sampler) // volumes_per_step
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"the pretraining corpus has {len(dataset)} training volume(s), fewer than "
                f"data.volumes_per_step ({volumes_per_step}) × {dist.world_size} process(es); "
                f"lower data.volumes_per_step or add volumes")
        # Worker seeds come from this generator, not from the global RNG, so (re)creating a loader
        # mid-run does not shift the random stream that dropout uses.
        self._loader_generator = torch.Generator()
        self.step = start_step
        self._iterator: Iterator[Any] | None = None

    def _open_epoch(self) -> None:
        epoch, offset = divmod(self.step, self.steps_per_epoch)
        self.sampler.set_epoch(epoch)
        self._loader_generator.manual_seed(self.sampler.seed * 100_003 + epoch)
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)
        loader = DataLoader(self.dataset, batch_size=self.volumes_per_step,
                            sampler=_SkipFirst(self.sampler, offset * self.volumes_per_step),
                            drop_last=True, num_workers=self.num_workers,
                            pin_memory=self.device.type == "cuda",
                            persistent_workers=False, generator=self._loader_generator)
        self._iterator = iter(loader)
        if offset:
            log.info("resuming data order at epoch %d, step %d of %d", epoch, offset,
                     self.steps_per_epoch)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        # The loader of an epoch yields exactly the batches of its remaining steps.
        if self._iterator is None or self.step % self.steps_per_epoch == 0:
            self._open_epoch()
        item = next(self._iterator)
        self.step += 1
        return flatten_volumes(item, self.device)


def global_crop_rows(volumes_per_step: int, crops_per_volume: int, dist: DistInfo
                     ) -> torch.Tensor:
    """Row in the step's global batch (one process, ``volumes_per_step × world`` volumes) of each
    crop of this rank's batch, in this rank's order: local volume j is global volume j·W + r and
    its crop k is row (j·W + r)·K + k (see the module docstring). One process: 0, 1, 2, ..."""
    volume = torch.arange(volumes_per_step) * dist.world_size + dist.rank
    return (volume[:, None] * crops_per_volume + torch.arange(crops_per_volume)).flatten()


def flatten_volumes(item: dict[str, torch.Tensor], device: torch.device
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of PretrainCropDataset items, (V, K, C, *crop) images and (V, K, 1, *crop) valid
    masks, → (V·K, C, *crop) float and (V·K, 1, *crop) bool on ``device``."""
    non_blocking = device.type == "cuda"
    return (item["image"].flatten(0, 1).to(device, torch.float32, non_blocking=non_blocking),
            item["valid"].flatten(0, 1).to(device, torch.bool, non_blocking=non_blocking))
