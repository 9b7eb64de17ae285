"""The report library at its edges: aggregating no files, paper CSVs with blank lines or a wrong number of fields,
the plan's checks of rows against their layout and the config's variants, a curves figure missing a curve, and
an HTML page whose header mixes grouped and ungrouped columns."""

from html.parser import HTMLParser

import pytest

from papa.errors import PapaError
from papa.report import aggregate, figures, paper, plan, tables
from papa.report.display import Display, Line
from papa.report.html import page
from tests.unit.test_report import config_with, history


def test_aggregating_no_files_gives_an_empty_frame_that_renders_as_missing(tmp_path):
    """No metrics files: the tidy frame's columns with no rows, which writes, loads back and renders every cell
    as missing (a table before any run finished)."""
    frame = aggregate.aggregate([])
    assert list(frame.columns) == aggregate.COLUMNS and frame.empty
    aggregate.write(frame, tmp_path / "m.csv")
    assert (tmp_path / "m.csv").read_text() == ",".join(aggregate.COLUMNS) + "\n"
    loaded = aggregate.load(tmp_path / "m.csv")
    assert list(loaded.columns) == aggregate.COLUMNS and loaded.empty
    table = {"name": "t", "layout": "main", "rows": [{"label": "CNN", "experiment": "exp"}]}
    grid = tables.cells(table, loaded, ["baseline", "papa"], [1, 2])
    assert list(grid["text"]) == [tables.MISSING] * 4 and list(grid["n"]) == [0] * 4


def test_paper_csv_blank_lines_are_skipped_and_lines_keep_their_numbers():
    """Blank lines (a trailing one, or between groups of rows) hold no cell; a later line's number in a message
    still counts them and each line of a note quoted over two lines, and names the line a record starts on."""
    text = "row,column,value,note\n\nCNN,Baseline Ensemble,95.2 (0.1),\n\nCNN,PAPA AvgSoup,94.8,rerun\n\n"
    assert paper.parse(text, "x.csv") == {("CNN", "Baseline Ensemble"): "95.2 (0.1)", ("CNN", "PAPA AvgSoup"): "94.8"}
    with pytest.raises(PapaError, match=r"^x\.csv: line 5: duplicate cell \('A', 'B'\)$"):
        paper.parse("row,column,value\n\nA,B,1\n\nA,B,2\n", "x.csv")
    with pytest.raises(PapaError, match=r"^x\.csv: line 4: duplicate cell \('A', 'B'\)$"):
        paper.parse('row,column,value,note\nA,B,1,"two\nlines"\nA,B,2,\n', "x.csv")
    with pytest.raises(PapaError, match=r"^x\.csv: line 3: duplicate cell \('A', 'B'\)$"):
        paper.parse('row,column,value,note\nA,B,1,\nA,B,2,"two\nlines"\n', "x.csv")


@pytest.mark.parametrize(("text", "message"), [
    ("row,column,value\nCNN,Baseline Ensemble\n", "line 2: expected 3 fields, found 2"),
    ("row,column,value,note\nA,B,1,\n\nCNN,PAPA AvgSoup,94.8,a,b\n", "line 4: expected 4 fields, found 5"),
])
def test_paper_csv_line_with_a_wrong_number_of_fields(text, message):
    with pytest.raises(PapaError, match=f"^x\\.csv: {message}$"):
        paper.parse(text, "x.csv")


@pytest.mark.parametrize(("table", "message"), [
    ({"name": "t", "layout": "side_by_side", "rows": [{"label": "x", "experiment": "a", "variant": "baseline"}]},
     "tables.0.rows.0.columns: required by the side_by_side layout"),
    ({"name": "t", "layout": "main", "rows": [{"label": "x", "experiment": "a"},
                                              {"label": "y", "experiment": "b", "columns": "SWA"}]},
     "tables.0.rows.1.columns: only the side_by_side layout has column groups"),
    ({"name": "t", "layout": "range", "rows": [{"label": "x", "experiment": "a", "variant": "papa"}]},
     "tables.0.rows.0.variant: 'papa' is not in the config's variants"),
    ({"name": "t", "layout": "main", "rows": [{"label": "x", "experiment": "a", "variant": "papa-2"}]},
     "tables.0.rows.0.variant: 'papa-2' is not in the config's variants"),
])
def test_plan_check_names_a_row_that_does_not_fit(table, message):
    """Rows the schema accepts but the config cannot render: column groups outside side_by_side (or missing in
    it), a row's variant the config does not train (variants: baseline, papa-all)."""
    with pytest.raises(PapaError, match="^test\\.yaml: " + message.replace(".", r"\.") + "$"):
        plan.check(config_with(tables=[table]), "test.yaml")


