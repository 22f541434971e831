"""Data files the package needs at run time, shipped inside it.

They are symbolic links to the files' homes in the repository (workflow/schemas/config.schema.yaml
stays where Snakemake and every helper edit it, the job spec schemas beside it,
config/paper_results.yaml where users read it);
building a wheel copies the linked content, so a non-editable install carries the real files.
"""
from pathlib import Path

RESOURCES = Path(__file__).resolve().parent
CONFIG_SCHEMA = RESOURCES / "config.schema.yaml"
PAPER_RESULTS = RESOURCES / "paper_results.yaml"
