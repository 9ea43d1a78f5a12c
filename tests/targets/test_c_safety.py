"""The C backend with hostile names, odd Clip bounds and a cross toolchain without newlib.

Names: a model's input/output names and node names reach model.h/model.c only inside comments,
mapped to a safe alphabet, so no name can close its comment (``*/``, a backslash-newline splice,
the ``??/`` trigraph) and put code in the host build that dlopt loads in its own process, or in
the user's firmware.  Clip with min > max gives max everywhere, as ONNX defines it and ONNX
Runtime computes it.  An arm-none-eabi-gcc without newlib's headers (the real compiler, moved by
GCC_EXEC_PREFIX to a tree that holds only gcc's own files) leaves the host-verified C and says
which package is missing."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from dlopt.core.errors import ModelError
from dlopt.core.profiles import resolve_target
from dlopt.targets import get_backend
from dlopt.targets.c.verify import cross_tools
from helpers import run_ort, run_session

C = get_backend("c")
# each closes a /* comment once the preprocessor has spliced lines (phase 2) and, under -std=c99,
# replaced trigraphs (phase 1)
CLOSES = ("*/", "*\\\n/", "*??/\n/")
TRIGRAPHS = {"??=": "#", "??/": "\\", "??'": "^", "??(": "[", "??)": "]", "??!": "|", "??<": "{", "??>": "}",
             "??-": "~"}


def _payload(close: str, marker: Path, fn: str) -> str:
    """A name that, written raw into a comment, ends it and defines a constructor writing ``marker`` in
    the host build only (the Cortex-M objects' undefined symbols are checked: no fopen there)."""
    return (f"{fn} {close}\n#ifndef __arm__\n#include <stdio.h>\n__attribute__((constructor)) static void "
            f"{fn}(void) {{ FILE *f = fopen(\"{marker}\", \"w\"); if (f) fclose(f); }}\n#endif\n/*")


def _model(x: str, y: str, conv: str, fc: str) -> onnx.ModelProto:
    rng = np.random.default_rng(3)
    inits = [numpy_helper.from_array((rng.standard_normal(s) * 0.4).astype(np.float32), n)
             for n, s in (("w", (3, 1, 3, 3)), ("fw", (5, 48)), ("fb", (5,)))]
    # no bias on the Conv: its name then sits in one comment (the weights'), so a payload defines its
    # constructor once and compiles
    nodes = [helper.make_node("Conv", [x, "w"], ["c"], pads=[1, 1, 1, 1], name=conv),
             helper.make_node("Relu", ["c"], ["r"], name=fc + " relu"),
             helper.make_node("Flatten", ["r"], ["f"], name="flatten"),
             helper.make_node("Gemm", ["f", "fw", "fb"], [y], transB=1, name=fc)]
    graph = helper.make_graph(nodes, "names", [helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, 1, 4, 4])],
                              [helper.make_tensor_value_info(y, TensorProto.FLOAT, [1, 5])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _code(text: str) -> str:
    """What the compiler sees of C text: trigraphs replaced, lines spliced, comments gone, spaces folded."""
    for tri, char in TRIGRAPHS.items():
        text = text.replace(tri, char)
    text = text.replace("\\\n", "")
    text = re.sub(r"/\*.*?\*/", " ", text, flags=re.DOTALL)
    return " ".join(text.split())


def _compile(proto, folder: Path):
    return C.compile(ir.serde.deserialize_model(proto), resolve_target("cortex-m7"), folder, precision="fp32",
                     threads=1)


def _run_c(artifact, feeds: list[dict]) -> list[np.ndarray]:
    """The first output of the host build on each feed (loaded in this process: a constructor would run here)."""
    return [outputs[0] for outputs in run_session(C.load(artifact), feeds)]


def _matches_ort(artifact, proto, x_name: str) -> float:
    feeds = [{x_name: np.random.default_rng(seed).standard_normal((1, 1, 4, 4)).astype(np.float32)}
             for seed in range(3)]
    return max(float(np.max(np.abs(got - want)) / np.max(np.abs(want)))
               for got, want in zip(_run_c(artifact, feeds), (run_ort(proto, f)[0] for f in feeds)))


@pytest.mark.parametrize("turn", range(len(CLOSES)))
def test_a_name_never_closes_its_comment_nor_runs_code(tmp_path, turn):
    """Each of input, output and node name gets each way of closing a comment across the three turns."""
    markers = {k: tmp_path / f"marker-{k}" for k in ("input", "output", "node")}
    x = _payload(CLOSES[turn], markers["input"], "dl_evil_input")
    y = _payload(CLOSES[(turn + 1) % 3], markers["output"], "dl_evil_output")
    conv = _payload(CLOSES[(turn + 2) % 3], markers["node"], "dl_evil_node")
    fc = "fc ??/\n??= \\ */ ??) \r\n end"
    hostile, plain = _model(x, y, conv, fc), _model("x", "y", "conv", "fc")
    got = _compile(hostile, tmp_path / "hostile")  # -Wall -Wextra -Werror for the M7 when installed
    want = _compile(plain, tmp_path / "plain")
    for file in ("model.c", "model.h"):
        text, reference = (got.folder / file).read_text(), (want.folder / file).read_text()
        assert _code(text) == _code(reference), file  # no name adds a token the compiler sees
        assert text.count("\n") == reference.count("\n"), file  # nor a line
        assert "\\" not in text and "??" not in text and "\r" not in text, file
        for comment in re.findall(r"/\*(.*?)\*/", text, flags=re.DOTALL):
            assert "/*" not in comment, (file, comment)
    block = (got.folder / "INTEGRATION.md").read_text().split("```c\n")[1].split("```")[0]
    plain_block = (want.folder / "INTEGRATION.md").read_text().split("```c\n")[1].split("```")[0]
    assert _code(block) == _code(plain_block) and block.count("\n") == plain_block.count("\n")
    assert "\\" not in block and "??" not in block
    assert _matches_ort(got, hostile, x) <= 1e-5
    assert not [k for k, m in markers.items() if m.exists()]
    # the names survive where they are data: the settings (JSON) keep them exactly
    settings = json.loads((got.folder / "c_build.json").read_text())
    assert [settings["inputs"][0]["name"], settings["outputs"][0]["name"]] == [x, y]


def _clip_models(lo: float, hi: float) -> dict[str, onnx.ModelProto]:
    rng = np.random.default_rng(7)
    bounds = [numpy_helper.from_array(np.array(lo, np.float32), "lo"),
              numpy_helper.from_array(np.array(hi, np.float32), "hi")]
    w = numpy_helper.from_array((rng.standard_normal((2, 1, 3, 3))).astype(np.float32), "w")
    xi = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 4, 4])

    def model(nodes, inits, out_shape, opset):
        graph = helper.make_graph(nodes, "clip", [xi], [helper.make_tensor_value_info("y", TensorProto.FLOAT,
                                                                                      out_shape)], inits)
        proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
        proto.ir_version = 8
        onnx.checker.check_model(proto)
        return proto

    return {
        "clip": model([helper.make_node("Clip", ["x", "lo", "hi"], ["y"], name="clip")], bounds, [1, 1, 4, 4], 17),
        "conv+clip": model([helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1], name="conv"),
                            helper.make_node("Clip", ["c", "lo", "hi"], ["y"], name="clip")],
                           [w, *bounds], [1, 2, 4, 4], 17),
        "clip-6": model([helper.make_node("Clip", ["x"], ["y"], min=lo, max=hi, name="clip")], [], [1, 1, 4, 4], 6),
    }


