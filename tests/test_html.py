"""dlopt.html: a self-contained page with every candidate, the plot, escaped text; and how it looks in Chromium."""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
from html import escape
from html.parser import HTMLParser

import numpy as np
import pytest

import models
from dlopt.html import render_html

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def real(tmp_path_factory) -> dict:
    import dlopt

    tmp = tmp_path_factory.mktemp("html")
    models.save(models.conv_bn_relu(), tmp / "cnn.onnx")
    dlopt.compile(tmp / "cnn.onnx", target="cpu", out=tmp / "out", precision="fp32", runs=5, warmup=1)
    return json.loads((tmp / "out" / "report.json").read_text())


class _Tables(HTMLParser):
    """Rows of each table (by id) and the elements inside the plot figure."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self.stack: list[str] = []
        self.table = None
        self.in_figure = False
        self.figure_tags: list[str] = []
        self.figure_text: list[str] = []
        self.tags: list[str] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append(tag)
        if tag == "table":
            self.table = attrs.get("id")
            self.tables[self.table] = []
        elif tag == "tr" and self.table is not None:
            self.tables[self.table].append([])
        elif tag in ("td", "th") and self.table is not None:
            self.tables[self.table][-1].append("")
        elif tag == "figure" and attrs.get("id") == "latency-accuracy":
            self.in_figure = True
        if self.in_figure:
            self.figure_tags.append(tag)
        self.stack.append(tag)

    def handle_endtag(self, tag):
        if tag == "table":
            self.table = None
        elif tag == "figure":
            self.in_figure = False

    def handle_data(self, data):
        if self.table is not None and self.tables[self.table] and self.tables[self.table][-1]:
            self.tables[self.table][-1][-1] += data
        if self.in_figure:
            self.figure_text.append(data)


def _parse(page: str) -> _Tables:
    parser = _Tables()
    parser.feed(page)
    return parser


def test_page_has_every_candidate_the_plot_and_the_chosen_label(real):
    page = render_html(real)
    parsed = _parse(page)
    rows = parsed.tables["candidates"]
    assert rows[0][:9] == ["backend", "precision", "p50 ms", "p99 ms", "speedup", "size MB", "max rel err",
                           "drop pp", "result"]
    assert rows[0][9:] == (["energy / inference"] if real["baseline"].get("energy") else [])
    assert len(rows) == 2 + len(real["candidates"])  # header, original, one per candidate
    assert rows[1][:2] == ["original", "fp32"]
    for row, cand in zip(rows[2:], real["candidates"], strict=True):
        assert row[0] == cand["backend"] and row[1].startswith(cand["precision"])
        assert row[8] == ("CHOSEN" if cand["chosen"] else cand["reason"] or cand["status"])
    assert 'tr class="chosen"' in page
    assert "svg" in parsed.figure_tags and "text" in parsed.figure_tags  # inline SVG, text kept as text
    assert f"chosen: {real['chosen']}" in "".join(parsed.figure_text)
    assert "original" in "".join(parsed.figure_text)
    assert parsed.tables["passes"][1][0] == "ShapeInferencePass"
    assert all(f"<li>{escape(note)}</li>" in page for note in real["notes"])
    # self-contained: no scripts, no stylesheet links, no remote images
    assert not {"script", "link", "iframe", "img"} & set(parsed.tags)
    assert not re.search(r"url\((?!#)|@import|(src|href)=\"?(https?:|//)", page)  # only in-page url(#id)


def test_text_from_the_report_is_escaped(real):
    evil = copy.deepcopy(real)
    evil["model"]["path"] = "/tmp/<script>alert(1)</script>.onnx"
    evil["notes"].append('<img src=x onerror="alert(2)">')
    evil["candidates"][0]["reason"] = "</td></tr></table><script>alert(3)</script>"
    page = render_html(evil)
    parsed = _parse(page)
    assert "script" not in parsed.tags and "img" not in parsed.tags
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "<li>&lt;img src=x onerror=&quot;alert(2)&quot;&gt;</li>" in page
    assert len(parsed.tables["candidates"]) == 2 + len(real["candidates"])


def _without_energy(report: dict) -> dict:
    data = copy.deepcopy(report)
    for measurement in [data["baseline"]] + [c["measurement"] for c in data["candidates"] if c["measurement"]]:
        measurement.pop("energy", None)
    return data


def test_energy_column(real):
    data = _without_energy(real)
    why = "; no sensor used: RAPL: /sys/class/powercap does not exist (no powercap driver)"
    data["baseline"]["energy"] = {"joules_per_inference": 5.6e-7, "kind": "estimated", "watts": 40.0,
                                  "source": "estimated (power model of cpu: 10.0 W idle + 15.0 W x 2.00 busy cores)"
                                  + why}
    chosen = next(c for c in data["candidates"] if c["chosen"])
    chosen["measurement"]["energy"] = {"joules_per_inference": 0.0123, "kind": "measured", "watts": 31.2,
                                       "source": "RAPL package-0"}
    page = render_html(data)
    rows = _parse(page).tables["candidates"]
    assert rows[0][-1] == "energy / inference"
    assert rows[1][-1] == "560 nJ (estimated)"
    assert rows[2 + data["candidates"].index(chosen)][-1] == "12.3 mJ (measured)"
    assert {row[-1] for i, row in enumerate(rows[2:]) if data["candidates"][i] is not chosen} == {"-"}
    assert "<li>original: estimated (power model of cpu: 10.0 W idle + 15.0 W x 2.00 busy cores), 40 W</li>" in page
    assert f"<li>{chosen['backend']}/{chosen['precision']}: RAPL package-0, 31.2 W</li>" in page
    assert page.count("No power sensor was read: RAPL: /sys/class/powercap does not exist") == 1
    assert "energy / inference" not in render_html(_without_energy(real))  # no column when nothing has energy


def test_unmeasured_candidates_are_listed_under_the_plot(real):
    data = copy.deepcopy(real)
    measured = [c for c in data["candidates"] if c["measurement"]]
    for cand in measured:
        cand["measurement"]["latency"] = None  # as for a target that is not this machine
    page = render_html(data)
    for cand in measured:
        assert f"<li>{cand['backend']}/{cand['precision']} ({cand['status']}): latency not measured" in page
    figure = page[page.index('<figure id="latency-accuracy">'):page.index("</figure>")]
    assert "No candidate has both a latency and an accuracy score to plot." in figure and "<svg" not in figure


def _screenshot(html_path, png_path, profile_dir) -> subprocess.CompletedProcess:
    return subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={profile_dir}", f"--screenshot={png_path}", "--window-size=1280,2000",
         html_path.resolve().as_uri()],
        capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)")
def test_chromium_renders_a_real_page(real, tmp_path):
    import matplotlib.image

    page = tmp_path / "report.html"
    page.write_text(render_html(real), encoding="utf-8")
    png = tmp_path / "report.png"
    result = _screenshot(page, png, tmp_path / "chromium-profile")
    assert result.returncode == 0, result.stderr[-2000:]
    assert png.stat().st_size > 20_000
    pixels = matplotlib.image.imread(png)[..., :3]
    assert pixels.shape[:2] == (2000, 1280)
    assert float(pixels.std()) > 0.05  # not one colour
    colours = np.unique((pixels.reshape(-1, 3) * 255).astype(np.uint8), axis=0)
    assert len(colours) > 50  # text, table shading, plot markers
