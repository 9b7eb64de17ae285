"""Values reported in the paper, shipped as data: ``papa/report/paper/<id>.csv``.

Each file has the header ``row,column,value``: ``row`` is a table row's ``label`` in the config,
``column`` a column header of the table's layout (see papa.report.tables), and ``value`` the cell's text
as printed in the paper (e.g. ``95.2 (0.1)``, ``80.21 [80.05, 80.46]``, ``1 (out of 10)``).
"""

from __future__ import annotations

import csv
import io
from importlib import resources

from papa.errors import PapaError

HEADER = ["row", "column", "value"]


def available() -> list[str]:
    """Ids of the shipped paper tables."""
    folder = resources.files("papa.report").joinpath("paper")
    if not folder.is_dir():
        return []
    return sorted(f.name.removesuffix(".csv") for f in folder.iterdir() if f.name.endswith(".csv"))


def values(table_id: str) -> dict[tuple[str, str], str]:
    """{(row, column): value} of paper table ``table_id``."""
    file = resources.files("papa.report").joinpath("paper", f"{table_id}.csv")
    if not file.is_file():
        known = ", ".join(available()) or "none"
        raise PapaError(f"no paper values for {table_id!r} (papa/report/paper/; available: {known})")
    return parse(file.read_text(), f"papa/report/paper/{table_id}.csv")


def parse(text: str, where: str) -> dict[tuple[str, str], str]:
    reader = csv.reader(io.StringIO(text))
    header = next(reader, None)
    if header != HEADER:
        raise PapaError(f"{where}: header must be {','.join(HEADER)}, found {header}")
    out = {}
    for n, record in enumerate(reader, start=2):
        if not record:
            continue
        if len(record) != 3:
            raise PapaError(f"{where}: line {n}: expected 3 fields, found {len(record)}")
        row, column, value = (field.strip() for field in record)
        if (row, column) in out:
            raise PapaError(f"{where}: line {n}: duplicate cell ({row!r}, {column!r})")
        out[row, column] = value
    return out