def test_curves_figure_names_a_line_with_no_history(tmp_path):
    """A ``lines`` figure given the history of one line only: the other line is named, no PNG is written."""
    figure = {"name": "f2", "kind": "curves", "lines": [{"label": "PAPA-all", "experiment": "a", "variant": "papa-all"},
                                                        {"label": "PAPA-2", "experiment": "a", "variant": "papa-2"}]}
    histories = {("PAPA-all", 1): history(tmp_path / "h.csv", jumps=True)}
    with pytest.raises(PapaError, match=r"^figure 'f2': no history for 'PAPA-2'$"):
        figures.curves(figure, histories, tmp_path / "f2.png")
    assert not (tmp_path / "f2.png").exists()


class _Cells(HTMLParser):
    """The cells of an HTML page's table rows, per section (thead, tbody): (tag, text, rowspan, colspan); the
    open tags must close in order."""

    VOID = {"meta"}

    def __init__(self, text: str):
        super().__init__()
        self.open, self.rows, self.section, self.cell = [], {}, None, None
        self.feed(text)
        self.close()
        assert not self.open, f"unclosed tags {self.open}"

    def handle_starttag(self, tag, attrs):
        if tag not in self.VOID:
            self.open.append(tag)
        if tag in ("thead", "tbody"):
            self.section = tag
        elif tag == "tr":
            self.rows.setdefault(self.section, []).append([])
        elif tag in ("th", "td"):
            a = dict(attrs)
            self.cell = [tag, "", int(a.get("rowspan", 1)), int(a.get("colspan", 1))]

    def handle_data(self, data):
        if self.cell is not None:
            self.cell[1] += data

    def handle_endtag(self, tag):
        assert self.open and self.open[-1] == tag, f"</{tag}> closes {self.open[-1:]}"
        self.open.pop()
        if tag in ("th", "td"):
            self.rows[self.section][-1].append(tuple(self.cell))
            self.cell = None


def layout(rows: list[list[tuple]]) -> list[list[tuple[str, str]]]:
    """The HTML table model: each row's (tag, text) per column, a cell filling the slots its rowspan and colspan
    cover, each row's cells taking the slots left free by the rows above, left to right."""
    taken: dict[tuple[int, int], tuple[str, str]] = {}
    for r, cells in enumerate(rows):
        c = 0
        for tag, text, rowspan, colspan in cells:
            while (r, c) in taken:
                c += 1
            for dr in range(rowspan):
                for dc in range(colspan):
                    assert (r + dr, c + dc) not in taken, f"cells overlap at row {r + dr}, column {c + dc}"
                    taken[r + dr, c + dc] = (tag, text)
            c += colspan
    width = 1 + max(c for _, c in taken)
    grid = [[taken.get((r, c)) for c in range(width)] for r in range(len(rows))]
    assert all(None not in row for row in grid), f"rows of unequal width: {grid}"
    return grid


def test_html_header_mixing_grouped_and_ungrouped_columns_lines_up():
    """A header whose ungrouped columns sit between grouped ones: each ungrouped measure spans both header rows,
    each group spans its measures, and every column of the header and the body lines up with its measure."""
    headers = [("", "Population size p"), ("SWA", "Ensemble"), ("SWA", "Average soup"), ("", "Greedy soup"),
               ("", "Population mean"), ("EMA", "Ensemble")]
    ours = ["4", "95.0", "10.1", "94.0", "93.0", "96.0"]
    lines = [Line("heading", "Digits", [("", False, False)] * 6),
             Line("ours", "CNN", [(t, t == "95.0", t == "10.1") for t in ours]),
             Line("paper", "CNN (paper)", [(t, False, False) for t in ["", "95.2", "", "", "", ""]])]
    html = page(Display("t", "A caption.", "Model", headers, lines, ["Test accuracy (%)"], []))
    cells = _Cells(html).rows
    top, bottom = layout(cells["thead"])
    assert top == [("th", "Model"), ("th", "Population size p"), ("th", "SWA"), ("th", "SWA"), ("th", "Greedy soup"),
                   ("th", "Population mean"), ("th", "EMA")]
    assert bottom == [("th", "Model"), ("th", "Population size p"), ("th", "Ensemble"), ("th", "Average soup"),
                      ("th", "Greedy soup"), ("th", "Population mean"), ("th", "Ensemble")]
    heading, mine, theirs = layout(cells["tbody"])
    assert heading == [("th", "Digits")] * 7
    assert mine == [("th", "CNN"), ("td", "4"), ("td", "95.0"), ("td", "10.1†"), ("td", "94.0"), ("td", "93.0"),
                    ("td", "96.0")]
    assert theirs == [("th", "CNN (paper)"), ("td", ""), ("td", "95.2"), ("td", ""), ("td", ""), ("td", ""), ("td", "")]
    assert ('<th scope="col" rowspan="2">Population size p</th><th scope="colgroup" colspan="2">SWA</th>'
            '<th scope="col" rowspan="2">Greedy soup</th><th scope="col" rowspan="2">Population mean</th>'
            '<th scope="colgroup" colspan="1">EMA</th>') in html
