"""The report's HTML page: sections in order, plotly.js inlined once, no network access.

Each figure is embedded as JSON in a ``<script type="application/json">`` block and drawn
by one loop calling ``Plotly.newPlot``, so plotly.js appears once however many figures
there are. The overview table sorts on a click of a header (numbers as numbers, empty cells last in
either direction). The page records what it drew in ``<body data-figures-rendered=N>`` and shows
any script error in a visible banner, so a reader (and a headless browser in the tests)
can tell a broken page from an empty one.
"""

from __future__ import annotations

import html
import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import plotly.graph_objects as go
from plotly.io.json import to_json_plotly
from plotly.offline import get_plotlyjs

if TYPE_CHECKING:
    from precision_lab.report.data import ReportData

PLOTLY_CONFIG = {"displaylogo": False, "responsive": True}


@dataclass
class Section:
    """One block of the page.

    Attributes:
        key: HTML id (letters, digits, dashes).
        title: Heading.
        caption: One line saying how to read the figure.
        figure: A Plotly figure, or its plain ``{"data", "layout"}`` spec, or None.
        html: Trusted HTML to show instead of (or besides) a figure, e.g. a table.
        empty: Why there is nothing to show; replaces the figure when set.
        notes: Further lines under the figure (e.g. where traces were downsampled).
    """

    key: str
    title: str
    caption: str
    figure: go.Figure | dict | None = None
    html: str = ""
    empty: str = ""
    notes: list[str] = field(default_factory=list)


