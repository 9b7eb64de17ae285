rule similarity:
    input:
        split=SPLIT,
        population=f"{RUN}/population.safetensors",
    output:
        similarity=f"{RUN}/similarity.json",
    params:
        config=job_config,
        settings=settings("similarity"),
        run=subpath(input.population, parent=True),
    log:
        f"{LOGS}/similarity/{{experiment}}/{{variant}}/seed{{seed}}.log",
    benchmark:
        f"{BENCH}/similarity/{{experiment}}/{{variant}}/seed{{seed}}.tsv"
    # with its run's training (train.smk)
    group:
        "run"
    threads: res("similarity", "threads")
    resources:
        mem_mb=res("similarity", "mem_mb"),
        runtime=res("similarity", "runtime"),
        gpu=res("similarity", "gpu"),
    container:
        CONTAINER
    shell:
        "OMP_NUM_THREADS={threads} papa similarity --config {params.config:q} --experiment {wildcards.experiment:q}"
        " --split {input.split:q} --run {params.run:q} > {log:q} 2>&1"
