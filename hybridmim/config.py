"""From the validated experiment config to job specs and workflow targets.

The experiment grid lives in the config (workflow/schemas/config.schema.yaml); this module turns it
into (a) the list of targets the workflow builds and (b) one fully resolved, JSON-serialisable
spec per job (docs/contracts.md). Library code only ever sees specs, so a job is reproducible from
its spec alone and the spec's hash identifies it. Snakemake's common.smk and the CLI both call
these builders; nothing here imports torch, to keep DAG building fast.
"""
from __future__ import annotations

import copy
import dataclasses
import itertools
import os
from pathlib import Path
from typing import Any

import yaml

from hybridmim.dataset_catalog import ACQUISITION_KEYS, DatasetSpec, dataset_from_config
from hybridmim.hashing import spec_hash
from hybridmim.resources import CONFIG_SCHEMA
from hybridmim.variants import VariantError, resolve_variants

DATA_DIR = "data"
RESULTS_DIR = "results"
# The SimMIM-style baseline is defined, not configured: L_PR only (pretrain_spec writes it into
# the spec, hybridmim.pretrain.spec refuses any other weights under that kind).
SIMMIM_WEIGHTS = {"pr": 1.0, "num": 0.0, "loc": 0.0, "con": 0.0, "cl": 0.0}


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
        validate(config, str(CONFIG_SCHEMA), set_default=True)
    except Exception as exc:  # WorkflowError with the jsonschema message naming the key
        raise ConfigError(f"{path}: {exc}") from exc
    check_consistency(config)
    return config


def check_consistency(config: dict) -> None:
    """Cross-key checks the schema cannot express; each error names the offending key."""
    # A bad dataset block (e.g. a typo in a key) fails before any job runs.
    datasets = {name: dataset_spec(config, name) for name in sorted(config["datasets"])}
    backbones = set(config["backbones"])
    pre = config["pretraining"]
    for corpus, block in pre["corpora"].items():
        _check_declared(f"pretraining.corpora.{corpus}.datasets", block["datasets"], datasets,
                        "datasets")
    _check_declared("pretraining.backbones", pre["backbones"], backbones, "backbones")
    methods = [*pre["methods"], *variants_of(config)]
    ft = config["finetuning"]
    for where, block in grid_blocks(config):
        _check_declared(f"{where}.datasets", block["datasets"], datasets, "datasets")
        _check_declared(f"{where}.backbones", block["backbones"], backbones, "backbones")
        pretrained = [init for init in block["inits"] if init != "scratch"]
        _check_declared(f"{where}.inits", pretrained, methods,
                        "pretraining.methods or pretraining.variants (or use 'scratch')")
        if pretrained:
            _check_declared(f"{where}.backbones (inits {pretrained} are pretrained)",
                            block["backbones"], pre["backbones"], "pretraining.backbones")
            for ds in block["datasets"]:
                modality = datasets[ds].modality
                corpus = ft["pretrained_corpus"].get(modality)
                if corpus not in pre["corpora"]:
                    raise ConfigError(f"finetuning.pretrained_corpus.{modality} is {corpus!r}, "
                                      f"which is not under pretraining.corpora "
                                      f"({sorted(pre['corpora'])})")
    for stage in ("finetuning", "evaluation"):
        if config[stage]["resources"]["gpus"] > 1:
            raise ConfigError(f"{stage}.resources.gpus is {config[stage]['resources']['gpus']}: "
                              f"fine-tuning and evaluation jobs run on one GPU each (the grid "
                              f"runs many jobs in parallel); only pretraining launches torchrun "
                              f"with one DDP process per GPU")
    _check_contrastive_views(config)
    geo = pre["geometry"]
    if geo["crop"] % geo["region"] or geo["region"] % geo["patch"]:
        raise ConfigError(f"pretraining.geometry: crop ({geo['crop']}) must be a multiple of "
                          f"region ({geo['region']}) and region a multiple of patch "
                          f"({geo['patch']})")


def _check_declared(where: str, names, declared, section: str) -> None:
    """Every name a list of the grid refers to is defined where the config defines such names."""
    for name in names:
        if name not in declared:
            raise ConfigError(f"{where} lists {name!r}, which is not defined under {section} "
                              f"(defined: {sorted(declared)})")


