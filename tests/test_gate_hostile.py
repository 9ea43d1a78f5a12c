"""`dlopt gate` with hostile or careless reports, thresholds and output paths (issue 9, the gate parts).

Each case runs the `dlopt gate` command: exit code, exactly one `dlopt: error:` line, no traceback,
and the files in the folder as they were.  The command runs in this process (tests/serving.py ``dlopt_in``:
the console script's command, checks, printing and exit mapping without its start-up), except where a FIFO
could block it: those run the installed command under a timeout.
"""

from __future__ import annotations

import copy
import json
import os
import stat
import xml.etree.ElementTree as ET

import pytest

import models
from cli import dlopt
from serving import dlopt_in

LIMITS = ("--max-size-mb", "1", "--max-accuracy-drop", "1")


@pytest.fixture(scope="module")
def real(twin) -> dict:
    """One real report of a tiny model (fp32, timed on this CPU): the ``twin`` folder's, which every test
    here only reads (the gate judges the report, whichever backend wrote it)."""
    report = json.loads((twin / "report.json").read_text())
    assert report["evaluation"]["feeds"] == 20 and report["baseline"]["latency"]["p50_ms"] > 0  # real and timed
    return report


def _chosen(report: dict) -> dict:
    return next(c for c in report["candidates"] if f"{c['backend']}/{c['precision']}" == report["chosen"])


def _write(path, report: dict):
    path.write_text(json.dumps(report))  # json.dumps writes NaN and -Infinity as json.loads reads them
    return path


def _one_error_line(result, code=2) -> str:
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dlopt: error: "), result.stderr
    assert "Traceback" not in result.stderr and "\x1b" not in result.stderr
    return lines[0]


def _snapshot(folder) -> dict:
    """Every entry under ``folder``: its kind and its bytes or link text (a FIFO is never opened)."""
    seen = {}
    for path in sorted(folder.rglob("*")):
        mode = path.lstat().st_mode
        if stat.S_ISLNK(mode):
            seen[str(path.relative_to(folder))] = ("link", os.readlink(path))
        elif stat.S_ISREG(mode):
            seen[str(path.relative_to(folder))] = ("file", path.read_bytes(), stat.S_IMODE(mode))
        else:
            seen[str(path.relative_to(folder))] = ("dir" if stat.S_ISDIR(mode) else "other",)
    return seen


def _gate(*args, cwd, timeout=None):
    """`dlopt gate ARGS` from ``cwd``: in this process, or, given a ``timeout`` (where a FIFO could block
    it), the installed command killed after that many seconds."""
    if timeout is not None:
        return dlopt("gate", *args, cwd=cwd, timeout=timeout)
    return dlopt_in("gate", *args, cwd=cwd)


# -- defect 1: --junit / --markdown write into files, never replace what is at the path ------------
def test_symlink_output_is_written_through_and_stays_a_link(real, tmp_path):
    _write(tmp_path / "report.json", real)
    target = tmp_path / "kept" / "gate-results.xml"
    target.parent.mkdir()
    target.write_text("old results")
    target.chmod(0o640)
    inode = target.stat().st_ino
    (tmp_path / "gate.xml").symlink_to(target)
    result = _gate("report.json", *LIMITS, "--junit", "gate.xml", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "gate.xml").is_symlink() and os.readlink(tmp_path / "gate.xml") == str(target)
    assert target.stat().st_ino == inode and stat.S_IMODE(target.stat().st_mode) == 0o640
    suite = ET.parse(target).getroot().find("testsuite")
    assert (suite.get("name"), suite.get("tests"), suite.get("failures")) == ("dlopt gate", "3", "0")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gate.xml", "kept", "report.json"]  # no temp files


