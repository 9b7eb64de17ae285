"""Every cell of every table layout recomputed from the per-seed metrics and compared with what `papa render`
writes (the Markdown a reader sees, and the CSV): the tidy frame of `papa aggregate`, then each layout of
papa/report/tables.py (main, detailed, range, greedy_sizes, mean_soup, segmentation, side_by_side, similarity,
datasets).

The expected cells are computed here, from the dictionaries the metrics files are written from, with the
formulas the tables promise: mean and sample standard deviation (ddof = 1) over the config's seeds, the mean of
the population means with the extremes over every member of every seed, the mean greedy-soup size out of p,
REPAIRed soups for the table's ``repair`` variants, bold for the best ensemble and the best soup of a row. The
values are irregular (the mean is not the median, the sample std is not the population one, the extremes over
all members are not the means of the per-seed extremes), and a seed outside the config's is on disk too."""

import json
import random
import statistics

import pandas as pd
import pytest

from papa.report import aggregate, tables

SEEDS = [1, 2, 3]
ON_DISK = [*SEEDS, 9]  # seed 9 is not the config's: no cell may use it
VARIANTS = ["baseline", "papa", "papa-all", "papa-2"]
NAMES = {"baseline": "Baseline", "papa": "PAPA", "papa-all": "PAPA-all", "papa-2": "PAPA-2"}
SOUPS = ["avg_soup", "greedy_soup", "avg_soup_repair", "greedy_soup_repair"]
CLASSES = ["impervious_surfaces", "building", "low_vegetation", "tree", "car", "clutter"]
F1_HEADERS = {"Roads": "impervious_surfaces", "Buildings": "building", "Vegetation": "low_vegetation",
              "Trees": "tree", "Cars": "car", "Clutter": "clutter", "Average F1": "average"}
POPULATION = {"e1": 4, "e2": 8, "seg": 5}
MISSING = "—"


def runs_on_disk() -> list[tuple[str, str, int]]:
    """(experiment, variant, seed) of every metrics.json: all of e1 and seg; e2 lacks PAPA-all entirely and
    has PAPA-2 for seed 2 only (cells of no seed, and of one seed)."""
    out = []
    for e in POPULATION:
        for v in VARIANTS:
            seeds = {"papa-all": [], "papa-2": [2]}.get(v, ON_DISK) if e == "e2" else ON_DISK
            out += [(e, v, s) for s in seeds]
    return out


def metrics_of(e: str, v: str, s: int) -> dict:
    """One run's metrics.json, irregular numbers drawn from a generator seeded by the run."""
    rng = random.Random(f"{e}/{v}/{s}")
    p = POPULATION[e]
    members = [round(rng.uniform(70, 96), 3) for _ in range(p)]
    m = {"experiment": e, "variant": v, "seed": s, "population": p, "members": members,
         "mean": statistics.fmean(members), "min": min(members), "max": max(members),
         "std": statistics.pstdev(members), "ensemble": round(rng.uniform(85, 97), 3),
         **{k: round(rng.uniform(10, 97), 3) for k in SOUPS},
         "greedy_soup_size": rng.randint(1, p), "greedy_soup_members": [0], "soups_aligned": False,
         "val_members": members}
    if e == "seg":
        for model in ("mean", "ensemble", *SOUPS):
            f1 = [round(rng.uniform(30, 95), 3) for _ in CLASSES]
            m |= {f"{model}_f1_{c}": x for c, x in zip(CLASSES, f1, strict=True)}
            m[f"{model}_f1_average"] = statistics.fmean(f1)
    return m


def similarity_of(e: str, v: str, s: int) -> dict:
    rng = random.Random(f"similarity/{e}/{v}/{s}")
    stages = [f"layer{k}" for k in range(1, 5)]
    return {"experiment": e, "variant": v, "seed": s, "stages": stages,
            "between_networks": {st: round(rng.uniform(20, 99), 3) for st in stages},
            "network_and_avg_soup": {st: round(rng.uniform(20, 99), 3) for st in stages},
            "aligned": True, "repaired": True, "repair_iters": 5, "test_images": 100}


