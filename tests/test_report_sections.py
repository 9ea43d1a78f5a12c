"""A report section is one object (dlopt.report.sections): a new one is one module and one registry line, and
shows in report.json and its schema check, report.md, report.html and the terminal; the calibration line is
written once, for all three renderings."""

from __future__ import annotations

import json
import re

import pytest
from click.testing import CliRunner

from dlopt.cli.app import main
from dlopt.core.errors import ConfigError
from dlopt.report import sections
from dlopt.report.data import Measurement, Report
from dlopt.report.html import render_html
from dlopt.report.schema import validate_report
from dlopt.report.sections.base import Section
from models import conv_bn_relu, save


class NodeCount(Section):
    """The toy section: the node count of the input model, filled by the compile itself."""

    key = "node_count"
    schema = ("object", {"nodes": "count"})

    def collect(self, job, ev, builds):
        return {"nodes": len(job.proto.graph.node)}

    def markdown(self, report):
        return [f"Input nodes: {self.value(report)['nodes']}.", ""]

    def html(self, report):
        return [f'<p id="node-count">Input nodes: {self.value(report)["nodes"]}.</p>']

    def terminal(self, report):
        return [f"input nodes: {self.value(report)['nodes']}"]


@pytest.fixture(scope="module")
def toy_output(tmp_path_factory):
    """A compile (fp32, ONNX Runtime only) with the toy section added to the registry: (output folder, stdout)."""
    tmp = tmp_path_factory.mktemp("toy")
    model = save(conv_bn_relu(channels=4, size=8), tmp / "cnn.onnx")
    (tmp / "dlopt.toml").write_text('[targets.ort-here]\nbase = "cpu"\nbackends = ["ort"]\n')
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sections, "SECTIONS", [*sections.SECTIONS, NodeCount()])
        result = CliRunner().invoke(main, ["compile", model, "--target", "ort-here", "--targets-file",
                                           str(tmp / "dlopt.toml"), "-o", str(tmp / "out"), "--precision", "fp32",
                                           "--runs", "5", "--max-accuracy-drop", "100", "-q"])
    assert result.exit_code == 0, f"{result.output}\n{result.exception!r}"
    return tmp / "out", result.stdout


def test_a_new_section_is_written_checked_and_rendered_everywhere(toy_output):
    out, stdout = toy_output
    text = (out / "report.json").read_text()
    data = json.loads(text)
    assert list(data)[-1] == "node_count" and data["node_count"] == {"nodes": 7}  # tests/models.conv_bn_relu: 7 nodes
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sections, "SECTIONS", [*sections.SECTIONS, NodeCount()])
        assert validate_report(data) is data
        with pytest.raises(ConfigError, match=r"^report is not a dlopt report: node_count\.nodes must be an integer "
                                              r"between 0 and 2\*\*63, got -1$"):
            validate_report({**data, "node_count": {"nodes": -1}})
        assert Report.from_dict(data).to_json() == text  # read back and written again: the same bytes
        assert "<p id=\"node-count\">Input nodes: 7.</p>" in render_html(data)
    md = (out / "report.md").read_text()
    assert "\nInput nodes: 7.\n\n## Passes\n" in md  # in the body slot: after the candidate tables
    assert '<p id="node-count">Input nodes: 7.</p>\n<h2>Passes</h2>' in (out / "report.html").read_text()
    lines = stdout.splitlines()
    after = lines[lines.index("input nodes: 7") + 1:]  # after the candidate table; then notes and the summary
    assert lines[-1].startswith("chosen ort/fp32") and lines[-2] == ""
    assert all(line.startswith("note: ") for line in after[:-2]), after


def test_without_the_section_the_field_is_not_read_back_nor_checked(toy_output):
    data = json.loads((toy_output[0] / "report.json").read_text())
    assert validate_report({**data, "node_count": {"nodes": -1}})["node_count"] == {"nodes": -1}  # unknown: ignored
    assert "node_count" not in Report.from_dict(data).to_dict()  # a 1.x reader ignores fields it does not know
    assert "Input nodes" not in render_html(data)


def _calibrated(calibration: dict) -> Report:
    return Report(model={"path": "m.onnx", "inputs": []}, target={"name": "cpu"}, precision="int8",
                  evaluation={"source": "random (seed 0)", "feeds": 1}, baseline=Measurement(None, 10),
                  budget={"metric": "top-1 agreement", "original": 1.0, "max_drop_pp": 1.0}, passes=[], candidates=[],
                  chosen=None, output_dir=None, dlopt_version="0", created="now", calibration=calibration)


def test_the_calibration_line_is_one_line_in_three_renderings():
    calib = {"samples": 32, "source": "cal|<b>.npz", "method": "minmax", "seconds": 0.057, "peak_rss_mb": 146.2,
             "rss_increase_mb": 0.7}
    report = _calibrated(calib)
    md = [line for line in report.to_markdown().splitlines() if line.startswith("Calibration")]
    assert md == ["Calibration: 32 samples from cal\\|&lt;b>.npz (minmax), 0.057 s, process peak RSS 146.2 MB "
                  "(+0.7 MB)."]
    page = render_html(report.to_dict())
    assert re.findall(r"<p>Calibration: .*?</p>", page) == [
        "<p>Calibration: 32 samples from cal|&lt;b&gt;.npz (minmax), 0.057 s.</p>"]
    assert sections.terminal(report) == ["", "calibration: 32 samples from cal|<b>.npz (minmax), 0.057 s, "
                                             "peak RSS 146.2 MB (+0.7 MB)"]
    assert validate_report(json.loads(report.to_json()))  # the schema entry accepts what a compile writes
    with pytest.raises(ConfigError, match=r"calibration\.samples must be an integer between 0 and 2\*\*63"):
        validate_report({**json.loads(report.to_json()), "calibration": {**calib, "samples": "32"}})


