"""Tables rendered from the tidy metrics frame: Markdown for people, CSV for machines.

A table entry of the config names a ``layout`` and lists ``rows`` ({label, experiment, variant?,
group?}); the layout fixes the columns. Column headers (also the ``column`` key of the paper CSVs
``papa/report/paper/<id>.csv``, header ``row,column,value``, ``row`` = the row ``label``):

- ``main`` (Table 1): ``Baseline Ensemble``, ``Baseline GreedySoup``, then ``<V> Ensemble`` and
  ``<V> AvgSoup`` for V in ``PAPA``, ``PAPA-all``, ``PAPA-2``.
- ``detailed`` (Tables 6-9): ``<V> Ens``, ``<V> Avg``, ``<V> Greed`` for every variant V
  (``Baseline``, ``PAPA``, ``PAPA-all``, ``PAPA-2``).
- ``range`` (Tables 12, 14-17): ``p``, ``mean [min, max]``, ``AvgSoup``, ``GreedySoup``; each row must
  name its ``variant``.
- ``greedy_sizes`` (Table 18): ``<V> GreedySoup`` for every variant V, cells ``k (out of p)``.
- ``mean_soup`` (A.10, Table 2): ``<V> Mean`` (population mean) and ``<V> AvgSoup`` for every variant V.
- ``datasets`` (Table 3): one row per method, one column per dataset: a row names its ``variant`` and
  ``experiments: {<column header>: <experiment>}`` (instead of ``experiment``); cells are average soups.

Columns of variants outside the table's ``variants`` (default: the config's) are left out; a row's own
``variant`` fills only that variant's columns. The table's ``repair`` variants show the REPAIRed soups.

Cells read ``x (y)``: the mean (sample standard deviation, ddof=1) over the config's seeds, or ``x`` for
a single seed; ``mean [min, max]`` is the mean of the population means over seeds and the extremes over
all members of all seeds; ``k (out of p)`` shows the mean greedy-soup size. A missing result reads ``—``.
In ``main`` and ``detailed`` the best ensemble and the best soup of each row are bold. A paper ``value``
is the cell's text as printed in the paper (e.g. ``95.2 (0.1)``, ``80.21 [80.05, 80.46]``,
``1 (out of 10)``; CSV-quote fields holding commas); it is shown in a row ``<label> (paper)`` right
under ours. A row's ``group`` starts a bold heading row when it changes (Table 1's dataset lines).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from tabulate import tabulate

from papa.report import paper

VARIANT_NAMES = {"baseline": "Baseline", "papa": "PAPA", "papa-all": "PAPA-all", "papa-2": "PAPA-2"}

# layout -> {column header: (variant or None for the row's own variant, metric)}
MAIN = {
    "Baseline Ensemble": ("baseline", "ensemble"),
    "Baseline GreedySoup": ("baseline", "greedy_soup"),
    **{
        f"{VARIANT_NAMES[v]} {name}": (v, metric)
        for v in ("papa", "papa-all", "papa-2")
        for name, metric in (("Ensemble", "ensemble"), ("AvgSoup", "avg_soup"))
    },
}
DETAILED = {
    f"{VARIANT_NAMES[v]} {name}": (v, metric)
    for v in VARIANT_NAMES
    for name, metric in (("Ens", "ensemble"), ("Avg", "avg_soup"), ("Greed", "greedy_soup"))
}
RANGE = {
    "p": (None, "population"),
    "mean [min, max]": (None, "mean"),
    "AvgSoup": (None, "avg_soup"),
    "GreedySoup": (None, "greedy_soup"),
}
GREEDY_SIZES = {f"{VARIANT_NAMES[v]} GreedySoup": (v, "greedy_soup_size") for v in VARIANT_NAMES}
MEAN_SOUP = {
    f"{VARIANT_NAMES[v]} {name}": (v, metric)
    for v in VARIANT_NAMES
    for name, metric in (("Mean", "mean"), ("AvgSoup", "avg_soup"))
}
DATASETS = "datasets"
LAYOUTS = {
    "main": MAIN,
    "detailed": DETAILED,
    "range": RANGE,
    "greedy_sizes": GREEDY_SIZES,
    "mean_soup": MEAN_SOUP,
    DATASETS: {},  # the columns are the rows' ``experiments`` keys
}
LABEL = "Model"
"""Header of the first (row label) column."""
MISSING = "—"
SOUPS = ("avg_soup", "greedy_soup")
HIGHLIGHT = {"main", "detailed"}
CSV_COLUMNS = [
    "row",
    "group",
    "column",
    "experiment",
    "variant",
    "metric",
    "n",
    "mean",
    "std",
    "min",
    "max",
    "text",
    "paper",
    "best",
]


def columns(table: dict, variants: list[str]) -> dict[str, tuple[str | None, str]]:
    """The layout's columns kept for this table: {header: (variant or None, metric)}."""
    if table["layout"] == DATASETS:
        headers = dict.fromkeys(h for row in table["rows"] for h in row.get("experiments", {}))
        return {h: (None, "avg_soup") for h in headers}
    keep = table.get("variants") or variants
    return {h: (v, m) for h, (v, m) in LAYOUTS[table["layout"]].items() if v is None or v in keep}