RAW = {run: metrics_of(*run) for run in runs_on_disk()}
SIMILARITY = {run: similarity_of(*run) for run in runs_on_disk() if run[0] == "e1"}


@pytest.fixture(scope="module")
def frame(tmp_path_factory):
    results = tmp_path_factory.mktemp("results")
    for (e, v, s), m in RAW.items():
        path = aggregate.run_dir(results, e, v, s)
        path.mkdir(parents=True)
        (path / "metrics.json").write_text(json.dumps(m))
        if (e, v, s) in SIMILARITY:
            (path / "similarity.json").write_text(json.dumps(SIMILARITY[e, v, s]))
    return aggregate.aggregate(aggregate.find_metrics(results))


# the expected cells, from RAW -------------------------------------------------------------------------------
def values(e: str, v: str, key: str) -> list[float]:
    """``key`` of every config seed's run; a dotted key reads similarity.json's mappings."""
    out = []
    for s in SEEDS:
        if key.count(".") == 1 and (e, v, s) in SIMILARITY:
            measure, stage = key.split(".")
            out.append(SIMILARITY[e, v, s][measure][stage])
        elif (e, v, s) in RAW and "." not in key:
            out.append(RAW[e, v, s][key])
    return out


def mean_std(xs: list[float], decimals: int = 2) -> str:
    if not xs:
        return MISSING
    text = f"{statistics.fmean(xs):.{decimals}f}"
    return text if len(xs) == 1 else f"{text} ({statistics.stdev(xs):.{decimals}f})"


def soup_key(key: str, v: str, repair: list[str]) -> str:
    return f"{key}_repair" if key in ("avg_soup", "greedy_soup") and v in repair else key


def bold_best(row: dict[str, str], means: dict[str, list[float]], kinds: dict[str, str]) -> dict[str, str]:
    """Bold the best ensemble and the best soup of a row: the highest mean over seeds among the cells of each
    kind (``kinds``: header -> 'ensemble' or 'soup'; ``means``: header -> the values over seeds)."""
    out = dict(row)
    for kind in ("ensemble", "soup"):
        scored = {h: statistics.fmean(xs) for h, xs in means.items() if kinds[h] == kind and xs}
        for h, x in scored.items():
            if x == max(scored.values()):
                out[h] = f"**{row[h]}**"
    return out


# reading what render wrote ----------------------------------------------------------------------------------
def render(table: dict, frame, tmp_path, variants=VARIANTS) -> tuple[pd.DataFrame, str]:
    md, csv = tmp_path / f"{table['name']}.md", tmp_path / f"{table['name']}.csv"
    tables.render(table, frame, variants, SEEDS, md, csv)
    return pd.read_csv(csv, keep_default_na=False), md.read_text()


def markdown_rows(md: str) -> list[list[str]]:
    """The cells of every line of the Markdown table, header first (separator line left out)."""
    lines = [line for line in md.splitlines() if line.startswith("|")]
    return [[c.strip() for c in line.strip().strip("|").split("|")] for i, line in enumerate(lines) if i != 1]


def check(table: dict, frame, tmp_path, expected: dict[str, dict[str, str]], variants=VARIANTS,
          stats: dict | None = None) -> None:
    """The rendered Markdown is exactly ``expected`` ({row label: {header: text}}, in order, bold included),
    and the CSV's text, mean and std columns agree with it and with ``stats`` ({(row, header): values})."""
    grid, md = render(table, frame, tmp_path, variants)
    rows = markdown_rows(md)
    headers = list(next(iter(expected.values())))
    # the Markdown spells the column keys out (``PAPA Avg``: ``PAPA Average soup``)
    assert rows[0] == ["Model", *(" ".join(filter(None, tables.header(table, h))) for h in headers)]
    body = [r for r in rows[1:] if not r[0].startswith("**")]  # group headings left out
    assert [r[0] for r in body] == list(expected)
    for r in body:
        # a cell at chance level carries a dagger (its CSV record says ``chance``)
        shown = dict(zip(headers, r[1:], strict=True))
        for h, text in shown.items():
            record = grid[(grid["row"] == r[0]) & (grid["column"] == h)].iloc[0]
            assert text.endswith("†") == (str(record["chance"]) == "True"), (r[0], h)
        assert {h: t.removesuffix("†") for h, t in shown.items()} == expected[r[0]], r[0]
    for label, cells in expected.items():
        for header, text in cells.items():
            record = grid[(grid["row"] == label) & (grid["column"] == header)].iloc[0]
            assert record["text"] == text.strip("*"), (label, header)
            assert str(record["best"]) == str(text.startswith("**")), (label, header)
    for (label, header), xs in (stats or {}).items():
        record = grid[(grid["row"] == label) & (grid["column"] == header)].iloc[0]
        assert float(record["mean"]) == pytest.approx(statistics.fmean(xs), rel=0, abs=1e-9)
        if len(xs) > 1:
            assert float(record["std"]) == pytest.approx(statistics.stdev(xs), rel=0, abs=1e-9)
            assert statistics.stdev(xs) != pytest.approx(statistics.pstdev(xs), abs=1e-4)


