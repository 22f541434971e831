"""Per-dataset data steps as the workflow runs them: acquire → data/raw/<ds>, then preprocess +
split → data/processed/<ds>. The CLI's `data` commands (called by Snakemake and by the DVC stages)
are thin wrappers around these two functions."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any


def acquire_dataset(config: dict[str, Any], name: str, data_root: str = "data") -> Path:
    """Generate (demo), download, or locate + convert + check one dataset into data/raw/<name>."""
    from hybridmim.config import acquisition_options, dataset_spec
    from hybridmim.data.sources.acquire import acquire

    spec = dataset_spec(config, name)
    options = acquisition_options(config, name)
    if (spec.source or {}).get("kind") == "generated":
        # The demo's size and seed are acquisition options of its config block.
        spec = dataclasses.replace(spec, source={**spec.source, **{
            key: options[key] for key in ("num_cases", "num_test", "seed") if key in options}})
    manual = {name: options["manual_path"]} if "manual_path" in options else {}
    return Path(acquire(spec, raw_root=Path(data_root) / "raw",
                        downloads_dir=Path(data_root) / "downloads", manual_paths=manual))


def preprocess_and_split(config: dict[str, Any], name: str, data_root: str = "data") -> Path:
    """Preprocess data/raw/<name> per the dataset's recipe and write its splits once."""
    from hybridmim.config import dataset_spec
    from hybridmim.data.prepare.preprocess import preprocess_dataset
    from hybridmim.data.prepare.splits import make_splits

    spec = dataset_spec(config, name)
    raw_dir = Path(data_root) / "raw" / name
    out_dir = Path(data_root) / "processed" / name
    if not (raw_dir / "dataset.json").exists():
        raise FileNotFoundError(f"{raw_dir}/dataset.json is missing: run `hybridmim data acquire "
                                f"--dataset {name}` (or the workflow's acquire_data rule) first")
    preprocess_dataset(raw_dir, out_dir, spec)
    make_splits(out_dir, spec)
    return out_dir / "splits.json"
