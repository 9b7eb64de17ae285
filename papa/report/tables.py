"""Tables rendered from the tidy metrics frame: Markdown and HTML for people, CSV for machines. A table entry of
the config names a ``layout`` (``LAYOUTS``: its columns, {header: (variant or None for the row's own, metric)})
and lists ``rows``; docs/interfaces.md describes every layout, the cells and the CSV."""

from pathlib import Path

import numpy as np
import pandas as pd
from tabulate import tabulate

from papa.io import write_text
from papa.report import paper
from papa.report.aggregate import over_seeds
from papa.report.display import CHANCE_MARK, PAPER_MARK, Display, Line
from papa.report.html import page
from papa.variants import VARIANTS


def _per_variant(*measures: tuple[str, str], baseline: tuple[tuple[str, str], ...] = ()) -> dict:
    """Columns ``<label> <measure>`` of every variant (papa.variants), in order: {header: (variant, metric)};
    the variants that never average (the baseline) show ``baseline``'s measures instead, when given."""
    return {f"{v.label} {name}": (v.name, metric) for v in VARIANTS.values()
            for name, metric in (baseline if baseline and v.unit == "none" else measures)}


MAIN = _per_variant(("Ensemble", "ensemble"), ("AvgSoup", "avg_soup"),
                    baseline=(("Ensemble", "ensemble"), ("GreedySoup", "greedy_soup")))
DETAILED = _per_variant(("Ens", "ensemble"), ("Avg", "avg_soup"), ("Greed", "greedy_soup"))
RANGE = {"p": (None, "population"), "mean [min, max]": (None, "mean"), "AvgSoup": (None, "avg_soup"),
         "GreedySoup": (None, "greedy_soup")}
GREEDY_SIZES = _per_variant(("GreedySoup", "greedy_soup_size"))
MEAN_SOUP = _per_variant(("Mean", "mean"), ("AvgSoup", "avg_soup"))
SEGMENTATION = {"Accuracy": (None, "accuracy"), **{header: (None, f"f1_{name}") for header, name in (
    ("Roads", "impervious_surfaces"), ("Buildings", "building"), ("Vegetation", "low_vegetation"), ("Trees", "tree"),
    ("Cars", "car"), ("Clutter", "clutter"), ("Average F1", "average"))}}
SIDE_BY_SIDE = {"Mean": (None, "mean"), "Avg": (None, "avg_soup"), "Greed": (None, "greedy_soup")}
SIMILARITY_MEASURES = {"Between two networks": "between_networks",
                       "Between one network and AvgSoup": "network_and_avg_soup"}
SIMILARITY_STAGES = 4
SIMILARITY = {f"{title} Layer {k}": (None, f"{key}.layer{k}") for title, key in SIMILARITY_MEASURES.items()
              for k in range(1, SIMILARITY_STAGES + 1)}
DATASETS = "datasets"
LAYOUTS = {"main": MAIN, "detailed": DETAILED, "range": RANGE, "greedy_sizes": GREEDY_SIZES, "mean_soup": MEAN_SOUP,
           "segmentation": SEGMENTATION, "side_by_side": SIDE_BY_SIDE, "similarity": SIMILARITY,
           DATASETS: {}}  # datasets: the columns are the rows' ``experiments`` keys
OWN_VARIANT = {"range", "similarity", "segmentation", "side_by_side", DATASETS}  # their rows name their variant
MISSING = "—"
SOUPS = ("avg_soup", "greedy_soup")
SPELLED = {"Ens": "Ensemble", "Avg": "Average soup", "AvgSoup": "Average soup", "Greed": "Greedy soup",
           "GreedySoup": "Greedy soup", "Mean": "Population mean", "p": "Population size p",
           "mean [min, max]": "Members: mean [min, max]",
           "Between one network and AvgSoup": "Between one network and the average soup"}  # abbreviated column keys
ACCURACIES = {"mean", "ensemble", *SOUPS, *(f"{s}_repair" for s in SOUPS)}  # checked against chance level
HIGHLIGHT = {"main", "detailed"}
CSV_COLUMNS = ["row", "group", "column", "experiment", "variant", "metric", "n", "mean", "std", "min", "max", "text",
               "paper", "paper_note", "best", "classes", "chance", "code"]