def row_experiments(row: dict) -> list[str]:
    """Every experiment a row shows."""
    return list(row["experiments"].values()) if "experiments" in row else [row["experiment"]]


def cell_experiment(row: dict, header: str) -> str | None:
    """The experiment of a row's cell in column ``header`` (``datasets`` rows: None where it has none)."""
    return row["experiments"].get(header) if "experiments" in row else row["experiment"]


def cell_variant(row: dict, variant: str | None) -> str | None:
    """The variant a cell shows: the column's, the row's own (``range``), or None (left empty)."""
    own = row.get("variant")
    if variant is None:
        return own
    return variant if own is None or own == variant else None


def _fmt(x: float, decimals: int) -> str:
    return f"{x:.{decimals}f}"


def _values(frame: pd.DataFrame, experiment: str, variant: str, metric: str) -> np.ndarray:
    sel = frame[(frame.experiment == experiment) & (frame.variant == variant) & (frame.metric == metric)]
    return sel.sort_values("seed")["value"].to_numpy(dtype=float)


def _stats(values: np.ndarray) -> dict:
    n = len(values)
    return {
        "n": n,
        "mean": values.mean() if n else np.nan,
        "std": values.std(ddof=1) if n > 1 else np.nan,
        "min": values.min() if n else np.nan,
        "max": values.max() if n else np.nan,
    }


def mean_std(stats: dict, decimals: int) -> str:
    """``x (y)`` for several seeds, ``x`` for one."""
    if not stats["n"]:
        return MISSING
    text = _fmt(stats["mean"], decimals)
    return text if stats["n"] == 1 else f"{text} ({_fmt(stats['std'], decimals)})"


def _cell(frame, experiment, variant, metric, table) -> dict:
    """The stats and text of one cell."""
    if metric in SOUPS and variant in table.get("repair", []):
        metric = f"{metric}_repair"
    decimals = table.get("decimals", 2)
    get = lambda m: _values(frame, experiment, variant, m)  # noqa: E731
    stats = _stats(get(metric))
    if metric == "mean" and table["layout"] == "range":
        lo, hi = get("min"), get("max")
        stats |= {"min": lo.min() if len(lo) else np.nan, "max": hi.max() if len(hi) else np.nan}
        lo_hi = f"[{_fmt(stats['min'], decimals)}, {_fmt(stats['max'], decimals)}]"
        text = f"{_fmt(stats['mean'], decimals)} {lo_hi}" if stats["n"] else MISSING
    elif metric == "population":
        text = MISSING if not stats["n"] else f"{stats['mean']:g}"
    elif metric == "greedy_soup_size":
        p = get("population")
        k = stats["mean"]
        text = MISSING if not stats["n"] else f"{k:.{0 if k == round(k) else 1}f} (out of {p.max():g})"
    else:
        text = mean_std(stats, decimals)
    return {"metric": metric, **stats, "text": text}


