"""Reports from fake metrics.json / history.csv files: aggregation, cell formatting, paper values,
figures, the plan of runs, and the report subcommands."""

import json
import re

import numpy as np
import pandas as pd
import pytest

from papa import config as cfg
from papa.errors import PapaError
from papa.report import aggregate, figures, paper, plan, tables
from tests.helpers import REPO as REPO_ROOT

VARIANTS = ["baseline", "papa", "papa-all", "papa-2"]
SEEDS = [1, 2, 3]


def fake_metrics(path, experiment, variant, seed, **override):
    members = [90.0 + seed, 91.0 + seed, 92.0 + seed, 93.0 + seed]
    data = {
        "experiment": experiment,
        "variant": variant,
        "seed": seed,
        "population": 4,
        "members": members,
        "mean": float(np.mean(members)),
        "min": min(members),
        "max": max(members),
        "std": float(np.std(members)),
        "ensemble": 94.0 + seed,
        "avg_soup": 80.0 + seed,
        "greedy_soup": 93.0,
        "greedy_soup_size": 1,
        "avg_soup_repair": 85.0 + seed,
        "greedy_soup_repair": 93.5,
        "greedy_soup_members": [0],
        "val_members": members,
    } | override
    file = aggregate.run_dir(path, experiment, variant, seed) / "metrics.json"
    file.parent.mkdir(parents=True, exist_ok=True)
    file.write_text(json.dumps(data))
    return file


@pytest.fixture
def frame(tmp_path):
    for v in VARIANTS:
        for s in SEEDS:
            extra = {"avg_soup": 96.0 + s / 10, "greedy_soup_size": s} if v == "papa" else {}
            fake_metrics(tmp_path / "results", "exp", v, s, **extra)
    return aggregate.aggregate(aggregate.find_metrics(tmp_path / "results"))


def table(layout, **kw):
    rows = kw.pop("rows", [{"label": "CNN", "experiment": "exp"}])
    return {"name": "t", "layout": layout, "caption": "A caption.", "rows": rows} | kw


def cell(grid, column, row="CNN"):
    return grid[(grid["row"] == row) & (grid["column"] == column)].iloc[0]


def test_aggregate_is_tidy_and_round_trips(frame, tmp_path):
    numeric = {
        "population",
        "mean",
        "min",
        "max",
        "std",
        "ensemble",
        "avg_soup",
        "greedy_soup",
        "greedy_soup_size",
        "avg_soup_repair",
        "greedy_soup_repair",
    }
    assert list(frame.columns) == aggregate.COLUMNS
    assert len(frame) == len(VARIANTS) * len(SEEDS) * len(numeric)
    assert set(frame.metric) == numeric
    assert not frame.duplicated(["experiment", "variant", "seed", "metric"]).any()
    back = aggregate.load(aggregate.write(frame, tmp_path / "m.csv"))
    pd.testing.assert_frame_equal(back, frame)


def test_aggregate_rejects_duplicates_and_unknown_runs(tmp_path):
    a = fake_metrics(tmp_path / "a", "exp", "papa", 1)
    b = fake_metrics(tmp_path / "b", "exp", "papa", 1)
    with pytest.raises(PapaError, match="two metrics files.*'papa', seed 1"):
        aggregate.aggregate([a, b])
    loose = tmp_path / "loose.json"
    loose.write_text(json.dumps({"mean": 1.0}))
    with pytest.raises(PapaError, match="cannot tell experiment"):
        aggregate.read_metrics(loose)


def test_a_run_is_read_from_the_last_three_folders_of_its_path():
    assert aggregate.run_of("exp/papa-2/seed3/metrics.json") == ("exp", "papa-2", 3)
    assert aggregate.run_of("results/exp/papa/seed12/similarity.json") == ("exp", "papa", 12)
    for path in ("papa/seed3/metrics.json", "exp/papa/seedx/metrics.json", "exp/papa/run3/metrics.json"):
        assert aggregate.run_of(path) is None


@pytest.mark.parametrize(("values", "std"), [([], np.nan), ([2.0], np.nan), ([1.0, 3.0], 2**0.5), ([1, 2, 3], 1.0)])
def test_the_std_over_seeds_is_the_sample_one_from_two_seeds_on(values, std):
    stats = aggregate.over_seeds(values)
    assert stats["n"] == len(values)
    assert stats["std"] == pytest.approx(std, nan_ok=True)


def test_a_csv_problem_names_its_line_and_an_empty_number_is_nan(tmp_path):
    kinds = {"epoch": int, "loss": float}
    path = tmp_path / "h.csv"
    path.write_text("epoch,loss\n1,0.5\n2,\n")
    frame = aggregate.read_csv(path, kinds, "history", "not found")
    assert frame["epoch"].tolist() == [1, 2] and np.isnan(frame["loss"][1])
    path.write_text("epoch,loss\n1,0.5\n,0.4\n")
    with pytest.raises(PapaError, match=r"h\.csv: line 3: epoch: '' is not an integer"):
        aggregate.read_csv(path, kinds, "history", "not found")
    path.write_text("epoch,loss\n1,0.5\n2,0.4,9\n")
    with pytest.raises(PapaError, match=r"h\.csv: line 3 has 3 fields, the header 2"):
        aggregate.read_csv(path, kinds, "history", "not found")


