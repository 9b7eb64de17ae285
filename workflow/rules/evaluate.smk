rule evaluate:
    input:
        split=SPLIT,
        population=f"{RUN}/population.safetensors",
        soups=f"{RUN}/soups.safetensors",
    output:
        metrics=f"{RUN}/metrics.json",
    params:
        config=job_config,
        run=subpath(input.population, parent=True),
    log:
        f"{LOGS}/evaluate/{{experiment}}/{{variant}}/seed{{seed}}.log",
    benchmark:
        f"{BENCH}/evaluate/{{experiment}}/{{variant}}/seed{{seed}}.tsv"
    # with its run's training (train.smk)
    group:
        "run"
    threads: res("evaluate", "threads")
    resources:
        mem_mb=res("evaluate", "mem_mb"),
        runtime=res("evaluate", "runtime"),
        gpu=res("evaluate", "gpu"),
    container:
        CONTAINER
    shell:
        "OMP_NUM_THREADS={threads} papa evaluate --config {params.config:q} --experiment {wildcards.experiment:q}"
        " --split {input.split:q} --run {params.run:q} > {log:q} 2>&1"
