"""Issue 23, second round (items 2, 5, 7, 8, 9): what a security tester still got through `dlopt verify`,
`bench --select` and run_candidates.py after the first fixes (tests/test_folder_safety.py).

Each attack is made in a temporary copy of a real output (ONNX Runtime fp32 at the top level, a real
TVM x86_64 library in bundle/tvm-fp32); a native library planted by an attack writes a marker file
from its constructor, and the marker must never appear.
"""

from __future__ import annotations

import json
import os
import shutil
import time

import pytest

from cli import dlopt
from test_folder_safety import (built, evil_library, here, one_error_line, out, rewrite_manifest,  # noqa: F401
                                rewrite_meta, run_script, tree)

from dlopt.device import device_check
from dlopt.device.device_check import VerifyFileError
from dlopt.core.errors import ConfigError

# -- item 2: verify.npz may not point a candidate at another candidate's folder ---------------------


def test_a_bundle_candidate_pointed_at_the_top_level_is_refused(out, tmp_path):
    """The tester's dot.py: tvm/fp32's dir set to "." and its library swapped; `dlopt verify` said
    "tvm/fp32 verified" (it ran the top-level ONNX) and exited 0."""
    marker = tmp_path / "marker"
    (out / "bundle" / "tvm-fp32" / "model.so").unlink()
    evil_library(tmp_path / "lib", marker).rename(out / "bundle" / "tvm-fp32" / "model.so")
    rewrite_meta(out, lambda m: m["candidates"]["tvm/fp32"].update(dir="."))
    for verb in ("verify", "bench"):
        line = one_error_line(here(verb, out, "-q", *(["--runs", "5"] if verb == "bench" else [])), 2)
        assert "puts the candidate 'tvm/fp32' in '.'" in line and "ships it in 'bundle/tvm-fp32'" in line, line
    line = one_error_line(run_script(out, "--verify-only"), 2)
    assert line.startswith("run_candidates.py: error:") and "ships it in 'bundle/tvm-fp32'" in line, line
    assert not marker.exists() and not (out / "device_report.json").exists()


@pytest.mark.parametrize("change, why", [
    (lambda m: m["candidates"]["tvm/fp32"].update(dir="./bundle/tvm-fp32"), "ships it in 'bundle/tvm-fp32'"),
    (lambda m: m["candidates"]["ort/fp32"].update(dir="bundle/tvm-fp32"), "ships it in '.'"),
    (lambda m: m["candidates"]["tvm/fp32"].update(backend="ort"), "a 'ort/fp32' artefact"),
    (lambda m: m["candidates"].update({"ort/int8": {**m["candidates"]["ort/fp32"], "precision": "int8"}}),
     "does not ship"),
])
def test_a_verify_entry_that_is_not_the_manifests_candidate_is_refused(out, change, why):
    rewrite_meta(out, change)
    assert why in one_error_line(here("verify", out, "-q"), 2)
    assert why in one_error_line(run_script(out, "--verify-only"), 2)
    assert not (out / "device_report.json").exists()


def test_a_bundle_folder_that_opens_as_another_candidate_is_refused(out):
    """Two manifest keys on one folder: dlopt.load opens bundle/tvm-fp32 as the first, ort/fp16."""
    rewrite_manifest(out, lambda m: m.update(bundle={"ort/fp16": "bundle/tvm-fp32", **m["bundle"]}))
    line = one_error_line(here("verify", out, "-q", "--candidate", "tvm/fp32"), 2)
    assert "lacks a readable session_options.json" in line, line  # opened as ort/fp16: not what it is
    shutil.copy(out / "session_options.json", out / "bundle" / "tvm-fp32")
    line = one_error_line(here("verify", out, "-q", "--candidate", "tvm/fp32"), 2)
    assert "holds a ort/fp16 artefact, not tvm/fp32" in line, line
    (out / "bundle" / "tvm-fp32" / "session_options.json").unlink()
    # a manifest.json planted in the bundle folder: refused before anything loads
    rewrite_manifest(out, lambda m: m["bundle"].pop("ort/fp16"))
    shutil.copy(out / "manifest.json", out / "bundle" / "tvm-fp32" / "manifest.json")
    assert "manifest.json" in one_error_line(here("verify", out, "-q"), 2)


def test_the_untouched_output_still_verifies_in_both(out):
    done = dlopt("verify", out, "--json", "-q")
    assert done.returncode == 0, done.stderr
    assert [(r["key"], r["verified"]) for r in json.loads(done.stdout)["candidates"]] == [
        ("ort/fp32", True), ("tvm/fp32", True)]
    done = run_script(out, "--verify-only", "--json")
    assert done.returncode == 0, done.stderr
    assert [r["verified"] for r in json.loads(done.stdout)["candidates"]] == [True, True]


