"""MLflow tracking: the store, provenance capture and the run context every job uses."""
