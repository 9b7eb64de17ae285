rule train:
    input:
        split=SPLIT,
    output:
        population=f"{RUN}/population.safetensors",
        sidecar=f"{RUN}/population.json",
        history=f"{RUN}/history.csv",
    params:
        config=CONFIGFILE,
        settings=settings("train"),
        run=subpath(output.population, parent=True),
    log:
        f"{LOGS}/train/{{experiment}}/{{variant}}/seed{{seed}}.log",
    benchmark:
        f"{BENCH}/train/{{experiment}}/{{variant}}/seed{{seed}}.tsv"
    threads: res("train", "threads")
    # a failed or preempted attempt leaves its last checkpoint in the run directory: the retry resumes there
    retries: 2
    resources:
        mem_mb=res("train", "mem_mb"),
        runtime=res("train", "runtime"),
        gpu=res("train", "gpu"),
    container:
        CONTAINER
    shell:
        "OMP_NUM_THREADS={threads} papa train --config {params.config} --experiment {wildcards.experiment}"
        " --variant {wildcards.variant} --seed {wildcards.seed} --split {input.split} --out {params.run}"
        " > {log} 2>&1"
