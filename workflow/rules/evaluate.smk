rule evaluate:
    input:
        split=SPLIT,
        population=f"{RUN}/population.safetensors",
        soups=f"{RUN}/soups.safetensors",
    output:
        metrics=f"{RUN}/metrics.json",
    params:
        config=CONFIGFILE,
        run=subpath(input.population, parent=True),
    log:
        f"{LOGS}/evaluate/{{experiment}}/{{variant}}/seed{{seed}}.log",
    benchmark:
        f"{BENCH}/evaluate/{{experiment}}/{{variant}}/seed{{seed}}.tsv"
    threads: res("evaluate", "threads")
    resources:
        mem_mb=res("evaluate", "mem_mb"),
        runtime=res("evaluate", "runtime"),
        gpu=res("evaluate", "gpu"),
    container:
        CONTAINER
    shell:
        "OMP_NUM_THREADS={threads} papa evaluate --config {params.config} --experiment {wildcards.experiment}"
        " --split {input.split} --run {params.run} > {log} 2>&1"
