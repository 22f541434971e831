"""MLflow tracking: the store, provenance capture and the run context every job uses."""
from hybridmim.tracking.runs import TrackedRun, tracked_run

__all__ = ["TrackedRun", "tracked_run"]
