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
    # Re-derive every reported number from MLflow and re-verify its provenance chain
    # (data hash vs dvc.lock, checkpoint sha256, run ids, spec hashes); fails on any mismatch.
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
