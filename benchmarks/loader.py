"""Can the data loaders feed the training step? Crops per second against DataLoader workers.

Builds a preprocessed cache in the project's layout (docs/contracts.md: float32 HU ``.npy``
volumes, uint8 labels, dataset.json, splits.json) at a CT size after the recipe's resampling
(default 1 × 256 × 256 × 160 voxels, ~40 MiB a volume), then times the project's own datasets
through ``torch.utils.data.DataLoader`` with 0, 2, 4 and 8 workers (persistent workers, as the
jobs use them):

- pretraining: ``hybridmim.data.loading.PretrainCropDataset`` (random crops read through a
  memory map, windowed), ``crops_per_volume`` 2, 2 volumes per batch;
- fine-tuning: ``SegmentationDataset(train=True)`` (whole volume read, MONAI
  RandCropByPosNegLabeld + flips/rotations/intensity jitter), 2 crops per volume, batch 2.

Each is reported in crops/s next to the rate the step needs: ``--step-crops`` crops every
``--step-seconds`` seconds (default 4 crops per 0.2 s = 20 crops/s, a 96³ batch-4 GPU step).
The first batch (worker start-up) is not timed.

    python benchmarks/loader.py                     # crop 96, workers 0 2 4 8
    python benchmarks/loader.py --shape 1 128 128 96 --batches 4 --workers 0 2
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path


def write_cache(folder: Path, cases: int, shape: list[int], seed: int = 0) -> Path:
    import numpy as np

    (folder / "cases").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    records = []
    spatial = shape[1:]
    for i in range(cases):
        grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s, dtype=np.float32) for s in spatial],
                                    indexing="ij"))
        body = (grid ** 2).sum(0) < 0.8
        organ = ((grid - 0.2) ** 2).sum(0) < 0.05
        hu = np.where(body, 40.0, -1000.0).astype(np.float32)
        hu += rng.normal(0, 30, spatial).astype(np.float32)
        case = f"case{i:03d}"
        np.save(folder / "cases" / f"{case}_image.npy", np.broadcast_to(hu, shape).copy())
        np.save(folder / "cases" / f"{case}_label.npy", organ.astype(np.uint8))
        records.append({"case": case, "image": f"cases/{case}_image.npy",
                        "label": f"cases/{case}_label.npy", "spacing": [1.5, 1.5, 2.0],
                        "shape": list(shape)})
    index = {"name": "loader_bench", "channels": ["CT"] * shape[0],
             "labels": {"0": "background", "1": "organ"},
             "recipe": {"modality": "CT", "spacing": [1.5, 1.5, 2.0]}, "recipe_hash": "bench",
             "cases": records}
    (folder / "dataset.json").write_text(json.dumps(index))
    ids = [r["case"] for r in records]
    (folder / "splits.json").write_text(json.dumps(
        {"seed": 0, "recipe": "bench", "train": ids, "val": [], "test": []}))
    return folder


def crops_per_second(dataset, crops_per_item: int, batch: int, workers: int,
                     batches: int) -> float:
    import torch
    from torch.utils.data import DataLoader

    loader = DataLoader(dataset, batch_size=batch, shuffle=True, num_workers=workers,
                        persistent_workers=workers > 0,
                        generator=torch.Generator().manual_seed(0))
    iterator = iter(_endless(loader))
    next(iterator)  # worker start-up and first reads are paid once per job
    started = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    return batches * batch * crops_per_item / (time.perf_counter() - started)


def _endless(loader):
    while True:
        yield from loader


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--crop", type=int, default=96)
    parser.add_argument("--shape", type=int, nargs=4, default=[1, 256, 256, 160],
                        help="C X Y Z of each cached volume")
    parser.add_argument("--cases", type=int, default=8)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2, 4, 8])
    parser.add_argument("--batches", type=int, default=8, help="timed batches per setting")
    parser.add_argument("--step-crops", type=int, default=4)
    parser.add_argument("--step-seconds", type=float, default=0.2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the main "
                        "process (a training job's others go to the model)")
    parser.add_argument("--out", default="results/benchmarks/loader.json")
    args = parser.parse_args(argv)

    import os

    import torch

    from hybridmim.data.loading import PretrainCropDataset, SegmentationDataset
    from hybridmim.dataset_catalog import CT_FINETUNE_WINDOW, CT_PRETRAIN_WINDOW

    torch.set_num_threads(args.threads)
    needed = args.step_crops / args.step_seconds
    rows = []
    with tempfile.TemporaryDirectory(prefix="loader_bench_") as tmp:
        cache = write_cache(Path(tmp) / "cache", args.cases, args.shape)
        ids = [f"case{i:03d}" for i in range(args.cases)]
        datasets = {
            "pretrain": (PretrainCropDataset([{"processed_dir": str(cache),
                                                "window": dict(CT_PRETRAIN_WINDOW)}],
                                              split_ids={str(cache): ids}, crop=args.crop,
                                              crops_per_volume=2), 2),
            "finetune": (SegmentationDataset(cache, ids, window=dict(CT_FINETUNE_WINDOW),
                                             crop=args.crop, num_samples=2, train=True), 2),
        }
        print(f"cache {args.cases} × {args.shape} float32, crop {args.crop}, "
              f"{os.cpu_count()} CPUs; the step needs {needed:.1f} crops/s "
              f"({args.step_crops} crops per {args.step_seconds} s)", flush=True)
        print(f"{'stage':9} {'workers':>7} {'crops/s':>8} {'× needed':>9}", flush=True)
        for stage, (dataset, per_item) in datasets.items():
            for workers in args.workers:
                rate = crops_per_second(dataset, per_item, 2, workers, args.batches)
                rows.append({"stage": stage, "workers": workers, "crops_per_s": rate,
                             "needed_crops_per_s": needed, "feeds_step": rate >= needed})
                print(f"{stage:9} {workers:7d} {rate:8.1f} {rate / needed:9.2f}", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = out.with_suffix(".json.tmp")
    tmp_out.write_text(json.dumps({"crop": args.crop, "shape": args.shape, "cases": args.cases,
                                   "cpus": os.cpu_count(), "step_crops": args.step_crops,
                                   "step_seconds": args.step_seconds, "rows": rows}, indent=2))
    tmp_out.replace(out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
