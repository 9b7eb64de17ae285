"""A table as a small self-contained HTML page (reports/<table>.html), what Snakemake's report shows inline: grouped
column headers, the paper's values in a grey row under ours, best and chance-level cells marked as in the Markdown."""

from html import escape
from itertools import groupby

from papa.report.display import CHANCE_MARK, Display

STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; color: #1f2328; margin: 1rem; }
p.title { max-width: 60rem; }
table { border-collapse: collapse; font-variant-numeric: tabular-nums; font-size: 0.9rem; }
th, td { padding: 0.3rem 0.6rem; text-align: right; white-space: nowrap; }
thead th { border-bottom: 1px solid #8c959f; vertical-align: bottom; }
thead tr:first-child th[colspan] { border-bottom: 1px solid #d0d7de; text-align: center; }
tbody th { text-align: left; font-weight: normal; }
tbody tr.ours td, tbody tr.ours th { border-top: 1px solid #d0d7de; }
tbody tr.paper td, tbody tr.paper th { color: #656d76; font-style: italic; }
tbody tr.heading th { font-weight: bold; padding-top: 0.8rem; border-bottom: 1px solid #8c959f; }
td.chance { color: #cf222e; }
p.notes, p.footnote { color: #656d76; font-size: 0.85rem; max-width: 60rem; }
"""


def _head(shown: Display) -> str:
    """One header row, or two when columns are grouped: the group spanning its columns, then the measures."""
    label = f'<th scope="col">{escape(shown.label_header)}</th>'
    if not any(group for group, _ in shown.headers):
        return "<tr>" + label + "".join(f'<th scope="col">{escape(m)}</th>' for _, m in shown.headers) + "</tr>"
    top, bottom = [label.replace("<th ", '<th rowspan="2" ', 1)], []
    for group, run in groupby(shown.headers, key=lambda h: h[0]):
        measures = [m for _, m in run]
        if group:
            top.append(f'<th scope="colgroup" colspan="{len(measures)}">{escape(group)}</th>')
            bottom += [f'<th scope="col">{escape(m)}</th>' for m in measures]
        else:
            top += [f'<th scope="col" rowspan="2">{escape(m)}</th>' for m in measures]
    return f"<tr>{''.join(top)}</tr>\n<tr>{''.join(bottom)}</tr>"


def _cell(text: str, best: bool, chance: bool) -> str:
    body = f"<strong>{escape(text)}</strong>" if best else escape(text)
    return f'<td class="chance" title="at chance level">{body}{CHANCE_MARK}</td>' if chance else f"<td>{body}</td>"


def _row(line) -> str:
    if line.kind == "heading":
        span = len(line.cells) + 1
        return f'<tr class="heading"><th scope="rowgroup" colspan="{span}">{escape(line.label)}</th></tr>'
    cells = "".join(_cell(*c) for c in line.cells)
    return f'<tr class="{line.kind}"><th scope="row">{escape(line.label)}</th>{cells}</tr>'


def page(shown: Display) -> str:
    """The HTML page of a table."""
    name = escape(shown.name)
    title = f"<strong>{name}</strong>" + (f": {escape(shown.caption)}" if shown.caption else "")
    body = "\n".join(_row(line) for line in shown.lines)
    notes = "".join(f'<p class="footnote">{escape(f)}</p>\n' for f in shown.footnotes)
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>{name}</title>\n'
            f"<style>{STYLE}</style>\n</head>\n<body>\n<p class=\"title\">{title}</p>\n"
            f"<table>\n<thead>\n{_head(shown)}\n</thead>\n<tbody>\n{body}\n</tbody>\n</table>\n"
            f'<p class="notes">{escape("; ".join(shown.notes))}.</p>\n{notes}</body>\n</html>\n')
