"""Where and how a training job runs: device, threads, precision, seeding and DDP.

All training entry points go through here so that CPU, one GPU and `torchrun` multi-GPU jobs share
one code path.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import platform
import random
from typing import Any

import numpy as np
import torch

from hybridmim.precision import choose_precision, guard_cpu_bf16_convolutions

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def configure_threads(threads: int | None) -> None:
    """Honour the rule's `threads:` (Snakemake exports OMP_NUM_THREADS; torch may ignore it)."""
    n = threads or int(os.environ.get("OMP_NUM_THREADS", "0") or 0)
    if n > 0:
        torch.set_num_threads(n)


def init_distributed() -> DistInfo:
    """Join the process group when launched by torchrun (RANK/WORLD_SIZE set), else single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    import torch.distributed as dist

    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=backend)
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank)


def shutdown_distributed() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def select_device(dist_info: DistInfo | None = None) -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", (dist_info or DistInfo()).local_rank)
    return torch.device("cpu")


def precision_choice(precision: str, device: torch.device, backbone: str | None = None):
    """``choose_precision``, with the choice and its reason logged."""
    choice = choose_precision(precision, device, backbone=backbone)
    log.info("precision %s (%s)", choice.precision, choice.reason)
    return choice


def autocast(device: torch.device, precision: str) -> torch.autocast:
    """The forward pass's mixed-precision context (switched off for fp32)."""
    dtype = torch.float16 if precision == "fp16" else torch.bfloat16
    return torch.autocast(device_type=device.type, dtype=dtype, enabled=precision != "fp32")


def prepare_network(network: torch.nn.Module, device: torch.device, precision: str,
                    spec: dict[str, Any] | None = None) -> torch.nn.Module:
    """Apply the speed options to ``network`` in place; return the module to call for forward
    passes (``network`` itself, or its compiled wrapper). Save and load weights through
    ``network``: the options change only speed, never the parameters or the state dict.

    Always: the CPU-bf16 convolution guard (hybridmim/precision.py). On request, the spec keys
    ``channels_last`` (channels-last-3d memory layout) and ``compile`` (``torch.compile``), off by
    default: measured side by side with ``benchmarks/pretrain_step.py`` (benchmarks/README.md),
    neither made a training step faster for every backbone on the CPUs we have, and
    ``torch.compile`` costs tens of seconds per job, which short jobs never earn back.
    """
    spec = spec or {}
    guarded = guard_cpu_bf16_convolutions(network, device, precision)
    if guarded:
        log.debug("%d Conv3d layers run in fp32 on maps <= 2 voxels deep (CPU bf16)", guarded)
    if spec.get("channels_last"):
        network.to(memory_format=torch.channels_last_3d)
    if spec.get("compile"):
        return torch.compile(network)
    return network


def seed_everything(seed: int, deterministic: bool = False) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def rng_state() -> dict[str, Any]:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