# the tests --------------------------------------------------------------------------------------------------
def test_aggregate_has_one_row_per_numeric_scalar_of_every_file(frame):
    """Every number of a metrics.json or similarity.json (mappings flattened to dotted names) is one row; lists,
    flags and the seed are not metrics."""
    expected = set()
    for files in (RAW, SIMILARITY):
        for (e, v, s), data in files.items():
            flat = {f"{key}.{k}": x for key, d in data.items() if isinstance(d, dict) for k, x in d.items()}
            for key, x in {**data, **flat}.items():
                if key != "seed" and isinstance(x, int | float) and not isinstance(x, bool):
                    expected.add((e, v, s, key, float(x)))
    got = set(frame[aggregate.COLUMNS[:5]].itertuples(index=False, name=None))
    assert got == expected and set(frame["code"]) == {""}  # these files record no code version
    assert len(frame) == len(expected)
    assert {"members", "greedy_soup_members", "val_members", "soups_aligned", "seed"}.isdisjoint(set(frame.metric))


def test_main_layout(frame, tmp_path):
    """Table 1: Baseline Ensemble and GreedySoup, then Ensemble and AvgSoup of each PAPA variant; PAPA-all's
    soups REPAIRed; bold: the best ensemble and the best soup of each row."""
    cols = {"Baseline Ensemble": ("baseline", "ensemble"), "Baseline GreedySoup": ("baseline", "greedy_soup"),
            **{f"{NAMES[v]} {n}": (v, k) for v in VARIANTS[1:] for n, k in (("Ensemble", "ensemble"),
                                                                              ("AvgSoup", "avg_soup"))}}
    repair = ["papa-all"]
    rows = [{"label": "One", "experiment": "e1", "group": "G"}, {"label": "Two", "experiment": "e2"},
            {"label": "None", "experiment": "nowhere"}]
    kinds = {h: "ensemble" if k == "ensemble" else "soup" for h, (_, k) in cols.items()}
    expected, stats = {}, {}
    for row in rows:
        xs = {h: values(row["experiment"], v, soup_key(k, v, repair)) for h, (v, k) in cols.items()}
        expected[row["label"]] = bold_best({h: mean_std(x) for h, x in xs.items()}, xs, kinds)
        stats |= {(row["label"], h): x for h, x in xs.items() if x}
    assert expected["Two"]["PAPA-all Ensemble"] == MISSING and "(" not in expected["Two"]["PAPA-2 AvgSoup"]
    table = {"name": "main", "layout": "main", "rows": rows, "repair": repair}
    check(table, frame, tmp_path, expected, stats=stats)
    assert "**G**" in render(table, frame, tmp_path)[1]


def test_detailed_layout_with_a_variant_subset(frame, tmp_path):
    """Tables 6-9: Ens, Avg and Greed of every variant the table shows (here the table's own subset)."""
    shown, repair = ["baseline", "papa-2"], ["baseline"]
    cols = {f"{NAMES[v]} {n}": (v, k) for v in shown for n, k in (("Ens", "ensemble"), ("Avg", "avg_soup"),
                                                                   ("Greed", "greedy_soup"))}
    rows = [{"label": "One", "experiment": "e1"}, {"label": "Two", "experiment": "e2"}]
    kinds = {h: "ensemble" if k == "ensemble" else "soup" for h, (_, k) in cols.items()}
    expected = {}
    for row in rows:
        xs = {h: values(row["experiment"], v, soup_key(k, v, repair)) for h, (v, k) in cols.items()}
        expected[row["label"]] = bold_best({h: mean_std(x) for h, x in xs.items()}, xs, kinds)
    check({"name": "detailed", "layout": "detailed", "rows": rows, "repair": repair, "variants": shown},
          frame, tmp_path, expected)


