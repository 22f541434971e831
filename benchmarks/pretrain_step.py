"""Time and peak memory of one pretraining step: HybridMIM vs the SimMIM-style baseline.

The paper claims partial region prediction makes pretraining cheaper. This measures the real
training step (``hybridmim.pretrain.step.PretrainStep``: masking on device, forward, second
dropout pass, all losses, backward, AdamW) for both methods on the same backbone, input, batch and
hardware, side by side in one run, and reports the ratios.

Time: per backbone, one subprocess builds both models and interleaves their steps (H S S H ...),
so a load change on a shared machine hits both alike; the median per method is reported.
Memory: every (backbone, method) runs two steps in a fresh subprocess, so its peak is its own:
``torch.cuda.max_memory_allocated`` on CUDA; on CPU the growth of the process' peak RSS
(``resource.getrusage(...).ru_maxrss``) over its RSS right before the first step, i.e. what the
steps added on top of the imported libraries, the model and the input.

Variants (``--variants fp32 bf16 channels_last compile``): the HybridMIM step of each backbone
in fp32, bf16, channels-last-3d (in the benchmark's precision) and ``torch.compile``d (ditto),
all built in one subprocess per backbone and stepped in rotation (A B C D, D C B A, ...), so the
ratios to the first variant are side by side under the same load; compile time is reported
separately (it is paid once per job).

    python benchmarks/pretrain_step.py                       # CPU, small widths, crop 64
    python benchmarks/pretrain_step.py --variants fp32 bf16 channels_last compile
    python benchmarks/pretrain_step.py --device cuda --crop 96 --batch 4 --precision bf16 \\
        --unet-filters 64 64 128 256 512 --swin-feature-size 48 --unetr-hidden-size 768
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

METHODS = {
    "hybridmim": {"name": "hybridmim", "box": "partial", "masking": "uniform", "mask_ratio": 0.4,
                  "region_grouping": "spatial", "temperature": 0.5, "gather_negatives": False,
                  "loss_weights": {"pr": 1.0, "num": 0.1, "loc": 0.1, "con": 0.01, "cl": 0.1}},
    "simmim": {"name": "simmim"},
}


def backbone_specs(args: argparse.Namespace) -> dict[str, dict]:
    return {
        "unet": {"name": "unet", "in_channels": 1, "filters": args.unet_filters, "dropout": 0.1},
        "swinunetr": {"name": "swinunetr", "in_channels": 1,
                      "feature_size": args.swin_feature_size, "drop_rate": 0.1,
                      "depths": args.swin_depths, "num_heads": args.swin_heads},
        "unetr": {"name": "unetr", "in_channels": 1, "feature_size": args.unetr_feature_size,
                  "hidden_size": args.unetr_hidden_size, "mlp_dim": args.unetr_mlp_dim,
                  "num_heads": args.unetr_heads, "dropout_rate": 0.1},
    }


def _rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _build_stepper(config: dict, method_name: str, variant: str | None = None):
    """The real PretrainStep. ``variant``: None (config's precision), ``fp32``/``bf16``/``fp16``
    (that precision), ``channels_last`` or ``compile`` (config's precision plus the option)."""
    import torch

    from hybridmim import runtime
    from hybridmim.models.hybridmim_model import build_pretrain_model
    from hybridmim.pretrain.losses import HybridMIMLoss
    from hybridmim.pretrain.masking import MaskGeometry
    from hybridmim.pretrain.spec import resolve_method
    from hybridmim.pretrain.step import PretrainStep
    from hybridmim.training_loop import optimisation

    torch.manual_seed(0)
    device = torch.device(config["device"])
    from hybridmim.runtime import prepare_network

    requested = variant if variant in {"fp32", "bf16", "fp16"} else config["precision"]
    precision = runtime.precision_choice(requested, device).precision
    method = {**METHODS[method_name], "proj_dim": config["proj_dim"]}
    geo = config["geometry"]
    if geo["crop"] - geo["region"] < 64:  # the CPU crop: one Swin box token per axis
        method["swin_bottleneck_slice"] = "after_encoder10"
    method = resolve_method(method)
    model = build_pretrain_model(config["backbone"], config["geometry"], method).to(device)
    forward_model = prepare_network(model, device, precision,
                                    {"channels_last": variant == "channels_last",
                                     "compile": variant == "compile"})
    optimizer, scheduler, scaler = optimisation(
        model.parameters(), {"lr": 1e-4, "weight_decay": 1e-3}, 10_000, device, precision)
    return PretrainStep(
        model=model, forward_model=forward_model,
        loss_fn=HybridMIMLoss.from_method(method),
        optimizer=optimizer, scheduler=scheduler, scaler=scaler,
        geometry=MaskGeometry.coerce(config["geometry"]), method=method, device=device,
        precision=precision, grad_clip=1.0)


def _inputs(config: dict):
    import torch

    device = torch.device(config["device"])
    crop, batch = config["geometry"]["crop"], config["batch"]
    images = torch.rand(batch, 1, crop, crop, crop, device=device) * 0.999 + 0.001
    valid = torch.ones(batch, 1, crop, crop, crop, dtype=torch.bool, device=device)
    return images, valid, torch.Generator(device=device).manual_seed(0)


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_time(config: dict) -> dict:
    """Worker: both methods in one process, steps interleaved (H S S H H S ...), so that a load
    change on a shared machine hits both alike; median seconds per step of each."""
    import torch

    torch.set_num_threads(config["threads"])
    steppers = {m: _build_stepper(config, m) for m in METHODS}
    images, valid, generator = _inputs(config)
    for _ in range(config["warmup"]):
        for stepper in steppers.values():
            stepper.train_step(images, valid, generator)
    device = images.device
    _sync(device)
    times = _interleaved_times(steppers, images, valid, generator, config["steps"])
    return {m: {"seconds_per_step": statistics.median(t), "times": t,
                "parameters": sum(p.numel() for p in steppers[m].model.parameters()),
                "recon_voxels": int(steppers[m].model.box_shape[0] ** 3),
                "precision": steppers[m].precision} for m, t in times.items()}


def _interleaved_times(steppers: dict, images, valid, generator, steps: int) -> dict:
    """Seconds of each stepper's steps, stepped in rotation (the order reversed every round, so
    no stepper always runs right after the same one): one side-by-side measurement."""
    times: dict[str, list[float]] = {name: [] for name in steppers}
    order = list(steppers)
    for _ in range(steps):
        for name in order:
            started = time.perf_counter()
            steppers[name].train_step(images, valid, generator)
            _sync(images.device)
            times[name].append(time.perf_counter() - started)
        order.reverse()
    return times


def measure_variants(config: dict) -> dict:
    """Worker: the HybridMIM step in each variant, stepped in rotation; median s/step each."""
    import torch

    torch.set_num_threads(config["threads"])
    variants = config["variants"]
    steppers = {v: _build_stepper(config, "hybridmim", v) for v in variants}
    images, valid, generator = _inputs(config)
    device = images.device
    first_steps = {}
    for name, stepper in steppers.items():
        started = time.perf_counter()  # the first step of a compiled model includes compiling
        stepper.train_step(images, valid, generator)
        _sync(device)
        first_steps[name] = time.perf_counter() - started
        for _ in range(config["warmup"] - 1):
            stepper.train_step(images, valid, generator)
    _sync(device)
    times = _interleaved_times(steppers, images, valid, generator, config["steps"])
    return {v: {"seconds_per_step": statistics.median(t), "times": t,
                "first_step_seconds": first_steps[v], "precision": steppers[v].precision}
            for v, t in times.items()}


def run_variants(args: argparse.Namespace, base: dict, specs: dict) -> list[dict]:
    rows = []
    reference = args.variants[0]
    print(f"{'backbone':10} " + " ".join(f"{v:>14}" for v in args.variants)
          + "   (s/step; ratio to " + reference + ")", flush=True)
    for name in args.backbones:
        result = run_worker("variants", {**base, "backbone": specs[name],
                                         "variants": args.variants})
        row = {"backbone": name, "backbone_spec": specs[name], "variants": result}
        if "error" in result:
            print(f"{name:10} error: {result['error']}", flush=True)
        else:
            ref = result[reference]["seconds_per_step"]
            row["ratio_to_" + reference] = {v: r["seconds_per_step"] / ref
                                            for v, r in result.items()}
            print(f"{name:10} " + " ".join(
                f"{r['seconds_per_step']:7.3f} ({r['seconds_per_step'] / ref:4.2f})"
                for r in result.values()), flush=True)
        rows.append(row)
    return rows


def measure_memory(config: dict) -> dict:
    """Worker: peak memory of one method's training step in a fresh process."""
    import torch

    torch.set_num_threads(config["threads"])
    stepper = _build_stepper(config, config["method"])
    images, valid, generator = _inputs(config)
    device = images.device
    rss_before = _rss_bytes()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(2):  # the second step also holds the optimizer moments
        stepper.train_step(images, valid, generator)
    _sync(device)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
    else:  # ru_maxrss is in KiB on Linux
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss_before
    return {"peak_memory_bytes": int(peak)}


def run_worker(kind: str, config: dict) -> dict:
    """Run ``measure_<kind>`` in a fresh interpreter; an error becomes {"error": last line}."""
    proc = subprocess.run([sys.executable, __file__, "--worker", kind, json.dumps(config)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _fmt_mib(n: float) -> str:
    return f"{n / 2**20:8.1f}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--device", default="auto", help="cpu | cuda | cuda:N | auto")
    parser.add_argument("--crop", type=int, default=None, help="crop side (default 96 on GPU, "
                        "64 on CPU)")
    parser.add_argument("--region", type=int, default=32)
    parser.add_argument("--patch", type=int, default=16)
    parser.add_argument("--batch", type=int, default=None, help="crops per step (default 4 on "
                        "GPU, 2 on CPU)")
    parser.add_argument("--precision", default="auto", help="auto | fp32 | bf16 | fp16")
    parser.add_argument("--backbones", nargs="+", default=["unet", "swinunetr", "unetr"])
    parser.add_argument("--steps", type=int, default=5, help="timed steps per configuration")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", 2)))
    parser.add_argument("--proj-dim", type=int, default=384)
    parser.add_argument("--unet-filters", type=int, nargs=5, default=[8, 8, 16, 32, 64])
    parser.add_argument("--swin-feature-size", type=int, default=12)
    parser.add_argument("--swin-depths", type=int, nargs=4, default=[2, 2, 2, 2])
    parser.add_argument("--swin-heads", type=int, nargs=4, default=[3, 6, 12, 24])
    parser.add_argument("--unetr-feature-size", type=int, default=8)
    parser.add_argument("--unetr-hidden-size", type=int, default=96)
    parser.add_argument("--unetr-mlp-dim", type=int, default=192)
    parser.add_argument("--unetr-heads", type=int, default=4)
    parser.add_argument("--variants", nargs="+", choices=["fp32", "bf16", "fp16",
                                                          "channels_last", "compile"],
                        help="compare these variants of the HybridMIM step instead of "
                        "HybridMIM vs SimMIM (ratios to the first)")
    parser.add_argument("--out", default=None, help="JSON output (default results/benchmarks/"
                        "pretrain_step.json, or pretrain_variants.json with --variants)")
    args = parser.parse_args(argv)

    if args.worker:
        kind, config = args.worker
        worker = {"time": measure_time, "memory": measure_memory,
                  "variants": measure_variants}[kind]
        print(json.dumps(worker(json.loads(config))))
        return

    import torch

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    on_gpu = device.startswith("cuda")
    crop = args.crop or (96 if on_gpu else 64)
    batch = args.batch or (4 if on_gpu else 2)
    specs = backbone_specs(args)
    base = {"device": device, "precision": args.precision, "batch": batch, "steps": args.steps,
            "warmup": args.warmup, "threads": args.threads, "proj_dim": args.proj_dim,
            "geometry": {"crop": crop, "region": args.region, "patch": args.patch}}
    rows = []
    print(f"device {device}, crop {crop}, batch {batch}, precision {args.precision}, "
          f"{args.steps} timed steps after {args.warmup} warm-up", flush=True)
    out = Path(args.out or ("results/benchmarks/pretrain_variants.json" if args.variants
                            else "results/benchmarks/pretrain_step.json"))
    if args.variants:
        _write_report(out, device, on_gpu, base, run_variants(args, base, specs))
        return
    header = (f"{'backbone':10} {'method':9} {'s/step':>8} {'peak MiB':>8} {'recon vox':>10}"
              f" | {'time H/S':>8} {'mem H/S':>8}")
    print(header + "\n" + "-" * len(header), flush=True)
    for name in args.backbones:
        config = {**base, "backbone": specs[name]}
        timing = run_worker("time", config)
        results = {}
        for method in METHODS:
            if "error" in timing:
                results[method] = timing
                continue
            memory = run_worker("memory", {**config, "method": method})
            results[method] = {**timing[method], **memory}
        h, s = results["hybridmim"], results["simmim"]
        ok = "error" not in h and "error" not in s
        row = {"backbone": name, "backbone_spec": specs[name], "hybridmim": h, "simmim": s}
        if ok:
            row["time_ratio"] = h["seconds_per_step"] / s["seconds_per_step"]
            row["memory_ratio"] = h["peak_memory_bytes"] / max(1, s["peak_memory_bytes"])
        rows.append(row)
        for method, r in results.items():
            if "error" in r:
                print(f"{name:10} {method:9} error: {r['error']}", flush=True)
                continue
            ratios = (f" | {row['time_ratio']:8.2f} {row['memory_ratio']:8.2f}"
                      if ok and method == "simmim" else "")
            print(f"{name:10} {method:9} {r['seconds_per_step']:8.3f} "
                  f"{_fmt_mib(r['peak_memory_bytes'])} {r['recon_voxels']:10d}{ratios}",
                  flush=True)
    _write_report(out, device, on_gpu, base, rows)


def _write_report(out: Path, device: str, on_gpu: bool, base: dict, rows: list) -> None:
    import torch

    out.parent.mkdir(parents=True, exist_ok=True)
    report = {"device": device, "device_name": (torch.cuda.get_device_name(device) if on_gpu
                                                else "cpu"),
              "torch": torch.__version__, **{k: v for k, v in base.items() if k != "device"},
              "memory_measure": "cuda max_memory_allocated" if on_gpu else
              "peak RSS growth during the steps (ru_maxrss - RSS before)", "rows": rows}
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    tmp.replace(out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
