rule aggregate:
    input:
        metrics=all_metrics(),
    output:
        METRICS,
    log:
        f"{LOGS}/report/aggregate.log",
    benchmark:
        f"{BENCH}/report/aggregate.tsv"
    resources:
        mem_mb=1000,
        runtime=5,
    container:
        CONTAINER
    shell:
        "papa aggregate {input.metrics:q} --out {output:q} > {log:q} 2>&1"


rule render_table:
    input:
        metrics=METRICS,
    output:
        html=report(
            f"{REPORTS}/{{table}}.html",
            caption="../report/table.rst",
            category="Tables",
            labels={"table": "{table}", "format": "HTML (shown here)"},
        ),
        md=report(
            f"{REPORTS}/{{table}}.md",
            caption="../report/table.rst",
            category="Tables",
            labels={"table": "{table}", "format": "Markdown (download)"},
        ),
        csv=report(
            f"{REPORTS}/{{table}}.csv",
            caption="../report/table.rst",
            category="Tables",
            labels={"table": "{table}", "format": "CSV (download)"},
        ),
    params:
        config=CONFIGFILE,
        config_sha256=CONFIG_SHA256,
    log:
        f"{LOGS}/report/{{table}}.log",
    benchmark:
        f"{BENCH}/report/{{table}}.tsv"
    resources:
        mem_mb=1000,
        runtime=5,
    container:
        CONTAINER
    shell:
        "papa render --config {params.config:q} --table {wildcards.table:q} --metrics {input.metrics:q}"
        " --md {output.md:q} --csv {output.csv:q} --html {output.html:q} > {log:q} 2>&1"


rule plot_figure:
    input:
        metrics=METRICS,
        histories=histories,
    output:
        png=report(
            f"{REPORTS}/{{figure}}.png",
            caption="../report/figure.rst",
            category="Figures",
            labels={"figure": "{figure}"},
        ),
    params:
        config=CONFIGFILE,
        config_sha256=CONFIG_SHA256,
    log:
        f"{LOGS}/report/{{figure}}.log",
    benchmark:
        f"{BENCH}/report/{{figure}}.tsv"
    resources:
        mem_mb=1000,
        runtime=5,
    container:
        CONTAINER
    shell:
        "papa plot --config {params.config:q} --figure {wildcards.figure:q} --metrics {input.metrics:q}"
        " --histories {input.histories:q} --out {output.png:q} > {log:q} 2>&1"