def test_main_cells_are_mean_and_sample_std(frame):
    grid = tables.cells(table("main"), frame, VARIANTS, SEEDS)
    assert list(grid["column"]) == list(tables.MAIN)
    # ensemble 95, 96, 97 over seeds: mean 96, sample std 1
    assert cell(grid, "Baseline Ensemble")["text"] == "96.00 (1.00)"
    assert cell(grid, "Baseline GreedySoup")["text"] == "93.00 (0.00)"
    assert cell(grid, "PAPA AvgSoup")["text"] == "96.20 (0.10)"
    assert cell(grid, "PAPA-2 AvgSoup")["text"] == "82.00 (1.00)"
    one = tables.cells(table("main", decimals=1), frame, VARIANTS, [2])
    assert cell(one, "Baseline Ensemble")["text"] == "96.0"
    assert cell(one, "PAPA AvgSoup")["mean"] == pytest.approx(96.2)


def test_best_ensemble_and_soup_are_bold(frame, tmp_path):
    t = table("main")
    tables.render(t, frame, VARIANTS, SEEDS, tmp_path / "t.md", tmp_path / "t.csv")
    md = (tmp_path / "t.md").read_text()
    assert " **96.20 (0.10)** |" in md  # PAPA AvgSoup beats every other soup
    assert md.count("**96.00 (1.00)**") == 4  # four equal ensembles: all best
    assert md.startswith("**t**: A caption.")
    assert "mean (standard deviation) over seeds 1, 2, 3" in md
    machine = pd.read_csv(tmp_path / "t.csv")
    assert list(machine.columns) == tables.CSV_COLUMNS
    assert machine.loc[machine.column == "PAPA AvgSoup", "best"].item()


def md_headers(md: str) -> list[str]:
    """The header cells of a rendered Markdown table."""
    line = next(line for line in md.splitlines() if line.startswith("| "))
    return [c.strip() for c in line.strip("|").split("|")]


SPELLED_OUT = {  # (group, measure): the Markdown header reads "group measure", the HTML groups the measures
    "main": [("Baseline", "Ensemble"), ("Baseline", "Greedy soup"), ("PAPA", "Ensemble"), ("PAPA", "Average soup")],
    "detailed": [("Baseline", "Ensemble"), ("Baseline", "Average soup"), ("PAPA-2", "Greedy soup")],
    "range": [("", "Population size p"), ("", "Members: mean [min, max]"), ("", "Average soup"),
              ("", "Greedy soup")],
    "greedy_sizes": [("Baseline", "Greedy soup size"), ("PAPA-2", "Greedy soup size")],
    "mean_soup": [("Baseline", "Population mean"), ("Baseline", "Average soup"), ("PAPA-all", "Population mean")],
    "side_by_side": [("SWA", "Population mean"), ("SWA", "Average soup"), ("SWA", "Greedy soup")],
}


@pytest.mark.parametrize("layout", sorted(SPELLED_OUT))
def test_headers_are_spelled_out_in_every_layout(frame, tmp_path, layout):
    """Markdown and HTML headers read "Average soup", "Greedy soup", ... ; the CSV keeps the paper's keys."""
    row = {"label": "CNN", "experiment": "exp"}
    row |= {"variant": "papa"} if layout in tables.OWN_VARIANT else {}
    row |= {"columns": "SWA"} if layout == "side_by_side" else {}
    t = table(layout, rows=[row])
    tables.render(t, frame, VARIANTS, SEEDS, tmp_path / "t.md", tmp_path / "t.csv", tmp_path / "t.html")
    headers = md_headers((tmp_path / "t.md").read_text())
    html = (tmp_path / "t.html").read_text()
    for group, measure in SPELLED_OUT[layout]:
        assert f"{group} {measure}".strip() in headers
        assert f">{measure}</th>" in html
        assert not group or re.search(rf'<th scope="colgroup" colspan="\d">{re.escape(group)}</th>', html)
    abbreviations = {"Ens", "Avg", "Greed", "AvgSoup", "GreedySoup", "Mean"}
    assert not {word for h in headers for word in h.split()} & abbreviations
    assert not {"p", "mean [min, max]"} & set(headers)
    keys = set(pd.read_csv(tmp_path / "t.csv")["column"])
    assert keys == set(tables.columns(t, VARIANTS, row))  # the paper CSVs' keys, unchanged


def test_similarity_measures_are_spelled_out(tmp_path):
    frame = pd.DataFrame(
        [("exp", "papa", 1, f"{m}.layer{k}", 90.0 + k) for m in ("between_networks", "network_and_avg_soup")
         for k in range(1, 5)], columns=aggregate.COLUMNS[:5])
    t = table("similarity", rows=[{"label": "PAPA", "experiment": "exp", "variant": "papa"}])
    tables.render(t, frame, VARIANTS, [1], tmp_path / "t.md", tmp_path / "t.csv", tmp_path / "t.html")
    for path in ("t.md", "t.html"):
        text = (tmp_path / path).read_text()
        assert "Between one network and the average soup" in text and "AvgSoup" not in text