def columns(table: dict, variants: list[str], row: dict | None = None) -> dict[str, tuple[str | None, str]]:
    """The layout's columns kept for this table: {header: (variant or None, metric)}; in ``side_by_side``
    those of ``row``'s column group (every group's without a row)."""
    if table["layout"] == "side_by_side":
        groups = [row["columns"]] if row is not None else [r["columns"] for r in table["rows"]]
        return {f"{g} {h}": vm for g in groups for h, vm in SIDE_BY_SIDE.items()}
    if table["layout"] == DATASETS:
        return {h: (None, "avg_soup") for r in table["rows"] for h in r.get("experiments", {})}
    keep = table.get("variants") or variants
    return {h: (v, m) for h, (v, m) in LAYOUTS[table["layout"]].items() if v is None or v in keep}


def row_experiments(row: dict) -> list[str]:
    return list(row["experiments"].values()) if "experiments" in row else [row["experiment"]]


def cell_experiment(row: dict, header: str) -> str | None:
    """The experiment of a row's cell in column ``header`` (``datasets`` rows: None where it has none)."""
    return row["experiments"].get(header) if "experiments" in row else row["experiment"]


def cell_variant(row: dict, variant: str | None) -> str | None:
    """The variant a cell shows: the column's, the row's own (``range``), or None (left empty)."""
    own = row.get("variant")
    return own if variant is None else (variant if own in (None, variant) else None)


def row_metric(table: dict, row: dict, variant: str, metric: str) -> str:
    """The metrics.json key of a cell: the column's metric, or for ``segmentation`` the row's model's
    (``<model>`` for accuracy, ``<model>_f1_<class>``), a soup REPAIRed where the table says so."""
    model = row["model"] if table["layout"] == "segmentation" else metric
    if model in SOUPS and variant in table.get("repair", []):
        model = f"{model}_repair"
    if table["layout"] != "segmentation" or metric == "accuracy":
        return model
    return f"{model}_{metric}"


def _cell(frame, experiment, variant, metric, table) -> dict:
    """The stats and text of one cell (``metric``: its metrics.json key, ``row_metric``)."""
    run = frame[(frame.experiment == experiment) & (frame.variant == variant)]
    get = lambda m: run[run.metric == m].sort_values("seed")["value"].to_numpy(dtype=float)  # noqa: E731
    stats = over_seeds(get(metric))
    d = table.get("decimals", 2)
    code = "; ".join(sorted(set(run.code[run.metric == metric]) - {""})) if "code" in frame else ""  # the runs' code
    spans = metric == "mean" and table["layout"] == "range"  # with [min, max] over the members of all seeds
    if spans:
        stats |= {"min": over_seeds(get("min"))["min"], "max": over_seeds(get("max"))["max"]}
    if not stats["n"]:
        text = MISSING
    elif spans:
        text = f"{stats['mean']:.{d}f} [{stats['min']:.{d}f}, {stats['max']:.{d}f}]"
    elif metric == "population":
        text = f"{stats['mean']:g}"
    elif metric == "greedy_soup_size":
        k = stats["mean"]
        text = f"{k:.{0 if k == round(k) else 1}f} (out of {get('population').max():g})"
    else:  # x (y) over several seeds, x for one
        text = f"{stats['mean']:.{d}f}" + (f" ({stats['std']:.{d}f})" if stats["n"] > 1 else "")
    classes = next(iter(get("num_classes")), np.nan)
    chance = metric in ACCURACIES and bool(stats["n"]) and at_chance(stats["mean"], classes)
    return {"metric": metric, **stats, "text": text, "classes": classes, "chance": chance, "code": code}


def at_chance(accuracy: float, classes: float) -> bool:
    """Whether an accuracy (%) is at chance level: within max(1, min(5, chance / 2)) points of chance =
    100 / classes (10 classes: 5-15%; 100 classes: 0-2%). False when the number of classes is unknown."""
    if not classes > 0:
        return False
    chance = 100.0 / classes
    return abs(accuracy - chance) <= max(1.0, min(5.0, chance / 2))


