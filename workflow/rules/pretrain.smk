# Pretraining: one job per backbone x method x corpus that the fine-tuning grid needs.


rule pretrain:
    input:
        data=corpus_inputs,
        store=STORE_MARKER,
    output:
        model="results/pretrain/{backbone}/{method}/{corpus}/model.pt",
        metrics="results/pretrain/{backbone}/{method}/{corpus}/metrics.json",
    params:
        spec=lambda w: spec_file(hcfg.pretrain_spec(config, w.backbone, w.method, w.corpus)),
        launcher=launcher("pretraining"),
    conda:
        "../envs/hybridmim.yaml"
    log:
        "logs/pretrain/{backbone}_{method}_{corpus}.log",
    threads: stage_res("pretraining", "cpus")
    resources:
        mem_mb=stage_res("pretraining", "mem_mb"),
        runtime=stage_res("pretraining", "runtime"),
        cpus_per_task=stage_res("pretraining", "cpus"),
        **slurm_gpu_resources("pretraining"),
    shell:
        "{params.launcher} pretrain --spec-file {params.spec} > {log} 2>&1"
