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
USE_DVC = config["data_versioning"]["dvc"]
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
    return config[stage]["resources"][key]


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
    res = config[stage]["resources"]
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


def pretrain_data_ready(dataset):
    """The cache a pretraining corpus reads (pretraining.data_recipe), versioned if DVC is on."""
    if config["pretraining"]["data_recipe"] != "native":
        return data_ready(dataset)
    if USE_DVC:
        return f"results/data_versions/pretrain/{dataset}.json"
    return f"{hcfg.pretrain_data_dir(config, dataset)}/splits.json"


def corpus_inputs(wildcards):
    names = config["pretraining"]["corpora"][wildcards.corpus]["datasets"]
    return [pretrain_data_ready(n) for n in names]


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


# Every table and figure the report writes, with its report section and caption (the
# `snakemake --report` HTML groups them by section; captions in workflow/report/).
REPORT_TABLES = {
    "comparison": ("1. Segmentation results", "comparison.rst"),
    "paper_vs_ours": ("1. Segmentation results", "paper_vs_ours.rst"),
    "ablations": ("2. Ablations", "ablations.rst"),
    "pretrain_cost": ("3. Pretraining cost", "pretrain_cost.rst"),
    "label_efficiency": ("4. Label efficiency", "label_efficiency.rst"),
    "paired_differences": ("5. Statistics", "paired_differences.rst"),
}
REPORT_FIGURES = {
    "test_dice": ("1. Segmentation results", "test_dice.rst"),
    "per_class_dice": ("1. Segmentation results", "per_class_dice.rst"),
    "ablations": ("2. Ablations", "ablations_figure.rst"),
    "pretrain_losses": ("3. Pretraining cost", "pretrain_losses.rst"),
    "time_to_quality": ("3. Pretraining cost", "time_to_quality.rst"),
    "label_efficiency": ("4. Label efficiency", "label_efficiency_figure.rst"),
    "finetune_curves": ("6. Fine-tuning", "finetune_curves.rst"),
}


def report_datasets():
    return sorted({job["dataset"] for job in hcfg.finetune_grid(config)})


def report_items():
    """(path, section, caption) of every file the report rule writes; the report shows the
    tables' CSV and the figures' PNG, the other formats sit beside them."""
    items = []
    tables = dict(REPORT_TABLES)
    tables.update({f"per_class_{d}": ("1. Segmentation results", "per_class.rst")
                   for d in report_datasets()})
    for name, (section, caption) in tables.items():
        items.append((f"results/tables/{name}.csv", section, caption))
        items += [(f"results/tables/{name}.{ext}", None, None) for ext in ("md", "tex")]
    figures = dict(REPORT_FIGURES)
    figures.update({f"gallery_{d}": ("7. Qualitative", "gallery.rst") for d in report_datasets()})
    for name, (section, caption) in figures.items():
        items.append((f"results/figures/{name}.png", section, caption))
        items += [(f"results/figures/{name}.{ext}", None, None) for ext in ("pdf", "csv")]
    return items


def report_outputs():
    return [path for path, _, _ in report_items()]


def flagged_report_outputs():
    """The report rule's outputs, the shown ones flagged for `snakemake --report`."""
    return [report(path, caption=f"../report/{caption}", category=section) if section
            else path for path, section, caption in report_items()]
