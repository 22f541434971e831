"""Does the embedded demo learn? Train seconds and test Dice of scratch fine-tuning per demo dataset.

The demo's results table compares scratch against HybridMIM-pretrained initialisation; that only
means something if scratch fine-tuning, within the demo's CPU budget, already learns the task.
This runs the real fine-tuning job (``hybridmim.finetune.train.run_finetuning``) and the real
test evaluation (``hybridmim.evaluate.run.run_evaluation``) on specs built by ``hybridmim.config``
from a config file, with the fine-tuning settings overridden from the command line, and prints a
table: dataset, settings, training seconds (wall clock, validation excluded, as the job counts
them), CPU seconds of the whole fine-tuning job (with one thread this is what the job would take on
an idle core, so it stays meaningful when other work shares the machine), best validation Dice, test
Dice (mean and per class).

Each dataset runs in its own subprocess with ``--threads`` torch threads, ``--parallel`` of them at
a time, so the timings are what a Snakemake job with that many cores would see. Data and results
live under ``--workdir`` (data/raw, data/processed, results/...), never in the repository:

    python benchmarks/demo_learning.py --workdir /tmp/demo --prepare
    python benchmarks/demo_learning.py --workdir /tmp/demo --datasets demo_spleen \\
        --crop 48 --steps 120 --lr 3e-3 --filters 8 8 16 32 64 --threads 1 --parallel 2
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

DEMO_DATASETS = ("demo_spleen", "demo_liver", "demo_btcv", "demo_brats")
RESULT_MARK = "DEMO_LEARNING_RESULT "


def settings_of(args: argparse.Namespace) -> dict:
    """The fine-tuning overrides; None means 'as in the config'."""
    return {"crop": args.crop, "steps": args.steps, "lr": args.lr, "warmup": args.warmup,
            "batch_size": args.batch_size, "crops_per_volume": args.crops_per_volume,
            "filters": args.filters, "val_every": args.val_every}


def build_specs(config_path: str, dataset: str, settings: dict, threads: int, tag: str):
    """Finetune and evaluate specs of the scratch job, with ``settings`` applied and outputs
    under results/demo_learning/<tag>/ (relative to the working directory)."""
    from hybridmim import config as hcfg

    config = hcfg.load_config(config_path)
    ft = config["finetuning"]
    if settings["filters"] is not None:
        for backbone in config["backbones"].values():
            if backbone.get("name") == "unet":
                backbone["filters"] = list(settings["filters"])
    for key in ("crop", "batch_size", "val_every"):
        if settings[key] is not None:
            ft[key] = settings[key]
    optim_keys = {"steps": "steps", "lr": "lr", "warmup": "warmup_steps"}
    for key, optim_key in optim_keys.items():
        if settings[key] is not None:
            ft["optim"][optim_key] = settings[key]
    backbone = ft["backbones"][0]
    spec = hcfg.finetune_spec(config, dataset, backbone, "scratch", 1.0, 0)
    if settings["crops_per_volume"] is not None:
        spec["crops_per_volume"] = settings["crops_per_volume"]
    folder = Path("results") / "demo_learning" / tag / dataset
    spec["out"] = str(folder / "finetune" / "model.pt")
    spec["threads"] = threads
    evaluation = hcfg.evaluate_spec(config, dataset, backbone, "scratch", 1.0, 0)
    evaluation.update(model=spec["out"], out=str(folder / "evaluate" / "metrics.json"),
                      threads=threads)
    return spec, evaluation, folder


def run_one(config_path: str, dataset: str, settings: dict, threads: int, tag: str) -> dict:
    """In the worker process: fine-tune from scratch, evaluate on the test split."""
    import torch

    from hybridmim.evaluate.run import run_evaluation
    from hybridmim.finetune.train import run_finetuning
    from hybridmim.progress import setup_logging

    setup_logging()
    torch.set_num_threads(threads)
    spec, evaluation, folder = build_specs(config_path, dataset, settings, threads, tag)
    shutil.rmtree(folder, ignore_errors=True)  # a leftover state/ would resume, not retrain
    started, cpu_started = time.monotonic(), time.process_time()
    trained = run_finetuning(spec)
    wall, cpu = time.monotonic() - started, time.process_time() - cpu_started
    evaluated = run_evaluation(evaluation)
    return {"dataset": dataset, "settings": {**settings, "crop": spec["crop"],
                                             "steps": spec["optim"]["steps"],
                                             "lr": spec["optim"]["lr"],
                                             "batch_size": spec["batch_size"],
                                             "filters": spec["backbone"].get("filters")},
            "train_seconds": trained["metrics"]["train_seconds"], "job_wall_seconds": wall,
            "job_cpu_seconds": cpu,
            "best_val_dice": trained["metrics"]["best_val_dice_mean"],
            "best_step": trained["metrics"]["best_step"],
            "test_dice_mean": evaluated["metrics"].get("test_dice_mean"),
            "test_dice": (evaluated.get("per_class") or {}).get("dice", {})}


def prepare(config_path: str, datasets) -> None:
    """Generate and preprocess the demo datasets under ./data (skipped when up to date)."""
    from hybridmim import config as hcfg
    from hybridmim.data.pipeline import acquire_dataset, preprocess_and_split
    from hybridmim.progress import setup_logging

    setup_logging()
    config = hcfg.load_config(config_path)
    for name in datasets:
        acquire_dataset(config, name)
        preprocess_and_split(config, name)


def launch(args: argparse.Namespace, dataset: str, tag: str) -> dict:
    """Run one dataset in a child process (its own threads, its own peak memory)."""
    command = [sys.executable, __file__, "--worker", dataset, "--config", args.config,
               "--workdir", ".", "--tag", tag, "--threads", str(args.threads)]
    for key, value in settings_of(args).items():
        if value is not None:
            flag = "--" + key.replace("_", "-")
            command += [flag, *map(str, value)] if isinstance(value, list) else [flag, str(value)]
    log_path = Path("results") / "demo_learning" / f"{tag}_{dataset}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:
        finished = subprocess.run(command, stdout=subprocess.PIPE, stderr=log, text=True,
                                  env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
    for line in finished.stdout.splitlines():
        if line.startswith(RESULT_MARK):
            return json.loads(line[len(RESULT_MARK):])
    return {"dataset": dataset, "error": f"exit {finished.returncode}, see {log_path}"}


def format_table(results: list[dict]) -> str:
    rows = ["| dataset | settings | train s | job CPU s | best val Dice | test Dice mean | "
            "test Dice per class |", "|---|---|---|---|---|---|---|"]
    for r in results:
        if "error" in r:
            rows.append(f"| {r['dataset']} | | | | | {r['error']} | |")
            continue
        s = r["settings"]
        setting = (f"crop {s['crop']}, {s['steps']} steps, lr {s['lr']}, bs {s['batch_size']}"
                   f"x{s['crops_per_volume'] or 2}, filters {s['filters']}")
        per_class = ", ".join(f"{k} {v:.2f}" if v is not None else f"{k} n/a"
                              for k, v in r["test_dice"].items())
        mean = r["test_dice_mean"]
        rows.append(f"| {r['dataset']} | {setting} | {r['train_seconds']:.0f} | "
                    f"{r['job_cpu_seconds']:.0f} | "
                    f"{r['best_val_dice']:.3f} | {mean if mean is None else f'{mean:.3f}'} | "
                    f"{per_class} |")
    return "\n".join(rows)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(Path(__file__).resolve().parents[1] / "config"
                                                / "config.yaml"))
    parser.add_argument("--workdir", default=".", help="folder holding data/ and results/")
    parser.add_argument("--datasets", nargs="+", default=list(DEMO_DATASETS))
    parser.add_argument("--prepare", action="store_true",
                        help="generate + preprocess the datasets first")
    parser.add_argument("--crop", type=int)
    parser.add_argument("--steps", type=int)
    parser.add_argument("--lr", type=float)
    parser.add_argument("--warmup", type=int)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--crops-per-volume", type=int)
    parser.add_argument("--filters", type=int, nargs=5)
    parser.add_argument("--val-every", type=int)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--parallel", type=int, default=2, help="datasets trained at once")
    parser.add_argument("--tag", help="results sub-folder (default: a timestamp)")
    parser.add_argument("--json-out", help="also write the results as JSON here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    args.config = str(Path(args.config).resolve())
    json_out = Path(args.json_out).resolve() if args.json_out else None
    os.chdir(args.workdir)
    if args.worker:
        result = run_one(args.config, args.worker, settings_of(args), args.threads, args.tag)
        print(RESULT_MARK + json.dumps(result), flush=True)
        return
    unknown = [d for d in args.datasets if d not in DEMO_DATASETS]
    if unknown:
        raise SystemExit(f"--datasets: {unknown} are not demo datasets; use {DEMO_DATASETS}")
    if args.prepare:
        prepare(args.config, args.datasets)
    tag = args.tag or time.strftime("%Y%m%d-%H%M%S")
    with ThreadPoolExecutor(max(1, args.parallel)) as pool:
        results = list(pool.map(lambda d: launch(args, d, tag), args.datasets))
    print(format_table(results))
    if json_out:
        json_out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