def test_renderers_read_a_section_only_through_the_registry(monkeypatch):
    """Without Calibration in SECTIONS no rendering says a word of calibration: none reads the field itself."""
    report = _calibrated({"samples": 32, "source": "calib.npz", "method": "minmax", "seconds": 0.1,
                          "peak_rss_mb": 1.0, "rss_increase_mb": 0.0})
    assert "alibration" in report.to_markdown() and "alibration" in render_html(report.to_dict())
    monkeypatch.setattr(sections, "SECTIONS", [s for s in sections.SECTIONS if s.key != "calibration"])
    assert "alibration" not in report.to_markdown() + render_html(report.to_dict()) + "".join(sections.terminal(report))
    assert report.to_dict()["calibration"]["samples"] == 32  # the field is still written: Report keeps it


def _with_candidate(candidate, baseline=None) -> Report:
    return Report(model={"path": "m.onnx", "inputs": []}, target={"name": "cpu"}, precision="auto",
                  evaluation={"source": "random (seed 0)", "feeds": 1}, baseline=baseline or Measurement(None, 10),
                  budget={"metric": "top-1 agreement", "original": 1.0, "max_drop_pp": 1.0}, passes=[],
                  candidates=[candidate], chosen=candidate.key, output_dir=None, dlopt_version="0", created="now")


def test_energy_is_one_section_its_column_sources_and_schema_entry(monkeypatch):
    from dlopt.measure.energy import NO_SENSOR
    from dlopt.report.data import Candidate
    from dlopt.report.sections.energy import Energy

    def joules(value):
        return {"joules_per_inference": value, "kind": "estimated", "source": f"15 W model{NO_SENSOR}no RAPL",
                "watts": 15.0}

    report = _with_candidate(Candidate("ort", "int8", "ok", chosen=True, measurement=Measurement(None, 5, None,
                                                                                                   joules(3.2e-7))),
                             Measurement(None, 10, None, joules(0.0021)))
    data = json.loads(report.to_json())
    page = render_html(data)
    assert "<th>energy / inference</th>" in page
    assert '<td class="num">2.1 mJ (estimated)</td>' in page and '<td class="num">320 nJ (estimated)</td>' in page
    assert page.count("<li>") >= 2 and "<li>original: 15 W model, 15 W</li>" in page
    assert page.count("No power sensor was read: no RAPL.") == 1  # said once for both figures
    bad = {**data, "baseline": {**data["baseline"], "energy": {"joules_per_inference": "a lot", "kind": "x"}}}
    with pytest.raises(ConfigError, match=r"baseline\.energy\.joules_per_inference must be"):
        validate_report(bad)
    monkeypatch.setattr(sections, "SECTIONS", [s for s in sections.SECTIONS if not isinstance(s, Energy)])
    assert "energy / inference" not in render_html(data) and "Energy sources" not in render_html(data)
    assert validate_report(bad) is bad  # the schema entry is the section's: without it, not checked


def test_tuning_is_one_section_its_clause_on_every_candidate_table(monkeypatch):
    from dlopt.report.data import Candidate
    from dlopt.report.sections import tuning
    from dlopt.report.sections.tuning import Tuning
    from dlopt.targets.tvm.tuning_db import TuningApplied

    applied = TuningApplied("/db/a|b", 4, 5, "4 of 5 tasks tuned from /db/a|b (64 trials)")
    report = _with_candidate(Candidate("tvm", "fp32", "ok", chosen=True, tuning=applied))
    clause = "4 of 5 tasks tuned from /db/a|b (64 trials)"
    assert report.candidate_rows()[1][-1] == f"CHOSEN; {clause}"  # the terminal's and report.md's table
    assert f"CHOSEN; 4 of 5 tasks tuned from /db/a\\|b (64 trials) |" in report.to_markdown()
    assert f"<td class=\"text\">CHOSEN; {clause}</td>" in render_html(report.to_dict())
    assert tuning.line(report.to_dict()["candidates"][0]["tuning"]) == tuning.line(applied) == clause  # README's
    assert tuning.line(None) is None and tuning.line({"summary": None}) is None
    monkeypatch.setattr(sections, "SECTIONS", [s for s in sections.SECTIONS if not isinstance(s, Tuning)])
    assert "tasks tuned" not in report.to_markdown() + render_html(report.to_dict())
    assert report.to_dict()["candidates"][0]["tuning"]["tuned_tasks"] == 4  # the field is still written


def test_the_microcontroller_clause_is_the_mcu_section_s_in_the_reason_and_the_summary_line():
    from dlopt.report.sections import mcu
    from dlopt.targets.c.figures import McuFigures

    figures = McuFigures.from_settings({"mcpu": "cortex-m4", "figures_unavailable": "arm-none-eabi-gcc not found",
                                        "memory": {"arena_bytes": 96, "liveness_lower_bound_bytes": 64}})
    clause = "arena 96 B (liveness lower bound 64 B); no Cortex-M sizes: arm-none-eabi-gcc not found"
    assert mcu.describe(figures) == clause
    assert mcu.verified(figures) == (f"C sources verified on this machine (host gcc build); {clause}; a "
                                     f"microcontroller build is not timed here")
    assert mcu.shipped(figures) == f"a microcontroller build, not timed: {clause}"
    owners = sorted(s.candidate_key for s in sections.SECTIONS if s.candidate_key)
    assert owners == ["mcu", "tuning"]  # one section per candidate field it renders