@pytest.mark.parametrize(("accuracy", "classes", "chance"), [
    (9.75, 10, True), (11.98, 10, True), (15.5, 10, False), (41.2, 10, False), (98.0, 10, False),
    (1.0, 100, True), (1.9, 100, True), (2.5, 100, False), (0.1, 1000, True), (52.0, 2, True), (60.0, 2, False),
    (10.0, float("nan"), False), (15.0, 10, True), (15.02, 10, False), (50.0, 0, False),  # 15: the bound itself
    (55.5, 2, False),
])
def test_chance_level(accuracy, classes, chance):
    assert tables.at_chance(accuracy, classes) is chance


def test_a_soup_at_chance_level_is_marked(tmp_path):
    """The baseline's average soup of a 10-class problem at 9.75% gets the mark and a footnote; a cell of a
    run that does not say its number of classes is left alone."""
    for s in SEEDS:
        fake_metrics(tmp_path / "results", "exp", "baseline", s, avg_soup=9.5 + s / 10, num_classes=10)
        fake_metrics(tmp_path / "results", "exp", "papa", s, avg_soup=96.0, num_classes=10)
        fake_metrics(tmp_path / "results", "old", "baseline", s, avg_soup=10.0)  # no num_classes
    frame = aggregate.aggregate(aggregate.find_metrics(tmp_path / "results"))
    rows = [{"label": "Baseline", "experiment": "exp", "variant": "baseline"},
            {"label": "PAPA", "experiment": "exp", "variant": "papa"},
            {"label": "Old", "experiment": "old", "variant": "baseline"}]
    t = table("range", rows=rows)
    tables.render(t, frame, VARIANTS, SEEDS, tmp_path / "t.md", tmp_path / "t.csv", tmp_path / "t.html")
    md = (tmp_path / "t.md").read_text()
    assert "| 9.70 (0.10)† |" in md.replace("  ", "").replace("| ", "|").replace("|", "| ")  # noqa: E501
    assert md.count(tables.CHANCE_MARK) == 2  # the cell and its footnote
    assert md.splitlines()[-1] == "† at chance level (1/classes: 10% for 10 classes)"
    machine = pd.read_csv(tmp_path / "t.csv")
    marked = machine[machine.chance]
    assert list(zip(marked.row, marked.column, strict=True)) == [("Baseline", "AvgSoup")]
    assert marked["classes"].item() == 10
    html = (tmp_path / "t.html").read_text()
    assert '<td class="chance" title="at chance level">9.70 (0.10)†</td>' in html
    assert "at chance level (1/classes: 10% for 10 classes)" in html


def test_each_layout_notes_what_its_cells_hold(frame, monkeypatch):
    """The notes under a table: bold marks only where cells are highlighted, the range's meaning, which soups were
    REPAIRed; a paper value with a note is marked and the note given as a footnote."""
    def notes(layout, **kw):
        t = table(layout, **kw)
        return tables.display(t, tables.cells(t, frame, VARIANTS, SEEDS), SEEDS).notes

    main, ranged = notes("main"), notes("range", rows=[{"label": "PAPA", "experiment": "exp", "variant": "papa"}])
    assert "bold: best ensemble and best soup of each row" in main and not any("[min, max]" in n for n in main)
    assert "[min, max] over the members of all seeds" in ranged and not any("bold" in n for n in ranged)
    assert "soups with REPAIR for Baseline" in notes("detailed", repair=["baseline"])
    assert not any("REPAIR" in n for n in notes("detailed"))
    text = "row,column,value\nCNN,PAPA AvgSoup,94.8\n"
    monkeypatch.setattr(paper, "values", lambda _: paper.parse(text, "test.csv"))
    monkeypatch.setattr(paper, "notes", lambda _: {("CNN", "PAPA AvgSoup"): "a re-run"})
    t = table("main", paper="table1")
    shown = tables.display(t, tables.cells(t, frame, VARIANTS, SEEDS), SEEDS)
    assert f"{tables.PAPER_MARK} paper value: a re-run" in shown.footnotes
    assert any(f"94.8{tables.PAPER_MARK}" in str(line) for line in shown.lines)


def test_one_seed_keeps_every_digit_and_similarity_has_four_stages(frame):
    """A one-seed cell is a bare number, which the Markdown table must not reformat (81.00 stays 81.00); the
    similarity layout has a column per ResNet stage and measure."""
    t = table("main")
    text = tables.markdown(t, tables.cells(t, frame, VARIANTS, [1]), [1])
    assert re.search(r"\| +81\.00 +\|", text)
    assert list(tables.columns(table("similarity"), VARIANTS)) == [
        f"{measure} Layer {k}" for measure in tables.SIMILARITY_MEASURES for k in (1, 2, 3, 4)]


