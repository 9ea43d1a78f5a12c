"""Files an output folder hands dlopt back (issue 23, items 5, 6, 8, 10, 11): a FIFO, a link to
/dev/zero, JSON nested 100 000 deep, an over-long name, a symlinked model or a manifest dropped
into a bundle folder end `dlopt run`/`dlopt load` in one line with exit 2, at once."""

from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
import subprocess
import time

import numpy as np
import onnx
import pytest

from cli import DLOPT
from test_folder_safety import AWAY, MODEL, built  # noqa: F401 - the shared build, a fixture

import dlopt as api
from dlopt.core.artifacts import contained_path, read_folder_json
from dlopt.core.errors import ConfigError, first_line

# The output of test_folder_safety.py's `built` fixture, built once for both files (and for every pytest-xdist
# worker): a CPU target that is not this machine (AWAY), nothing timed, ORT ships at the top, TVM in bundle/.
assert "cpu_flags" in AWAY and '"ort", "tvm"' in AWAY and MODEL.graph.input[0].name == "x"
WALL_S = 60  # a loaded 2-core machine starts dlopt with ORT and TVM in a few seconds; a hang is forever


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A real input file for `dlopt run`: only a folder it hands back may stop the run."""
    path = tmp_path_factory.mktemp("folder-files") / "in.npz"
    np.savez(path, x=np.random.default_rng(0).standard_normal((2, 3, 16, 16)).astype(np.float32))
    return path


@pytest.fixture
def out(built, tmp_path):
    assert json.loads((built / "report.json").read_text())["chosen"] == "ort/fp32"
    assert json.loads((built / "manifest.json").read_text())["bundle"] == {"tvm/fp32": "bundle/tvm-fp32"}
    return shutil.copytree(built, tmp_path / "out", symlinks=True)


def _limit_memory():  # a reader that loops on /dev/zero fails fast here instead of taking the machine
    resource.setrlimit(resource.RLIMIT_DATA, (8 << 30, 8 << 30))


def _dlopt(*args):
    start = time.monotonic()
    result = subprocess.run([DLOPT, *map(str, args)], capture_output=True, text=True, timeout=WALL_S,
                            preexec_fn=_limit_memory)
    return result, time.monotonic() - start


def _plant(path, kind):
    path.unlink()
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "dev-zero":
        os.symlink("/dev/zero", path)
    elif kind == "deep":
        path.write_text("[" * 100_000 + "]" * 100_000)
    elif kind == "not-utf8":
        path.write_bytes(b'{"a": "\xff"}')


# -- the reader itself -------------------------------------------------------------------------------

@pytest.mark.parametrize(("kind", "message"), [
    ("fifo", "is not a regular file"),
    ("dev-zero", "goes through the symlink s.json"),
    ("deep", "is not valid JSON (nested too deeply)"),
    ("not-utf8", "is not valid JSON ('utf-8' codec can't decode byte 0xff"),
    ("dir", "is not a regular file"),
    ("big", "is 2001 bytes, over dlopt's limit of 2000"),
    ("missing", "s.json is missing"),
    ("depth 65", "nests deeper than 64 levels"),
])
def test_reader_refuses_each_hostile_file_at_once_in_one_line(tmp_path, kind, message):
    path = tmp_path / "s.json"
    path.write_text("{}")
    if kind == "dir":
        path.unlink()
        path.mkdir()
    elif kind == "big":
        path.write_text(" " * 1999 + "{}")
    elif kind == "missing":
        path.unlink()
    elif kind == "depth 65":
        path.write_text("[" * 65 + "]" * 65)
    else:
        _plant(path, kind)
    start = time.monotonic()
    with pytest.raises(ConfigError) as info:
        read_folder_json(tmp_path, "s.json", **({"limit": 2000} if kind == "big" else {}))
    assert time.monotonic() - start < 5
    assert message in str(info.value) and "\n" not in str(info.value)
    path.rmdir() if path.is_dir() and not path.is_symlink() else path.unlink(missing_ok=True)
    path.write_text("[" * 64 + "]" * 64)
    assert read_folder_json(tmp_path, "s.json", limit=2000) is not None
    assert read_folder_json(tmp_path, "none.json", missing_ok=True) is None


# -- dlopt run / load on a planted settings file (items 5, 6, 8) ------------------------------------

@pytest.mark.parametrize("kind", ["fifo", "dev-zero", "deep"])
@pytest.mark.parametrize(("name", "where"), [("session_options.json", "."), ("manifest.json", "."),
                                             ("report.json", "bundle/tvm-fp32"),
                                             ("tvm_build.json", "bundle/tvm-fp32")])
def test_dlopt_run_refuses_a_planted_settings_file_in_one_line(out, inputs, kind, name, where):
    folder = out / where
    _plant((out if name in ("manifest.json", "report.json") else folder) / name, kind)
    result, took = _dlopt("run", folder, "-i", inputs, "-o", out.parent / "p.npz")
    print(f"{name} {kind}: exit {result.returncode} in {took:.1f} s: {result.stderr.strip()}")
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("dlopt: error: ")
    assert name in result.stderr or (name == "manifest.json" and "not a dlopt output" in result.stderr)
    assert not (out.parent / "p.npz").exists()


def test_dlopt_verify_refuses_a_fifo_manifest_in_one_line(out):
    _plant(out / "manifest.json", "fifo")
    result, took = _dlopt("verify", out)
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and "manifest.json is not a regular file" in result.stderr, result.stderr


# -- names (item 8) ----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["a" * 300, "bundle/" + "b" * 300, "x/" * 3000])
def test_an_over_long_name_is_a_one_line_refusal(tmp_path, name):
    (tmp_path / "bundle").mkdir()
    with pytest.raises(ConfigError, match="cannot be checked") as info:
        contained_path(tmp_path, name, named_in="verify.npz")
    assert "\n" not in str(info.value) and len(str(info.value)) < 600


def test_a_line_separator_in_a_name_is_shown_not_cut():
    exc = ConfigError("the path 'bundle\u2028evil' is refused; recompile")
    assert first_line(exc) == "the path 'bundle\\u2028evil' is refused; recompile"
    assert first_line(ValueError("a\u2029b\x85c\x1ed\nsecond line")) == "a\\u2029b\\x85c\\x1ed"
    assert first_line(ValueError("head:\nreason")) == "head: reason"


# -- links among the artefact's own files (item 10) -------------------------------------------------

def test_a_symlinked_model_is_not_loaded(out, inputs, tmp_path):
    outside = tmp_path / "elsewhere.onnx"
    shutil.copy(out / "model.onnx", outside)
    (out / "model.onnx").unlink()
    (out / "model.onnx").symlink_to(outside)
    with pytest.raises(ConfigError, match="goes through the symlink model.onnx"):
        api.load(out)
    result, _ = _dlopt("run", out, "-i", inputs, "-o", tmp_path / "p.npz")
    assert result.returncode == 2 and "symlink model.onnx" in result.stderr and result.stderr.count("\n") == 1
    assert not (tmp_path / "p.npz").exists()


@pytest.mark.parametrize("how", ["linked data", "data outside"])
def test_external_data_outside_the_folder_is_not_loaded(out, tmp_path, how):
    model = onnx.load(out / "model.onnx")
    onnx.save(model, out / "model.onnx", save_as_external_data=True, all_tensors_to_one_file=True,
              location="model.onnx.data", size_threshold=0)
    if how == "linked data":
        shutil.move(out / "model.onnx.data", tmp_path / "real.data")
        (out / "model.onnx.data").symlink_to(tmp_path / "real.data")
    else:  # onnx.save refuses to write '..': edit the saved model's locations by hand
        shutil.move(out / "model.onnx.data", tmp_path / "outside.data")
        model = onnx.load(out / "model.onnx", load_external_data=False)
        for tensor in model.graph.initializer:
            for entry in tensor.external_data:
                if entry.key == "location":
                    entry.value = "../outside.data"
        (out / "model.onnx").write_bytes(model.SerializeToString())
    with pytest.raises(ConfigError) as info:  # '..' is refused by ONNX Runtime itself
        api.load(out)
    assert ("the symlink model.onnx.data" if how == "linked data" else "External data path") in str(info.value)


# -- a bundle folder's own manifest (item 11) -------------------------------------------------------

def test_a_manifest_in_a_bundle_folder_does_not_vouch_for_a_swapped_library(out):
    folder = out / "bundle" / "tvm-fp32"
    (folder / "model.so").write_bytes(b"\x7fELF not the library dlopt built")
    inner = json.loads((out / "manifest.json").read_text())
    inner.update(backend="tvm", precision="fp32", files=["model.so", "tvm_build.json"], bundle={},
                 file_sha256={f: hashlib.sha256((folder / f).read_bytes()).hexdigest()
                              for f in ("model.so", "tvm_build.json")})
    (folder / "manifest.json").write_text(json.dumps(inner))
    with pytest.raises(ConfigError, match="holds a manifest.json, which dlopt never writes there"):
        api.load(folder)
    (folder / "manifest.json").unlink()
    with pytest.raises(ConfigError, match="bundle/tvm-fp32/model.so .* is not the file dlopt published"):
        api.load(folder)


def test_the_untouched_output_and_its_bundle_still_load(out):
    x = np.random.default_rng(1).standard_normal((2, 3, 16, 16)).astype(np.float32)
    with api.load(out) as top, api.load(out / "bundle" / "tvm-fp32") as tvm:
        (a,), (b,) = top.run({"x": x}), tvm.run({"x": x})
    assert a.shape == (2, 10) and float(np.max(np.abs(a - b))) < 1e-4
