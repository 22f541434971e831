"""Test-set evaluation: Dice/HD95 metrics (metrics.py), the evaluation job (run.py) and
qualitative overlays (overlays.py)."""
