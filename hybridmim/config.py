"""From the validated experiment config to job specs and workflow targets.

The experiment grid lives in the config (workflow/schemas/config.schema.yaml); this module turns it
into (a) the list of targets the workflow builds and (b) one fully resolved, JSON-serialisable
spec per job (docs/contracts.md). Library code only ever sees specs, so a job is reproducible from
its spec alone and the spec's hash identifies it. Snakemake's common.smk and the CLI both call
these builders; nothing here imports torch, to keep DAG building fast.
"""
from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import yaml

from hybridmim.data.registry import DatasetSpec, dataset_from_config

SCHEMA = Path(__file__).resolve().parent.parent / "workflow" / "schemas" / "config.schema.yaml"
DATA_DIR = "data"
RESULTS_DIR = "results"
# Keys of a dataset config block that steer acquisition/generation, not the registry entry.
ACQUISITION_KEYS = {"registry", "num_cases", "num_test", "seed", "manual_path"}


class ConfigError(ValueError):
    """The config is inconsistent; the message names the key and what to change."""


# ------------------------------------------------------------------------------------------------
# Loading (for the CLI and DVC; Snakemake validates with snakemake.utils.validate itself)
def load_config(path: str | os.PathLike) -> dict[str, Any]:
    from snakemake.utils import validate

    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file {path} does not exist")
    config = yaml.safe_load(path.read_text()) or {}
    try:
        validate(config, str(SCHEMA), set_default=True)
    except Exception as exc:  # WorkflowError with the jsonschema message naming the key
        raise ConfigError(f"{path}: {exc}") from exc
    check_consistency(config)
    return config


def _section(config: dict, *keys: str) -> dict:
    node: Any = config
    for key in keys:
        node = (node or {}).get(key) or {}
    return node


def _resources(config: dict, stage: str) -> dict[str, Any]:
    defaults = {"gpus": 0, "gpu_model": "", "cpus": 2, "mem_mb": 4000, "runtime": 60}
    return {**defaults, **_section(config, stage, "resources")}


def check_consistency(config: dict) -> None:
    """Cross-key checks the schema cannot express; each error names the offending key."""
    datasets = set(config["datasets"])
    backbones = set(config["backbones"])
    pre = config["pretraining"]
    for corpus, block in pre["corpora"].items():
        for ds in block["datasets"]:
            if ds not in datasets:
                raise ConfigError(f"pretraining.corpora.{corpus}.datasets lists {ds!r}, which is "
                                  f"not under datasets: (known: {sorted(datasets)})")
    for bb in pre["backbones"]:
        if bb not in backbones:
            raise ConfigError(f"pretraining.backbones lists {bb!r}; define it under backbones:")
    ft = config["finetuning"]
    for ds in ft["datasets"]:
        if ds not in datasets:
            raise ConfigError(f"finetuning.datasets lists {ds!r}, not defined under datasets:")
    for bb in ft["backbones"]:
        if bb not in backbones:
            raise ConfigError(f"finetuning.backbones lists {bb!r}; define it under backbones:")
    for init in ft["inits"]:
        if init != "scratch" and init not in pre["methods"]:
            raise ConfigError(f"finetuning.inits lists {init!r}: use 'scratch' or a method under "
                              f"pretraining.methods ({sorted(pre['methods'])})")
        if init != "scratch":
            missing = [bb for bb in ft["backbones"] if bb not in pre["backbones"]]
            if missing:
                raise ConfigError(f"finetuning.inits uses {init!r} but backbones {missing} are "
                                  f"not in pretraining.backbones")
    corpus_for = ft.get("pretrained_corpus") or {"CT": "ct", "MRI": "mri"}
    if any(i != "scratch" for i in ft["inits"]):
        for ds in ft["datasets"]:
            modality = dataset_spec(config, ds).modality
            corpus = corpus_for.get(modality)
            if corpus not in pre["corpora"]:
                raise ConfigError(f"finetuning.pretrained_corpus.{modality} is {corpus!r}, which "
                                  f"is not under pretraining.corpora ({sorted(pre['corpora'])})")
    for stage in ("finetuning", "evaluation"):
        if _resources(config, stage)["gpus"] > 1:
            raise ConfigError(f"{stage}.resources.gpus is {_resources(config, stage)['gpus']}: "
                              f"fine-tuning and evaluation jobs run on one GPU each (the grid "
                              f"runs many jobs in parallel); only pretraining launches torchrun "
                              f"with one DDP process per GPU")
    geo = pre["geometry"]
    if geo["crop"] % geo["region"] or geo["region"] % geo["patch"]:
        raise ConfigError(f"pretraining.geometry: crop ({geo['crop']}) must be a multiple of "
                          f"region ({geo['region']}) and region a multiple of patch "
                          f"({geo['patch']})")


# ------------------------------------------------------------------------------------------------
# Datasets
def dataset_spec(config: dict, name: str) -> DatasetSpec:
    block = dict(config["datasets"].get(name) or {})
    registry_name = block.pop("registry", name)
    overrides = {k: v for k, v in block.items() if k not in ACQUISITION_KEYS}
    return dataset_from_config(registry_name, overrides) if registry_name == name else \
        _renamed(dataset_from_config(registry_name, overrides), name)


