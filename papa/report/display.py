"""What a table shows in any format: papa.report.tables builds it and writes its Markdown, papa.report.html its page."""

from typing import NamedTuple

CHANCE_MARK = "†"  # an accuracy at chance level
PAPER_MARK = "‡"  # a paper value with a note (papa/report/paper/<id>.csv's note column)


class Line(NamedTuple):
    """One displayed row: a ``heading`` (the label alone, bold), ``ours`` or ``paper`` (the paper's values
    under ours); each cell (text, best, at chance)."""

    kind: str
    label: str
    cells: list[tuple[str, bool, bool]]


class Display(NamedTuple):
    name: str
    caption: str
    label_header: str
    headers: list[tuple[str, str]]  # (group, measure) per column; group "" where the column has none
    lines: list[Line]
    notes: list[str]
    footnotes: list[str]
