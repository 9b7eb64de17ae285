"""Tables rendered from the tidy metrics frame: Markdown for people, CSV for machines.

A table entry of the config names a ``layout`` and lists ``rows`` ({label, experiment, variant?,
group?}); the layout fixes the columns. Column headers (also the ``column`` key of the paper CSVs
``papa/report/paper/<id>.csv``, header ``row,column,value``, ``row`` = the row ``label``):

- ``main`` (Table 1): ``Baseline Ensemble``, ``Baseline GreedySoup``, then ``<V> Ensemble`` and
  ``<V> AvgSoup`` for V in ``PAPA``, ``PAPA-all``, ``PAPA-2``.
- ``detailed`` (Tables 6-9): ``<V> Ens``, ``<V> Avg``, ``<V> Greed`` for every variant V
  (``Baseline``, ``PAPA``, ``PAPA-all``, ``PAPA-2``).
- ``range`` (Tables 12, 14-17): ``p``, ``mean [min, max]``, ``AvgSoup``, ``GreedySoup``; each row names
  its ``variant`` (default ``baseline``).
- ``greedy_sizes`` (Table 18): ``<V> GreedySoup`` for every variant V, cells ``k (out of p)``.
- ``mean_soup`` (A.10, Table 2): ``<V> Mean`` (population mean) and ``<V> AvgSoup`` for every variant V.

A table's ``variants`` (optional) keeps only the columns of those variants. Cells read ``x (y)``: the
mean (standard deviation) over seeds, or ``x`` for a single seed; ``range`` cells read
``mean [min, max]`` over all members of all seeds. A paper ``value`` is the cell's text as printed in
the paper (e.g. ``95.2 (0.1)``, ``80.21 [80.05, 80.46]``, ``1 (out of 10)``); it is shown in a row
``<label> (paper)`` right under ours.
"""

from __future__ import annotations

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
LAYOUTS = {
    "main": MAIN,
    "detailed": DETAILED,
    "range": RANGE,
    "greedy_sizes": GREEDY_SIZES,
    "mean_soup": MEAN_SOUP,
}
LABEL = "Model"
"""Header of the first (row label) column."""