def _best(cells: list[dict]) -> None:
    """Mark the best ensemble and the best soup of one row."""
    for group in (("ensemble",), tuple(m for s in SOUPS for m in (s, f"{s}_repair"))):
        scored = [c for c in cells if c["metric"] in group and c["n"]]
        top = max((c["mean"] for c in scored), default=None)
        for c in scored:
            c["best"] = c["mean"] == top


def cells(table: dict, frame: pd.DataFrame, variants: list[str], seeds: list[int]) -> pd.DataFrame:
    """One record per (row, column): the machine-readable table (columns ``CSV_COLUMNS``)."""
    frame = frame[frame.seed.isin(seeds)]
    reported, noted = (paper.values(table["paper"]), paper.notes(table["paper"])) if table.get("paper") else ({}, {})
    records = []
    for row in table["rows"]:
        row_cells = []
        for header, (variant, metric) in columns(table, variants, row).items():
            experiment = cell_experiment(row, header)
            v = cell_variant(row, variant) if experiment is not None else None
            base = {"row": row["label"], "group": row.get("group"), "column": header, "experiment": experiment,
                    "variant": v}
            cell = (_cell(frame, experiment, v, row_metric(table, row, v, metric), table) if v is not None else
                    {"metric": metric, **over_seeds([]), "text": "", "classes": np.nan, "chance": False, "code": ""})
            at = (row["label"], header)
            row_cells.append(base | cell | {"paper": reported.get(at), "paper_note": noted.get(at), "best": False})
        if table["layout"] in HIGHLIGHT:
            _best(row_cells)
        records += row_cells
    if table["layout"] == "side_by_side":  # one displayed row per label, its groups in the table's order
        labels = list(dict.fromkeys(r["label"] for r in table["rows"]))
        order = list(columns(table, variants))
        records.sort(key=lambda r: (labels.index(r["row"]), order.index(r["column"])))
    return pd.DataFrame(records, columns=CSV_COLUMNS)


def header(table: dict, key: str) -> tuple[str, str]:
    """(group, measure) of column ``key`` spelled out: ``PAPA-all Avg`` is (``PAPA-all``, ``Average soup``)."""
    groups = [] if table["layout"] in OWN_VARIANT else [v.label for v in VARIANTS.values()]  # columns per variant
    if table["layout"] == "side_by_side":
        groups = [r["columns"] for r in table["rows"]]
    group, measure = next(((g, key[len(g) + 1:]) for g in sorted(groups, key=len, reverse=True)
                           if key.startswith(f"{g} ")), ("", key))
    return group, "Greedy soup size" if table["layout"] == "greedy_sizes" else SPELLED.get(measure, measure)


def _paper_text(value, note) -> str:
    """A paper cell as shown: empty where the paper gives no value, marked where the value has a note."""
    if not isinstance(value, str):
        return ""
    return value + PAPER_MARK if isinstance(note, str) else value


def _lines(label: str, cells: pd.DataFrame) -> list[Line]:
    """Our row, and the paper's under it when the paper gives any of its cells; a value with a note is marked."""
    ours = Line("ours", label, [(c.text, bool(c.best), bool(c.chance)) for c in cells.itertuples()])
    if not any(isinstance(v, str) for v in cells["paper"]):
        return [ours]
    reported = [(_paper_text(v, n), False, False) for v, n in zip(cells["paper"], cells["paper_note"], strict=True)]
    return [ours, Line("paper", f"{label} (paper)", reported)]


