"""The report as ONE self-contained HTML file: inline CSS, plots as base64 data URIs."""

from __future__ import annotations

import base64
import html
from collections.abc import Mapping, Sequence

from kdlab.report.aggregate import UnfinishedRun

__all__ = ["CSS", "HtmlTable", "data_uri", "describe_unfinished", "render_html"]

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto;
       max-width: 1400px; padding: 0 1em; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 2em; }
table { border-collapse: collapse; font-size: 0.9em; }
div.table { overflow-x: auto; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; }
th { background: #f0f0f0; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr:nth-child(even) td { background: #fafafa; }
ul.notes li { margin: 0.2em 0; }
figure { display: inline-block; margin: 0.5em; vertical-align: top; }
figure img { max-width: 100%; height: auto; }
figcaption { font-size: 0.85em; color: #555; }
code { background: #f4f4f4; padding: 0 0.2em; }
"""


def _esc(text: object) -> str:
    return html.escape(str(text), quote=True)


def data_uri(png: bytes) -> str:
    """``data:image/png;base64,...`` of PNG bytes."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


#: one table: (heading, notes, (key, header) columns, formatted rows, right-aligned keys)
HtmlTable = tuple[str, Sequence[str], Sequence[tuple[str, str]], Sequence[Mapping[str, str]],
                  frozenset[str]]


def _table(columns: Sequence[tuple[str, str]], rows: Sequence[Mapping[str, str]],
           numeric: frozenset[str]) -> list[str]:
    out = ['<div class="table">', "<table>", "<thead><tr>"]
    out += [f"<th>{_esc(h)}</th>" for _, h in columns]
    out += ["</tr></thead>", "<tbody>"]
    for r in rows:
        cells = "".join(
            ('<td class="num">' if k in numeric else "<td>") + _esc(r.get(k, "")) + "</td>"
            for k, _ in columns)
        out.append(f"<tr>{cells}</tr>")
    out += ["</tbody>", "</table>", "</div>"]
    return out


def render_html(title: str, notes: Sequence[str], tables: Sequence[HtmlTable],
                unfinished: Sequence[UnfinishedRun], plots: Mapping[str, bytes]) -> str:
    """The full HTML page.

    ``tables`` are (heading, notes, columns, rows, numeric): ``columns`` are (key, header)
    pairs, ``rows`` hold already formatted strings and ``numeric`` names right-aligned columns;
    ``plots`` maps file names to PNG bytes (embedded in name order). Everything is escaped;
    nothing refers to an outside resource.
    """
    out = ["<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
           f"<title>{_esc(title)}</title>", f"<style>{CSS}</style>", "</head>", "<body>",
           f"<h1>{_esc(title)}</h1>", '<ul class="notes">']
    out += [f"<li>{_esc(n)}</li>" for n in notes]
    out.append("</ul>")
    for heading, table_notes, columns, rows, numeric in tables:
        out.append(f"<h2>{_esc(heading)}</h2>")
        if table_notes:
            out += ['<ul class="notes">', *(f"<li>{_esc(n)}</li>" for n in table_notes),
                    "</ul>"]
        out += _table(columns, rows, numeric)
    if unfinished:
        out += [f"<h2>Unfinished or failed runs ({len(unfinished)})</h2>",
                "<p>Not included in the table above.</p>", "<ul>"]
        out += [f"<li><code>{_esc(u.rel)}</code>: {_esc(describe_unfinished(u))}</li>"
                for u in unfinished]
        out.append("</ul>")
    if plots:
        out.append("<h2>Plots</h2>")
        for name in sorted(plots):
            out += ["<figure>", f'<img alt="{_esc(name)}" src="{data_uri(plots[name])}">',
                    f"<figcaption>{_esc(name)}</figcaption>", "</figure>"]
    out += ["</body>", "</html>", ""]
    return "\n".join(out)


def describe_unfinished(u: UnfinishedRun) -> str:
    """``failed at epoch 3: error`` style description of an unfinished run."""
    text = u.state
    if u.epoch is not None:
        text += f" at epoch {u.epoch}"
    if u.error:
        text += f": {u.error}"
    return text