def _renamed(spec: DatasetSpec, name: str) -> DatasetSpec:
    import dataclasses

    return dataclasses.replace(spec, name=name)


def acquisition_options(config: dict, name: str) -> dict[str, Any]:
    block = config["datasets"].get(name) or {}
    return {k: block[k] for k in ACQUISITION_KEYS - {"registry"} if k in block}


def raw_dir(name: str) -> str:
    return f"{DATA_DIR}/raw/{name}"


def processed_dir(name: str) -> str:
    return f"{DATA_DIR}/processed/{name}"


def dataset_entry(config: dict, name: str) -> dict[str, Any]:
    """The dataset part of a finetune/evaluate spec."""
    spec = dataset_spec(config, name)
    entry = spec.to_dict()
    entry.pop("source", None)
    entry.update(processed_dir=processed_dir(name), window=dict(spec.windows["finetune"]),
                 num_classes=spec.num_classes)
    return entry


# ------------------------------------------------------------------------------------------------
# Common spec parts
def _common(config: dict, run_name: str, seed: int, out: str, rule: str,
            wildcards: dict[str, Any], stage: str) -> dict[str, Any]:
    tracking = {"uri": "sqlite:///results/mlflow/mlflow.db",
                "artifact_root": "results/mlflow/artifacts", **(config.get("tracking") or {})}
    res = _resources(config, stage)
    return {"run_name": run_name, "seed": int(seed), "out": out, "tracking": tracking,
            "provenance": {"rule": rule, "wildcards": {k: str(v) for k, v in wildcards.items()}},
            "precision": config.get("precision", "auto"),
            "deterministic": bool(config.get("deterministic", False)),
            "threads": res["cpus"],
            # Speed-only options join the spec only when on, so default specs keep their hashes.
            **{key: True for key in ("channels_last", "compile") if config.get(key)}}


def backbone_spec(config: dict, backbone: str, in_channels: int) -> dict[str, Any]:
    block = copy.deepcopy(config["backbones"][backbone])
    block.pop("pretrain_optim", None)
    block["in_channels"] = int(in_channels)
    return block


def corpus_channels(config: dict, corpus: str) -> int:
    names = config["pretraining"]["corpora"][corpus]["datasets"]
    counts = {n: dataset_spec(config, n).num_channels for n in names}
    if len(set(counts.values())) != 1:
        raise ConfigError(f"pretraining.corpora.{corpus} mixes channel counts {counts}: a corpus "
                          f"must hold one modality (make one corpus per channel count)")
    return next(iter(counts.values()))


# ------------------------------------------------------------------------------------------------
# Pretraining
def pretrain_model_path(backbone: str, method: str, corpus: str) -> str:
    return f"{RESULTS_DIR}/pretrain/{backbone}/{method}/{corpus}/model.pt"


def pretrain_targets(config: dict) -> list[str]:
    """The pretrained models the fine-tuning grid needs (only those)."""
    ft = config["finetuning"]
    corpus_for = ft.get("pretrained_corpus") or {"CT": "ct", "MRI": "mri"}
    targets = set()
    for init in ft["inits"]:
        if init == "scratch":
            continue
        for bb in ft["backbones"]:
            for ds in ft["datasets"]:
                corpus = corpus_for[dataset_spec(config, ds).modality]
                targets.add(pretrain_model_path(bb, init, corpus))
    return sorted(targets)


def pretrain_spec(config: dict, backbone: str, method: str, corpus: str, rule: str = "pretrain"
                  ) -> dict[str, Any]:
    pre = config["pretraining"]
    if method not in pre["methods"]:
        raise ConfigError(f"pretraining method {method!r} is not under pretraining.methods")
    meth = {"name": method, **copy.deepcopy(pre["methods"][method])}
    meth.setdefault("kind", "hybridmim")
    if meth["kind"] == "simmim":
        # The SimMIM-style baseline is defined, not configured: full reconstruction, L_PR only.
        meth["box"] = "full"
        meth["loss_weights"] = {"pr": 1.0, "num": 0.0, "loc": 0.0, "con": 0.0, "cl": 0.0}
    optim = {**pre["optim"], **(config["backbones"][backbone].get("pretrain_optim") or {})}
    optim.setdefault("grad_clip", 1.0)
    datasets = []
    for name in pre["corpora"][corpus]["datasets"]:
        ds = dataset_spec(config, name)
        datasets.append({"name": name, "processed_dir": processed_dir(name),
                         "modality": ds.modality, "window": dict(ds.windows["pretrain"])})
    wildcards = {"backbone": backbone, "method": method, "corpus": corpus}
    out = pretrain_model_path(backbone, method, corpus)
    spec = _common(config, f"pretrain/{backbone}/{method}/{corpus}", 0, out, rule, wildcards,
                   "pretraining")
    spec.update({
        "backbone": backbone_spec(config, backbone, corpus_channels(config, corpus)),
        "geometry": dict(pre["geometry"]),
        "method": meth,
        "data": {"datasets": datasets, "crops_per_volume": pre.get("crops_per_volume", 2),
                 "volumes_per_step": pre.get("volumes_per_step", 2),
                 "val_volumes": pre.get("val_volumes", 0),
                 "num_workers": pre.get("num_workers", 0)},
        "optim": optim,
        "checkpoint_every": pre.get("checkpoint_every", 500),
        "log_every": pre.get("log_every", 10),
    })
    return spec


