"""Per-dataset data steps as the workflow runs them: acquire → data/raw/<ds>, then preprocess +
split → data/processed/<ds>. The CLI's `data` commands (called by Snakemake and by the DVC stages)
are thin wrappers around these two functions."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def acquire_dataset(config: dict[str, Any], name: str, data_root: str = "data") -> Path:
    """Generate (demo), download, or locate + convert + check one dataset into data/raw/<name>."""
    from hybridmim.config import acquisition_options, dataset_spec

    spec = dataset_spec(config, name)
    options = acquisition_options(config, name)
    raw_dir = Path(data_root) / "raw" / name
    kind = (spec.source or {}).get("kind")
    if kind == "generated":
        from hybridmim.data.demo import generate_demo

        generator = spec.source.get("generator", name)
        log.info("generating demo dataset %s (%s) into %s", name, generator, raw_dir)
        return generate_demo(generator, raw_dir, num_cases=options.get("num_cases", 10),
                             num_test=options.get("num_test", 2), seed=options.get("seed", 0))
    from hybridmim.data.sources.acquire import acquire

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
