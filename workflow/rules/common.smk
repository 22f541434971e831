# Shared helpers: the experiment grid and job specs come from hybridmim.config, so the workflow
# and the CLI agree on every path and every job's parameters.
import hashlib
import json
import os
import shlex

from hybridmim import config as hcfg
from hybridmim.atomic import write_text

hcfg.check_consistency(config)

DATASETS = sorted(config["datasets"])
USE_DVC = config.get("data_versioning", {}).get("dvc", True)
STORE_MARKER = "results/mlflow/store.json"


wildcard_constraints:
    dataset="[A-Za-z0-9_.-]+",
    backbone="[A-Za-z0-9_.-]+",
    method="[A-Za-z0-9_.-]+",
    corpus="[A-Za-z0-9_.-]+",
    init="[A-Za-z0-9_.-]+",
    fraction="[0-9.]+",
    seed="[0-9]+",


def spec_arg(spec):
    """A job spec as one shell-quoted JSON argument."""
    return shlex.quote(json.dumps(spec, sort_keys=True))


def spec_file(spec):
    """A job spec as a file named by its content hash, so that the console shows one short
    command per job (the job's log and its MLflow run keep the full spec). A changed spec is a
    changed path, which Snakemake's params trigger still sees."""
    text = json.dumps(spec, sort_keys=True)
    path = f".snakemake/specs/{hashlib.sha256(text.encode()).hexdigest()[:16]}.json"
    if not os.path.exists(path):
        write_text(path, f"{text}\n")
    return shlex.quote(path)


def stage_res(stage, key):
    return hcfg.stage_resources(config, stage)[key]


def launcher(stage):
    """`hybridmim` for one process; torchrun (DDP, one process per GPU) for a multi-GPU job.

    The effective batch of a DDP pretraining job is gpus x volumes_per_step x crops_per_volume,
    and it trains the same weights as one process with gpus x volumes_per_step volumes per step
    (docs/slurm.md, "GPUs and multi-GPU training"). The learning rate is NOT scaled
    automatically: scale pretraining.optim.lr yourself if you change the GPU count."""
    gpus = stage_res(stage, "gpus")
    if gpus > 1:
        return f"torchrun --standalone --nproc_per_node={gpus} -m hybridmim.cli"
    return "hybridmim"


def slurm_gpu_resources(stage):
    """GPU resources as the SLURM executor plugin reads them (`gpu`, `gpu_model`)."""
    res = hcfg.stage_resources(config, stage)
    out = {}
    if res["gpus"] > 0:
        out["gpu"] = res["gpus"]
        if res["gpu_model"]:
            out["gpu_model"] = res["gpu_model"]
    return out


def data_ready(dataset):
    """What a training job needs of a dataset: the processed cache, versioned by DVC if enabled."""
    if USE_DVC:
        return f"results/data_versions/{dataset}.json"
    return f"{hcfg.processed_dir(dataset)}/splits.json"


def corpus_inputs(wildcards):
    names = config["pretraining"]["corpora"][wildcards.corpus]["datasets"]
    return [data_ready(n) for n in names]


def finetune_inputs(wildcards):
    inputs = {"data": data_ready(wildcards.dataset), "store": STORE_MARKER}
    pretrained = hcfg.pretrained_for(config, wildcards.dataset, wildcards.backbone, wildcards.init)
    if pretrained:
        inputs["pretrained"] = pretrained
    return inputs


def evaluate_outputs():
    return [
        f"{hcfg.evaluate_dir(**job)}/metrics.json" for job in hcfg.finetune_grid(config)
    ]


def report_outputs():
    return [
        "results/tables/comparison.csv",
        "results/tables/comparison.md",
        "results/figures/test_dice.png",
    ]
