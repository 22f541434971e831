"""One-shot performance check of a GPU (or, at tiny sizes, a CPU): writes JSON and Markdown.

Run through ``benchmarks/gpu_check.sh`` (a wall-clock limit around it). Everything measured uses
the project's real code: ``hybridmim.pretrain.step.PretrainStep`` (via benchmarks/pretrain_step.py)
for pretraining, the stock MONAI segmentation networks with DiceCE + AdamW for fine-tuning, and
``hybridmim.predict.inference.predict_volume`` (MONAI sliding window) for inference.

Sections (``--size paper``: 96³ crops, batch 4, the paper's backbone widths, bf16):

1. Pretraining step per backbone (unet, swinunetr, unetr), HybridMIM and SimMIM: s/step, crops/s,
   peak memory, the HybridMIM/SimMIM time and memory ratios.
2. FLOPs of one training step (forward + backward) counted by ``torch.utils.flop_counter``;
   achieved TFLOP/s = FLOPs / s per step; MFU = achieved / the GPU's dense bf16 (or fp16) peak,
   looked up from the GPU's name (``PEAK_TFLOPS``; unknown GPUs and CPUs get no MFU).
3. Fine-tuning step throughput (crops/s) and whole-volume inference throughput (volumes/s and
   Mvoxel/s) per backbone.
4. fp16 + GradScaler: a few UNet pretraining steps in fp16, finite losses and the loss scale.
5. ``torch.compile`` on/off for the UNet pretraining step (compile time reported apart). Skipped
   on a CPU unless ``--compile`` (inductor on a CPU compiles for minutes).

    bash benchmarks/gpu_check.sh                 # GPU, paper sizes, ≤ 8 min on one H100-class GPU
    bash benchmarks/gpu_check.sh --size tiny     # any machine, seconds to a minute (CI)
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import pretrain_step as ps  # noqa: E402  (the step benchmark's builders)

# Dense (no sparsity) peak TFLOP/s for bf16/fp16 tensor-core math, from the vendors' data sheets;
# the first key contained in the device name wins, so longer names come first.
PEAK_TFLOPS = {
    "GB200": 2500.0, "B200": 2250.0, "B100": 1750.0, "H200": 989.0, "H100 PCIe": 756.0,
    "H100 NVL": 835.0, "H100": 989.0, "H800": 989.0, "GH200": 989.0, "A100": 312.0,
    "A800": 312.0, "L40S": 362.0, "L40": 181.0, "L4": 121.0, "A40": 150.0, "A30": 165.0,
    "A10G": 70.0, "A10": 125.0, "RTX 6000 Ada": 364.0, "RTX A6000": 155.0,
    "RTX 4090": 165.0, "RTX 3090": 71.0, "V100": 125.0, "T4": 65.0,
}

SIZES = {
    "paper": {"crop": 96, "region": 32, "patch": 16, "batch": 4, "steps": 10, "warmup": 3,
              "unet_filters": [64, 64, 128, 256, 512], "swin_feature_size": 48,
              "unetr_feature_size": 16, "unetr_hidden_size": 768, "unetr_mlp_dim": 3072,
              "unetr_heads": 12, "proj_dim": 384, "volume": [192, 192, 160]},
    # The smallest geometry every backbone accepts (SwinUNETR: crop >= 64, region = its stride).
    "tiny": {"crop": 64, "region": 32, "patch": 16, "batch": 2, "steps": 1, "warmup": 1,
             "unet_filters": [4, 4, 8, 8, 16], "swin_feature_size": 12, "swin_depths": [1] * 4,
             "unetr_feature_size": 4, "unetr_hidden_size": 24, "unetr_mlp_dim": 48,
             "unetr_heads": 2, "proj_dim": 16, "volume": [70, 64, 64]},
}
BACKBONES = ("unet", "swinunetr", "unetr")


def peak_tflops(device_name: str) -> float | None:
    return next((v for k, v in PEAK_TFLOPS.items() if k.lower() in device_name.lower()), None)


class Clock:
    """Wall time of a GPU or CPU section (synchronising CUDA before reading the clock)."""

    def __init__(self, device):
        self.device = device

    def sync(self) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def time(self, fn, steps: int, warmup: int) -> list[float]:
        for _ in range(warmup):
            fn()
        self.sync()
        times = []
        for _ in range(steps):
            started = time.perf_counter()
            fn()
            self.sync()
            times.append(time.perf_counter() - started)
        return times


@contextlib.contextmanager
def peak_memory(device, out: dict):
    """Peak allocated CUDA memory of the block (bytes); on a CPU, the growth of the peak RSS."""
    import resource

    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        yield
        out["peak_memory_bytes"] = int(torch.cuda.max_memory_allocated(device))
    else:
        before = ps._rss_bytes()
        yield
        out["peak_memory_bytes"] = max(
            0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before)
        out["peak_memory_note"] = "CPU: peak RSS growth (a lower bound once the peak was set)"


def count_flops(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def step_config(args, size: dict, device: str, precision: str, backbone: str) -> dict:
    specs = ps.backbone_specs(argparse.Namespace(
        unet_filters=size["unet_filters"], swin_feature_size=size["swin_feature_size"],
        swin_depths=size.get("swin_depths", [2, 2, 2, 2]), swin_heads=[3, 6, 12, 24],
        unetr_feature_size=size["unetr_feature_size"], unetr_hidden_size=size["unetr_hidden_size"],
        unetr_mlp_dim=size["unetr_mlp_dim"], unetr_heads=size["unetr_heads"]))
    return {"device": device, "precision": precision, "batch": size["batch"],
            "proj_dim": size["proj_dim"], "backbone": specs[backbone],
            "geometry": {"crop": size["crop"], "region": size["region"], "patch": size["patch"]}}


def pretraining(args, size, device, precision, clock, peak) -> list[dict]:
    rows = []
    for backbone in args.backbones:
        config = step_config(args, size, str(device), precision, backbone)
        row: dict = {"backbone": backbone}
        for method in ps.METHODS:
            result: dict = {}
            try:
                stepper = ps._build_stepper(config, method)
                images, valid, generator = ps._inputs(config)

                def step():
                    stepper.train_step(images, valid, generator)

                with peak_memory(device, result):
                    times = clock.time(step, size["steps"], size["warmup"])
                seconds = statistics.median(times)
                flops = count_flops(step)
                result.update(seconds_per_step=seconds, crops_per_s=size["batch"] / seconds,
                              flops_per_step=flops, achieved_tflops=flops / seconds / 1e12,
                              precision=stepper.precision)
                if peak:
                    result["mfu"] = result["achieved_tflops"] / peak
                del stepper, images, valid
            except Exception as exc:  # one failing configuration must not hide the others
                result = {"error": f"{type(exc).__name__}: {exc}"[:300]}
            row[method] = result
            print(f"pretrain {backbone:9} {method:9} {_brief(result)}", flush=True)
        h, s = row["hybridmim"], row["simmim"]
        if "error" not in h and "error" not in s:
            row["time_ratio"] = h["seconds_per_step"] / s["seconds_per_step"]
            if device.type == "cuda":  # in-process peak RSS on a CPU does not compare
                row["memory_ratio"] = h["peak_memory_bytes"] / max(1, s["peak_memory_bytes"])
        rows.append(row)
    return rows


def finetune_and_inference(args, size, device, precision, clock, peak) -> list[dict]:
    import torch
    from monai.losses import DiceCELoss

    from hybridmim import runtime
    from hybridmim.models.backbones import build_segmentation_network
    from hybridmim.runtime import prepare_network
    from hybridmim.predict.inference import predict_volume

    rows = []
    crop, batch = size["crop"], size["batch"]
    for backbone in args.backbones:
        row: dict = {"backbone": backbone}
        try:
            spec = step_config(args, size, str(device), precision, backbone)["backbone"]
            torch.manual_seed(0)
            network = build_segmentation_network(spec, 14, crop)[0].to(device)
            forward = prepare_network(network, device, precision)
            optimizer = torch.optim.AdamW(network.parameters(), lr=1e-4)
            loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
            image = torch.rand(batch, 1, crop, crop, crop, device=device)
            label = torch.randint(0, 14, (batch, 1, crop, crop, crop), device=device)

            def step():
                with runtime.autocast(device, precision):
                    logits = forward(image)
                loss = loss_fn(logits.float(), label)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()

            seconds = statistics.median(clock.time(step, size["steps"], size["warmup"]))
            flops = count_flops(step)
            row["finetune"] = {"seconds_per_step": seconds, "crops_per_s": batch / seconds,
                               "achieved_tflops": flops / seconds / 1e12,
                               **({"mfu": flops / seconds / 1e12 / peak} if peak else {})}
            network.eval()
            volume = torch.rand(1, *size["volume"])

            def infer():
                predict_volume(forward, volume, crop, overlap=0.5, device=device,
                               precision=precision, sw_batch_size=batch)

            seconds = statistics.median(clock.time(infer, max(1, size["steps"] // 3), 1))
            row["inference"] = {"seconds_per_volume": seconds, "volume": size["volume"],
                                "overlap": 0.5, "volumes_per_s": 1 / seconds,
                                "mvoxels_per_s": torch.Size(size["volume"]).numel() / seconds / 1e6}
            del network, forward, optimizer
        except Exception as exc:
            row["error"] = f"{type(exc).__name__}: {exc}"[:300]
        print(f"finetune {backbone:9} {_brief(row.get('finetune', row))} | inference "
              f"{_brief(row.get('inference', row))}", flush=True)
        rows.append(row)
    return rows


def fp16_scaler(args, size, device, steps: int = 5) -> dict:
    config = step_config(args, size, str(device), "fp16", "unet")
    try:
        stepper = ps._build_stepper(config, "hybridmim")
        images, valid, generator = ps._inputs(config)
        totals = [float(stepper.train_step(images, valid, generator)["total"])
                  for _ in range(steps)]
        import math

        return {"precision": stepper.precision, "steps": steps, "losses": totals,
                "finite": all(math.isfinite(v) for v in totals),
                "scaler_enabled": stepper.scaler.is_enabled(),
                "loss_scale": float(stepper.scaler.get_scale()) if stepper.scaler.is_enabled()
                else None}
    except Exception as exc:
        return {"error": f"{type(exc).__name__}: {exc}"[:300]}


def compile_on_off(args, size, device, precision, clock) -> dict:
    config = step_config(args, size, str(device), precision, "unet")
    result = {}
    for variant in ("eager", "compile"):
        try:
            stepper = ps._build_stepper(config, "hybridmim",
                                        "compile" if variant == "compile" else None)
            images, valid, generator = ps._inputs(config)

            def step():
                stepper.train_step(images, valid, generator)

            started = time.perf_counter()
            step()
            clock.sync()
            first = time.perf_counter() - started
            seconds = statistics.median(clock.time(step, size["steps"], size["warmup"]))
            result[variant] = {"seconds_per_step": seconds, "first_step_seconds": first}
        except Exception as exc:
            result[variant] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
    if all("error" not in r for r in result.values()):
        result["speedup"] = (result["eager"]["seconds_per_step"]
                             / result["compile"]["seconds_per_step"])
    return result


def _brief(result: dict) -> str:
    if "error" in result:
        return "error: " + result["error"]
    parts = []
    for key, fmt in (("seconds_per_step", "{:.3f} s/step"), ("crops_per_s", "{:.1f} crops/s"),
                     ("seconds_per_volume", "{:.2f} s/volume"),
                     ("peak_memory_bytes", "{:.0f} MiB"), ("achieved_tflops", "{:.3g} TFLOP/s"),
                     ("mfu", "MFU {:.1%}")):
        if key in result:
            value = result[key] / 2**20 if key == "peak_memory_bytes" else result[key]
            parts.append(fmt.format(value))
    return ", ".join(parts)


def markdown(report: dict) -> str:
    mib = 2**20
    lines = [f"# GPU check: {report['device_name']}", "",
             f"torch {report['torch']}, size `{report['size']}` (crop {report['crop']}³, batch "
             f"{report['batch']}), precision {report['precision']} ({report['precision_reason']})"
             f", peak {report['peak_tflops'] or 'unknown'} TFLOP/s, {report['seconds']:.0f} s.",
             "", "## Pretraining step", "",
             "| backbone | method | s/step | crops/s | peak MiB | TFLOP/s | MFU | H/S time | "
             "H/S memory |", "|---|---|---|---|---|---|---|---|---|"]
    for row in report["pretraining"]:
        for method in ("hybridmim", "simmim"):
            r = row[method]
            if "error" in r:
                lines.append(f"| {row['backbone']} | {method} | error: {r['error']} |||||||")
                continue
            ratios = (f"{row['time_ratio']:.2f} | {row.get('memory_ratio', float('nan')):.2f}"
                      if method == "hybridmim" and "time_ratio" in row else " | ")
            mfu = f"{r['mfu']:.1%}" if "mfu" in r else "–"
            lines.append(f"| {row['backbone']} | {method} | {r['seconds_per_step']:.3f} | "
                         f"{r['crops_per_s']:.1f} | {r['peak_memory_bytes'] / mib:.0f} | "
                         f"{r['achieved_tflops']:.3g} | {mfu} | {ratios} |")
    lines += ["", "## Fine-tuning and inference", "",
              "| backbone | fine-tune crops/s | fine-tune TFLOP/s | inference s/volume | "
              "Mvoxel/s |", "|---|---|---|---|---|"]
    for row in report["finetune_inference"]:
        if "error" in row:
            lines.append(f"| {row['backbone']} | error: {row['error']} ||||")
            continue
        f, i = row["finetune"], row["inference"]
        lines.append(f"| {row['backbone']} | {f['crops_per_s']:.1f} | {f['achieved_tflops']:.3g}"
                     f" | {i['seconds_per_volume']:.2f} | {i['mvoxels_per_s']:.2f} |")
    fp16 = report["fp16_gradscaler"]
    lines += ["", "## fp16 + GradScaler (UNet, HybridMIM)", "",
              (f"error: {fp16['error']}" if "error" in fp16 else
               f"{fp16['steps']} steps in {fp16['precision']}, losses "
               f"{', '.join(f'{v:.4f}' for v in fp16['losses'])}; finite: {fp16['finite']}; "
               f"scaler enabled: {fp16['scaler_enabled']}, scale {fp16['loss_scale']}")]
    comp = report.get("compile")
    lines += ["", "## torch.compile (UNet, HybridMIM)", ""]
    if not comp:
        lines.append("skipped (CPU without --compile)")
    else:
        for variant in ("eager", "compile"):
            r = comp[variant]
            lines.append(f"- {variant}: " + (f"error: {r['error']}" if "error" in r else
                         f"{r['seconds_per_step']:.3f} s/step (first step "
                         f"{r['first_step_seconds']:.1f} s)"))
        if "speedup" in comp:
            lines.append(f"- speed-up: {comp['speedup']:.2f}×")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default=None,
                        help="paper (default on a GPU) or tiny (default on a CPU)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="bf16", help="bf16 (default) | fp32 | auto")
    parser.add_argument("--backbones", nargs="+", default=list(BACKBONES), choices=BACKBONES)
    parser.add_argument("--compile", action="store_true",
                        help="also time torch.compile on a CPU (always done on a GPU)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default="results/benchmarks/gpu_check")
    args = parser.parse_args(argv)

    import torch

    from hybridmim import runtime

    started = time.perf_counter()
    device = torch.device(args.device if args.device != "auto" else
                          ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.threads:
        torch.set_num_threads(args.threads)
    size_name = args.size or ("paper" if device.type == "cuda" else "tiny")
    size = SIZES[size_name]
    choice = runtime.precision_choice(args.precision, device)
    precision = choice.precision
    name = runtime.device_name(device)
    peak = peak_tflops(name) if device.type == "cuda" else None
    clock = Clock(device)
    print(f"{name}: size {size_name}, precision {precision} ({choice.reason}), peak "
          f"{peak or 'unknown'} TFLOP/s", flush=True)
    report = {"device": str(device), "device_name": name, "torch": torch.__version__,
              "size": size_name, **{k: size[k] for k in ("crop", "region", "patch", "batch",
                                                         "steps", "warmup")},
              "precision": precision, "precision_reason": choice.reason,
              "peak_tflops": peak, "peak_tflops_source": "PEAK_TFLOPS in benchmarks/gpu_check.py"
              if peak else None}
    report["pretraining"] = pretraining(args, size, device, precision, clock, peak)
    report["finetune_inference"] = finetune_and_inference(args, size, device, precision, clock,
                                                          peak)
    report["fp16_gradscaler"] = fp16_scaler(args, size, device)
    print(f"fp16+GradScaler {report['fp16_gradscaler']}", flush=True)
    report["compile"] = (compile_on_off(args, size, device, precision, clock)
                         if device.type == "cuda" or args.compile else None)
    if report["compile"]:
        print(f"compile {report['compile']}", flush=True)
    report["seconds"] = time.perf_counter() - started

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for path, text in ((out / "gpu_check.json", json.dumps(report, indent=2) + "\n"),
                       (out / "gpu_check.md", markdown(report))):
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(text)
        tmp.replace(path)
    print(f"wrote {out}/gpu_check.json and gpu_check.md ({report['seconds']:.0f} s)")
    failed = [r["backbone"] for r in report["pretraining"]
              if "error" in r["hybridmim"] or "error" in r["simmim"]]
    failed += [r["backbone"] for r in report["finetune_inference"] if "error" in r]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
