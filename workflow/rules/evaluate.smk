# Evaluation on the test split with sliding-window inference.


rule evaluate:
    input:
        model="results/finetune/{dataset}/{backbone}/{init}/frac{fraction}/seed{seed}/model.pt",
        store=STORE_MARKER,
    output:
        metrics="results/evaluate/{dataset}/{backbone}/{init}/frac{fraction}/seed{seed}/metrics.json",
    params:
        spec=lambda w: spec_file(
            hcfg.evaluate_spec(config, w.dataset, w.backbone, w.init, w.fraction, w.seed)
        ),
    conda:
        "../envs/hybridmim.yaml"
    log:
        "logs/evaluate/{dataset}_{backbone}_{init}_frac{fraction}_seed{seed}.log",
    threads: stage_res("evaluation", "cpus")
    resources:
        mem_mb=stage_res("evaluation", "mem_mb"),
        runtime=stage_res("evaluation", "runtime"),
        cpus_per_task=stage_res("evaluation", "cpus"),
        **slurm_gpu_resources("evaluation"),
    shell:
        "hybridmim evaluate --spec-file {params.spec} > {log} 2>&1"
