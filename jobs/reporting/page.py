"""The report as ONE self-contained HTML page: inline CSS, every image embedded as a base64 ``data:`` URI, no
JavaScript, no reference to any other file or URL (it can be mailed or opened from anywhere)."""
from __future__ import annotations

import base64
import html
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from jobs.reporting.tables import COLUMNS, Table

NUMBER = re.compile(r"^(—|[-+]?[0-9.]+(e[-+]?[0-9]+)?( ± [0-9.]+)?)$")
CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 24px auto; max-width: 1360px;
       color: #1d1d1f; background: #ffffff; line-height: 1.4; }
h1 { font-size: 26px; margin-bottom: 4px; }
h2 { font-size: 21px; border-bottom: 2px solid #d0d7de; padding-bottom: 4px; margin-top: 36px; }
h3 { font-size: 16px; margin: 20px 0 6px; }
.meta { color: #57606a; font-size: 13px; }
.intro { font-size: 14px; margin: 8px 0; }
table { border-collapse: collapse; margin: 6px 0 14px; font-size: 13px; }
th, td { border: 1px solid #d0d7de; padding: 4px 9px; text-align: right; vertical-align: top; }
th { background: #f3f4f6; }
td:first-child, th:first-child { text-align: left; }
td.text, th.text { text-align: left; }
td.text { max-width: 560px; overflow-wrap: anywhere; }
tr:nth-child(even) td { background: #fafbfc; }
.files { color: #57606a; font-size: 12px; }
.note { background: #fff8c5; border: 1px solid #e3d17a; padding: 6px 10px; margin: 8px 0; font-size: 13px; }
.figures { display: flex; flex-wrap: wrap; gap: 14px; }
figure { margin: 0; }
figure img { max-width: 100%; border: 1px solid #d0d7de; }
figure.half img { width: 640px; }
figcaption { font-size: 12px; color: #57606a; max-width: 640px; }
dl.legend dt { font-weight: 600; margin-top: 6px; }
dl.legend dd { margin-left: 18px; font-size: 13px; }
"""


@dataclass
class Figure:
    """A PNG to embed: ``path`` on disk, its title and caption; ``wide`` figures take the page's width."""

    path: Path
    title: str
    caption: str = ""
    wide: bool = False


@dataclass
class Section:
    """One part of the page: its heading, an optional intro, tables, figures and notes (what is missing)."""

    title: str
    anchor: str
    intro: str = ""          # HTML (trusted: written by jobs.report)
    tables: list[Table] = field(default_factory=list)
    figures: list[Figure] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def data_uri(path: Path) -> str:
    """``data:image/png;base64,…`` of a PNG file."""
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


def render_table(table: Table, files: Sequence[str] = ()) -> str:
    """One table as HTML (id ``table-<name>``), with its title, notes and the names of the files it is in."""
    e = html.escape
    parts = [f'<h3 id="table-{e(table.name)}">{e(table.title)}</h3>']
    if files:
        parts.append('<div class="files">' + " · ".join(f"<code>{e(f)}</code>" for f in files) + "</div>")
    if not table.rows:
        parts.append('<div class="note">no rows</div>')
        return "\n".join(parts)
    numeric = [i > 0 and all(NUMBER.match(str(row[i])) for row in table.rows) for i in range(len(table.headers))]
    align = ["" if n else ' class="text"' for n in numeric]
    parts.append(f'<table class="data" data-name="{e(table.name)}">')
    parts.append("<thead><tr>" + "".join(f"<th{a}>{e(h)}</th>" for h, a in zip(table.headers, align))
                 + "</tr></thead><tbody>")
    for row in table.rows:
        parts.append("<tr>" + "".join(f"<td{a}>{e(str(cell))}</td>" for cell, a in zip(row, align)) + "</tr>")
    parts.append("</tbody></table>")
    if table.notes:
        parts.append('<ul class="meta">' + "".join(f"<li>{e(n)}</li>" for n in table.notes) + "</ul>")
    return "\n".join(parts)


def render_figure(figure: Figure) -> str:
    """One embedded PNG with its caption."""
    e = html.escape
    cls = "wide" if figure.wide else "half"
    caption = f"<b>{e(figure.title)}</b>" + (f" — {e(figure.caption)}" if figure.caption else "")
    return (f'<figure class="{cls}"><img src="{data_uri(figure.path)}" alt="{e(figure.title)}">'
            f"<figcaption>{caption}</figcaption></figure>")


def legend() -> str:
    """The metrics legend: each column of the main tables, its meaning, and ↑/↓."""
    e = html.escape
    items = "".join(f"<dt>{e(c.header)} {c.arrow} ({'higher' if c.higher_is_better else 'lower'} is better)</dt>"
                    f"<dd>{e(c.meaning)}</dd>" for c in COLUMNS)
    return f'<dl class="legend">{items}</dl>'


def render_page(title: str, subtitle: str, sections: Sequence[Section],
                table_files: dict[str, list[str]] | None = None) -> str:
    """The whole page as an HTML string. ``table_files``: table name -> the files (relative to the report
    folder) it was also written to, shown as text (never as links)."""
    e = html.escape
    table_files = table_files or {}
    toc = " · ".join(f"{e(s.title)}" for s in sections)
    body = [f"<h1>{e(title)}</h1>", f'<div class="meta">{e(subtitle)}</div>', f'<div class="meta">{toc}</div>']
    for section in sections:
        body.append(f'<h2 id="{e(section.anchor)}">{e(section.title)}</h2>')
        if section.intro:
            body.append(f'<div class="intro">{section.intro}</div>')
        for note in section.notes:
            body.append(f'<div class="note">{e(note)}</div>')
        for table in section.tables:
            body.append(render_table(table, table_files.get(table.name, ())))
        if section.figures:
            body.append('<div class="figures">' + "\n".join(render_figure(f) for f in section.figures) + "</div>")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{e(title)}</title><style>{CSS}</style></head>\n<body>\n" + "\n".join(body)
            + "\n</body></html>\n")


__all__ = ["Figure", "Section", "data_uri", "legend", "render_figure", "render_page", "render_table"]
