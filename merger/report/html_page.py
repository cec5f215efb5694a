"""The markup of report.html, from the context merger.report.html_report builds for it.

Every value is escaped where it enters the page (`escaped`: & < > " ' as character references, so
no text of a recipe, a path or an override can open a tag or leave an attribute); the one value
taken as markup is a plot's SVG, which merger.report.svg_plots builds from escaped parts. The data
for the page's script is JSON with < > & ' written as \\u escapes, so it cannot close its script
element. The style and the script are static files beside this module (templates/report.css and
report.js), read once per process. Plain string building, no template engine: a full cache hit
writes this page, and an engine's import and a template's compile would be most of its cost.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from merger.report.svg_plots import shown

TEMPLATES_DIR = Path(__file__).parent / "templates"
STYLE_FILE = "report.css"
SCRIPT_FILE = "report.js"
HEAD = """<!DOCTYPE html><html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; img-src 'self' file: data:; \
style-src 'unsafe-inline'; script-src 'unsafe-inline'">
"""
NAV = (
    '<nav><a href="#grid-section">Grid</a><a href="#compare">Compare</a><a href="#metrics">Metrics</a>'
    '<a href="#plots-section">Plots</a><a href="#provenance">Provenance</a></nav>'
)
COMPARE_FRAME = """
  <div id="compare-frame">
    <div class="layer" id="compare-bottom"><img id="compare-a-img" alt="A"></div>
    <div class="layer" id="compare-top"><img id="compare-b-img" alt="B"></div>
    <span class="frame-label" id="label-a"></span><span class="frame-label" id="label-b"></span>
    <div id="divider" role="slider" tabindex="0" aria-label="divider between A and B" aria-valuemin="0" \
aria-valuemax="100" aria-valuenow="50"></div>
  </div>
  <p class="hint">Drag the divider (or use the arrow keys on it); wheel to zoom both images, drag elsewhere \