def test_rows_keep_the_tables_order_and_a_group_is_its_longest_name(frame):
    """Rows are shown in the table's order, not sorted; side by side, a column belongs to the longest group name
    it starts with ("SWA long Average soup" to "SWA long", not "SWA")."""
    rows = [{"label": "PAPA", "experiment": "exp", "variant": "papa"},
            {"label": "Baseline", "experiment": "exp", "variant": "baseline"}]
    t = table("range", rows=rows)
    shown = tables.display(t, tables.cells(t, frame, VARIANTS, SEEDS), SEEDS)
    assert [line.label for line in shown.lines] == ["PAPA", "Baseline"]
    t = table("similarity", rows=rows)  # a heading per row, in the same order
    shown = tables.display(t, tables.cells(t, frame, VARIANTS, SEEDS), SEEDS)
    assert [line.label for line in shown.lines if line.kind == "heading"] == ["PAPA", "Baseline"]
    t = table("side_by_side", rows=[{"label": "CNN", "experiment": "exp", "variant": "papa", "columns": c}
                                    for c in ("SWA", "SWA long")])
    assert tables.header(t, "SWA long Avg") == ("SWA long", "Average soup")
    assert tables.header(t, "SWA Avg") == ("SWA", "Average soup")


def test_html_page_shows_the_table_with_the_papers_rows(frame, tmp_path, monkeypatch):
    """The HTML page holds the whole table: grouped headers, our row, the paper's row under it, the notes."""
    text = "row,column,value\nCNN,Baseline Ensemble,95.2 (0.1)\nCNN,PAPA AvgSoup,94.8\n"
    monkeypatch.setattr(paper, "values", lambda _: paper.parse(text, "test.csv"))
    t = table("main", paper="table1", rows=[{"label": "CNN", "experiment": "exp", "group": "Digits <8x8>"}])
    tables.render(t, frame, VARIANTS, SEEDS, tmp_path / "t.md", tmp_path / "t.csv", tmp_path / "t.html")
    html = (tmp_path / "t.html").read_text()
    assert html.startswith("<!DOCTYPE html>") and html.rstrip().endswith("</html>")
    assert '<p class="title"><strong>t</strong>: A caption.</p>' in html
    assert '<th scope="colgroup" colspan="2">Baseline</th>' in html
    assert '<th scope="colgroup" colspan="2">PAPA-all</th>' in html
    assert '<tr class="heading"><th scope="rowgroup" colspan="9">Digits &lt;8x8&gt;</th></tr>' in html
    ours = html.index('<tr class="ours"><th scope="row">CNN</th><td><strong>96.00 (1.00)</strong></td>')
    theirs = html.index('<tr class="paper"><th scope="row">CNN (paper)</th><td>95.2 (0.1)</td><td></td><td></td>'
                        "<td>94.8</td>")
    assert ours < theirs
    assert "values reported in the paper (table1)" in html


def test_detailed_layout_with_repair_and_variant_subset(frame):
    t = table("detailed", repair=["baseline"], variants=["baseline", "papa"])
    grid = tables.cells(t, frame, VARIANTS, SEEDS)
    assert list(grid["column"]) == [
        "Baseline Ens",
        "Baseline Avg",
        "Baseline Greed",
        "PAPA Ens",
        "PAPA Avg",
        "PAPA Greed",
    ]
    assert cell(grid, "Baseline Avg")["metric"] == "avg_soup_repair"
    assert cell(grid, "Baseline Avg")["text"] == "87.00 (1.00)"
    assert cell(grid, "PAPA Avg")["metric"] == "avg_soup"
    # config variants also limit the columns
    assert set(tables.cells(table("detailed"), frame, ["papa"], SEEDS)["variant"]) == {"papa"}


def test_range_and_greedy_sizes_and_mean_soup(frame):
    rows = [
        {"label": "Baseline", "experiment": "exp", "variant": "baseline"},
        {"label": "PAPA", "experiment": "exp", "variant": "papa"},
    ]
    grid = tables.cells(table("range", rows=rows), frame, VARIANTS, SEEDS)
    # member accuracies 91..94, 92..95, 93..96: mean of means 93.5, extremes over all seeds
    assert cell(grid, "mean [min, max]", "Baseline")["text"] == "93.50 [91.00, 96.00]"
    assert cell(grid, "p", "PAPA")["text"] == "4"
    assert cell(grid, "GreedySoup", "Baseline")["text"] == "93.00 (0.00)"
    sizes = tables.cells(table("greedy_sizes"), frame, VARIANTS, SEEDS)
    assert cell(sizes, "Baseline GreedySoup")["text"] == "1 (out of 4)"
    assert cell(sizes, "PAPA GreedySoup")["text"] == "2 (out of 4)"
    assert cell(tables.cells(table("greedy_sizes"), frame, VARIANTS, [1, 2]), "PAPA GreedySoup")["text"] == (
        "1.5 (out of 4)"
    )
    soup = tables.cells(table("mean_soup", variants=["baseline", "papa-all"]), frame, VARIANTS, [1])
    assert list(soup["column"]) == ["Baseline Mean", "Baseline AvgSoup", "PAPA-all Mean", "PAPA-all AvgSoup"]
    assert cell(soup, "Baseline Mean")["text"] == "92.50"


