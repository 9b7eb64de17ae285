rule similarity:
    input:
        split=SPLIT,
        population=f"{RUN}/population.safetensors",
    output:
        similarity=f"{RUN}/similarity.json",
    params:
        config=CONFIGFILE,
        settings=settings("similarity"),
        run=subpath(input.population, parent=True),
    log:
        f"{LOGS}/similarity/{{experiment}}/{{variant}}/seed{{seed}}.log",
    benchmark:
        f"{BENCH}/similarity/{{experiment}}/{{variant}}/seed{{seed}}.tsv"
    threads: res("similarity", "threads")
    resources:
        mem_mb=res("similarity", "mem_mb"),
        runtime=res("similarity", "runtime"),
        gpu=res("similarity", "gpu"),
    container:
        CONTAINER
    shell:
        "OMP_NUM_THREADS={threads} papa similarity --config {params.config} --experiment {wildcards.experiment}"
        " --split {input.split} --run {params.run} > {log} 2>&1"