# -- item 9: bench --select moves only bundle/<folder> -----------------------------------------------

@pytest.mark.parametrize("where, why", [
    ("bundle", "dlopt writes bundle/<folder>"), ("bundle/.", "dlopt writes bundle/<folder>"),
    ("bundle/tvm-fp32/", "dlopt writes bundle/<folder>"), ("./bundle/tvm-fp32", "dlopt writes bundle/<folder>"),
    ("bundle//tvm-fp32", "dlopt writes bundle/<folder>"), ("run_candidates.py", "dlopt writes bundle/<folder>"),
    ("bundle/absent", "is not a folder"), ("bundle/" + "b" * 300, "cannot be checked"),
])
def test_select_refuses_a_bundle_path_that_is_not_one_bundle_folder(out, where, why):
    from dlopt.workflows.promote import select

    rewrite_manifest(out, lambda m: m["bundle"].update({"tvm/fp32": where}))
    before = tree(out)
    with pytest.raises(ConfigError) as raised:
        select(out, "tvm/fp32")
    assert why in str(raised.value) and "\n" not in str(raised.value)
    assert tree(out) == before


def test_select_refuses_two_candidates_in_one_folder(out):
    from dlopt.workflows.promote import select

    rewrite_manifest(out, lambda m: m["bundle"].update({"ort/fp16": "bundle/tvm-fp32"}))
    before = tree(out)
    with pytest.raises(ConfigError, match="puts two candidates in bundle/tvm-fp32"):
        select(out, "tvm/fp32")
    assert tree(out) == before


def test_select_refuses_a_bundle_folder_holding_the_outputs_own_names(out):
    from dlopt.workflows.promote import select

    (out / "bundle" / "tvm-fp32" / "bundle").mkdir()
    (out / "bundle" / "tvm-fp32" / "bundle" / "x.txt").write_text("x")
    before = tree(out)
    with pytest.raises(ConfigError, match="holds bundle, which --select would move onto the output's own"):
        select(out, "tvm/fp32")
    assert tree(out) == before


# -- item 8: a folder already at the top-level candidate's bundle place; names too long --------------

def test_select_refuses_when_the_top_level_candidates_bundle_folder_exists(out):
    from dlopt.workflows.promote import select

    (out / "bundle" / "ort-fp32").mkdir()
    (out / "bundle" / "ort-fp32" / "user.txt").write_text("mine")
    before = tree(out)
    with pytest.raises(ConfigError, match="already holds bundle/ort-fp32"):
        select(out, "tvm/fp32")
    assert tree(out) == before


@pytest.mark.parametrize("name", ["a" * 5000, "bundle/" + "b" * 300])
def test_a_name_too_long_for_the_file_system_is_one_line(out, name):
    with pytest.raises(VerifyFileError) as raised:
        device_check.contained_path(out, name)
    assert "cannot be checked" in str(raised.value) and len(str(raised.value)) < 400
    rewrite_meta(out, lambda m: m["candidates"]["tvm/fp32"].update(dir=name))
    one_error_line(here("verify", out, "-q"), 2)
    line = one_error_line(run_script(out, "--verify-only"), 2)
    assert "cannot be checked" in line and len(line) < 500


# -- item 7: run_candidates.py passes ORT and OpenVINO only what dlopt writes ------------------------

def test_foreign_ort_config_entries_are_refused_before_anything_runs(out, tmp_path):
    """rc.py: ep.context_* entries made ORT write an EP context model where the folder said; run_candidates.py
    passed every entry through (dlopt.load refused them)."""
    context = tmp_path / "ctx_written.onnx"
    options = json.loads((out / "session_options.json").read_text())
    options["config_entries"] = {"session.x64quantprecision": "1", "ep.context_enable": "1",
                                 "ep.context_file_path": str(context), "ep.context_embed_mode": "1"}
    (out / "session_options.json").write_text(json.dumps(options))
    want = "session_options.json sets ONNX Runtime config entry 'ep.context_embed_mode', which dlopt does not write"
    with pytest.raises(VerifyFileError, match=want):
        device_check.open_plain(out, "ort")
    assert want in one_error_line(run_script(out, "--verify-only"), 2)
    assert want in one_error_line(here("verify", out, "-q"), 2)
    assert not context.exists() and not (out / "device_report.json").exists()
    options.update(config_entries={"session.x64quantprecision": "1"}, graph_optimization_level="__class__")
    (out / "session_options.json").write_text(json.dumps(options))
    with pytest.raises(VerifyFileError, match="graph_optimization_level '__class__'"):
        device_check.open_plain(out, "ort")