def test_new_outputs_are_created_0644_with_their_folders(real, tmp_path):
    _write(tmp_path / "report.json", real)
    old = os.umask(0o022)  # the gate (in this process) writes under it
    try:
        result = _gate("report.json", *LIMITS, "--junit", "ci/xml/gate.xml", "--markdown", "ci/gate.md", cwd=tmp_path)
    finally:
        os.umask(old)
    assert result.returncode == 0, result.stderr
    for path in (tmp_path / "ci" / "xml" / "gate.xml", tmp_path / "ci" / "gate.md"):
        assert stat.S_ISREG(path.lstat().st_mode) and stat.S_IMODE(path.stat().st_mode) == 0o644
    assert (tmp_path / "ci" / "gate.md").read_text().startswith("### dlopt gate ✅ passed")


def _folder(path):
    path.mkdir()
    (path / "inside.txt").write_text("mine")


@pytest.mark.parametrize("make, message", [
    (_folder, "is a folder; give a file path such as out.md/gate.md"),
    (os.mkfifo, "is not a regular file (a FIFO, socket or device); give a file path"),
    (lambda p: p.symlink_to(p.parent / "nowhere.md"), "is a symbolic link to nothing; give a file path"),
], ids=["folder", "fifo", "dangling-link"])
def test_output_that_is_not_a_file_is_refused_before_anything_is_written(real, tmp_path, make, message):
    _write(tmp_path / "report.json", real)
    make(tmp_path / "out.md")
    before = _snapshot(tmp_path)
    # the FIFO has no reader: opening it for writing would block until the timeout
    line = _one_error_line(_gate("report.json", *LIMITS, "--junit", "gate.xml", "--markdown", "out.md",
                                 cwd=tmp_path, timeout=20 if make is os.mkfifo else None))
    assert line == f"dlopt: error: --markdown out.md {message}"
    assert _snapshot(tmp_path) == before  # nor was gate.xml, a good path checked before out.md, written


def test_output_that_is_the_report_itself_is_refused(real, tmp_path):
    report = _write(tmp_path / "report.json", real)
    before = report.read_bytes()
    line = _one_error_line(_gate("report.json", *LIMITS, "--markdown", "report.json", cwd=tmp_path))
    assert line.endswith("--markdown report.json is the report report.json, which the gate reads; write elsewhere")
    assert report.read_bytes() == before


# -- defect 2: wrong types, deep nesting, huge numbers -> exit 2 naming the field ------------------
def _set(*keys, value):
    """An edit setting report[keys...] to ``value``; the key "chosen*" stands for the chosen candidate."""
    def edit(report):
        where = report
        for key in keys[:-1]:
            where = _chosen(where) if key == "chosen*" else where[key]
        where[keys[-1]] = value
    return edit


@pytest.mark.parametrize("edit, message", [
    (_set("candidates", value="x"), "candidates must be an array, got 'x'"),
    (_set("chosen", value=5), "chosen must be a string or null, got 5"),
    (_set("chosen*", "measurement", "latency", "p50_ms", value="0.1"),
     "measurement.latency.p50_ms must be a finite number, 0 or more, or null, got '0.1'"),
    (_set("chosen*", "measurement", "latency", "p50_ms", value=[0.1]),
     "measurement.latency.p50_ms must be a finite number, 0 or more, or null, got an array"),
    (_set("chosen*", "measurement", value=[1, 2]), "measurement must be an object or null, got an array"),
    (_set("chosen*", "measurement", "size_bytes", value=True),
     "measurement.size_bytes must be an integer between 0 and 2**63, got true"),
    (_set("chosen*", "score", value={"metric": "top-1 agreement", "value": 1.0}), "score.drop_pp must be a finite "
     "number, got nothing"),
    (_set("baseline", "energy", value={"joules_per_inference": 1e-3}), "baseline.energy.kind must be a string"),
    (_set("target", value=["cpu"]), "target must be an object, got an array"),
    (_set("model", "sha256", value="not a hash\n"), "model.sha256 must be a hex SHA-256 or null, got 'not a hash\\n'"),
    (_set("schema_version", value=1), "is not a dlopt report this version can read (schema 1; reads 1.x)"),
])
def test_report_of_wrong_types_is_refused(real, tmp_path, edit, message):
    data = copy.deepcopy(real)
    edit(data)
    _write(tmp_path / "report.json", data)
    before = _snapshot(tmp_path)
    line = _one_error_line(_gate("report.json", *LIMITS, "--junit", "gate.xml", cwd=tmp_path))
    assert line.startswith("dlopt: error: report.json is not a dlopt report") and message in line, line
    assert _snapshot(tmp_path) == before  # no gate.xml


