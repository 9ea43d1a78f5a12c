"""dlopt.report.html: a self-contained page with every candidate, the plot, escaped text; and how it looks in Chromium."""

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
from dlopt.report.html import plot_points, render_html
from dlopt.report.plot import Point, draw_plot, overlap, place_labels
from dlopt.report.data import Report

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


def _paragraph(page: str, ident: str) -> str:
    match = re.search(rf'<p class="[^"]*" id="{ident}">(.*?)</p>', page)
    return match.group(1) if match else ""


def test_page_has_every_candidate_the_plot_and_the_chosen_label(real):
    page = render_html(real)
    parsed = _parse(page)
    rows = parsed.tables["candidates"]
    drop = f"drop in {real['budget']['metric']} ({real['budget']['units']})"
    assert rows[0][:11] == ["backend", "precision", "p50 ms", "p50 95% CI ms", "p90 ms", "p99 ms", "speedup (95% CI)",
                            "size MB", "max rel err", drop, "result"]
    assert rows[0][11:] == (["energy / inference"] if real["baseline"].get("energy") else [])
    assert len(rows) == 2 + len(real["candidates"])  # header, original, one per candidate
    base = real["baseline"]["latency"]
    assert rows[1][:6] == ["original", "fp32", f"{base['p50_ms']:.3f}",
                           f"{base['ci_low_ms']:.3f}-{base['ci_high_ms']:.3f}", f"{base['p90_ms']:.3f}",
                           f"{base['p99_ms']:.3f}"]
    for row, cand in zip(rows[2:], real["candidates"], strict=True):
        assert row[0] == cand["backend"] and row[1].startswith(cand["precision"])
        chosen = "CHOSEN" + (f": {cand['reason']}" if cand["reason"] else "")
        assert row[10] == (chosen if cand["chosen"] else cand["reason"] or cand["status"])
        latency = (cand["measurement"] or {}).get("latency")
        if latency:
            lo, hi = latency["speedup_ci"]
            assert row[6].startswith(f"{cand['speedup']:.2f}x ({lo:.2f}-{hi:.2f})")
            assert row[3] == f"{latency['ci_low_ms']:.3f}-{latency['ci_high_ms']:.3f}"
    assert 'tr class="chosen"' in page
    # the summary line first, then how latency was timed
    assert _paragraph(page, "summary") == escape(real["summary"])
    assert real["summary"].startswith(f"chosen {real['chosen']}")
    assert page.index('id="summary"') < page.index('id="timing"') < page.index('id="candidates"')
    timing, declared = _paragraph(page, "timing"), real["timing"]
    assert f"shape {declared['shape']}; {declared['threads']} threads; {declared['runs']} runs" in timing
    assert "interleaved" in timing and f"noise (run-to-run cv) {declared['noise_cv'] * 100:.1f}%" in timing
    figure = "".join(parsed.figure_text)
    assert "svg" in parsed.figure_tags and "text" in parsed.figure_tags  # inline SVG, text kept as text
    assert f"{real['chosen']} (" in figure and "chosen)" in figure
    assert "original (1.00x)" in figure and "log scale" in figure and drop in figure
    assert parsed.tables["passes"][1][0] == "UpgradeOpsetPass"  # the first generic pass
    assert all(f"<li>{escape(note)}</li>" in page for note in real["notes"])
    # self-contained: no scripts, no stylesheet links, no remote images
    assert not {"script", "link", "iframe", "img"} & set(parsed.tags)
    assert not re.search(r"url\((?!#)|@import|(src|href)=\"?(https?:|//)", page)  # only in-page url(#id)


def _pairs(boxes):
    return [(a, b) for i, a in enumerate(boxes) for b in boxes[i + 1:]]


def test_the_plot_is_log_scale_with_intervals_and_labels_clear_of_each_other(real):
    points, missing = plot_points(Report.from_dict(real))
    assert not missing and [p.role for p in points].count("original") == 1
    plot = draw_plot(points, budget=real["budget"]["max_drop_pp"], drop_label="drop")
    assert plot.xscale == "log"
    assert 'id="interval-original"' in plot.svg  # error bars from ci_low_ms / ci_high_ms
    assert len(plot.label_boxes) == len(points)
    assert all(overlap(a, b) == 0 for a, b in _pairs(plot.label_boxes))
    assert all(overlap(label, marker) == 0 for label in plot.label_boxes for marker in plot.marker_boxes)


def test_the_original_stays_visible_under_a_chosen_candidate_at_the_same_point():
    points = [Point("original (1.00x)", 1.0, 0.0, "original", 0.95, 1.05),
              Point("ort/original (1.00x, chosen)", 1.0, 0.0, "chosen", 0.95, 1.05),
              Point("ort/fp16 (1.00x, tie)", 1.0, 0.0, "ok"), Point("openvino/fp32 (0.99x)", 1.01, 0.0, "ok"),
              Point("ort/int8 (1.30x)", 0.77, 2.5, "rejected"), Point("tvm/fp32 (0.01x)", 100.0, 0.0, "ok", 90, 120)]
    plot = draw_plot(points, budget=1.0, drop_label="drop in top-1 accuracy (percentage points)")
    # drawn after (so above) the star, and labelled apart from it
    assert plot.svg.index('id="point-chosen"') < plot.svg.index('id="point-original"')
    assert all(overlap(a, b) == 0 for a, b in _pairs(plot.label_boxes))
    assert plot.xscale == "log"


