"""The report page: sections of text, tables and figures, rendered to one self-contained HTML file.

A report is a list of ``Section`` objects (see ``reports.steps`` for the steps that make
them). The page is rendered from the sections' JSON form, the very dicts written to
``results.json``, so every number on the page is one of the numbers in that file: numbers are
rounded to ``SIG`` significant digits when a ``Table`` is made, and the page only formats them.
Figures are inlined as base64 PNGs; the page has no script and loads nothing from the network.
"""

from __future__ import annotations

import base64
import html
import math
import numbers
from dataclasses import asdict, dataclass, field
from pathlib import Path

SIG = 4  # significant digits of every float in a table (and so on the page)


def round_sig(x: float, sig: int = SIG) -> float:
    if x == 0 or not math.isfinite(x):
        return x
    return round(x, sig - 1 - math.floor(math.log10(abs(x))))


def cell(value):
    """A table cell as stored in results.json: None, bool, int, str, rounded float or a list of ints."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        value = float(value)
        return round_sig(value) if math.isfinite(value) else str(value)  # JSON has no inf or nan
    if isinstance(value, (list, tuple)):
        return [cell(v) for v in value]
    raise TypeError(f"a table cell cannot hold {type(value).__name__}: {value!r}")


def format_cell(value) -> str:
    """The text the page shows for a stored cell (``cell``): removing the thousands commas gives the number back."""
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}" if abs(value) >= 100_000 else str(value)  # ids and indices stay plain
    if isinstance(value, float):
        decimals = 0 if value == 0 else max(0, SIG - 1 - math.floor(math.log10(abs(value))))
        return f"{value:,.{decimals}f}"
    if isinstance(value, list):
        return "none" if not value else ", ".join(str(v) if isinstance(v, int) else format_cell(v) for v in value)
    return str(value)


def layer_ranges(layers: list[int]) -> str:
    """[11, 12, ..., 27, 29] -> '11–27, 29'."""
    parts, start = [], None
    for i, layer in enumerate(layers):
        if start is None:
            start = layer
        if i + 1 == len(layers) or layers[i + 1] != layer + 1:
            parts.append(str(start) if start == layer else f"{start}–{layer}")
            start = None
    return ", ".join(parts) or "none"


@dataclass
class Table:
    caption: str
    columns: list[str]
    rows: list[list]

    def __post_init__(self):
        self.rows = [[cell(v) for v in row] for row in self.rows]


def facts(caption: str, pairs: dict) -> Table:
    """A two-column table of named values."""
    return Table(caption, ["", "value"], [[name, value] for name, value in pairs.items()])


@dataclass
class Figure:
    file: str  # a PNG in the report folder
    caption: str  # what it shows, in one plain sentence


@dataclass
class Section:
    key: str = ""  # the pipeline sets key and title from its step
    title: str = ""
    text: list[str] = field(default_factory=list)  # plain sentences; measured numbers go in tables
    tables: list[Table] = field(default_factory=list)
    figures: list[Figure] = field(default_factory=list)
    data: dict = field(default_factory=dict)  # the full-precision results behind the tables (JSON only)
    error: str | None = None  # why the step failed

    def to_dict(self) -> dict:
        return {**asdict(self), "status": "failed" if self.error else "ok"}


CSS = """
body { font: 15px/1.45 system-ui, sans-serif; color: #1d2330; margin: 0 auto; max-width: 1500px; padding: 0 24px 48px; }
h1 { margin: 24px 0 4px; } h2 { border-bottom: 2px solid #d8dce6; padding-bottom: 4px; margin-top: 36px; }
h3 { margin: 8px 0; color: #3b4a6b; }
nav a { margin-right: 14px; }
.models { display: grid; grid-template-columns: repeat(var(--n), minmax(0, 1fr)); gap: 28px; }
.scroll { overflow-x: auto; margin: 10px 0 18px; }
table { border-collapse: collapse; font-size: 13px; }
.caption { font-weight: 600; margin: 4px 0; }
th, td { border-bottom: 1px solid #e3e6ee; padding: 3px 10px; text-align: left; vertical-align: top; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
thead th { background: #f2f4f8; }
figure { margin: 12px 0 20px; } figure img { max-width: 100%; height: auto; border: 1px solid #e3e6ee; }
figcaption { font-size: 13px; color: #4a5468; }
.failed { background: #fdecec; border-left: 4px solid #c62828; padding: 8px 12px; }
.problems { background: #fff6e0; border-left: 4px solid #e0a800; padding: 8px 16px; }
pre { background: #f2f4f8; padding: 8px 12px; white-space: pre-wrap; word-break: break-all; }
"""


def _esc(text) -> str:
    return html.escape(str(text), quote=True)


def _table(table: dict, table_id: str) -> str:
    head = "".join(f"<th>{_esc(c)}</th>" for c in table["columns"])
    body = []
    for row in table["rows"]:
        cells = []
        for value in row:
            kind = "num" if isinstance(value, (int, float, list)) and not isinstance(value, bool) else "txt"
            cells.append(f'<td class="{kind}">{_esc(format_cell(value))}</td>')
        body.append(f"<tr>{''.join(cells)}</tr>")
    return (f'<div class="scroll"><p class="caption">{_esc(table["caption"])}</p><table id="{table_id}">'
            f"<thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table></div>")


def _figure(figure: dict, folder: Path) -> str:
    path = folder / figure["file"]
    if not path.is_file():
        return f'<p class="failed">The figure {_esc(figure["file"])} was not written.</p>'
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return (f'<figure><img src="data:image/png;base64,{data}" alt="{_esc(figure["caption"])}" '
            f'data-file="{_esc(figure["file"])}"><figcaption>{_esc(figure["caption"])}</figcaption></figure>')


def _section_body(section: dict, model_index: int) -> str:
    parts = []
    if section["error"]:
        parts.append(f'<p class="failed" data-failed-step="{_esc(section["key"])}"><strong>The step '
                     f'“{_esc(section["title"])}” failed:</strong> {_esc(section["error"])}</p>')
    parts += [f"<p>{_esc(sentence)}</p>" for sentence in section["text"]]
    parts += [_table(t, f"m{model_index}-{section['key']}-t{j}") for j, t in enumerate(section["tables"])]
    return "".join(parts)


def render_page(results: dict, folder: str | Path) -> str:
    """The page for ``results`` (the dict written to results.json); figures are read from ``folder``."""
    folder = Path(folder)
    models = results["models"]
    keys: list[tuple[str, str]] = []  # (key, title) in step order, over every model
    for model in models:
        for s in model["sections"]:
            if s["key"] not in [k for k, _ in keys]:
                keys.append((s["key"], s["title"]))
    names = [m["name"] for m in models]
    out = [f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">'
           f"<title>{_esc(results['title'])}</title><style>{CSS}</style></head><body>",
           f"<header><h1>{_esc(results['title'])}</h1><p>{_esc(results['summary'])}</p>",
           "<nav>" + "".join(f'<a href="#{_esc(k)}">{_esc(t)}</a>' for k, t in keys + [("run", "Run")]) + "</nav>",
           "</header>"]
    opening = results.get("findings")  # what was found, before the detailed sections
    if opening is not None:
        out.append(f'<section id="findings" data-section="findings"><h2>{_esc(opening["title"])}</h2>'
                   f"{_section_body(opening, 0)}</section>")
    failures = results["failures"]
    if failures:
        items = "".join(f"<li>{_esc(f['model'])}: step “{_esc(f['title'])}” failed: {_esc(f['error'])}</li>"
                        for f in failures)
        out.append(f'<div class="problems"><p><strong>Some steps failed; the other sections are complete.'
                   f"</strong></p><ul>{items}</ul></div>")
    for key, title in keys:
        out.append(f'<section id="{_esc(key)}" data-section="{_esc(key)}"><h2>{_esc(title)}</h2>'
                   f'<div class="models" style="--n: {len(models)}">')
        for i, model in enumerate(models):
            section = next((s for s in model["sections"] if s["key"] == key), None)
            out.append(f'<article data-model="{i}">' + (f"<h3>{_esc(names[i])}</h3>" if len(models) > 1 else ""))
            if section is not None:
                out.append(_section_body(section, i))
                out += [_figure(f, folder) for f in section["figures"]]
            out.append("</article>")
        out.append("</div></section>")
    run = results["run"]
    out.append(f'<section id="run" data-section="run"><h2>{_esc(run["title"])}</h2>{_section_body(run, 0)}'
               f"<p>To reproduce this page:</p><pre>{_esc(results['command'])}</pre></section></body></html>")
    return "\n".join(out)
