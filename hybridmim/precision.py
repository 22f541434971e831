"""Which arithmetic precision a job runs in, and why.

``auto`` means: bf16 where the hardware computes bf16 natively, else the fastest safe choice.

- CUDA: bf16 on GPUs that support it (Ampere and later), fp16 + GradScaler on older GPUs.
- CPU: bf16 when the CPU has native bf16 instructions, i.e. Intel AMX (``amx_bf16``) or
  AVX512-BF16 (``avx512_bf16``, also on AMD Zen 4 and later); fp32 elsewhere. Without them
  PyTorch emulates bf16 by converting to fp32 and back, which is slower than fp32. Note that
  ``torch.ops.mkldnn._is_mkldnn_bf16_supported()`` is not a test of native support: it is also
  true on plain AVX512 CPUs, where oneDNN emulates bf16.

The choice and its reason are recorded on every run (MLflow tags ``precision`` and
``precision.reason``), so a result can be traced to the arithmetic that produced it.
Losses and metrics are always computed in fp32 (the loss modules and ``predict_volume`` cast
the network's outputs), whatever the precision of the forward pass.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import platform

import torch

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
# Backbones whose CPU training step is slower in bf16 than in fp32 even with native bf16
# (benchmarks/pretrain_step.py --variants; SwinUNETR 1.5x slower: its window attention is many
# small matmuls, softmaxes and layer norms where the bf16 conversions cost more than they save).
CPU_BF16_SLOWER = ("swinunetr",)
# PyTorch's own CPUID probes. They are private, but torch 2.13 has no public API that reports
# bf16 instructions (torch.backends.cpu.get_cpu_capability() says only "AVX512"). Every CPU with
# an AMX tile unit has AMX-BF16.
_TORCH_PROBES = {"amx_bf16": "_is_amx_tile_supported", "avx512_bf16": "_is_avx512_bf16_supported"}
NATIVE_BF16_FLAGS = tuple(_TORCH_PROBES)
# Test/ops hook: pretend the CPU has these flags (comma-separated, "" = none), e.g. to force the
# fp32 path on a bf16 CPU when comparing runs.
CPU_FLAGS_ENV = "HYBRIDMIM_CPU_FLAGS"


@dataclasses.dataclass(frozen=True)
class PrecisionChoice:
    precision: str
    reason: str

    def tags(self) -> dict[str, str]:
        return {"precision": self.precision, "precision.reason": self.reason}


@functools.lru_cache(maxsize=1)
def _detected_cpu_flags() -> frozenset[str]:
    return frozenset(flag for flag, probe in _TORCH_PROBES.items()
                     if getattr(torch.cpu, probe, lambda: False)())


def cpu_flags() -> frozenset[str]:
    forced = os.environ.get(CPU_FLAGS_ENV)
    if forced is not None:
        return frozenset(f for f in forced.replace(",", " ").split() if f)
    return _detected_cpu_flags()


def choose_precision(requested: str, device: torch.device,
                     flags: frozenset[str] | set[str] | None = None,
                     backbone: str | None = None) -> PrecisionChoice:
    """``backbone`` (unet|swinunetr|unetr, when known) lets ``auto`` keep fp32 on a CPU for a
    backbone measured slower in bf16 there (CPU_BF16_SLOWER)."""
    if requested not in PRECISIONS:
        raise ValueError(f"precision must be one of {'|'.join(PRECISIONS)}, got {requested!r}")
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        if requested != "auto":
            return PrecisionChoice(requested, f"requested {requested} on {name}")
        if torch.cuda.is_bf16_supported():
            return PrecisionChoice("bf16", f"auto: {name} supports bf16")
        return PrecisionChoice("fp16", f"auto: {name} lacks bf16; fp16 with loss scaling")
    if device.type != "cpu":
        return PrecisionChoice("fp32", f"{device.type} device: fp32")
    flags = cpu_flags() if flags is None else flags
    native = next((f for f in NATIVE_BF16_FLAGS if f in flags), None)  # amx_bf16 first
    cpu = platform.machine() or "cpu"
    if requested == "fp16":
        # CPU fp16 autocast is emulated and GradScaler on CPU is not a tested path here.
        return PrecisionChoice("fp32", "requested fp16, which is for CUDA GPUs; fp32 on the CPU")
    if requested in {"fp32", "bf16"}:
        detail = f"native {native}" if native else "no native bf16: emulated, slow"
        return PrecisionChoice(requested, f"requested {requested} on a {cpu} CPU"
                               + (f" ({detail})" if requested == "bf16" else ""))
    if native and backbone in CPU_BF16_SLOWER:
        return PrecisionChoice("fp32", f"auto: {cpu} CPU with native bf16 ({native}), but "
                               f"{backbone} trains slower in bf16 than fp32 on CPUs")
    if native:
        return PrecisionChoice("bf16", f"auto: {cpu} CPU with native bf16 ({native})")
    return PrecisionChoice("fp32", f"auto: {cpu} CPU without native bf16 (no "
                           f"{' / '.join(NATIVE_BF16_FLAGS)})")


# PyTorch 2.13's oneDNN (3.12) computes the bf16 weight gradient of a stride-1 3×3×3 Conv3d
# wrongly (garbage, sometimes inf/NaN) when the input's depth is 2, as at the bottleneck of a
# UNet on a 32³ crop (measured on an AVX512-BF16 CPU; the forward and the input gradient are
# right, other sizes are right). Such maps are tiny, so those convolutions simply run in fp32.
SMALL_MAP = 2


def _guarded_conv_forward(self: torch.nn.Conv3d, x: torch.Tensor) -> torch.Tensor:
    if (x.device.type == "cpu" and torch.is_autocast_enabled("cpu")
            and min(x.shape[2:]) <= SMALL_MAP):
        with torch.autocast("cpu", enabled=False):
            return self._conv_forward(x.float(), self.weight, self.bias)
    return torch.nn.Conv3d.forward(self, x)


def guard_cpu_bf16_convolutions(model: torch.nn.Module, device: torch.device,
                                precision: str) -> int:
    """Route the model's Conv3d layers through fp32 on maps ≤ 2 voxels deep under CPU bf16.

    Returns how many layers were guarded (0 when not on a CPU in bf16). Parameters and the
    state dict are untouched."""
    if device.type != "cpu" or precision != "bf16":
        return 0
    count = 0
    for module in model.modules():
        if type(module) is torch.nn.Conv3d:
            module.forward = _guarded_conv_forward.__get__(module)
            count += 1
    return count
