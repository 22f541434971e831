"""HybridMIM pretraining: masking (masking.py), losses (losses.py) and the loop (train.py).

- ``masking``: patch masks on the device (uniform or hierarchical), region count/location labels
  (spatial or the authors' raster grouping), voxel masks.
- ``losses``: ``HybridMIMLoss`` = L_PR + L_Num + L_Loc + L_Con + L_CL with switchable weights.
- ``train``: ``run_pretraining(spec)`` — the `hybridmim pretrain` job (resumable, DDP, MLflow).
  Helpers: ``spec`` (checks), ``corpus`` (datasets), ``feed`` (resumable data order),
  ``step`` (one optimisation step, validation); the LR schedule and optimiser step are
  ``hybridmim.training_loop``'s, shared with fine-tuning.
"""