@pytest.mark.parametrize("text, message", [
    ("[" * 100_000 + "]" * 100_000, "its JSON is nested too deeply"),
    ('{"schema_version": "1.0", "model": ' + "[" * 100_000 + "]" * 100_000 + "}", "its JSON is nested too deeply"),
    ("REPORT_WITH_SIZE " + "9" * 5000, "not readable JSON: it holds an integer of 5000 digits"),
    ("REPORT_WITH_SIZE " + "9" * 4000, "not readable JSON: it holds an integer of 4000 digits"),
    ("REPORT_WITH_SIZE -" + "9" * 50, "not readable JSON: it holds an integer of 50 digits"),
    (b'{"schema_version": "1.0", "model": "\xff\xfe"}', "not readable JSON: 'utf-8' codec can't decode byte 0xff"),
])
def test_unparsable_reports_are_refused(real, tmp_path, text, message):
    if isinstance(text, str) and text.startswith("REPORT_WITH_SIZE "):
        data = copy.deepcopy(real)
        _chosen(data)["measurement"]["size_bytes"] = 12345
        text = json.dumps(data).replace('"size_bytes": 12345', '"size_bytes": ' + text.split(" ", 1)[1])
    if isinstance(text, bytes):
        (tmp_path / "report.json").write_bytes(text)
    else:
        (tmp_path / "report.json").write_text(text)
    line = _one_error_line(_gate("report.json", *LIMITS, cwd=tmp_path))
    assert line.startswith("dlopt: error: report.json is not a dlopt report (") and message in line, line


def test_a_fifo_given_as_the_report_is_refused_without_blocking(tmp_path):
    os.mkfifo(tmp_path / "report.json")
    line = _one_error_line(_gate("report.json", *LIMITS, cwd=tmp_path, timeout=20))
    assert line == "dlopt: error: report.json is not a regular file"


def test_api_refuses_huge_python_integers(real):
    from dlopt.core.errors import ConfigError
    from dlopt.report.gate import Thresholds, check

    data = copy.deepcopy(real)
    _chosen(data)["measurement"]["size_bytes"] = 10 ** 5000
    with pytest.raises(ConfigError, match=r"size_bytes must be an integer between 0 and 2\*\*63, got an integer "
                                          r"of about 5001 digits"):  # 10 ** 5000 has 5001
        check(data, Thresholds(max_size_mb=1))
    with pytest.raises(ConfigError, match="--max-size-mb must be a number, got an integer of about 401 digits"):
        Thresholds(max_size_mb=10 ** 400)


# -- defect 3: a gate that measured nothing fails unless --allow-missing ---------------------------
def _unmeasured(real) -> dict:
    """As for a target that is not this machine: no latency, so no energy."""
    data = copy.deepcopy(real)
    _chosen(data)["measurement"].update(latency=None, energy=None)
    return data


