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
        "papa aggregate {input.metrics} --out {output} > {log} 2>&1"


rule render_table:
    input:
        config=CONFIGFILE,
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
        "papa render --config {input.config} --table {wildcards.table} --metrics {input.metrics}"
        " --md {output.md} --csv {output.csv} --html {output.html} > {log} 2>&1"


rule plot_figure:
    input:
        config=CONFIGFILE,
        metrics=METRICS,
        histories=histories,
    output:
        png=report(
            f"{REPORTS}/{{figure}}.png",
            caption="../report/figure.rst",
            category="Figures",
            labels={"figure": "{figure}"},
        ),
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
        "papa plot --config {input.config} --figure {wildcards.figure} --metrics {input.metrics}"
        " --histories {input.histories} --out {output.png} > {log} 2>&1"
