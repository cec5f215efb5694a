"""report.html, in-process: a synthetic sweep report with tiny PNGs, the page parsed back.

The page is self-contained (no network reference), escapes every user text, refers to its images
relatively, and draws a plot per metric and swept variable; the Pareto front is checked against a
brute-force one. Its behaviour in a browser: tests/test_report_browser.py.
"""

from __future__ import annotations

import html
import json
import math
import re
import shutil
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from html.parser import HTMLParser
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from merger.report import html_page, html_report
from merger.report.html_report import HTML_REPORT_NAME, write_html_report
from merger.report.svg_plots import pareto_front, sweep_plots

HOSTILE_OVERRIDES = ['"onload=alert(1)', "<script>alert(1)</script>", "</script><script>alert(3)</script>"]
HOSTILE_RECIPE = "<img src=x onerror=alert(1)>"
HOSTILE_JOB = "3 <b>x</b>\"'"


def picture(path: Path, size: tuple[int, int], seed: int) -> None:
    """A smooth gradient with a pattern and some noise: an image with many colours."""
    width, height = size
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([x * 255 / max(1, width - 1), y * 255 / max(1, height - 1), 128 + 100 * np.sin((x + y) / 3)], -1)
    pixels = np.clip(rgb + rng.normal(0, 12, rgb.shape), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def sweep_summary(root: Path, *, count: int = 4, two_objectives: bool = False, hostile: bool = True) -> dict[str, Any]:
    """A sweep report of `count` jobs (alpha from 0 to 1) whose previews are PNGs under root/sweep, of
    two input images under root/inputs (one cropped; x2 and x4 models)."""
    sweep, inputs = root / "sweep", root / "inputs"
    picture(inputs / "eval.png", (64, 48), 0)
    picture(inputs / "second.png", (26, 25), 1)
    alphas = [i / max(1, count - 1) for i in range(count)]
    jobs = []
    for i, alpha in enumerate(alphas):
        name = HOSTILE_JOB if hostile and i == 3 else str(i)
        folder = sweep / name
        picture(folder / "blend__eval.png", (40, 36), 10 + i)
        picture(folder / "blend__second.png", (24, 24), 20 + i)
        psnr, sharpness = 30 + 4 * alpha - 3 * alpha**2, 200 - 60 * alpha
        metrics: dict[str, Any] = {"blend": {"psnr": psnr, "ssim": None if i == 0 else 0.8 + 0.01 * i}}
        metrics["blend"]["sharpness"] = sharpness
        metrics["alt"] = {"failed": {"psnr": "the reference is gone"}} if i == 1 else {"psnr": 25 + i}
        overrides = [f"alpha={alpha:g}", f"mode={'ab'[i % 2]}"]
        if hostile and i == 1:
            overrides += HOSTILE_OVERRIDES
        eval_row = {"output": "blend", "node": "blend", "image": str(inputs / "eval.png"), "downscale": 2, "scale": 2}
        eval_row |= {"channels": 3, "size": [40, 36], "png": str(folder / "blend__eval.png"), "crop": [8, 4, 40, 36]}
        second_row = {"output": "blend", "node": "blend", "image": str(inputs / "second.png"), "downscale": 4}
        second_row |= {"scale": 4, "channels": 3, "size": [24, 24], "png": str(folder / "blend__second.png")}
        recipe_file = f'/abs/recipes/"><script>alert({i})</script>.yaml' if hostile else "/abs/recipes/demo.yaml"
        jobs.append(
            {
                "job": name,
                "overrides": overrides,
                "values": {"alpha": alpha, "mode": "ab"[i % 2]},
                "seconds": 1.0 + i,
                "nodes": {"blend": "computed"},
                "outputs": {"blend": {"path": str(folder / f"demo_{i}.safetensors"), "sha256": f"{i:064x}"}},
                "warnings": ["the blend has NaN in 1 key"] if i == 2 else [],
                "previews": [eval_row, second_row],
                "metrics": metrics,
                "objective": [psnr, sharpness] if two_objectives else psnr,
                "provenance": {
                    "recipe": {
                        "name": HOSTILE_RECIPE if hostile and i == 2 else "demo",
                        "file": recipe_file,
                        "git": {"commit": "abc123", "dirty": i == 1} if i else None,
                    },
                    "sources": {"psnr": {"path": "/abs/psnr.safetensors", "key": f"key{i}"}},
                    "command": f"merger recipe=demo {' '.join(overrides)}",
                },
            }
        )
    objective = [{"metric": "psnr", "output": "blend", "direction": "maximize"}]
    if two_objectives:
        objective.append({"metric": "sharpness", "output": "blend", "direction": "maximize"})
    return {
        "objective": objective,
        "best": jobs[min(2, count - 1)]["job"],
        "pareto": [job["job"] for job in jobs if not any(beats(o, job) for o in jobs)] if two_objectives else [],
        "swept": {"alpha": alphas, "mode": ["ab"[i % 2] for i in range(count)]},
        "jobs": jobs,
    }


def beats(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Job a dominates job b on (psnr, sharpness), both maximised."""
    (pa, sa), (pb, sb) = a["objective"], b["objective"]
    return pa >= pb and sa >= sb and (pa, sa) != (pb, sb)


class Page(HTMLParser):
    """The elements of a page (tag, attributes) and the text inside each <script>."""

    def __init__(self, text: str) -> None:
        super().__init__(convert_charrefs=True)
        self.elements: list[tuple[str, dict[str, str]]] = []
        self.scripts: list[tuple[dict[str, str], str]] = []
        self.text: list[str] = []
        self._script: dict[str, str] | None = None
        self.feed(text)
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = {k: v or "" for k, v in attrs}
        self.elements.append((tag, attributes))
        if tag == "script":
            self._script = attributes
            self.scripts.append((attributes, ""))

    def handle_endtag(self, tag: str) -> None:
        if tag == "script":
            self._script = None

    def handle_data(self, data: str) -> None:
        if self._script is not None:
            self.scripts[-1] = (self.scripts[-1][0], self.scripts[-1][1] + data)
        else:
            self.text.append(data)

    def having(self, css_class: str) -> list[dict[str, str]]:
        return [a for _, a in self.elements if css_class in a.get("class", "").split()]

    def data(self) -> dict[str, Any]:
        found = [text for attributes, text in self.scripts if attributes.get("id") == "data"]
        assert len(found) == 1
        loaded: dict[str, Any] = json.loads(found[0])
        return loaded


def written(tmp_path: Path, **options: Any) -> tuple[Path, dict[str, Any], str, Page]:
    summary = sweep_summary(tmp_path, **options)
    page = write_html_report(tmp_path / "sweep", summary, title="demo sweep <alpha>")
    text = page.read_text()
    return page, summary, text, Page(text)


def test_page_has_a_tile_per_job_and_marks_the_best(tmp_path: Path) -> None:
    page, summary, text, parsed = written(tmp_path)
    assert page == tmp_path / "sweep" / HTML_REPORT_NAME and page.is_file()
    tiles = parsed.having("tile")
    assert [t["data-job"] for t in tiles] == [job["job"] for job in summary["jobs"]]
    best = [t["data-job"] for t in tiles if "best" in t["class"].split()]
    assert best == [summary["best"]]
    assert text.count('<span class="badge best">best</span>') == 1
    assert "<title>demo sweep &lt;alpha&gt;</title>" in text
    assert not parsed.having("pareto")  # one objective: no front
    table_rows = [a for tag, a in parsed.elements if tag == "tr" and "data-job" in a]
    assert [r["data-job"] for r in table_rows] == [job["job"] for job in summary["jobs"]]
    assert {a.get("id") for _, a in parsed.elements} >= {"compare-a", "compare-b", "compare-image", "compare-frame"}
    assert {a.get("id") for _, a in parsed.elements} >= {"divider", "compare-top", "metrics-table", "provenance"}


def test_hostile_text_appears_only_escaped(tmp_path: Path) -> None:
    _, _, text, parsed = written(tmp_path)
    assert "<script>alert" not in text and "<img src=x" not in text and "<b>x</b>" not in text
    assert [a for a, _ in parsed.scripts] == [{"type": "application/json", "id": "data"}, {}]  # only the page's own
    assert not [a for _, attributes in parsed.elements for a in attributes if a.startswith("on")]
    shown = " ".join(parsed.text)
    for hostile in [*HOSTILE_OVERRIDES, HOSTILE_RECIPE, HOSTILE_JOB]:
        assert hostile in shown  # as text, to be read
    labels = [job["label"] for job in parsed.data()["jobs"]]
    assert any(all(h in label for h in HOSTILE_OVERRIDES) for label in labels)  # the script's data round-trips


def test_nothing_is_fetched_from_a_network_and_images_are_relative(tmp_path: Path) -> None:
    page, _, text, parsed = written(tmp_path)
    for marker in ("http://", "https://", "//cdn", "file://", "@import", "url("):
        assert marker not in text
    references = [a[k] for _, a in parsed.elements for k in ("src", "href") if k in a]
    sources = [a["src"] for tag, a in parsed.elements if tag == "img" and "src" in a]
    data = parsed.data()
    sources += [src for job in data["jobs"] for src in job["images"].values()]
    sources += [src for image in data["images"] for src in image["lr"].values()]
    assert len(sources) > 4 * 2
    for reference in references + sources:
        assert not reference.startswith(("/", "//", "http:", "https:", "file:", "javascript:")), reference
        assert ":" not in reference.split("/")[0], reference
    for source in sources:
        assert (page.parent / unquote(source)).is_file(), source
    assert {r for r in references if r.startswith("#")} == {r for r in references if not r.endswith(".png")}


def test_upscaled_inputs_have_the_previews_size(tmp_path: Path) -> None:
    page, summary, _, parsed = written(tmp_path)
    images = {image["key"]: image["lr"] for image in parsed.data()["images"]}
    assert set(images) == {"blend__eval.png", "blend__second.png"}
    for row in summary["jobs"][0]["previews"]:
        for method in ("nearest", "bicubic"):
            with Image.open(page.parent / unquote(images[Path(row["png"]).name][method])) as made:
                assert made.size == tuple(row["size"]), (row["png"], method)
    # nearest: each pixel of the box-downscaled crop, repeated scale x scale
    with Image.open(summary["jobs"][0]["previews"][0]["image"]) as source:
        region = np.asarray(source.convert("RGB"), dtype=np.float64)[4:40, 8:48]
    low = np.rint(region.reshape(18, 2, 20, 2, 3).mean(axis=(1, 3))).astype(np.uint8)
    with Image.open(page.parent / unquote(images["blend__eval.png"]["nearest"])) as made:
        assert np.array_equal(np.asarray(made), low.repeat(2, axis=0).repeat(2, axis=1))


def test_without_pillow_the_upscaled_inputs_are_left_out(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    summary = sweep_summary(tmp_path)
    row = summary["jobs"][0]["previews"][0]
    assert html_report.upscaled_input({**row, "image": str(tmp_path / "gone.png")}, tmp_path / "f", "x") == {}
    monkeypatch.setitem(sys.modules, "PIL", None)
    assert html_report.upscaled_input(row, tmp_path / "f", "x") == {}
    page = write_html_report(tmp_path / "sweep", summary, title="no Pillow")
    assert all(image["lr"] == {} for image in Page(page.read_text()).data()["images"])


def test_plots_for_each_metric_and_numeric_variable(tmp_path: Path) -> None:
    _, summary, text, _ = written(tmp_path)
    columns = ["blend.psnr", "blend.ssim", "blend.sharpness", "alt.psnr"]
    for column in columns:
        assert f'aria-label="{column} against alpha"' in text
    assert "against mode" not in text  # strings are not plotted
    plots, notes = sweep_plots(summary["jobs"], summary["swept"], [tuple(c.split(".")) for c in columns], [], None)
    assert notes == [] and len(plots) == len(columns) and text.count("<svg") == len(columns)
    for title, svg in plots:
        root = ET.fromstring(svg)  # well-formed
        circles = [e for e in root.iter("circle") if e.get("class") == "dot"]
        assert len(circles) == (3 if title.startswith(("blend.ssim", "alt.psnr")) else 4), title
        assert len(list(root.iter("polyline"))) == 1


def test_one_line_per_combination_of_the_other_variables(tmp_path: Path) -> None:
    jobs = [
        {"job": str(i), "values": {"alpha": a, "beta": b}, "metrics": {"m": {"psnr": a + b}}}
        for i, (a, b) in enumerate((a, b) for b in (0.1, 0.2) for a in (0.0, 0.5, 1.0))
    ]
    swept = {"alpha": [j["values"]["alpha"] for j in jobs], "beta": [j["values"]["beta"] for j in jobs]}
    plots, _ = sweep_plots(jobs, swept, [("m", "psnr")], [], None)
    by_title = {title: ET.fromstring(svg) for title, svg in plots}
    assert len(list(by_title["m.psnr against alpha"].iter("polyline"))) == 2
    legends = [e.text for e in by_title["m.psnr against alpha"].iter("text") if e.get("class") == "legend"]
    assert legends == ["beta=0.1", "beta=0.2"]
    assert len(list(by_title["m.psnr against beta"].iter("polyline"))) == 3


def test_two_objectives_mark_and_plot_the_pareto_front(tmp_path: Path) -> None:
    _, summary, text, parsed = written(tmp_path, two_objectives=True)
    assert [t["data-job"] for t in parsed.having("pareto") if "tile" in t["class"]] == summary["pareto"]
    assert summary["pareto"] == ["0", "1", "2"]
    points = [tuple(job["objective"]) for job in summary["jobs"]]
    assert [summary["jobs"][i]["job"] for i in pareto_front(points, ["maximize", "maximize"])] == summary["pareto"]
    trade = [svg for svg in re.findall("<svg.*?</svg>", text, re.S) if "blend.sharpness against blend.psnr" in svg]
    assert len(trade) == 1 and trade[0].count('class="dot on-front"') == 3 and 'class="best-ring"' in trade[0]


def test_no_objective_two_metrics_plot_their_front(tmp_path: Path) -> None:
    jobs = [
        {"job": str(i), "metrics": {"b": {"psnr": p, "perplexity": q}}}
        for i, (p, q) in enumerate([(1, 5), (2, 3), (3, 4)])
    ]
    plots, _ = sweep_plots(jobs, {}, [("b", "psnr"), ("b", "perplexity")], [], None)
    ((title, svg),) = plots
    assert title == "b.perplexity against b.psnr (maximize x, minimize y)"
    fronts = [e.get("data-job") for e in ET.fromstring(svg).iter("circle") if e.get("class") == "dot on-front"]
    assert sorted(fronts) == ["1", "2"]


def test_one_job_renders(tmp_path: Path) -> None:
    summary = sweep_summary(tmp_path, count=1, hostile=False)
    summary |= {"swept": {}, "objective": [], "best": None}
    summary["jobs"][0]["objective"] = None
    parsed = Page(write_html_report(tmp_path / "sweep", summary, title="one run").read_text())
    assert [t["data-job"] for t in parsed.having("tile")] == ["0"] and not parsed.having("best")
    data = parsed.data()
    assert [job["job"] for job in data["jobs"]] == ["0"] and all(image["lr"] for image in data["images"])


def test_a_job_without_previews_or_metrics_shows_its_text(tmp_path: Path) -> None:
    summary = {"objective": [], "best": None, "pareto": [], "swept": {}, "jobs": [{"job": "0", "overrides": []}]}
    page = write_html_report(tmp_path, summary, title="bare")
    text = page.read_text()
    assert "no preview" in text and "No job has a preview image to compare." in text
    assert Page(text).data() == {
        "images": [],
        "jobs": [{"best": False, "images": {}, "job": "0", "label": "(no overrides)"}],
    }


def test_metrics_table_cells_sort_by_number_and_say_failures(tmp_path: Path) -> None:
    _, _, text, parsed = written(tmp_path)
    cells = [a for tag, a in parsed.elements if tag == "td"]
    assert any(a.get("title") == "the reference is gone" and "data-num" not in a for a in cells)
    numbers = [float(a["data-num"]) for a in cells if "data-num" in a]
    assert 30.0 in numbers and all(math.isfinite(n) for n in numbers)
    headers = text.split('<table id="metrics-table">')[1].split("</thead>")[0]
    for header in ("job", "alpha", "mode", "blend.psnr", "alt.psnr", "objective", "seconds"):
        assert f'<button type="button">{header}</button>' in headers


def test_a_large_sweep_is_capped_and_quick(tmp_path: Path) -> None:
    jobs = [
        {"job": str(i), "overrides": [f"alpha={i}"], "values": {"alpha": i}, "metrics": {"b": {"psnr": math.sin(i)}}}
        for i in range(10_000)
    ]
    summary = {"objective": [], "best": "9999", "pareto": [], "swept": {"alpha": list(range(10_000))}, "jobs": jobs}
    start = time.perf_counter()
    page = write_html_report(tmp_path, summary, title="big")
    seconds = time.perf_counter() - start
    text = page.read_text()
    tiles = Page(text).having("tile")
    assert len(tiles) == html_report.MAX_JOBS_SHOWN + 1 and tiles[-1]["data-job"] == "9999"  # and the best
    assert "show 501 of 10000 jobs" in text and "The plots draw the first 2000 of 10000 jobs" in text
    assert len(text) < 5_000_000 and seconds < 10


def test_the_style_and_script_are_the_static_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    copy = tmp_path / "templates"
    shutil.copytree(html_page.TEMPLATES_DIR, copy)
    (copy / html_page.STYLE_FILE).write_text("h1 { color: red; }\n")
    (copy / html_page.SCRIPT_FILE).write_text("var edited = 1;\n")
    monkeypatch.setattr(html_page, "TEMPLATES_DIR", copy)
    html_page.static_text.cache_clear()
    try:
        text = write_html_report(tmp_path, sweep_summary(tmp_path / "run"), title="<t>").read_text()
    finally:
        html_page.static_text.cache_clear()
    assert "<style>\nh1 { color: red; }\n</style>" in text and "<script>\nvar edited = 1;\n</script>" in text
    assert "<h1>&lt;t&gt;</h1>" in text


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_escaped_text_reads_back_and_opens_nothing(text: str) -> None:
    out = html_page.escaped(text)
    assert html.unescape(out) == text
    assert not set(out) & set("<>\"'") and "&" not in out.replace("&amp;", "").replace("&lt;", "").replace(
        "&gt;", ""
    ).replace("&#34;", "").replace("&#39;", "")


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)


@settings(max_examples=200, deadline=None)
@given(json_values)
def test_script_json_reads_back_and_cannot_close_its_element(value: Any) -> None:
    out = html_page.script_json(value)
    assert json.loads(out) == value
    assert not set(out) & set("<>&'")


def test_script_json_refuses_nan() -> None:
    with pytest.raises(ValueError):
        html_page.script_json({"x": math.nan})


def test_href_is_relative_and_quoted(tmp_path: Path) -> None:
    assert html_report.href(str(tmp_path / "0" / "a b#c.png"), tmp_path) == "0/a%20b%23c.png"
    assert html_report.href(str(tmp_path.parent / "eval.png"), tmp_path) == "../eval.png"
    assert html_report.href(str(tmp_path / "javascript:alert(1)"), tmp_path) == "javascript%3Aalert%281%29"
    assert html_report.href(None, tmp_path) is None and html_report.href("", tmp_path) is None


# The Pareto front


def test_pareto_front_small_cases() -> None:
    assert pareto_front([], ["maximize", "maximize"]) == []
    assert pareto_front([(1.0, 1.0)], ["maximize", "minimize"]) == [0]
    assert pareto_front([(1, 2), (2, 1), (0, 0), (2, 2)], ["maximize", "maximize"]) == [3]
    assert pareto_front([(1, 2), (2, 1), (0, 0)], ["maximize", "maximize"]) == [0, 1]
    assert pareto_front([(1, 2), (2, 1), (0, 0)], ["minimize", "minimize"]) == [2]
    assert pareto_front([(1, 5), (1, 5), (0, 5)], ["maximize", "maximize"]) == [0, 1]  # ties stay, both
    assert pareto_front([(1, 5), (1, 4)], ["maximize", "maximize"]) == [0]  # same x, lower y: dominated
    assert pareto_front([(None, 9), (math.nan, 9), (1, math.inf), (1, 1)], ["maximize", "maximize"]) == [3]
    assert pareto_front([(1, 2, 3), (3, 2, 1), (1, 1, 1)], ["maximize"] * 3) == [0, 1]
    with pytest.raises(ValueError, match="direction"):
        pareto_front([(1, 2)], ["maximise", "maximize"])


def dominates(a: Sequence[Any], b: Sequence[Any], signs: Sequence[float]) -> bool:
    return all(s * x >= s * y for s, x, y in zip(signs, a, b, strict=True)) and any(
        s * x > s * y for s, x, y in zip(signs, a, b, strict=True)
    )


VALUES = st.one_of(st.integers(-4, 4).map(float), st.none(), st.just(math.nan), st.floats(-10, 10))


@settings(max_examples=300, deadline=None)
@given(
    st.integers(1, 3).flatmap(
        lambda k: st.tuples(
            st.lists(st.tuples(*[VALUES] * k), max_size=25),
            st.lists(st.sampled_from(["maximize", "minimize"]), min_size=k, max_size=k),
        )
    )
)
def test_pareto_front_matches_its_definition(case: tuple[list[tuple[float | None, ...]], list[str]]) -> None:
    points, directions = case
    signs = [1.0 if d == "maximize" else -1.0 for d in directions]
    valid = [i for i, p in enumerate(points) if all(v is not None and math.isfinite(v) for v in p)]
    front = pareto_front(points, directions)
    assert front == sorted(front) and set(front) <= set(valid)
    for i in front:  # no returned point is dominated
        assert not any(dominates(points[j], points[i], signs) for j in valid)
    for i in set(valid) - set(front):  # every excluded one is
        assert any(dominates(points[j], points[i], signs) for j in valid)