def test_every_gate_skipped_fails_unless_allowed(real, tmp_path):
    _write(tmp_path / "report.json", _unmeasured(real))
    args = ("report.json", "--max-latency-regression", "10", "--max-energy-regression", "5%", "--junit", "gate.xml")
    line = _one_error_line(_gate(*args, cwd=tmp_path), code=1)
    chosen = real["chosen"]
    assert line == (f"dlopt: error: gate failed: coverage: nothing was checked (latency-regression skipped: latency "
                    f"not measured for {chosen} (target {real['target']['name']} is not this machine); "
                    f"energy-regression skipped: no "
                    f"energy figure for {chosen}); pass --allow-missing to accept a report without these figures")
    cases = {c.get("name"): c for c in ET.parse(tmp_path / "gate.xml").getroot().iter("testcase")}
    assert cases["coverage"].find("failure") is not None and cases["latency-regression"].find("skipped") is not None

    allowed = _gate(*args, "--allow-missing", cwd=tmp_path)
    assert allowed.returncode == 0 and allowed.stderr == "", allowed.stderr
    assert "coverage" not in allowed.stdout and "skipped" in allowed.stdout
    # one gate measured is enough: the skip is shown, the build is judged on what was measured
    some = _gate("report.json", "--max-latency-regression", "10", "--max-size-mb", "1", cwd=tmp_path)
    assert some.returncode == 0 and "skipped" in some.stdout and "coverage" not in some.stdout


# -- defect 4: non-finite figures and thresholds -----------------------------------------------------
@pytest.mark.parametrize("where, value, message", [
    (("measurement", "latency", "p50_ms"), float("-inf"),
     "measurement.latency.p50_ms must be a finite number, 0 or more, or null, got -Infinity (not a finite number)"),
    (("measurement", "energy", "joules_per_inference"), float("inf"),
     "measurement.energy.joules_per_inference must be a finite number, 0 or more, got Infinity "
     "(not a finite number)"),
    (("score", "value"), float("nan"), "score.value must be a finite number, got NaN (not a finite number)"),
    (("score", "drop_pp"), float("-inf"), "score.drop_pp must be a finite number, got -Infinity (not a finite number)"),
])
def test_non_finite_report_figures_are_refused(real, tmp_path, where, value, message):
    data = copy.deepcopy(real)
    figures = _chosen(data)
    for key in where[:-1]:
        figures = figures[key]
    figures[where[-1]] = value
    _write(tmp_path / "report.json", data)
    line = _one_error_line(_gate("report.json", *LIMITS, cwd=tmp_path))
    index = next(i for i, c in enumerate(data["candidates"]) if c is _chosen(data))
    assert line == f"dlopt: error: report.json is not a dlopt report: candidates[{index}].{message}"


@pytest.mark.parametrize("args, toml, message", [
    (("--max-accuracy-drop", "-inf"), None, "--max-accuracy-drop must be a number, got '-inf' (not a finite number)"),
    (("--max-accuracy-drop", "nan"), None, "--max-accuracy-drop must be a number, got 'nan' (not a finite number)"),
    (("--max-latency-regression", "inf%"), None, "--max-latency-regression must be a percentage such as 10 or "
                                                 "\"10%\", got 'inf%' (not a finite number)"),
    ((), "[gate]\nmax-size-mb = inf\n", "dlopt.toml: [gate] --max-size-mb must be a number, got Infinity "
                                        "(not a finite number)"),
    ((), "[gate]\nmax-energy-regression = nan\n", "(not a finite number)"),
    ((), "[gate]\nmax-size-mb = " + "9" * 5000 + "\n", "cannot read gate thresholds from dlopt.toml"),
])
def test_non_finite_thresholds_are_refused(real, tmp_path, args, toml, message):
    _write(tmp_path / "report.json", real)
    if toml is not None:
        (tmp_path / "dlopt.toml").write_text(toml)
    line = _one_error_line(_gate("report.json", *args, cwd=tmp_path))
    assert message in line, line