def test_missing_results_and_row_variants(frame):
    rows = [
        {"label": "CNN", "experiment": "exp"},
        {"label": "Other", "experiment": "nowhere", "variant": "papa"},
    ]
    grid = tables.cells(table("main", rows=rows), frame, VARIANTS, SEEDS)
    assert cell(grid, "PAPA Ensemble", "Other")["text"] == tables.MISSING
    assert cell(grid, "Baseline Ensemble", "Other")["text"] == ""  # another variant's column


def test_paper_values_show_in_a_row_under_ours(frame, tmp_path, monkeypatch):
    text = "row,column,value\nCNN,Baseline Ensemble,95.2 (0.1)\nCNN,PAPA AvgSoup,94.8\n"
    monkeypatch.setattr(paper, "values", lambda _: paper.parse(text, "test.csv"))
    rows = [{"label": "CNN", "experiment": "exp", "group": "Digits"}]
    t = table("main", paper="table1", rows=rows)
    tables.render(t, frame, VARIANTS, SEEDS, tmp_path / "t.md", tmp_path / "t.csv")
    lines = (tmp_path / "t.md").read_text().splitlines()
    body = [line for line in lines if line.startswith("| ")][1:]
    assert body[0].startswith("| **Digits**")
    assert body[1].startswith("| CNN ") and "96.00 (1.00)" in body[1]
    assert body[2].startswith("| CNN (paper)")
    cells = [c.strip() for c in body[2].strip("|").split("|")]
    assert cells[1] == "95.2 (0.1)" and cells[4] == "94.8" and cells[2] == ""
    assert "values reported in the paper (table1)" in lines[-1]
    machine = pd.read_csv(tmp_path / "t.csv")
    assert str(machine.loc[machine.column == "PAPA AvgSoup", "paper"].item()) == "94.8"


def test_paper_file_format_is_checked():
    with pytest.raises(PapaError, match="header must be row,column,value"):
        paper.parse("a,b,c\n", "x.csv")
    with pytest.raises(PapaError, match="line 3: duplicate cell"):
        paper.parse("row,column,value\nA,B,1\nA,B,2\n", "x.csv")
    with pytest.raises(PapaError, match="no paper values for 'nope'"):
        paper.values("nope")
    for table_id in paper.available():  # every shipped file parses
        assert paper.values(table_id)


def history(path, jumps: bool, swa: bool = False):
    rows = []
    for epoch in (1, 2, 3):
        for member in (0, 1):
            acc = 50.0 + 10 * epoch + member
            rows.append((epoch, member, "end", acc))
            if jumps and epoch < 3:
                rows += [(epoch, member, "before_avg", acc), (epoch, member, "after_avg", acc + 5)]
            if swa and epoch == 3:
                rows.append((epoch, member, "swa", acc + 2))
    frame = pd.DataFrame(rows, columns=["epoch", "member", "phase", "test_accuracy"])
    frame.assign(lr=0.1, val_accuracy=frame.test_accuracy, val_loss=1.0).to_csv(path, index=False)
    return path


def test_trajectory_jumps_at_each_averaging(tmp_path):
    t = figures.trajectory(pd.read_csv(history(tmp_path / "h.csv", jumps=True)))
    assert list(zip(t.epoch, t.phase, strict=True)) == [
        (1, "before_avg"),
        (1, "after_avg"),
        (2, "before_avg"),
        (2, "after_avg"),
        (3, "end"),
    ]
    assert list(t.value) == [60.5, 65.5, 70.5, 75.5, 80.5]