@pytest.mark.parametrize("lo, hi", [(2.0, -1.0), (0.5, 0.25), (1.0, 1.0)])
def test_clip_with_min_over_max_is_onnx_runtimes(tmp_path, lo, hi):
    x = np.random.default_rng(1).standard_normal((1, 1, 4, 4)).astype(np.float32) * 3
    for label, proto in _clip_models(lo, hi).items():
        if label == "clip-6" and lo > hi:  # attributes before opset 11: ONNX Runtime refuses the model
            with pytest.raises(Exception, match="min_ <= max_ was false"):
                run_ort(proto, {"x": x})
            with pytest.raises(ModelError, match=r"^Clip 'clip': attribute min .* over max .*; give min <= max$"):
                _compile(proto, tmp_path / label)
            continue
        artifact = _compile(proto, tmp_path / label.replace("+", "-"))
        (got,) = _run_c(artifact, [{"x": x}])
        want = run_ort(proto, {"x": x})[0]
        assert np.array_equal(want, np.full_like(want, hi)), label  # ONNX: min > max gives max everywhere
        assert np.max(np.abs(got - want)) == 0.0, (label, np.max(np.abs(got - want)))


needs_cross = pytest.mark.skipif(cross_tools() is not True, reason=str(cross_tools()))


def _without_newlib(root: Path) -> Path:
    """A GCC_EXEC_PREFIX tree holding the host gcc's and arm-none-eabi-gcc's own files (cc1, gcc's
    headers, crt objects) but not newlib: what a toolchain installed without libnewlib-arm-none-eabi has."""
    for tool in ("gcc", "arm-none-eabi-gcc"):
        def ask(*flag):
            return subprocess.run([tool, *flag], capture_output=True, text=True, check=True).stdout.strip()

        folder = root / ask("-dumpmachine") / ask("-dumpversion")
        folder.mkdir(parents=True)
        for source in {Path(ask("-print-prog-name=cc1")).parent, Path(ask("-print-file-name=include")).parent}:
            for entry in source.iterdir():
                if not (folder / entry.name).exists():
                    (folder / entry.name).symlink_to(entry)
    return root


