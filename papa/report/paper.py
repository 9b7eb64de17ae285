"""Values reported in the paper, shipped as ``papa/report/paper/<id>.csv``: header ``row,column,value[,note]``,
``row`` a table row's ``label`` in the config, ``column`` a column header of its layout (papa.report.tables),
``value`` the cell as printed (``95.2 (0.1)``, ``1 (out of 10)``), ``note`` (optional) a footnote to the value."""

import csv
import io
from importlib import resources

from papa.errors import PapaError


def available() -> list[str]:
    """Ids of the shipped paper tables."""
    folder = resources.files("papa.report").joinpath("paper")
    files = folder.iterdir() if folder.is_dir() else []
    return sorted(f.name.removesuffix(".csv") for f in files if f.name.endswith(".csv"))


def _text(table_id: str) -> tuple[str, str]:
    file = resources.files("papa.report").joinpath("paper", f"{table_id}.csv")
    if not file.is_file():
        known = ", ".join(available()) or "none"
        raise PapaError(f"no paper values for {table_id!r} (papa/report/paper/; available: {known})")
    return file.read_text(), f"papa/report/paper/{table_id}.csv"


def values(table_id: str) -> dict[tuple[str, str], str]:
    """{(row, column): value} of paper table ``table_id``."""
    return parse(*_text(table_id))


def notes(table_id: str) -> dict[tuple[str, str], str]:
    """{(row, column): note} of the cells of paper table ``table_id`` that have one."""
    return _read(*_text(table_id))[1]


def parse(text: str, where: str) -> dict[tuple[str, str], str]:
    """{(row, column): value} of a paper CSV's text."""
    return _read(text, where)[0]


def _read(text: str, where: str) -> tuple[dict[tuple[str, str], str], dict[tuple[str, str], str]]:
    reader = csv.reader(io.StringIO(text))
    header = next(reader, None)
    if header not in (["row", "column", "value"], ["row", "column", "value", "note"]):
        raise PapaError(f"{where}: header must be row,column,value (or with ,note), found {header}")
    out, noted, end = {}, {}, reader.line_num
    for record in reader:
        n, end = end + 1, reader.line_num  # the line the record starts on: a quoted note may span lines
        if not record:
            continue
        if len(record) != len(header):
            raise PapaError(f"{where}: line {n}: expected {len(header)} fields, found {len(record)}")
        row, column, value, *note = (field.strip() for field in record)
        if (row, column) in out:
            raise PapaError(f"{where}: line {n}: duplicate cell ({row!r}, {column!r})")
        out[row, column] = value
        if note and note[0]:
            noted[row, column] = note[0]
    return out, noted