def test_trajectory_ends_with_the_swa_averages(tmp_path):
    """A run with train.swa records its members once more after they became their SWA averages: the curve
    ends with that point, after the last epoch's own."""
    t = figures.trajectory(pd.read_csv(history(tmp_path / "h.csv", jumps=True, swa=True)))
    assert list(zip(t.epoch, t.phase, strict=True))[-2:] == [(3, "end"), (3, "swa")]
    assert list(t.value)[-2:] == [80.5, 82.5]
    figures.curves({"name": "c", "kind": "curves", "experiment": "exp"}, {("papa-all", 1): tmp_path / "h.csv"},
                   tmp_path / "c.png")
    assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_figures_are_written(frame, tmp_path):
    histories = {}
    for v in ("baseline", "papa-all"):
        for s in (1, 2):
            path = aggregate.run_dir(tmp_path, "exp", v, s)
            path.mkdir(parents=True)
            histories[v, s] = history(path / "history.csv", jumps=v == "papa-all")
    figures.curves({"name": "c", "kind": "curves", "experiment": "exp"}, histories, tmp_path / "c.png")
    spec = {"name": "v", "kind": "variants", "experiments": ["exp"]}
    figures.compare(spec, frame, SEEDS, VARIANTS, tmp_path / "v.png")
    for name in ("c.png", "v.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(PapaError, match="no 'mean' results for experiment 'other'"):
        figures.compare(spec | {"experiments": ["other"]}, frame, SEEDS, VARIANTS, tmp_path / "x.png")


@pytest.mark.parametrize(("values", "kept"), [
    ([98.9, 98.5, 97.8, 98.2, 9.75, 98.1], (97.8, 98.9)),  # a soup at chance: the axis shows 97.8-98.9
    ([98.0, 97.5, 96.0, 64.9, 30.2, 11.0, 95.0, 97.0, 96.5, 97.7, 91.0, 93.0], (91.0, 98.0)),
    (list(np.linspace(30.0, 95.0, 50)), None),  # a smooth learning curve: everything
    ([90.0, 80.0, 70.0, 60.0], None),  # evenly spread: everything
    ([98.0, 97.0, 10.0, 9.0], None),  # half the values are far below: they are the point, keep them
    ([97.0], None),
])
def test_focus_leaves_out_the_few_values_far_below(values, kept):
    assert figures.focus(values) == kept


def test_variants_figure_zooms_to_where_the_values_differ(tmp_path):
    for v in VARIANTS:
        for s in SEEDS:
            fake_metrics(tmp_path / "r", "exp", v, s, mean=97.5 + s / 10, ensemble=98.5 + s / 10,
                         avg_soup=9.75 if v == "baseline" else 98.0 + s / 10, greedy_soup=98.2 + s / 10)
    frame = aggregate.aggregate(aggregate.find_metrics(tmp_path / "r"))
    fig = figures.compare_figure({"name": "v", "kind": "variants", "experiments": ["exp"]}, frame, SEEDS, VARIANTS)
    ax = fig.axes[0]
    low, high = ax.get_ylim()
    assert 96.0 < low < 97.6 and 98.8 < high < 100.0  # the 97.5-98.8 values span the axis
    assert [t.get_text() for t in ax.texts] == ["9.75"]  # the baseline's average soup, marked below it
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["Population mean", "Ensemble", "Average soup",
                                                                  "Greedy soup"]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["Baseline", "PAPA", "PAPA-all", "PAPA-2"]


def one_epoch_history(path, accuracy):
    rows = [(1, member, "end", accuracy + member) for member in (0, 1)]
    pd.DataFrame(rows, columns=["epoch", "member", "phase", "test_accuracy"]).to_csv(path, index=False)
    return path


def test_curves_legend_is_in_the_tables_order_and_one_epoch_shows_points(tmp_path):
    """Histories given in any order: the legend reads Baseline, PAPA, PAPA-all, PAPA-2. A one-epoch run has no
    curve: each variant shows one marker, and the title says why."""
    order = ["papa-2", "baseline", "papa-all", "papa"]
    histories = {(v, 1): one_epoch_history(tmp_path / f"{v}.csv", 90.0 + k) for k, v in enumerate(order)}
    fig = figures.curves_figure({"name": "c", "kind": "curves", "experiment": "exp"}, histories)
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["Baseline", "PAPA", "PAPA-all", "PAPA-2"]
    ax = fig.axes[0]
    markers = [line for line in ax.lines if line.get_marker() == "o" and len(line.get_xdata()) == 1]
    assert sorted(float(line.get_ydata()[0]) for line in markers) == [90.5, 91.5, 92.5, 93.5]
    assert all(0.5 < float(line.get_xdata()[0]) < 1.5 for line in markers)
    assert "one epoch: one point per variant" in ax.get_title()
    assert [t.get_text() for t in ax.get_xticklabels()] == ["1"]


def test_curves_mark_the_dips_below_the_axis(tmp_path):
    """PAPA-all's first averaging drops the members to chance: the axis keeps the curves' range and marks
    the dip on its edge."""
    rows = []
    for epoch in range(1, 7):
        acc = 99.0 - 6.0 / epoch
        rows += [(epoch, 0, "before_avg", acc), (epoch, 0, "after_avg", 11.0 if epoch == 1 else acc + 0.5)]
        rows += [(epoch, 0, "end", acc + 0.5)]
    path = tmp_path / "h.csv"
    pd.DataFrame(rows, columns=["epoch", "member", "phase", "test_accuracy"]).to_csv(path, index=False)
    fig = figures.curves_figure({"name": "c", "kind": "curves", "experiment": "exp"}, {("papa-all", 1): path})
    ax = fig.axes[0]
    assert ax.get_ylim()[0] > 90.0
    assert [t.get_text() for t in ax.texts] == ["11.00"]
    assert figures.ZOOM_NOTE in ax.get_title()


def test_curves_overlay_runs_of_different_experiments(tmp_path):
    """Figure 2's layout: ``lines`` overlay PAPA-all with and without REPAIR (two experiments) and PAPA-2, each
    with its jumps at the averagings; the CLI finds each line's history.csv by its run directory."""
    from papa.report import cli

    def history(path, drop):
        rows = []
        for epoch in (1, 2, 3):
            rows += [(epoch, 0, "before_avg", 90.0 + epoch), (epoch, 0, "after_avg", 90.0 + epoch - drop),
                     (epoch, 0, "end", 90.0 + epoch)]
        path.parent.mkdir(parents=True)
        pd.DataFrame(rows, columns=["epoch", "member", "phase", "test_accuracy"]).to_csv(path, index=False)
        return path

    lines = [{"label": "PAPA-all", "experiment": "base", "variant": "papa-all"},
             {"label": "PAPA-all without REPAIR", "experiment": "no-repair", "variant": "papa-all"},
             {"label": "PAPA-2", "experiment": "base", "variant": "papa-2"}]
    figure = {"name": "figure2", "kind": "curves", "lines": lines}
    files = [history(tmp_path / "r" / e / v / "seed1" / "history.csv", drop)
             for e, v, drop in [("base", "papa-all", 0.5), ("no-repair", "papa-all", 5.0), ("base", "papa-2", 1.0),
                                ("other", "papa-all", 9.0)]]
    assert plan.figure_runs(figure, VARIANTS) == {("base", "papa-all"), ("no-repair", "papa-all"), ("base", "papa-2")}
    histories = cli._histories(figure, {"variants": VARIANTS}, files)
    assert histories == {("PAPA-all", 1): files[0], ("PAPA-all without REPAIR", 1): files[1], ("PAPA-2", 1): files[2]}
    fig = figures.curves_figure(figure, histories)
    assert [t.get_text() for t in fig.legends[0].get_texts()] == [line["label"] for line in lines]
    jumps = fig.axes[1]
    assert sorted(round(float(y), 2) for line in jumps.lines for y in line.get_ydata() if y != 0) == sorted(
        [-0.5] * 3 + [-5.0] * 3 + [-1.0] * 3)


def config_with(**kw):
    raw = {"experiments": {"a": {}, "b": {}}, "variants": ["baseline", "papa-all"], "seeds": [1, 2]} | kw
    return cfg.validate(raw, "config", "test.yaml")


def test_plan_trains_only_what_is_shown():
    assert plan.runs(config_with()) == [
        ("a", "baseline"),
        ("a", "papa-all"),
        ("b", "baseline"),
        ("b", "papa-all"),
    ]
    shown = config_with(
        tables=[
            {
                "name": "t",
                "layout": "range",
                "rows": [{"label": "x", "experiment": "b", "variant": "papa-all"}],
            }
        ],
        figures=[{"name": "f", "kind": "curves", "experiment": "a", "variants": ["baseline"]}],
    )
    assert plan.runs(shown) == [("a", "baseline"), ("b", "papa-all")]


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        (
            {"tables": [{"name": "t", "layout": "main", "rows": [{"label": "x", "experiment": "c"}]}]},
            "tables.0.rows.0.experiment: unknown experiment 'c'",
        ),
        (
            {"tables": [{"name": "t", "layout": "main", "rows": [{"label": "x", "experiment": "a"}] * 2}]},
            "tables.0.rows.1.label: 'x' repeats",
        ),
        (
            {"tables": [{"name": "t", "layout": "range", "rows": [{"label": "x", "experiment": "a"}]}]},
            "tables.0.rows.0.variant: required by the range layout",
        ),
        (
            {
                "tables": [
                    {
                        "name": "t",
                        "layout": "main",
                        "paper": "nope",
                        "rows": [{"label": "x", "experiment": "a"}],
                    }
                ]
            },
            "tables.0.paper: no papa/report/paper/nope.csv",
        ),
        (
            {"figures": [{"name": "f", "kind": "variants", "experiments": ["a"], "variants": ["papa"]}]},
            "figures.0.variants: 'papa' is not in the config's variants",
        ),
        (
            {"figures": [{"name": "f", "kind": "curves", "experiment": "a"}] * 2},
            "figures.1.name: 'f' already names",
        ),
    ],
)
def test_plan_check_names_the_key(entries, message):
    with pytest.raises(PapaError, match=message.replace(".", r"\.").replace("(", r"\(")):
        plan.check(config_with(**entries), "test.yaml")


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        (
            {"tables": [{"name": "t", "layout": "wide", "rows": [{"label": "x", "experiment": "a"}]}]},
            "tables.0.layout: 'wide' is not one of",
        ),
        (
            {"tables": [{"name": "t", "layout": "main", "rows": [{"label": "x", "experimnt": "a"}]}]},
            "tables.0.rows.0",
        ),
        ({"figures": [{"name": "f", "kind": "curves"}]}, "figures.0: 'experiment' is a required property"),
        (
            {"tables": [{"name": "t", "layout": "main", "rows": [{"label": "x"}]}]},
            "tables.0.rows.0: needs one of the keys 'experiment', 'experiments'$",
        ),
        ({"resources": {"train": {"gpus": 1}}}, "resources.train: unknown key 'gpus'"),
    ],
)
def test_schema_names_the_key(entries, message):
    with pytest.raises(PapaError, match=message.replace(".", r"\.")):
        config_with(**entries)