_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;
margin:0 auto;max-width:1500px;padding:0 24px 48px;color:#1b1f24;background:#fff}
h1{font-size:1.6em;margin:24px 0 4px}h2{font-size:1.25em;margin:36px 0 4px;
border-bottom:1px solid #d0d7de;padding-bottom:4px}
p.caption{margin:2px 0 8px;color:#424a53}p.note{margin:4px 0;color:#6e4b00;font-size:.9em}
p.empty{padding:24px;background:#f6f8fa;border:1px dashed #afb8c1;color:#424a53}
nav a{margin-right:14px}#page-errors{background:#ffebe9;border:1px solid #cf222e;
padding:8px 12px;color:#82071e;white-space:pre-wrap}
table.data{border-collapse:collapse;font-size:.85em;width:100%}
table.data th,table.data td{border:1px solid #d0d7de;padding:3px 6px;text-align:left}
table.data th{background:#f6f8fa;position:sticky;top:0}
table.sortable th{cursor:pointer;user-select:none}
table.sortable th[data-dir=asc]::after{content:" \\25B2"}
table.sortable th[data-dir=desc]::after{content:" \\25BC"}
tr.broken td{background:#ffebe9}td.whatif-yes{background:#d8f3dc}
td.whatif-underflow{background:#fff3bf}td.whatif-no{background:#ffebe9}td.num{text-align:right;font-variant-numeric:tabular-nums}
div.scroll{max-height:520px;overflow:auto;border:1px solid #d0d7de}
code{background:#f6f8fa;padding:1px 4px}pre{white-space:pre-wrap;font-size:.85em;margin:4px 0}
"""

# Registered before plotly.js so that an error anywhere on the page is shown.
_ERROR_JS = """
window.__pageErrors=[];
window.addEventListener('error',function(e){window.__pageErrors.push(String(e.message));
var b=document.getElementById('page-errors');if(b){b.hidden=false;
b.textContent='Script error: '+window.__pageErrors.join('\\n');}});
"""

_RENDER_JS = """
(function(){
var specs=document.querySelectorAll('script.figure-spec');var jobs=[];
specs.forEach(function(s){var f=JSON.parse(s.textContent);
jobs.push(Plotly.newPlot(s.dataset.target,f.data,f.layout,CONFIG));});
Promise.all(jobs).then(function(){document.body.dataset.figuresRendered=jobs.length;},
function(err){window.dispatchEvent(new ErrorEvent('error',{message:String(err)}));});
document.querySelectorAll('table.sortable').forEach(function(t){
t.querySelectorAll('th').forEach(function(th,col){th.addEventListener('click',function(){
var dir=th.dataset.dir==='asc'?'desc':'asc';t.querySelectorAll('th').forEach(
function(h){delete h.dataset.dir;});th.dataset.dir=dir;var body=t.tBodies[0];
var rows=Array.from(body.rows);rows.sort(function(a,b){
var x=a.cells[col].dataset.v??a.cells[col].textContent,
y=b.cells[col].dataset.v??b.cells[col].textContent;
if(x===''||y===''){return (x==='')-(y==='');}
var nx=Number(x),ny=Number(y),c;
c=(!isNaN(nx)&&!isNaN(ny))?nx-ny:String(x).localeCompare(String(y));
return dir==='asc'?c:-c;});
rows.forEach(function(r){body.appendChild(r);});});});});
})();
"""


def data_table(key: str, headers, rows: list[str], *, scroll: bool = True) -> str:
    """A sortable data table: ``headers`` as plain text (escaped here), ``rows`` as finished
    ``<tr>`` elements; in a horizontally scrolling box unless ``scroll`` is False."""
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in headers)
    table = (
        f'<table class="data sortable" id="{key}"><thead><tr>{head}</tr></thead>'
        f"<tbody>{''.join(rows)}</tbody></table>"
    )
    return f'<div class="scroll">{table}</div>' if scroll else table


def _figure_json(fig: go.Figure | dict) -> str:
    # "</" inside a <script> block would end it early; "<\\/" is the same JSON string.
    # Plotly writes numpy arrays as base64 typed arrays: float32 display values cost
    # about 5.3 characters each.
    spec = fig if isinstance(fig, dict) else fig.to_plotly_json()
    return to_json_plotly(spec).replace("</", "<\\/")


def _section_html(sec: Section) -> str:
    parts = [
        f'<section id="{sec.key}">',
        f"<h2>{html.escape(sec.title)}</h2>",
        f'<p class="caption">{html.escape(sec.caption)}</p>',
    ]
    if sec.empty:
        parts.append(f'<p class="empty">{html.escape(sec.empty)}</p>')
    else:
        if sec.html:
            parts.append(sec.html)
        if sec.figure is not None:
            target = f"fig-{sec.key}"
            parts.append(f'<div id="{target}" class="figure"></div>')
            parts.append(
                f'<script type="application/json" class="figure-spec" data-target="{target}">'
                f"{_figure_json(sec.figure)}</script>"
            )
    parts.extend(f'<p class="note">{html.escape(n)}</p>' for n in sec.notes)
    parts.append("</section>")
    return "\n".join(parts)


def sources_html(data: ReportData) -> str:
    """The list of run directories a report was built from."""
    items = "".join(
        f"<li><b>{html.escape(s.label)}</b>: <code>{html.escape(str(s.path))}</code>, "
        f"{len(s.summary)} runs, {len(s.records):,} records</li>"
        for s in data.sources
    )
    return f"<ul>{items}</ul>"


def render_page(title: str, sections: list[Section], intro_html: str = "") -> str:
    """The whole page as one HTML string.

    Args:
        title: Page title and heading.
        sections: The blocks, in order (a navigation bar links to each).
        intro_html: Trusted HTML shown under the heading (e.g. `sources_html`).
    """
    nav = "".join(f'<a href="#{s.key}">{html.escape(s.title)}</a>' for s in sections)
    body = "\n".join(_section_html(s) for s in sections)
    render_js = _RENDER_JS.replace("CONFIG", json.dumps(PLOTLY_CONFIG))
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{html.escape(title)}</title>
<style>{_CSS}</style>
<script>{_ERROR_JS}</script>
<script type="text/javascript">{get_plotlyjs()}</script>
</head><body>
<h1>{html.escape(title)}</h1>
<div id="page-errors" hidden></div>
{intro_html}
<nav>{nav}</nav>
{body}
<script>{render_js}</script>
</body></html>
"""