def _best(cells: list[dict]) -> None:
    """Mark the best ensemble and the best soup of one row."""
    for group in (("ensemble",), tuple(m for s in SOUPS for m in (s, f"{s}_repair"))):
        scored = [c for c in cells if c["metric"] in group and c["n"]]
        if scored:
            top = max(c["mean"] for c in scored)
            for c in scored:
                c["best"] = c["mean"] == top


def cells(table: dict, frame: pd.DataFrame, variants: list[str], seeds: list[int]) -> pd.DataFrame:
    """One record per (row, column): the machine-readable table (columns ``CSV_COLUMNS``)."""
    frame = frame[frame.seed.isin(seeds)]
    reported = paper.values(table["paper"]) if table.get("paper") else {}
    records = []
    for row in table["rows"]:
        row_cells = []
        for header, (variant, metric) in columns(table, variants).items():
            experiment = cell_experiment(row, header)
            v = cell_variant(row, variant) if experiment is not None else None
            base = {
                "row": row["label"],
                "group": row.get("group"),
                "column": header,
                "experiment": experiment,
                "variant": v,
            }
            if v is None:
                cell = {"metric": metric, **_stats(np.array([])), "text": ""}
            else:
                cell = _cell(frame, experiment, v, metric, table)
            row_cells.append(base | cell | {"paper": reported.get((row["label"], header)), "best": False})
        if table["layout"] in HIGHLIGHT:
            _best(row_cells)
        records += row_cells
    return pd.DataFrame(records, columns=CSV_COLUMNS)


def markdown(table: dict, grid: pd.DataFrame, seeds: list[int]) -> str:
    """The Markdown table (with its caption and notes) of a ``cells`` frame."""
    headers = list(dict.fromkeys(grid["column"]))
    body, group = [], None
    for label, row in grid.groupby("row", sort=False):
        row = row.set_index("column").loc[headers]
        if isinstance(row["group"].iloc[0], str) and row["group"].iloc[0] != group:
            group = row["group"].iloc[0]
            body.append([f"**{group}**"] + [""] * len(headers))
        body.append([label] + [f"**{c.text}**" if c.best else c.text for c in row.itertuples()])
        if row["paper"].map(lambda v: isinstance(v, str)).any():
            body.append([f"{label} (paper)"] + [v if isinstance(v, str) else "" for v in row["paper"]])
    text = tabulate(
        body,
        headers=[LABEL, *headers],
        tablefmt="pipe",
        disable_numparse=True,
        colalign=("left",) + ("right",) * len(headers),
    )
    title = f"**{table['name']}**" + (f": {table['caption']}" if table.get("caption") else "")
    what = "greedy-soup size k of p members" if table["layout"] == "greedy_sizes" else "test accuracy (%)"
    spread = "mean (standard deviation)" if table["layout"] != "greedy_sizes" else "mean"
    seeds_text = f"{spread} over seeds {', '.join(map(str, seeds))}" if len(seeds) > 1 else f"seed {seeds[0]}"
    notes = [f"{what.capitalize()}; {seeds_text}"]
    if table["layout"] == "range":
        notes.append("[min, max] over the members of all seeds")
    if table["layout"] in HIGHLIGHT:
        notes.append("bold: best ensemble and best soup of each row")
    repaired = [v for v in table.get("repair", []) if v in set(grid["variant"].dropna())]
    if repaired and table["layout"] != "greedy_sizes":
        notes.append(f"soups with REPAIR for {', '.join(VARIANT_NAMES[v] for v in repaired)}")
    if table.get("paper"):
        notes.append(f"rows '(paper)': values reported in the paper ({table['paper']})")
    return f"{title}\n\n{text}\n\n{'; '.join(notes)}.\n"


def render(
    table: dict, frame: pd.DataFrame, variants: list[str], seeds: list[int], md: str | Path, csv: str | Path
) -> None:
    """Write table ``table`` (a config entry) from the tidy ``frame`` as Markdown and CSV."""
    grid = cells(table, frame, variants, seeds)
    for path in (md, csv):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(md).write_text(markdown(table, grid, seeds))
    grid.to_csv(csv, index=False)