# ------------------------------------------------------------------------------------------------
# Fine-tuning and evaluation
def _frac_tag(fraction: float) -> str:
    return f"{float(fraction):g}"


def finetune_dir(dataset: str, backbone: str, init: str, fraction: Any, seed: Any) -> str:
    return (f"{RESULTS_DIR}/finetune/{dataset}/{backbone}/{init}/frac{_frac_tag(fraction)}/"
            f"seed{seed}")


def evaluate_dir(dataset: str, backbone: str, init: str, fraction: Any, seed: Any) -> str:
    return (f"{RESULTS_DIR}/evaluate/{dataset}/{backbone}/{init}/frac{_frac_tag(fraction)}/"
            f"seed{seed}")


def finetune_grid(config: dict) -> list[dict[str, str]]:
    ft = config["finetuning"]
    return [{"dataset": ds, "backbone": bb, "init": init, "fraction": _frac_tag(frac),
             "seed": str(seed)}
            for ds in ft["datasets"] for bb in ft["backbones"] for init in ft["inits"]
            for frac in ft.get("label_fractions", [1.0]) for seed in ft.get("seeds", [0])]


def pretrained_for(config: dict, dataset: str, backbone: str, init: str) -> str | None:
    if init == "scratch":
        return None
    corpus_for = config["finetuning"].get("pretrained_corpus") or {"CT": "ct", "MRI": "mri"}
    corpus = corpus_for[dataset_spec(config, dataset).modality]
    return pretrain_model_path(backbone, init, corpus)


def _grid_common(config: dict, stage: str, dataset: str, backbone: str, init: str,
                 fraction: Any, seed: Any, out: str, rule: str, resource_stage: str
                 ) -> dict[str, Any]:
    """The common part of a fine-tuning or evaluation job of the grid."""
    wildcards = {"dataset": dataset, "backbone": backbone, "init": init,
                 "fraction": _frac_tag(fraction), "seed": seed}
    run_name = f"{stage}/{dataset}/{backbone}/{init}/frac{_frac_tag(fraction)}/seed{seed}"
    return _common(config, run_name, int(seed), out, rule, wildcards, resource_stage)


def finetune_spec(config: dict, dataset: str, backbone: str, init: str, fraction: Any,
                  seed: Any, rule: str = "finetune") -> dict[str, Any]:
    ft = config["finetuning"]
    ds = dataset_spec(config, dataset)
    checkpoint = pretrained_for(config, dataset, backbone, init)
    first_layer = ft.get("first_layer", "auto")
    if checkpoint and first_layer == "auto":
        corpus_for = ft.get("pretrained_corpus") or {"CT": "ct", "MRI": "mri"}
        pre_channels = corpus_channels(config, corpus_for[ds.modality])
        first_layer = "keep" if pre_channels == ds.num_channels else "reinit"
    out = f"{finetune_dir(dataset, backbone, init, fraction, seed)}/model.pt"
    spec = _grid_common(config, "finetune", dataset, backbone, init, fraction, seed, out, rule,
                        "finetuning")
    spec.update({
        "dataset": dataset_entry(config, dataset),
        "backbone": backbone_spec(config, backbone, ds.num_channels),
        "init": {"name": init, "checkpoint": checkpoint,
                 "first_layer": first_layer if checkpoint else "keep"},
        "label_fraction": float(fraction),
        "crop": ft["crop"],
        "batch_size": ft.get("batch_size", 2),
        "crops_per_volume": ft.get("crops_per_volume", 2),
        "optim": {"grad_clip": 1.0, **ft["optim"]},
        "val_every": ft.get("val_every", 100),
        "sw_overlap": ft.get("sw_overlap", 0.5),
        "checkpoint_every": ft.get("checkpoint_every", 100),
        "log_every": ft.get("log_every", 10),
        "num_workers": ft.get("num_workers", 0),
    })
    return spec


def evaluate_spec(config: dict, dataset: str, backbone: str, init: str, fraction: Any,
                  seed: Any, rule: str = "evaluate") -> dict[str, Any]:
    out = f"{evaluate_dir(dataset, backbone, init, fraction, seed)}/metrics.json"
    spec = _grid_common(config, "evaluate", dataset, backbone, init, fraction, seed, out, rule,
                        "evaluation")
    spec.update({
        "dataset": dataset_entry(config, dataset),
        "model": f"{finetune_dir(dataset, backbone, init, fraction, seed)}/model.pt",
        "split": "test",
        "crop": config["finetuning"]["crop"],
        "sw_overlap": (config.get("evaluation") or {}).get("sw_overlap", 0.5),
    })
    return spec


def stage_resources(config: dict, stage: str) -> dict[str, Any]:
    return _resources(config, stage)
