"""Resume state and published models.

Resume state (nnU-Net style: the full training state, not only weights) lives in
``<folder of model.pt>/state/`` which is never a declared Snakemake output, so Snakemake does not
delete it before re-running a failed or preempted job; the re-run resumes from it. The state
records the hash of the job spec: a state written for a different spec is ignored, never resumed.

The published ``model.pt`` is self-describing (see docs/contracts.md): the stock MONAI network
class and its kwargs, its state dict, optional pretraining heads and provenance metadata.
"""
from __future__ import annotations

import datetime as _dt
import importlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from hybridmim.atomic import torch_save

log = logging.getLogger(__name__)

MODEL_FORMAT = "hybridmim.model/1"
STATE_FORMAT = "hybridmim.state/1"


def state_dir_for(model_path: str | os.PathLike) -> Path:
    return Path(model_path).parent / "state"


def save_state(state_dir: str | os.PathLike, payload: dict[str, Any], spec_hash: str,
               name: str = "latest") -> None:
    """Atomically write ``state/<name>.pt`` (``latest`` rolls; ``best`` keeps the best so far)."""
    path = Path(state_dir) / f"{name}.pt"
    torch_save({"format": STATE_FORMAT, "spec_hash": spec_hash,
                "saved": _dt.datetime.now(_dt.timezone.utc).isoformat(), **payload}, path)


def load_state(state_dir: str | os.PathLike, spec_hash: str, name: str = "latest"
               ) -> dict[str, Any] | None:
    """Return the saved state if it exists and belongs to this spec, else None (and say why)."""
    path = Path(state_dir) / f"{name}.pt"
    if not path.exists():
        return None
    try:
        # On the CPU: RNG states must stay CPU tensors; weights and optimizer moments are copied
        # onto the device by load_state_dict.
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # a corrupt state must not block a fresh start
        log.warning("ignoring unreadable resume state %s (%s); starting from step 0", path, exc)
        return None
    if state.get("format") != STATE_FORMAT or state.get("spec_hash") != spec_hash:
        log.warning("resume state %s was written for another job spec (%s != %s); "
                    "starting from step 0", path, state.get("spec_hash"), spec_hash)
        return None
    log.info("resuming from %s (step %s)", path, state.get("step"))
    return state


def network_class_path(network: torch.nn.Module) -> str:
    cls = type(network)
    return f"{cls.__module__}.{cls.__qualname__}"


def import_class(path: str) -> type:
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def publish_model(path: str | os.PathLike, network_class: str, network_kwargs: dict[str, Any],
                  state_dict: dict[str, torch.Tensor], meta: dict[str, Any],
                  heads: dict[str, Any] | None = None) -> None:
    meta = {"created": _dt.datetime.now(_dt.timezone.utc).isoformat(), **meta}
    torch_save({"format": MODEL_FORMAT,
                "network": {"class": network_class, "kwargs": network_kwargs},
                "state_dict": {k: v.detach().cpu() for k, v in state_dict.items()},
                "heads": heads, "meta": meta}, path)


def load_model_file(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"model file {path} does not exist; run the job that creates it")
    blob = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(blob, dict) or blob.get("format") != MODEL_FORMAT:
        raise ValueError(f"{path} is not a hybridmim model file (format {MODEL_FORMAT} expected)")
    return blob


def build_network(model: dict[str, Any]) -> torch.nn.Module:
    """Instantiate the stock network a model file describes and load its weights strictly."""
    cls = import_class(model["network"]["class"])
    net = cls(**model["network"]["kwargs"])
    net.load_state_dict(model["state_dict"])
    return net


@dataclass
class LoadedModel:
    network: torch.nn.Module
    meta: dict[str, Any]
    source: str  # what was loaded, for logs and the bundle's model card
    network_record: dict[str, Any]  # {"class": stock MONAI class path, "kwargs": {...}}

    def channels_in_out(self) -> tuple[int, int]:
        kwargs = self.network_record["kwargs"]
        return (int(kwargs.get("in_channels", self.meta.get("channels") or 1)),
                int(kwargs.get("out_channels", 1)))

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "LoadedModel":
        blob = load_model_file(path)
        return cls(build_network(blob), dict(blob.get("meta") or {}), str(path), blob["network"])
