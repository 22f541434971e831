"""Speed options applied to a network before a job uses it: the CPU-bf16 convolution guard,
channels-last-3d memory layout and ``torch.compile``.

The two layout/compile options are spec keys (``channels_last``, ``compile``; config keys of the
same names, default off). They are off by default because, measured side by side with
``benchmarks/pretrain_step.py`` (benchmarks/README.md), neither made a training step faster for
every backbone on the CPUs we have; ``torch.compile`` also costs tens of seconds per job, which
short jobs never earn back. Both change only speed, never the parameters or the state dict.
"""
from __future__ import annotations

import logging
from typing import Any

import torch

from hybridmim.precision import guard_cpu_bf16_convolutions

log = logging.getLogger(__name__)


def prepare_network(network: torch.nn.Module, device: torch.device, precision: str,
                    spec: dict[str, Any] | None = None) -> torch.nn.Module:
    """Apply the options to ``network`` in place; return the module to call for forward passes
    (``network`` itself, or its compiled wrapper). Save and load weights through ``network``."""
    spec = spec or {}
    guarded = guard_cpu_bf16_convolutions(network, device, precision)
    if guarded:
        log.debug("%d Conv3d layers run in fp32 on maps <= 2 voxels deep (CPU bf16)", guarded)
    if spec.get("channels_last"):
        network.to(memory_format=torch.channels_last_3d)
    if spec.get("compile"):
        return torch.compile(network)
    return network