to pan; double-click to reset. Click a tile's image to compare it as B.</p>"""
_ESCAPES = str.maketrans({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&#34;", "'": "&#39;"})
_JSON_ESCAPES = str.maketrans({"<": "\\u003c", ">": "\\u003e", "&": "\\u0026", "'": "\\u0027"})


def escaped(value: Any) -> str:
    """`value`'s text, safe in an element's content and in a quoted attribute."""
    return str(value).translate(_ESCAPES)


def script_json(value: Any) -> str:
    """`value` as JSON (keys sorted, no NaN) that is safe inside a <script> element."""
    return json.dumps(value, sort_keys=True, allow_nan=False).translate(_JSON_ESCAPES)


@functools.cache
def static_text(name: str) -> str:
    return (TEMPLATES_DIR / name).read_text(encoding="utf-8")


def render(context: Mapping[str, Any]) -> str:
    """The whole page."""
    title = escaped(context["title"])
    parts = [
        HEAD,
        f"<title>{title}</title>\n<style>\n",
        static_text(STYLE_FILE),
        "</style>\n</head>\n<body>\n<header>\n",
        f"  <h1>{title}</h1>\n",
        _summary_line(context),
        f"\n  {NAV}",
        *(f'\n  <p class="note">{escaped(note)}</p>' for note in context["notes"]),
        '\n</header>\n<main>\n<section id="grid-section">\n  <h2>Jobs</h2>\n  <div id="grid">',
        *(_tile(t) for t in context["tiles"]),
        "\n  </div>\n</section>\n\n",
        _compare(context["compare"]),
        "\n\n",
        _table(context["table"]),
        "\n\n",
        _plots(context["plots"]),
        "\n\n",
        _provenance(context["provenance"]),
        '\n</main>\n<script type="application/json" id="data">',
        script_json(context["compare"]),
        "</script>\n<script>\n",
        static_text(SCRIPT_FILE),
        "</script>\n</body>\n</html>",
    ]
    return "".join(parts)


def _plural(count: int, word: str) -> str:
    return f"{escaped(count)} {word}{'' if count == 1 else 's'}"


def _summary_line(context: Mapping[str, Any]) -> str:
    line = f"  <p>{_plural(context['job_count'], 'job')}"
    objectives: Sequence[Mapping[str, Any]] = context["objectives"]
    if objectives:
        line += "; objective: " + ", ".join(f"{escaped(o['direction'])} {escaped(o['name'])}" for o in objectives)
    else:
        line += "; no objective"
    if context["best"] is not None:
        line += f"; best: job {escaped(context['best'])}"
    if context["swept"]:
        line += "; swept: " + escaped(", ".join(str(s) for s in context["swept"]))
    return line + "</p>"


def _tile(t: Mapping[str, Any]) -> str:
    job = escaped(t["job"])
    classes = "tile" + (" best" if t["best"] else "") + (" pareto" if t["pareto"] else "")
    out = f'\n    <div class="{classes}" data-job="{job}">\n      <div>'
    if t["best"]:
        out += '<span class="badge best">best</span>'
    if t["pareto"]:
        out += '<span class="badge pareto">Pareto</span>'
    if t["warnings"]:
        out += f'<span class="badge warned" title="see the provenance">{_plural(t["warnings"], "warning")}</span>'
    out += f"\n        <code>job {job}</code>\n      </div>"
    if t["images"]:
        out += '\n      <div class="images">'
        for image in t["images"]:
            caption = escaped(image["caption"])
            out += (
                f'\n        <figure><img src="{escaped(image["src"])}" alt="{caption} of job {job}" loading="lazy"'
                f' data-key="{escaped(image["key"])}" title="compare as B"><figcaption>{caption}</figcaption></figure>'
            )
        out += "\n      </div>"
    else:
        out += '\n      <div class="noimage">no preview</div>'
    out += f'\n      <div class="label">{escaped(t["label"])}</div>\n      <dl>'
    several = len(t["objective"]) > 1
    for name, value in t["objective"]:
        out += f"<dt>objective{' ' + escaped(name) if several else ''}</dt><dd>{escaped(shown(value))}</dd>"
    for name, value in t["metrics"]:
        out += f"<dt>{escaped(name)}</dt><dd>{escaped(shown(value))}</dd>"
    if t["more_metrics"]:
        out += f"<dt>…</dt><dd>{escaped(t['more_metrics'])} more in the table</dd>"
    return out + "\n      </dl>\n    </div>"


def _compare(compare: Mapping[str, Any]) -> str:
    out = '<section id="compare">\n  <h2>Compare</h2>'
    images: Sequence[Mapping[str, Any]] = compare["images"]
    if images:
        hidden = " hidden" if len(images) < 2 else ""
        options = "".join(f'<option value="{n}">{escaped(image["label"])}</option>' for n, image in enumerate(images))
        out += (
            '\n  <div class="controls">\n    <label>A (left) <select id="compare-a"></select></label>\n'
            '    <label>B (right) <select id="compare-b"></select></label>\n'
            f'    <label{hidden}>image <select id="compare-image">{options}\n    </select></label>\n  </div>'
            + COMPARE_FRAME
        )
    else:
        out += '\n  <p class="noimage">No job has a preview image to compare.</p>'
    return out + "\n</section>"


def _cell(cell: Mapping[str, Any]) -> str:
    sort, attributes = cell["sort"], ""
    if isinstance(sort, int | float):
        attributes = f' data-num="{escaped(sort)}"'
    elif sort is not None:
        attributes = f' data-text="{escaped(sort)}"'
    if cell["title"]:
        attributes += f' title="{escaped(cell["title"])}"'
    return f"\n        <td{attributes}>{escaped(cell['text'])}</td>"


def _table(table: Mapping[str, Any]) -> str:
    out = '<section id="metrics">\n  <h2>Metrics</h2>'
    rows: Sequence[Mapping[str, Any]] = table["rows"]
    if not rows:
        return out + '\n  <p class="noimage">No job.</p>\n</section>'
    headers = "".join(
        f'<th aria-sort="none"><button type="button">{escaped(h)}</button></th>' for h in table["headers"]
    )
    out += '\n  <div class="table-wrap">\n  <table id="metrics-table">'
    out += f"\n    <thead><tr>{headers}</tr></thead>\n    <tbody>"
    for row in rows:
        marked = ""
        if row["best"] or row["pareto"]:
            marked = f' class="{"best" if row["best"] else ""}{" pareto" if row["pareto"] else ""}"'
        cells = "".join(_cell(cell) for cell in row["cells"])
        out += f'\n      <tr data-job="{escaped(row["job"])}"{marked}>{cells}\n      </tr>'
    return out + (
        '\n    </tbody>\n  </table>\n  </div>\n  <p class="hint">Click a column\'s header to sort by it (again to'
        " reverse); missing and failed figures sort last.</p>\n</section>"
    )


def _plots(plots: Sequence[Mapping[str, Any]]) -> str:
    out = '<section id="plots-section">\n  <h2>Plots</h2>\n  <div id="plots">'
    for plot in plots:  # the SVG is markup that svg_plots built from escaped text
        out += f'\n    <figure class="plot-figure" title="{escaped(plot["title"])}">{plot["svg"]}</figure>'
    if not plots:
        out += '\n    <p class="noimage">No numeric swept variable with a metric, and no two objectives, to plot.</p>'
    return out + "\n  </div>\n</section>"


def _provenance(provenance: Sequence[Mapping[str, Any]]) -> str:
    out = '<section id="provenance">\n  <h2>Provenance</h2>'
    for p in provenance:
        recipe, git = p["recipe"], p["git"]
        if git:
            dirty = ' <span class="dirty">dirty</span> (uncommitted changes)' if git["dirty"] else ""
            git_cell = f"<code>{escaped(shown(git['commit']))}</code>{dirty}"
        else:
            git_cell = "not in a git repository"
        command = f"<pre>{escaped(p['command'])}</pre>" if p["command"] else "—"
        out += (
            f'\n  <details data-job="{escaped(p["job"])}">\n    <summary>job {escaped(p["job"])}: {escaped(p["label"])}'
            "</summary>\n    <table>\n"
            f"      <tr><th>recipe</th><td>{escaped(shown(recipe['name']))} <code>{escaped(shown(recipe['file']))}"
            "</code></td></tr>\n"
            f"      <tr><th>git</th><td>{git_cell}</td></tr>\n"
            f"      <tr><th>command</th><td>{command}</td></tr>"
        )
        for name, status in p["nodes"].items():
            out += f"\n      <tr><th>node {escaped(name)}</th><td>{escaped(status)}</td></tr>"
        out += "\n    </table>"
        out += _files_table(p["sources"], ("source", "path", "hash"), "key")
        out += _files_table(p["outputs"], ("output", "path", "sha256"), "sha256")
        if p["warnings"]:
            out += "\n    <ul>" + "".join(f"<li>{escaped(w)}</li>" for w in p["warnings"]) + "</ul>"
        out += "\n  </details>"
    return out + "\n</section>"


def _files_table(rows: Sequence[Mapping[str, Any]], headers: tuple[str, str, str], digest: str) -> str:
    if not rows:
        return ""
    head = "".join(f"<th>{h}</th>" for h in headers)
    body = "".join(
        f"<tr><td>{escaped(r['name'])}</td><td><code>{escaped(shown(r['path']))}</code></td>"
        f"<td><code>{escaped(shown(r[digest]))}</code></td></tr>"
        for r in rows
    )
    return f"\n    <table><tr>{head}</tr>{body}\n    </table>"
