rule soups:
    input:
        split=SPLIT,
        population=f"{RUN}/population.safetensors",
    output:
        soups=f"{RUN}/soups.safetensors",
        sidecar=f"{RUN}/soups.json",
    params:
        config=CONFIGFILE,
        settings=settings("soups"),
        run=subpath(input.population, parent=True),
    log:
        f"{LOGS}/soups/{{experiment}}/{{variant}}/seed{{seed}}.log",
    benchmark:
        f"{BENCH}/soups/{{experiment}}/{{variant}}/seed{{seed}}.tsv"
    threads: res("soups", "threads")
    resources:
        mem_mb=res("soups", "mem_mb"),
        runtime=res("soups", "runtime"),
        gpu=res("soups", "gpu"),
    container:
        CONTAINER
    shell:
        "OMP_NUM_THREADS={threads} papa soups --config {params.config} --experiment {wildcards.experiment}"
        " --split {input.split} --run {params.run} > {log} 2>&1"