def _check_contrastive_views(config: dict) -> None:
    """Every pretrained (backbone, method) with L_CL on needs encoder dropout (pretrain/spec.py)."""
    from hybridmim.pretrain.spec import PretrainSpecError, check_contrastive_views

    pre = config["pretraining"]
    for bb in pre["backbones"]:
        backbone = {k: v for k, v in config["backbones"][bb].items() if k != "pretrain_optim"}
        for name, method in pre["methods"].items():
            try:
                check_contrastive_views(backbone, {"name": name, **method},
                                        where=f"pretraining.methods.{name} on backbones.{bb}")
            except PretrainSpecError as exc:
                raise ConfigError(str(exc)) from None


# ------------------------------------------------------------------------------------------------
# Ablation variants and the fine-tuning grid's blocks
GRID_KEYS = ("datasets", "backbones", "inits", "label_fractions", "seeds")


def variants_of(config: dict) -> dict[str, dict[str, Any]]:
    """The declared ablation variants, resolved against their base (hybridmim.variants)."""
    try:
        return resolve_variants(config["pretraining"])
    except VariantError as exc:
        raise ConfigError(str(exc)) from None


def method_block(config: dict, method: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(method settings, geometry) of a declared method or ablation variant."""
    pre = config["pretraining"]
    if method in pre["methods"]:
        return copy.deepcopy(pre["methods"][method]), dict(pre["geometry"])
    variants = variants_of(config)
    if method not in variants:
        raise ConfigError(f"pretraining method {method!r} is neither under pretraining.methods "
                          f"({sorted(pre['methods'])}) nor a variant ({sorted(variants)})")
    return copy.deepcopy(variants[method]["method"]), dict(variants[method]["geometry"])


def grid_blocks(config: dict) -> list[tuple[str, dict[str, Any]]]:
    """The main fine-tuning grid and each of ``finetuning.subgrids`` with its lists filled in
    from the main grid; (config key, block) pairs."""
    ft = config["finetuning"]
    main = {k: ft[k] for k in GRID_KEYS}
    blocks = [("finetuning", main)]
    for i, sub in enumerate(ft["subgrids"]):
        blocks.append((f"finetuning.subgrids[{i}]", {k: sub.get(k, main[k]) for k in GRID_KEYS}))
    return blocks


# ------------------------------------------------------------------------------------------------
# Datasets
def dataset_spec(config: dict, name: str) -> DatasetSpec:
    block = dict(config["datasets"].get(name) or {})
    registry_name = block.pop("registry", name)
    overrides = {k: v for k, v in block.items() if k not in ACQUISITION_KEYS}
    spec = dataset_from_config(registry_name, overrides)
    return spec if registry_name == name else dataclasses.replace(spec, name=name)


def acquisition_options(config: dict, name: str) -> dict[str, Any]:
    block = config["datasets"].get(name) or {}
    return {k: block[k] for k in ACQUISITION_KEYS - {"registry"} if k in block}


def raw_dir(name: str) -> str:
    return f"{DATA_DIR}/raw/{name}"


def processed_dir(name: str) -> str:
    return f"{DATA_DIR}/processed/{name}"


def pretrain_data_dir(config: dict, name: str) -> str:
    """The cache a pretraining corpus reads: the fine-tuning cache, or the native-spacing one
    (`pretraining.data_recipe: native`, hybridmim.data.prepare.pretrain_cache)."""
    if config["pretraining"]["data_recipe"] == "native":
        return f"{DATA_DIR}/pretrain/{name}"
    return processed_dir(name)


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
# The config section that holds the resources of each stage's jobs.
RESOURCE_SECTIONS = {"pretrain": "pretraining", "finetune": "finetuning", "evaluate": "evaluation"}


def _common(config: dict, stage: str, run_name: str, seed: int, out: str,
            wildcards: dict[str, Any]) -> dict[str, Any]:
    """The part every job spec has; ``stage`` is also the name of the rule that runs the job."""
    return {"run_name": run_name, "seed": int(seed), "out": out,
            "tracking": dict(config["tracking"]),
            "provenance": {"rule": stage, "wildcards": {k: str(v) for k, v in wildcards.items()}},
            "precision": config["precision"], "deterministic": config["deterministic"],
            "threads": config[RESOURCE_SECTIONS[stage]]["resources"]["cpus"],
            # Speed-only options join the spec only when on, so default specs keep their hashes.
            **{key: True for key in ("channels_last", "compile") if config[key]}}


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
    """The pretrained models the fine-tuning grid needs (only those, each spec once)."""
    paths = {pretrained_for(config, job["dataset"], job["backbone"], job["init"])
             for job in finetune_grid(config)}
    return sorted(paths - {None})  # None: a job from scratch


def pretrain_content_hash(spec: dict[str, Any]) -> str:
    """Hash of what a pretraining job computes: its spec without the names and paths that only
    label it (run name, output path, provenance, the method's name)."""
    content = {k: v for k, v in spec.items() if k not in ("run_name", "out", "provenance")}
    content["method"] = {k: v for k, v in spec["method"].items() if k != "name"}
    return spec_hash(content)


def pretrained_as(config: dict, backbone: str, method: str, corpus: str) -> str:
    """The method whose pretraining job serves ``method``: the first declared method or variant
    (methods first, then variants in order) whose resolved spec has the same content hash. A
    variant that resolves to a spec already in the grid is therefore not pretrained twice."""
    wanted = pretrain_content_hash(pretrain_spec(config, backbone, method, corpus))
    for name in [*config["pretraining"]["methods"], *variants_of(config)]:
        if name == method:
            break
        if pretrain_content_hash(pretrain_spec(config, backbone, name, corpus)) == wanted:
            return name
    return method


def pretrain_spec(config: dict, backbone: str, method: str, corpus: str) -> dict[str, Any]:
    pre = config["pretraining"]
    block, geometry = method_block(config, method)
    meth = {"name": method, **block}
    if meth["kind"] == "simmim":
        # Full reconstruction, L_PR only.
        meth["box"] = "full"
        meth["loss_weights"] = dict(SIMMIM_WEIGHTS)
    optim = {**pre["optim"], **(config["backbones"][backbone].get("pretrain_optim") or {})}
    datasets = []
    for name in pre["corpora"][corpus]["datasets"]:
        ds = dataset_spec(config, name)
        datasets.append({"name": name, "processed_dir": pretrain_data_dir(config, name),
                         "modality": ds.modality, "window": dict(ds.windows["pretrain"])})
    wildcards = {"backbone": backbone, "method": method, "corpus": corpus}
    out = pretrain_model_path(backbone, method, corpus)
    spec = _common(config, "pretrain", f"pretrain/{backbone}/{method}/{corpus}", 0, out,
                   wildcards)
    spec.update({
        "backbone": backbone_spec(config, backbone, corpus_channels(config, corpus)),
        "geometry": geometry,
        "method": meth,
        "data": {"datasets": datasets, "crops_per_volume": pre["crops_per_volume"],
                 "volumes_per_step": pre["volumes_per_step"], "val_volumes": pre["val_volumes"],
                 "num_workers": pre["num_workers"]},
        "optim": optim,
        "checkpoint_every": pre["checkpoint_every"],
        "log_every": pre["log_every"],
    })
    return spec


# ------------------------------------------------------------------------------------------------
# Fine-tuning and evaluation
def _frac_tag(fraction: float) -> str:
    return f"{float(fraction):g}"


def _grid_run_name(stage: str, dataset: str, backbone: str, init: str, fraction: Any,
                   seed: Any) -> str:
    """The MLflow run name of a fine-tuning or evaluation job, and its folder under results/."""
    return f"{stage}/{dataset}/{backbone}/{init}/frac{_frac_tag(fraction)}/seed{seed}"


def finetune_dir(dataset: str, backbone: str, init: str, fraction: Any, seed: Any) -> str:
    return f"{RESULTS_DIR}/{_grid_run_name('finetune', dataset, backbone, init, fraction, seed)}"


def evaluate_dir(dataset: str, backbone: str, init: str, fraction: Any, seed: Any) -> str:
    return f"{RESULTS_DIR}/{_grid_run_name('evaluate', dataset, backbone, init, fraction, seed)}"


def finetune_grid(config: dict) -> list[dict[str, str]]:
    """Every fine-tuning job: the main grid, then each subgrid's new cells (no job twice)."""
    jobs: dict[tuple, dict[str, str]] = {}
    for _, block in grid_blocks(config):
        for ds, bb, init, frac, seed in itertools.product(*(block[k] for k in GRID_KEYS)):
            job = {"dataset": ds, "backbone": bb, "init": init, "fraction": _frac_tag(frac),
                   "seed": str(seed)}
            jobs.setdefault(tuple(job.values()), job)
    return list(jobs.values())


def pretrained_for(config: dict, dataset: str, backbone: str, init: str) -> str | None:
    if init == "scratch":
        return None
    corpus = config["finetuning"]["pretrained_corpus"][dataset_spec(config, dataset).modality]
    return pretrain_model_path(backbone, pretrained_as(config, backbone, init, corpus), corpus)


def variant_entry(config: dict, dataset: str, backbone: str, init: str) -> dict[str, Any] | None:
    """What a fine-tuning/evaluation job of an ablation variant records about it (the report
    pairs it with its base through this): base, changes, the pretraining job that served it."""
    variants = variants_of(config)
    if init not in variants:
        return None
    checkpoint = pretrained_for(config, dataset, backbone, init)
    return {"of": variants[init]["of"], "changes": variants[init]["changes"],
            "pretrained_as": Path(checkpoint).parent.parent.name,
            "corpus": Path(checkpoint).parent.name}


def _grid_common(config: dict, stage: str, dataset: str, backbone: str, init: str,
                 fraction: Any, seed: Any, output: str) -> dict[str, Any]:
    """The common part of a fine-tuning or evaluation job of the grid, writing
    ``results/<run name>/<output>``."""
    wildcards = {"dataset": dataset, "backbone": backbone, "init": init,
                 "fraction": _frac_tag(fraction), "seed": seed}
    run_name = _grid_run_name(stage, dataset, backbone, init, fraction, seed)
    spec = _common(config, stage, run_name, int(seed), f"{RESULTS_DIR}/{run_name}/{output}",
                   wildcards)
    variant = variant_entry(config, dataset, backbone, init)
    if variant:
        spec["variant"] = variant
    return spec


def finetune_spec(config: dict, dataset: str, backbone: str, init: str, fraction: Any,
                  seed: Any) -> dict[str, Any]:
    ft = config["finetuning"]
    ds = dataset_spec(config, dataset)
    checkpoint = pretrained_for(config, dataset, backbone, init)
    first_layer = ft["first_layer"]
    if checkpoint and first_layer == "auto":
        pre_channels = corpus_channels(config, ft["pretrained_corpus"][ds.modality])
        first_layer = "keep" if pre_channels == ds.num_channels else "reinit"
    spec = _grid_common(config, "finetune", dataset, backbone, init, fraction, seed, "model.pt")
    spec.update({
        "dataset": dataset_entry(config, dataset),
        "backbone": backbone_spec(config, backbone, ds.num_channels),
        "init": {"name": init, "checkpoint": checkpoint,
                 "first_layer": first_layer if checkpoint else "keep"},
        "label_fraction": float(fraction),
        "crop": ft["crop"],
        "batch_size": ft["batch_size"],
        "crops_per_volume": ft["crops_per_volume"],
        "optim": dict(ft["optim"]),
        "val_every": ft["val_every"],
        "sw_overlap": ft["sw_overlap"],
        "checkpoint_every": ft["checkpoint_every"],
        "log_every": ft["log_every"],
        "num_workers": ft["num_workers"],
    })
    return spec


def evaluate_spec(config: dict, dataset: str, backbone: str, init: str, fraction: Any,
                  seed: Any) -> dict[str, Any]:
    spec = _grid_common(config, "evaluate", dataset, backbone, init, fraction, seed,
                        "metrics.json")
    spec.update({
        # Test cases are segmented from their raw files and scored on their own grid.
        "dataset": {**dataset_entry(config, dataset), "raw_dir": raw_dir(dataset)},
        "model": f"{finetune_dir(dataset, backbone, init, fraction, seed)}/model.pt",
        "split": "test",
        "crop": config["finetuning"]["crop"],
        "sw_overlap": config["evaluation"]["sw_overlap"],
        "grid": config["evaluation"]["grid"],
    })
    return spec