@pytest.mark.parametrize("settings, why", [
    ({"device": "GPU", "properties": {}}, "names device 'GPU'"),
    ({"device": "HETERO:CPU", "properties": {}}, "names device 'HETERO:CPU'"),
    ({"device": "CPU", "properties": ["CACHE_DIR"]}, "properties that are not a JSON object"),
    ({"device": "CPU", "properties": {"CACHE_DIR": "/tmp/x"}}, "sets OpenVINO property 'CACHE_DIR'"),
    ({"device": "CPU", "properties": {"PERFORMANCE_HINT": "CUMULATIVE"}}, "sets PERFORMANCE_HINT 'CUMULATIVE'"),
])
def test_run_candidates_runs_openvino_on_the_cpu_only(tmp_path, settings, why):
    pytest.importorskip("openvino")
    (tmp_path / "runtime_config.json").write_text(json.dumps(settings))
    with pytest.raises(VerifyFileError, match=why):
        device_check.open_plain(tmp_path, "openvino")


def test_the_standalone_allow_lists_are_dlopts():
    from dlopt.targets import openvino, ort
    from dlopt.targets.openvino_plain import OpenVinoPlain
    from dlopt.targets.ort_plain import OrtPlain

    assert device_check.plain_runtime("ort") is OrtPlain and device_check.plain_runtime("openvino") is OpenVinoPlain
    assert OrtPlain.CONFIG_ENTRIES == ort.CONFIG_ENTRIES
    assert OpenVinoPlain.DEVICE == openvino.DEVICE
    assert set(OpenVinoPlain.VALUES) | set(OpenVinoPlain.COUNTS) == set(
        openvino._PROPERTY_VALUES) | set(openvino._COUNT_PROPERTIES)
    assert {k: set(v) for k, v in OpenVinoPlain.VALUES.items()} == {
        k: set(v) for k, v in openvino._PROPERTY_VALUES.items()}
    import onnxruntime

    assert all(isinstance(getattr(onnxruntime.GraphOptimizationLevel, name), onnxruntime.GraphOptimizationLevel)
               for name in OrtPlain.LEVELS)


# -- item 5: JSON files run_candidates.py reads are small regular files ------------------------------

def test_read_json_refuses_fifos_devices_huge_and_deep_files(tmp_path):
    os.mkfifo(tmp_path / "fifo.json")
    (tmp_path / "zero.json").symlink_to("/dev/zero")
    (tmp_path / "deep.json").write_text("[" * 200_000 + "]" * 200_000)
    (tmp_path / "big.json").write_text(" " * (device_check.JSON_MAX_BYTES + 1) + "{}")
    (tmp_path / "fine.json").write_text('{"a": [1, 2]}')
    started = time.monotonic()
    for name, why in (("fifo.json", "not a regular file"), ("zero.json", "is a symlink"),
                      ("deep.json", "nested too deeply"), ("big.json", "over the 16777216"),
                      ("absent.json", "cannot be opened")):
        with pytest.raises(VerifyFileError, match=why) as raised:
            device_check.read_json(tmp_path / name)
        assert "\n" not in str(raised.value)
    assert device_check.read_json(tmp_path / "fine.json") == {"a": [1, 2]}
    assert time.monotonic() - started < 10


def test_run_candidates_with_special_json_files_ends_in_bounded_time(out):
    settings = out / "session_options.json"
    kept = settings.read_text()
    settings.unlink()
    os.mkfifo(settings)
    started = time.monotonic()
    assert "not a regular file" in one_error_line(run_script(out, "--verify-only", timeout=60), 2)
    assert "not a regular file" in one_error_line(dlopt("verify", out, "-q", timeout=60), 2)
    settings.unlink()
    settings.symlink_to("/dev/zero")
    assert "is a symlink" in one_error_line(run_script(out, "--verify-only", timeout=60), 2)
    settings.unlink()
    settings.write_text(kept)
    manifest = out / "manifest.json"
    text = manifest.read_text()
    manifest.write_text("[" * 200_000 + "]" * 200_000)
    assert "nested too deeply" in one_error_line(run_script(out, "--verify-only", timeout=60), 2)
    manifest.unlink()
    os.mkfifo(manifest)
    assert "not a regular file" in one_error_line(run_script(out, "--verify-only", timeout=60), 2)
    manifest.unlink()
    manifest.write_text(text)
    report = out / "report.json"
    report.unlink()
    os.mkfifo(report)
    assert "not a regular file" in one_error_line(dlopt("verify", out, "-q", timeout=60), 2)
    assert time.monotonic() - started < 120
