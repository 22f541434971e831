"""HybridMIM pretraining: masking (masking.py), losses (losses.py) and the loop (train.py).

- ``masking``: patch masks on the device (uniform or hierarchical), region count/location labels
  (spatial or the authors' raster grouping), voxel masks.
- ``losses``: ``HybridMIMLoss`` = L_PR + L_Num + L_Loc + L_Con + L_CL with switchable weights.
- ``train``: ``run_pretraining(spec)`` — the `hybridmim pretrain` job (resumable, DDP, MLflow).
  Helpers: ``spec`` (checks), ``corpus`` (datasets), ``feed`` (resumable data order),
  ``step`` (one optimisation step, validation); the LR schedule and optimiser step are
  ``hybridmim.training_loop``'s, shared with fine-tuning.
"""
from hybridmim.pretrain.losses import HybridMIMLoss
from hybridmim.pretrain.masking import (MaskGeometry, apply_mask, expand_to_voxels, region_labels,
                                        sample_patch_mask)


def run_pretraining(spec: dict) -> dict:
    """See ``hybridmim.pretrain.train.run_pretraining`` (imported on use: it pulls in MONAI)."""
    from hybridmim.pretrain.train import run_pretraining as _run

    return _run(spec)


__all__ = ["HybridMIMLoss", "MaskGeometry", "apply_mask", "expand_to_voxels", "region_labels",
           "run_pretraining", "sample_patch_mask"]
