rule train:
    input:
        split=SPLIT,
    output:
        population=f"{RUN}/population.safetensors",
        sidecar=f"{RUN}/population.json",
        history=f"{RUN}/history.csv",
    params:
        config=job_config,
        settings=settings("train"),
        run=subpath(output.population, parent=True),
    log:
        f"{LOGS}/train/{{experiment}}/{{variant}}/seed{{seed}}.log",
    benchmark:
        f"{BENCH}/train/{{experiment}}/{{variant}}/seed{{seed}}.tsv"
    # one SLURM job per run: training and its short follow-up steps (soups and evaluate, similarity) together;
    # local runs ignore groups
    group:
        "run"
    threads: res("train", "threads")
    # no retries here: a local failure (bad input, a full disk) fails again the same way. On a cluster the
    # profile retries (workflow/profiles/slurm: a job stopped at its time limit leaves its last checkpoint, and
    # the retry resumes there), and a retry on a disk still full stops at its start (papa.runs.check_room)
    resources:
        mem_mb=res("train", "mem_mb"),
        runtime=res("train", "runtime"),
        gpu=res("train", "gpu"),
    container:
        CONTAINER
    shell:
        "OMP_NUM_THREADS={threads} papa train --config {params.config:q} --experiment {wildcards.experiment:q}"
        " --variant {wildcards.variant:q} --seed {wildcards.seed:q} --split {input.split:q} --out {params.run:q}"
        " > {log:q} 2>&1"