def test_range_layout(frame, tmp_path):
    """Tables 12, 14-17: p, mean [min, max] (the mean of the population means over seeds, the extremes over
    every member of every seed), AvgSoup and GreedySoup of the row's variant."""
    rows = [{"label": "Baseline", "experiment": "e1", "variant": "baseline"},
            {"label": "PAPA-2 (p=8)", "experiment": "e2", "variant": "papa-2"},
            {"label": "PAPA-all (p=8)", "experiment": "e2", "variant": "papa-all"},
            {"label": "PAPA-all", "experiment": "e1", "variant": "papa-all"}]
    expected, stats = {}, {}
    for row in rows:
        e, v = row["experiment"], row["variant"]
        means = values(e, v, "mean")
        everyone = [x for s in SEEDS if (e, v, s) in RAW for x in RAW[e, v, s]["members"]]
        span = f"{statistics.fmean(means):.1f} [{min(everyone):.1f}, {max(everyone):.1f}]" if means else MISSING
        expected[row["label"]] = {"p": f"{POPULATION[e]}" if means else MISSING, "mean [min, max]": span,
                                  "AvgSoup": mean_std(values(e, v, soup_key("avg_soup", v, ["papa-all"])), 1),
                                  "GreedySoup": mean_std(values(e, v, soup_key("greedy_soup", v, ["papa-all"])), 1)}
        if len(means) > 1:
            stats[row["label"], "mean [min, max]"] = means
            # the extremes over all members are not the means of the per-seed extremes
            assert min(everyone) != pytest.approx(statistics.fmean(values(e, v, "min")), abs=1e-3)
    table = {"name": "range", "layout": "range", "rows": rows, "decimals": 1, "repair": ["papa-all"]}
    check(table, frame, tmp_path, expected, stats=stats)


def test_greedy_sizes_layout(frame, tmp_path):
    """Table 18: the mean greedy-soup size over seeds, k (out of p): whole k without decimals, else one."""
    def text(e, v):
        sizes = values(e, v, "greedy_soup_size")
        if not sizes:
            return MISSING
        k = statistics.fmean(sizes)
        return f"{k:.0f} (out of {POPULATION[e]})" if k == int(k) else f"{k:.1f} (out of {POPULATION[e]})"

    rows = [{"label": "One", "experiment": "e1"}, {"label": "Two", "experiment": "e2"}]
    expected = {r["label"]: {f"{NAMES[v]} GreedySoup": text(r["experiment"], v) for v in VARIANTS} for r in rows}
    fractional = [t for cells in expected.values() for t in cells.values() if "." in t]
    assert fractional and any("." not in t and t != MISSING for cells in expected.values() for t in cells.values())
    check({"name": "sizes", "layout": "greedy_sizes", "rows": rows, "repair": ["papa"]}, frame, tmp_path, expected)


def test_mean_soup_layout(frame, tmp_path):
    """A.10, Table 2: the population mean and the average soup of every variant."""
    rows = [{"label": "One", "experiment": "e1"}]
    expected = {"One": {f"{NAMES[v]} {n}": mean_std(values("e1", v, k), 3) for v in VARIANTS
                        for n, k in (("Mean", "mean"), ("AvgSoup", "avg_soup"))}}
    check({"name": "mean_soup", "layout": "mean_soup", "rows": rows, "decimals": 3}, frame, tmp_path, expected)


