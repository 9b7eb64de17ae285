rule prepare:
    output:
        split=SPLIT,
    params:
        config=job_config,
        settings=settings("prepare"),
    log:
        f"{LOGS}/prepare/{{experiment}}.log",
    benchmark:
        f"{BENCH}/prepare/{{experiment}}.tsv"
    threads: res("prepare", "threads")
    resources:
        mem_mb=res("prepare", "mem_mb"),
        runtime=res("prepare", "runtime"),
        gpu=res("prepare", "gpu"),
    container:
        CONTAINER
    shell:
        "papa prepare --config {params.config:q} --experiment {wildcards.experiment:q} --out {output.split:q}"
        " > {log:q} 2>&1"