def test_place_labels_separates_labels_of_points_that_collide():
    anchors, sizes = [(200.0, 100.0)] * 8, [(90.0, 14.0)] * 8
    star = (190.0, 90.0, 210.0, 110.0)
    boxes = place_labels(anchors, sizes, obstacles=[star], bounds=(0.0, 0.0, 600.0, 300.0))
    assert all(overlap(a, b) == 0 for a, b in _pairs(boxes))
    assert all(overlap(box, star) == 0 for box in boxes)
    assert all(0 <= b[0] and b[2] <= 600 and 0 <= b[1] and b[3] <= 300 for b in boxes)
    assert all(b[2] - b[0] == 90.0 and b[3] - b[1] == 14.0 for b in boxes)
    assert max(max(abs(b[0] - 200), abs(b[2] - 200), abs(b[1] - 100), abs(b[3] - 100)) for b in boxes) < 150
    # no spot fits inside the bounds: the least bad ones are taken, still apart from each other
    crowded = place_labels([(5.0, 5.0)] * 3, [(9.0, 9.0)] * 3, bounds=(0.0, 0.0, 10.0, 10.0))
    assert len(crowded) == 3 and all(overlap(a, b) == 0 for a, b in _pairs(crowded))
    # more labels than free spots: every label still gets a box, overlapping as little as it can
    packed = place_labels([(50.0, 50.0)] * 30, [(40.0, 10.0)] * 30, rings=1)
    assert len(packed) == 30 and all(overlap(a, b) == 0 for a, b in _pairs(packed[:4]))  # right, above, below, left
    assert overlap((0, 0, 2, 2), (1, 1, 3, 3)) == 1 and overlap((0, 0, 1, 1), (1, 0, 2, 1)) == 0


def test_noise_warning_and_ties(real):
    data = copy.deepcopy(real)
    data["timing"]["noise_cv"] = 0.25
    other = next(c for c in data["candidates"] if c["measurement"] and not c["chosen"])
    key = f"{other['backend']}/{other['precision']}"
    data["verdict"]["ties"] = [key]
    other["reason"] = f"tie with {data['chosen']} ({key} at 1.03x its latency, under the 5% that counts)"
    page = render_html(data)
    assert _paragraph(page, "noise").startswith("The machine was noisy while timing: run-to-run variation reached 25% "
                                                "(above 10%).")
    rows = _parse(page).tables["candidates"]
    row = rows[2 + data["candidates"].index(other)]
    assert row[6].endswith(", tie")
    assert f'<tr class="tie"><td>{other["backend"]}</td>' in page
    assert f"{key} (" in "".join(_parse(page).figure_text) and ", tie)" in "".join(_parse(page).figure_text)
    other["reason"] = f"not told apart from {data['chosen']} ({key} at 0.85x its latency; intervals overlap)"
    assert _parse(render_html(data)).tables["candidates"][2 + data["candidates"].index(other)][6].endswith(
        ", not told apart")  # never called a tie at 0.85x
    data["timing"]["noise_cv"] = 0.05
    assert 'id="noise"' not in render_html(data)


def _schema_1_0(report: dict) -> dict:
    """The report as dlopt wrote it before timing, verdict, summary, units and intervals."""
    old = copy.deepcopy(report)
    for key in ("timing", "verdict", "summary"):
        old.pop(key)
    old["schema_version"] = "1.0"
    old["budget"].pop("units")
    for m in [old["baseline"]] + [c["measurement"] for c in old["candidates"] if c["measurement"]]:
        for key in ("p90_ms", "ci_low_ms", "ci_high_ms", "cv", "speedup_ci"):
            (m["latency"] or {}).pop(key, None)
    return old


def test_a_report_from_before_schema_1_1_still_renders(real):
    page = render_html(_schema_1_0(real))
    parsed = _parse(page)
    chosen = next(c for c in real["candidates"] if c["chosen"])
    assert _paragraph(page, "summary").startswith(f"chosen {real['chosen']}; {chosen['speedup']:.2f}x the original")
    assert "shape not recorded" in _paragraph(page, "timing")
    rows = parsed.tables["candidates"]
    assert rows[0][9] == f"drop in {real['budget']['metric']} (percentage points)"
    assert rows[1][3] == "-" and rows[1][4] == "-"  # no interval, no p90
    assert "svg" in parsed.figure_tags and 'id="interval-' not in page  # plotted, without error bars
    assert len(rows) == 2 + len(real["candidates"])


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