def display(table: dict, grid: pd.DataFrame, seeds: list[int]) -> Display:
    """What table ``table`` shows of a ``cells`` frame."""
    layout = table["layout"]
    spread = "mean" if layout == "greedy_sizes" else "mean (standard deviation)"
    over = f"{spread} over seeds {', '.join(map(str, seeds))}" if len(seeds) > 1 else f"seed {seeds[0]}"
    label_header = "Layer" if layout == "similarity" else "Model"
    lines = []
    if layout == "similarity":  # Table 5: per row a heading, then one line per measure over the layers
        layers = [f"Layer {k}" for k in range(1, SIMILARITY_STAGES + 1)]
        headers = [("", layer) for layer in layers]
        for label, row in grid.groupby("row", sort=False):
            lines.append(Line("heading", label, [("", False, False)] * len(layers)))
            for key in SIMILARITY_MEASURES:
                cells = row.set_index("column").loc[[f"{key} {layer}" for layer in layers]]
                lines += _lines(SPELLED.get(key, key), cells)
        notes = [f"Cosine similarity (%) of the ResNet stage outputs on the test set; {over}",
                 "members permutation-aligned to member 0 (feature matching) and the average soup REPAIRed first",
                 "averaged over the pairs of members and the members the experiment's similarity.members names "
                 "(all, or first-two: members 0 and 1 as the authors measured)"]
    else:  # each row of the grid followed by the paper's, a heading where the group changes
        keys = list(columns(table, []) if layout == "side_by_side" else dict.fromkeys(grid["column"]))
        headers = [header(table, key) for key in keys]
        group = None
        for label, row in grid.groupby("row", sort=False):
            # side_by_side: a label may lack a column group, whose cells stay empty
            row = row.set_index("column").reindex(keys).fillna({"text": "", "best": False, "chance": False})
            if isinstance(row["group"].iloc[0], str) and row["group"].iloc[0] != group:
                group = row["group"].iloc[0]
                lines.append(Line("heading", group, [("", False, False)] * len(keys)))
            lines += _lines(label, row)
        what = {"greedy_sizes": "Greedy-soup size k of p members",
                "segmentation": "Test pixel accuracy and F1-scores (%) on whole tiles"}.get(layout, "Test accuracy (%)")
        notes = [f"{what}; {over}"]
        if layout == "range":
            notes.append("[min, max] over the members of all seeds")
        if layout in HIGHLIGHT:
            notes.append("bold: best ensemble and best soup of each row")
        repaired = [v for v in table.get("repair", []) if v in set(grid["variant"].dropna())]
        if repaired and layout != "greedy_sizes":
            notes.append(f"soups with REPAIR for {', '.join(VARIANTS[v].label for v in repaired)}")
    if table.get("paper"):
        notes.append(f"rows '(paper)': values reported in the paper ({table['paper']})")
    chance = ", ".join(f"{100 / k:.3g}% for {k:g} classes" for k in sorted(grid[grid["chance"]]["classes"].unique()))
    footnotes = [f"{CHANCE_MARK} at chance level (1/classes: {chance})"] if chance else []
    footnotes += [f"{PAPER_MARK} paper value: {note}" for note in dict.fromkeys(grid["paper_note"].dropna())]
    return Display(table["name"], table.get("caption") or "", label_header, headers, lines, notes, footnotes)


def markdown(table: dict, grid: pd.DataFrame, seeds: list[int]) -> str:
    """The Markdown table (with its title, notes and footnotes) of a ``cells`` frame."""
    shown = display(table, grid, seeds)
    body = [[f"**{line.label}**" if line.kind == "heading" else line.label,
             *((f"**{t}**" if best else t) + (CHANCE_MARK if chance else "") for t, best, chance in line.cells)]
            for line in shown.lines]
    headers = [f"{group} {measure}" if group else measure for group, measure in shown.headers]
    text = tabulate(body, headers=[shown.label_header, *headers], tablefmt="pipe", disable_numparse=True,
                    colalign=("left",) + ("right",) * len(headers))
    title = f"**{shown.name}**" + (f": {shown.caption}" if shown.caption else "")
    return "\n\n".join([title, text, "; ".join(shown.notes) + ".", *shown.footnotes]) + "\n"


def render(table: dict, frame: pd.DataFrame, variants: list[str], seeds: list[int], md: str | Path, csv: str | Path,
           html: str | Path | None = None) -> None:
    """Write table ``table`` (a config entry) from ``frame`` as Markdown, CSV and (given ``html``) an HTML page."""
    grid = cells(table, frame, variants, seeds)
    write_text(md, markdown(table, grid, seeds))
    write_text(csv, grid.to_csv(index=False))
    if html is not None:
        write_text(html, page(display(table, grid, seeds)))