# -- defect 5: report strings in the PR comment are escaped ------------------------------------------
def test_markdown_escapes_model_and_target_names(real, tmp_path):
    data = copy.deepcopy(real)
    data["model"]["path"] = "models/@everyone <img src=x> `rm`.onnx"
    data["target"]["name"] = "cpu\n| injected | row |\x1b[31m"
    _write(tmp_path / "report.json", data)
    result = _gate("report.json", *LIMITS, "--markdown", "gate.md", "--junit", "gate.xml", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    text = (tmp_path / "gate.md").read_text()
    for raw in ("@everyone", "<img", "`rm`", "\n| injected", "\x1b"):
        assert raw not in text, raw
    assert text.startswith("### dlopt gate ✅ passed: @&#8203;everyone &lt;img src=x> \\`rm\\`.onnx for cpu "
                           "\\| injected \\| row \\|")
    ET.parse(tmp_path / "gate.xml")  # still well-formed XML
    assert "\x1b" not in result.stdout


# -- defect 6: --baseline of another model warns; of other data refuses -----------------------------
def test_baseline_of_another_model_warns(real, tmp_path):
    main = copy.deepcopy(real)
    main["model"]["sha256"] = "ab" * 32
    _write(tmp_path / "main.json", main)
    _write(tmp_path / "report.json", real)
    result = _gate("report.json", "--baseline", "main.json", *LIMITS, "--markdown", "gate.md", "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    mine = real["model"]["sha256"][:12]
    warning = (f"the baseline report is of another model (sha256 abababababab, this one {mine}): the gates compare "
               "this model with that one")
    assert result.stderr.splitlines() == [f"dlopt: warning: {warning}"]
    gates = {g["name"]: g for g in json.loads(result.stdout)["gates"]}
    assert gates["baseline"]["warning"] == warning and gates["baseline"]["status"] == "passed"
    assert f"> ⚠️ warning: {warning}" in (tmp_path / "gate.md").read_text()
    same = _gate("report.json", "--baseline", "report.json", *LIMITS, cwd=tmp_path)
    assert same.returncode == 0 and same.stderr == ""


@pytest.mark.parametrize("edit, message", [
    (_set("evaluation", "source", value="data/eval.npz"),
     "this one was evaluated on 'random (seed 0)' (20 feeds), the baseline on 'data/eval.npz' (20 feeds)"),
    (_set("evaluation", "feeds", value=500),
     "this one was evaluated on 'random (seed 0)' (20 feeds), the baseline on 'random (seed 0)' (500 feeds)"),
    (_set("budget", "metric", value="top-1 accuracy"),
     "this one's budget metric is 'top-1 agreement', the baseline's 'top-1 accuracy'"),
])
def test_baseline_evaluated_differently_is_refused_unless_allowed(real, tmp_path, edit, message):
    main = copy.deepcopy(real)
    edit(main)
    _write(tmp_path / "main.json", main)
    _write(tmp_path / "report.json", real)
    line = _one_error_line(_gate("report.json", "--baseline", "main.json", *LIMITS, "--junit", "gate.xml",
                                 cwd=tmp_path))
    assert line == (f"dlopt: error: the baseline report is not comparable: {message}; evaluate both on the same "
                    "data, or pass --allow-different-eval to compare them anyway")
    assert not (tmp_path / "gate.xml").exists()
    allowed = _gate("report.json", "--baseline", "main.json", *LIMITS, "--allow-different-eval", cwd=tmp_path)
    assert allowed.returncode == 0, allowed.stderr
    assert allowed.stderr.splitlines() == [f"dlopt: warning: compared although {message} (--allow-different-eval)"]


def test_help_documents_the_new_flags():
    result = dlopt_in("gate", "--help")
    assert result.returncode == 0
    for flag in ("--allow-missing", "--allow-different-eval"):
        assert flag in result.stdout


# -- defect 7: `compile --gate` honours [gate] of ./dlopt.toml as `gate` does -----------------------
def test_compile_gate_takes_the_accuracy_limit_from_dlopt_toml(tmp_path):
    """compile's --max-accuracy-drop default (1) must not override [gate] max-accuracy-drop."""
    models.save(models.conv_bn_relu(channels=4, size=8), tmp_path / "m.onnx")
    (tmp_path / "dlopt.toml").write_text('[targets.ort-only]\nbase = "cpu"\nbackends = ["ort"]\n\n'
                                         "[gate]\nmax-accuracy-drop = 0.25\nmax-size-mb = 0.000001\n")
    fast = ("--target", "ort-only", "--precision", "fp32", "--runs", "5", "--samples", "3", "--gate")
    result = dlopt_in("compile", "m.onnx", "-o", "out", *fast, cwd=tmp_path)
    assert result.returncode == 1, result.stderr
    assert "| accuracy-drop" not in result.stdout  # a table, not Markdown
    row = next(line.split() for line in result.stdout.splitlines() if line.startswith("accuracy-drop"))
    assert row[:6] == ["accuracy-drop", "0", "pp", "0.25", "pp", "passed"]
    assert result.stderr.strip().startswith("dlopt: error: gate failed: size: measured ")
    given = dlopt_in("compile", "m.onnx", "-o", "out", *fast, "--max-accuracy-drop", "0.75", cwd=tmp_path)
    row = next(line.split() for line in given.stdout.splitlines() if line.startswith("accuracy-drop"))
    assert row[:6] == ["accuracy-drop", "0", "pp", "0.75", "pp", "passed"]  # a flag given still wins


# -- issue 22 item 7: what the gate reads beside the reports (artefacts, evaluation files) ---------
@pytest.fixture(scope="module")
def twin(tmp_path_factory):
    """An ORT-only output folder of a tiny model, to copy and spoil (20 random feeds)."""
    import dlopt as api

    root = tmp_path_factory.mktemp("gate-hostile-twin")
    (root / "targets.toml").write_text('[targets.here]\nbase = "cpu"\nbackends = ["ort"]\nprecisions = ["fp32"]\n')
    api.compile(models.conv_bn_relu(channels=4, size=8), target="here", targets_file=root / "targets.toml",
                out=root / "out", precision="fp32", runs=5, warmup=1, samples=20)
    return root / "out"


def test_a_baseline_artefact_the_runtime_refuses_falls_back_to_cross_run(twin, tmp_path):
    """ONNX Runtime refusing the baseline's model (an op of an unknown domain) is no internal error:
    the latency is compared across runs and the note says why."""
    import shutil

    import onnx
    from onnx import TensorProto, helper

    shutil.copytree(twin, tmp_path / "base")
    graph = helper.make_graph([helper.make_node("Bogus", ["x"], ["logits"], domain="x.y")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 10])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("x.y", 1)]),
              tmp_path / "base" / "model.onnx")
    result = _gate(twin, "--baseline", "base", "--max-latency-regression", "10%", "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    latency = json.loads(result.stdout)["latency"]
    assert latency["mode"] == "cross-run" and latency["note"].startswith("not re-timed: ort/fp32 in base cannot be loaded by its runtime: ")
    assert "Traceback" not in result.stderr


def test_evaluation_sources_that_are_no_files_are_never_read(twin, tmp_path):
    """Reports whose evaluation.source names a device and a FIFO: neither is opened (reading would never
    end); the feeds both folders keep in verify.npz decide that the data is the same."""
    import shutil

    os.mkfifo(tmp_path / "fifo")
    for name, source in (("a", "/dev/zero"), ("b", str(tmp_path / "fifo"))):
        shutil.copytree(twin, tmp_path / name)
        report = json.loads((twin / "report.json").read_text())
        report["evaluation"]["source"] = source
        _write(tmp_path / name / "report.json", report)
    result = _gate("a", "--baseline", "b", *LIMITS, "--json", cwd=tmp_path, timeout=30)
    assert result.returncode == 0, result.stderr
    baseline = next(g for g in json.loads(result.stdout)["gates"] if g["name"] == "baseline")
    assert baseline["detail"].endswith("same evaluation data at another path (the feeds kept in both verify.npz "
                                       "are identical)")
    (tmp_path / "a" / "verify.npz").unlink()  # nothing left to compare by content: refused as before
    line = _one_error_line(_gate("a", "--baseline", "b", *LIMITS, cwd=tmp_path, timeout=30))
    assert "the baseline report is not comparable: this one was evaluated on '/dev/zero'" in line
