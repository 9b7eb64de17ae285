"""The report subcommands of ``papa``: aggregate, render, plot."""

from pathlib import Path

from papa.errors import PapaError


def _load(config_path: Path, kind: str, name: str) -> tuple[dict, dict]:
    from papa.config import load_config
    from papa.report import plan
    config = load_config(config_path)
    plan.check(config, str(config_path))
    if entry := next((e for e in config[kind] if e["name"] == name), None):
        return config, entry
    known = ", ".join(e["name"] for e in config[kind]) or "none"
    raise PapaError(f"{config_path}: no {kind[:-1]} named {name!r} (defined: {known})")


def _aggregate(a) -> None:
    from papa.report import aggregate
    paths = [*a.metrics, *(aggregate.find_metrics(a.results) if a.results else [])]
    if not paths:
        where = f"none found under {a.results}/<experiment>/<variant>/seed<S>/" if a.results else \
            "pass files, or --results DIR to collect them"
        raise PapaError(f"no metrics files given ({where})")
    frame = aggregate.aggregate(paths)
    aggregate.write(frame, a.out)
    print(f"{a.out}: {len(frame)} rows from {frame.groupby(['experiment', 'variant', 'seed']).ngroups} runs")


def _render(a) -> None:
    from papa.report import aggregate, tables
    config, table = _load(a.config, "tables", a.table)
    md = a.md or Path("reports") / f"{a.table}.md"
    csv, html = a.csv or md.with_suffix(".csv"), a.html or md.with_suffix(".html")
    tables.render(table, aggregate.load(a.metrics), config["variants"], config["seeds"], md, csv, html)
    print(f"{md}, {csv}, {html}: table {a.table!r} ({table['layout']}, {len(table['rows'])} rows)")


def _histories(figure: dict, config: dict, files: list[Path]) -> dict[tuple[str, int], Path]:
    """(curve, seed) -> history.csv of a curves figure: the given files, else those of the config's results."""
    from papa.report import aggregate, figures
    curves = figures.curve_keys(figure, config["variants"])
    # a variants figure keys its curves by variant (curves_figure orders and colours them), a lines one by label
    key = {run: label if figure.get("lines") else run[1] for label, run in curves.items()}
    if files:
        return {(key[r[:2]], r[2]): p for p in files if (r := aggregate.run_of(p)) and r[:2] in key}
    return {(k, s): aggregate.run_dir(config["results"], *run, s) / "history.csv" for run, k in key.items()
            for s in config["seeds"]}


def _plot(a) -> None:
    from papa.report import aggregate, figures
    config, figure = _load(a.config, "figures", a.figure)
    out = a.out or Path("reports") / f"{a.figure}.png"
    if figure["kind"] == "curves":
        if not (histories := _histories(figure, config, a.histories)):
            raise PapaError(f"figure {a.figure!r}: none of the history files is of a run it plots")
        figures.curves(figure, histories, out)
    elif a.metrics is None:
        raise PapaError(f"figure {a.figure!r} ({figure['kind']}) needs --metrics")
    else:
        figures.compare(figure, aggregate.load(a.metrics), config["seeds"], config["variants"], out)
    print(f"{out}: figure {a.figure!r} ({figure['kind']})")


def add_commands(subparsers) -> None:
    """Register ``aggregate``, ``render`` and ``plot`` on the ``papa`` subparsers."""
    p = subparsers.add_parser("aggregate", help="collect metrics.json files into one tidy CSV",
                              description="One row per experiment x variant x seed x metric (docs/interfaces.md).")
    p.add_argument("metrics", nargs="*", type=Path, help="metrics.json files")
    p.add_argument("--results", type=Path, help="also collect every <results>/*/*/seed*/metrics.json")
    p.add_argument("--out", required=True, type=Path, help="CSV to write")
    p.set_defaults(func=_aggregate)

    p = subparsers.add_parser("render", help="render one table of the config to Markdown, CSV and HTML",
                              description="Render a `tables` entry of the config from the aggregated metrics.")
    p.add_argument("--config", required=True, type=Path, help="config file (YAML)")
    p.add_argument("--table", required=True, help="table name in the config")
    p.add_argument("--metrics", required=True, type=Path, help="aggregated CSV from `papa aggregate`")
    p.add_argument("--md", type=Path, help="Markdown to write (default reports/<table>.md)")
    p.add_argument("--csv", type=Path, help="CSV to write (default: beside the Markdown)")
    p.add_argument("--html", type=Path, help="HTML page to write (default: beside the Markdown)")
    p.set_defaults(func=_render)

    p = subparsers.add_parser("plot", help="draw one figure of the config to PNG",
                              description="Draw a `figures` entry of the config: `curves` reads the runs' history.csv "
                              "files (given, or found under the config's results directory), `variants` the "
                              "aggregated metrics.")
    p.add_argument("--config", required=True, type=Path, help="config file (YAML)")
    p.add_argument("--figure", required=True, help="figure name in the config")
    p.add_argument("--metrics", type=Path, help="aggregated CSV from `papa aggregate` (variants figures)")
    p.add_argument("--histories", nargs="*", default=[], type=Path, help="history.csv files (curves figures)")
    p.add_argument("--out", type=Path, help="PNG to write (default reports/<figure>.png)")
    p.set_defaults(func=_plot)
