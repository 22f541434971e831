# Report: tables and figures built from the MLflow runs of exactly this grid's jobs. Deterministic
# jobs: never retried (`retries: 0`), unlike the training jobs a preemption may interrupt.


localrules:
    report,
    audit,


rule report:
    input:
        metrics=evaluate_outputs(),
        pretrain=hcfg.pretrain_targets(config),
        store=STORE_MARKER,
    output:
        flagged_report_outputs(),
    params:
        uri=config["tracking"]["uri"],
        pretrain_metrics=lambda w, input: [p.replace("model.pt", "metrics.json") for p in input.pretrain],
    conda:
        "../envs/hybridmim.yaml"
    log:
        "logs/report.log",
    retries: 0
    shell:
        "hybridmim report --tracking-uri {params.uri:q} --metrics {input.metrics}"
        " --pretrain-metrics {params.pretrain_metrics} --out results > {log} 2>&1"


rule audit:
    # Re-build every table/figure-data file from MLflow and compare it cell by cell, re-verify the
    # provenance chain (runs, data on disk via DVC, checkpoints) and re-compute a sample of
    # per-case Dice/HD95 from the saved predictions (docs/audit.md); fails on any mismatch.
    input:
        report_outputs(),
    output:
        "results/audit.json",
        report("results/audit.md", caption="../report/audit.rst", category="8. Audit"),
    params:
        uri=config["tracking"]["uri"],
    conda:
        "../envs/hybridmim.yaml"
    log:
        "logs/audit.log",
    retries: 0
    shell:
        "hybridmim audit --results results --tracking-uri {params.uri:q} > {log} 2>&1"