def test_report_subcommands(frame, tmp_path, monkeypatch):
    cli = pytest.importorskip("papa.cli")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "c.yaml").write_text(
        "variants: [baseline, papa, papa-all, papa-2]\nseeds: [1, 2, 3]\nexperiments: {exp: {}}\n"
        "tables: [{name: t1, layout: main, rows: [{label: CNN, experiment: exp}]}]\n"
        "figures: [{name: f1, kind: variants, experiments: [exp]}]\n"
    )
    assert cli.main(["aggregate", "--results", "results", "--out", "m.csv"]) == 0
    assert len(pd.read_csv("m.csv")) == len(frame)
    assert cli.main(["render", "--config", "c.yaml", "--table", "t1", "--metrics", "m.csv"]) == 0
    assert "96.00 (1.00)" in (tmp_path / "reports/t1.md").read_text()
    assert (tmp_path / "reports/t1.csv").exists()
    assert cli.main(["plot", "--config", "c.yaml", "--figure", "f1", "--metrics", "m.csv"]) == 0
    assert (tmp_path / "reports/f1.png").exists()
    assert cli.main(["render", "--config", "c.yaml", "--table", "nope", "--metrics", "m.csv"]) == 2
    for command in ("aggregate", "render", "plot"):
        with pytest.raises(SystemExit) as exit_:
            cli.main([command, "--help"])
        assert exit_.value.code == 0


