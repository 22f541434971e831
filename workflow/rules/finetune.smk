# Fine-tuning: dataset x backbone x init x label fraction x seed.


rule finetune:
    input:
        unpack(finetune_inputs),
    output:
        model="results/finetune/{dataset}/{backbone}/{init}/frac{fraction}/seed{seed}/model.pt",
        metrics="results/finetune/{dataset}/{backbone}/{init}/frac{fraction}/seed{seed}/metrics.json",
    params:
        spec=lambda w: spec_file(
            hcfg.finetune_spec(config, w.dataset, w.backbone, w.init, w.fraction, w.seed)
        ),
    conda:
        "../envs/hybridmim.yaml"
    log:
        "logs/finetune/{dataset}_{backbone}_{init}_frac{fraction}_seed{seed}.log",
    threads: stage_res("finetuning", "cpus")
    resources:
        mem_mb=stage_res("finetuning", "mem_mb"),
        runtime=stage_res("finetuning", "runtime"),
        cpus_per_task=stage_res("finetuning", "cpus"),
        **slurm_gpu_resources("finetuning"),
    shell:
        "hybridmim finetune --spec-file {params.spec} > {log} 2>&1"
