"""hybridmim: HybridMIM pretraining and evaluation as an auditable workflow."""
__version__ = "0.1.0"