def test_shipped_configs_and_paper_values_agree():
    """Every config renders what it names, and every shipped paper value lands in some table's cell."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[2] / "config"
    cells_of = {table_id: set() for table_id in paper.available()}
    for path in sorted(root.glob("**/*.yaml")):
        config = cfg.load_config(path)
        plan.check(config, str(path))
        for t in config["tables"]:
            if t["paper"]:
                headers = tables.columns(t, config["variants"])
                cells_of[t["paper"]] |= {(row["label"], h) for row in t["rows"] for h in headers}
    for table_id, cells in cells_of.items():
        stray = set(paper.values(table_id)) - cells
        assert not stray, f"papa/report/paper/{table_id}.csv: cells no table shows: {sorted(stray)[:5]}"


def test_datasets_layout_is_the_papers_table_3(tmp_path):
    """One row per method, one column per dataset (each column its own experiment), average soups, with the
    shipped Table 3 config and paper values."""
    config = cfg.load_config(REPO_ROOT / "config" / "paper" / "table3.yaml")
    for e, v in plan.runs(config):
        for s in SEEDS:
            soup = (97.0 if "cifar10-" in e else 82.0) + s / 10 + (0.5 if v == "papa" else 0.0)
            fake_metrics(tmp_path / "results", e, v, s, avg_soup=soup)
    frame = aggregate.aggregate(aggregate.find_metrics(tmp_path / "results"))
    t = config["tables"][0]
    assert t["layout"] == "datasets"
    grid = tables.cells(t, frame, config["variants"], SEEDS)
    assert list(dict.fromkeys(grid["column"])) == ["CIFAR-10", "CIFAR-100"]
    dart = "DART: PAPA-all no-repair, starts at 300 epochs, average every 40/50 epochs"
    assert cell(grid, "CIFAR-100", dart)["experiment"] == "dart-cifar100-resnet18-dart"
    assert cell(grid, "CIFAR-10", "PAPA-all")["text"] == "97.20 (0.10)"
    assert cell(grid, "CIFAR-100", "PAPA")["text"] == "82.70 (0.10)"
    assert cell(grid, "CIFAR-100", "PAPA")["variant"] == "papa"
    tables.render(t, frame, config["variants"], SEEDS, tmp_path / "t3.md", tmp_path / "t3.csv")
    lines = (tmp_path / "t3.md").read_text().splitlines()
    assert [c.strip() for c in lines[2].strip("|").split("|")] == ["Model", "CIFAR-10", "CIFAR-100"]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines if line.startswith("| ")][1:]
    assert [r[0] for r in rows[:4]] == ["PAPA-all", "PAPA-all (paper)", "PAPA-all no-repair",
                                         "PAPA-all no-repair (paper)"]
    assert rows[1][1:] == ["97.10 (0.15)", "82.59 (0.24)"]


def test_datasets_layout_rows_are_checked():
    base = {"variants": ["papa"], "experiments": {"a": {}}}
    row = {"label": "PAPA", "variant": "papa", "experiment": "a"}
    entry = {"name": "t", "layout": "datasets", "rows": [row]}
    config = cfg.validate(base | {"tables": [entry]}, "config", "c")
    with pytest.raises(PapaError, match=r"tables.0.rows.0: the datasets layout takes experiments"):
        plan.check(config, "c")
    row.pop("experiment")
    row["experiments"] = {"CIFAR-10": "b"}
    with pytest.raises(PapaError, match=r"tables.0.rows.0.experiments: unknown experiment 'b'"):
        plan.check(config, "c")
    row["experiments"] = {"CIFAR-10": "a"}
    row.pop("variant")
    with pytest.raises(PapaError, match="variant: required by the datasets layout"):
        plan.check(config, "c")