def test_segmentation_layout(frame, tmp_path):
    """Tables 10-11: pixel accuracy, the six F1-scores and their average, of the row's model (population mean,
    ensemble, average or greedy soup; the soups REPAIRed for the table's ``repair`` variants)."""
    rows = [{"label": f"{NAMES[v]}: {model}", "experiment": "seg", "variant": v, "model": model}
            for v in ("baseline", "papa-2") for model in ("mean", "ensemble", "avg_soup", "greedy_soup")]
    repair = ["baseline"]
    expected = {}
    for row in rows:
        v, model = row["variant"], soup_key(row["model"], row["variant"], repair)
        expected[row["label"]] = {"Accuracy": mean_std(values("seg", v, model)),
                                  **{h: mean_std(values("seg", v, f"{model}_f1_{c}")) for h, c in F1_HEADERS.items()}}
    check({"name": "seg", "layout": "segmentation", "rows": rows, "repair": repair}, frame, tmp_path, expected)


def test_side_by_side_layout(frame, tmp_path):
    """Table 13: config rows sharing a label fill their column group of one displayed row: Mean, Avg and Greed."""
    rows = [{"label": "Baseline", "experiment": "e1", "variant": "baseline", "columns": "Without SWA"},
            {"label": "Baseline", "experiment": "e2", "variant": "baseline", "columns": "With SWA"},
            {"label": "PAPA-all", "experiment": "e1", "variant": "papa-all", "columns": "With SWA"}]
    groups = ["Without SWA", "With SWA"]
    expected = {}
    for row in rows:
        cells = expected.setdefault(row["label"], {f"{g} {n}": "" for g in groups for n in ("Mean", "Avg", "Greed")})
        for n, k in (("Mean", "mean"), ("Avg", "avg_soup"), ("Greed", "greedy_soup")):
            cells[f"{row['columns']} {n}"] = mean_std(values(row["experiment"], row["variant"], k))
    grid, md = render({"name": "sbs", "layout": "side_by_side", "rows": rows}, frame, tmp_path)
    body = markdown_rows(md)
    table = {"layout": "side_by_side", "rows": rows}
    assert body[0] == ["Model", *(" ".join(tables.header(table, h)) for h in expected["Baseline"])]
    assert {r[0]: dict(zip(expected["Baseline"], r[1:], strict=True)) for r in body[1:]} == expected
    for row in rows:
        for n in ("Mean", "Avg", "Greed"):
            header = f"{row['columns']} {n}"
            record = grid[(grid["row"] == row["label"]) & (grid["column"] == header)].iloc[0]
            assert record["text"] == expected[row["label"]][header]


def test_similarity_layout(frame, tmp_path):
    """Table 5: per row a heading, then one line per measure over layers 1-4, each cell the mean (std) over
    seeds of the runs' similarity.json values."""
    rows = [{"label": NAMES[v], "experiment": "e1", "variant": v} for v in ("baseline", "papa-2")]
    _, md = render({"name": "sim", "layout": "similarity", "rows": rows}, frame, tmp_path)
    lines = markdown_rows(md)
    assert lines[0] == ["Layer", "Layer 1", "Layer 2", "Layer 3", "Layer 4"]
    expected = []
    for row in rows:
        expected.append([f"**{row['label']}**", "", "", "", ""])
        for title, key in (("Between two networks", "between_networks"),
                           ("Between one network and the average soup", "network_and_avg_soup")):
            expected.append([title, *(mean_std(values("e1", row["variant"], f"{key}.layer{k}")) for k in range(1, 5))])
    assert lines[1:] == expected


def test_datasets_layout(frame, tmp_path):
    """Table 3: one column per dataset (each its own experiment), the rows' average soups (REPAIRed for the
    table's ``repair`` variants); a row without an experiment for a column leaves it empty."""
    rows = [{"label": "PAPA", "variant": "papa", "experiments": {"D1": "e1", "D2": "e2"}},
            {"label": "PAPA-2", "variant": "papa-2", "experiments": {"D1": "e1", "D2": "e2"}},
            {"label": "Baseline", "variant": "baseline", "experiments": {"D2": "e2"}}]
    expected = {r["label"]: {d: mean_std(values(r["experiments"][d], r["variant"], soup_key("avg_soup", r["variant"],
                                                                                             ["papa-2"])))
                             if d in r["experiments"] else "" for d in ("D1", "D2")} for r in rows}
    check({"name": "datasets", "layout": "datasets", "rows": rows, "repair": ["papa-2"]}, frame, tmp_path, expected)
