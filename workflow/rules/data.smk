# Data: acquire (download / locate / generate, convert, check) and preprocess (+ splits) per
# dataset, then record both folders' hashes in dvc.lock. Same CLI as the DVC stages in dvc.yaml.
# These jobs are deterministic (`retries: 0`): bad input fails the same way twice, so the profile's
# retry (meant for preempted training jobs) would only print the error twice. Downloads retry
# transient network errors themselves (hybridmim.data.sources.download).


localrules:
    init_tracking,
    version_data,
    version_pretraining_data,


rule init_tracking:
    # The SQLite store must exist before parallel jobs open it (parallel creation fails).
    output:
        STORE_MARKER,
    params:
        uri=config["tracking"]["uri"],
        artifact_root=config["tracking"]["artifact_root"],
    conda:
        "../envs/hybridmim.yaml"
    log:
        "logs/init_tracking.log",
    retries: 0
    shell:
        "hybridmim tracking init --uri {params.uri:q} --artifact-root {params.artifact_root:q}"
        " --marker {output} > {log} 2>&1"


rule acquire_data:
    output:
        "data/raw/{dataset}/dataset.json",
    params:
        block=lambda w: spec_arg(config["datasets"][w.dataset]),
    conda:
        "../envs/hybridmim.yaml"
    log:
        "logs/data/acquire_{dataset}.log",
    resources:
        mem_mb=4000,
        runtime=240,
    retries: 0
    shell:
        "hybridmim data acquire --dataset {wildcards.dataset} --dataset-json {params.block}"
        " > {log} 2>&1"


rule preprocess_data:
    input:
        "data/raw/{dataset}/dataset.json",
    output:
        "data/processed/{dataset}/splits.json",
    params:
        block=lambda w: spec_arg(config["datasets"][w.dataset]),
    conda:
        "../envs/hybridmim.yaml"
    log:
        "logs/data/preprocess_{dataset}.log",
    threads: 2
    resources:
        mem_mb=8000,
        runtime=240,
    retries: 0
    shell:
        "hybridmim data preprocess --dataset {wildcards.dataset} --dataset-json {params.block}"
        " > {log} 2>&1"


rule version_data:
    # One DVC command at a time: DVC holds a repository lock.
    input:
        "data/raw/{dataset}/dataset.json",
        "data/processed/{dataset}/splits.json",
    output:
        "results/data_versions/{dataset}.json",
    params:
        block=lambda w: spec_arg(config["datasets"][w.dataset]),
    conda:
        "../envs/hybridmim.yaml"
    log:
        "logs/data/version_{dataset}.log",
    resources:
        dvc=1,
    retries: 0
    shell:
        "hybridmim data version --dataset {wildcards.dataset} --dataset-json {params.block}"
        " --out {output} > {log} 2>&1"


rule preprocess_pretraining_data:
    # pretraining.data_recipe: native — the authors' recipe (RAS, native spacing, whole volumes),
    # with the fine-tuning cache's split copied in (hybridmim.data.prepare.pretrain_cache).
    input:
        "data/raw/{dataset}/dataset.json",
        "data/processed/{dataset}/splits.json",
    output:
        "data/pretrain/{dataset}/splits.json",
    params:
        block=lambda w: spec_arg(config["datasets"][w.dataset]),
    conda:
        "../envs/hybridmim.yaml"
    log:
        "logs/data/preprocess_pretrain_{dataset}.log",
    threads: 2
    resources:
        mem_mb=8000,
        runtime=240,
    retries: 0
    shell:
        "hybridmim data preprocess-pretrain --dataset {wildcards.dataset}"
        " --dataset-json {params.block} > {log} 2>&1"


rule version_pretraining_data:
    input:
        "data/pretrain/{dataset}/splits.json",
        "results/data_versions/{dataset}.json",
    output:
        "results/data_versions/pretrain/{dataset}.json",
    conda:
        "../envs/hybridmim.yaml"
    log:
        "logs/data/version_pretrain_{dataset}.log",
    resources:
        dvc=1,
    retries: 0
    shell:
        "hybridmim data version-pretrain --dataset {wildcards.dataset} --out {output} > {log} 2>&1"
