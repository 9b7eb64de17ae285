rule prepare:
    output:
        split=SPLIT,
    params:
        config=CONFIGFILE,
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
        "papa prepare --config {params.config} --experiment {wildcards.experiment} --out {output.split}"
        " > {log} 2>&1"
