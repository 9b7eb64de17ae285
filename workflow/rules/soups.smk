# A run's follow-up in one process: the soups, then the test metrics of members, ensemble and soups
# (`papa soups --evaluate`; `papa evaluate` alone re-evaluates a run by hand). One start-up, one data load
# and one device initialization per run instead of two.
rule soups:
    input:
        split=SPLIT,
        population=f"{RUN}/population.safetensors",
    output:
        soups=f"{RUN}/soups.safetensors",
        sidecar=f"{RUN}/soups.json",
        metrics=f"{RUN}/metrics.json",
    params:
        config=job_config,
        settings=settings("soups"),
        run=subpath(input.population, parent=True),
    log:
        f"{LOGS}/soups/{{experiment}}/{{variant}}/seed{{seed}}.log",
    benchmark:
        f"{BENCH}/soups/{{experiment}}/{{variant}}/seed{{seed}}.tsv"
    # with its run's training (train.smk)
    group:
        "run"
    threads: res("soups", "threads")
    resources:
        mem_mb=res("soups", "mem_mb"),
        runtime=res("soups", "runtime"),
        gpu=res("soups", "gpu"),
    container:
        CONTAINER
    shell:
        "OMP_NUM_THREADS={threads} papa soups --config {params.config:q} --experiment {wildcards.experiment:q}"
        " --split {input.split:q} --run {params.run:q} --evaluate > {log:q} 2>&1"