@needs_cross
def test_a_cross_toolchain_without_newlib_keeps_the_host_verified_c(tmp_path, monkeypatch, caplog):
    from cli import dlopt as run_cli

    probe = tmp_path / "probe.c"
    probe.write_text("#include <string.h>\nint f(void) { return (int)strlen(\"a\"); }\n")
    monkeypatch.setenv("GCC_EXEC_PREFIX", f"{_without_newlib(tmp_path / 'gcc')}/")
    real = subprocess.run(["arm-none-eabi-gcc", "-c", str(probe), "-o", str(tmp_path / "probe.o")],
                          capture_output=True, text=True)
    assert real.returncode != 0 and "string.h: No such file" in real.stderr  # the condition is real
    C.runtime_version.cache_clear()
    assert C.runtime_version().endswith(" (no newlib)")  # in the cache key: no stale build once installed
    C.runtime_version.cache_clear()
    assert subprocess.run([shutil.which("gcc"), "-shared", "-fPIC", str(probe), "-o", str(tmp_path / "p.so")],
                          capture_output=True).returncode == 0  # and the host compiler unaffected
    proto = _clip_models(0.0, 6.0)["conv+clip"]
    with caplog.at_level("WARNING", logger="dlopt.targets.c.backend"):
        artifact = _compile(proto, tmp_path / "c")
    reason = artifact.settings["figures_unavailable"]
    assert "libnewlib-arm-none-eabi" in reason and "string.h" in reason and "\n" not in reason
    assert "figures" not in artifact.settings and "qemu" not in artifact.settings
    assert [r.getMessage() for r in caplog.records if r.name == "dlopt.targets.c.backend"] == [
        f"no Cortex-M sizes or qemu check: {reason}"]
    x = np.random.default_rng(2).standard_normal((1, 1, 4, 4)).astype(np.float32)
    (got,) = _run_c(artifact, [{"x": x}])
    assert np.max(np.abs(got - run_ort(proto, {"x": x})[0])) <= 1e-5
    # the CLI: the candidate ships, verified on the host build, and one line names the package
    onnx.save(_clip_models(-1.0, 3.0)["conv+clip"], tmp_path / "m.onnx")
    done = run_cli("compile", tmp_path / "m.onnx", "--target", "cortex-m4", "-o", tmp_path / "out",
                   "--precision", "fp32")
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stderr.splitlines() if "libnewlib-arm-none-eabi" in line]
    assert len(lines) == 1 and "string.h" in lines[0], done.stderr
    assert (tmp_path / "out" / "model.c").is_file()
    assert "figures_unavailable" in json.loads((tmp_path / "out" / "c_build.json").read_text())
    report = (tmp_path / "out" / "report.md").read_text()
    assert "no Cortex-M sizes: arm-none-eabi-gcc has no C library" in report and "libnewlib-arm-none-eabi" in report


def test_the_compile_flow_verifies_hostile_names_and_runs_none_of_them(tmp_path):
    import dlopt

    markers = [tmp_path / f"marker-{k}" for k in range(3)]
    names = [_payload(close, m, f"dl_evil_{k}") for k, (close, m) in enumerate(zip(CLOSES, markers))]
    proto = _model(*names, "fc */ ??/\n")
    onnx.save(proto, tmp_path / "m.onnx")
    x = np.random.default_rng(4).standard_normal((6, 1, 4, 4)).astype(np.float32)
    report = dlopt.compile(tmp_path / "m.onnx", target="cortex-m7", out=tmp_path / "out", precision="fp32",
                           inputs={names[0]: x})
    chosen = report.chosen_candidate()
    assert chosen.backend == "c" and chosen.fidelity.max_rel_error <= 1e-5
    assert not [m for m in markers if m.exists()]
    for file in ("model.c", "model.h"):
        assert "\\" not in (tmp_path / "out" / file).read_text()
