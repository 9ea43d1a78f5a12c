"""Issue 23, items 2, 3, 5, 6, 15, 16 (and 21's swapped .so and verify.npz MemoryError): what an
output folder says may not run code, move files or exhaust memory in `dlopt verify`, `dlopt bench`,
`bench --select` and run_candidates.py.

Each attack is made in a temporary copy of a real output (ONNX Runtime fp32 at the top level, a
real TVM x86_64 library in bundle/tvm-fp32), with a native library whose constructor writes a
marker file: the marker must never appear.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from numpy.lib import format as npy

import models
from cli import dlopt
from serving import dlopt_here

import dlopt as api
from dlopt.core.artifacts import FILE_HASHES, check_native_files, contained_path
from dlopt.device.device_check import VERIFY_READ_MAX, VerifyFileError, read_arrays
from dlopt.core.errors import ConfigError

AWAY = ('[targets.away]\nbase = "cpu"\nbackends = ["ort", "tvm"]\n'
        'cpu_flags = ["dlopt-test-not-this-cpu"]\n')
MODEL = models.conv_bn_relu(channels=8, size=16, batch="N")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """An output that ships ort/fp32 at the top level and a TVM library for this machine in bundle/.

    Built once per test run and only read (tests attack copies): this file and test_folder_safety2.py share
    it, and so do pytest-xdist's workers, whose base folders have this run's folder in common; a file lock
    lets the first build it while the others wait."""
    root = tmp_path_factory.getbasetemp()
    root = root.parent if os.environ.get("PYTEST_XDIST_WORKER") else root
    tmp = root / "folder-safety-built"
    out = tmp / "out"
    with open(root / "folder-safety-built.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (out / "manifest.json").is_file():  # a compile publishes its output whole or not at all
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            (tmp / "away.toml").write_text(AWAY)
            api.compile(MODEL, target="away", targets_file=tmp / "away.toml", out=out, precision="fp32", runs=5,
                        warmup=1, samples=4, cache=False)
    assert (out / "bundle" / "tvm-fp32" / "model.so").is_file()
    return out


@pytest.fixture
def out(built, tmp_path):
    copy = tmp_path / "out"
    shutil.copytree(built, copy)
    return copy


def evil_library(folder: Path, marker: Path) -> Path:
    """A shared library whose constructor writes ``marker``: what a swapped model.so runs when loaded."""
    folder.mkdir(parents=True, exist_ok=True)
    source = folder / "evil.c"
    source.write_text('#include <stdio.h>\n__attribute__((constructor)) static void f(void) {\n'
                      f'  FILE *f = fopen("{marker}", "w"); if (f) {{ fputs("ran", f); fclose(f); }}\n}}\n')
    library = folder / "model.so"
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(library), str(source)], check=True, timeout=60)
    source.unlink()
    return library


def rewrite_meta(out: Path, change) -> None:
    path = out / "verify.npz"
    with np.load(path, allow_pickle=False) as archive:
        arrays = {k: archive[k] for k in archive.files}
    meta = json.loads(str(arrays["meta"]))
    change(meta)
    arrays["meta"] = np.array(json.dumps(meta))
    with open(path, "wb") as f:
        np.savez_compressed(f, **arrays)


def rewrite_manifest(out: Path, change) -> None:
    manifest = json.loads((out / "manifest.json").read_text())
    change(manifest)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")


def one_error_line(done, code: int) -> str:
    lines = done.stderr.strip().splitlines()
    assert done.returncode == code, done.stderr
    assert len(lines) == 1 and "Traceback" not in done.stderr and "internal error" not in done.stderr, done.stderr
    return lines[0]


def here(*args) -> SimpleNamespace:
    """`dlopt ARGS` in this process (tests/serving.py ``dlopt_here``: the console script's command, checks and
    error-to-exit-code mapping without its start-up), as (returncode, stderr): for the refusals, where the
    subject is what dlopt checks before it loads anything; a library that did load would write its marker here
    all the same.  The zip bomb and the FIFOs still go to a subprocess, whose memory and time are bounded."""
    code, err = dlopt_here(*args)
    return SimpleNamespace(returncode=code, stderr=err)


def run_script(out: Path, *args, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(out / "run_candidates.py"), "--out", str(out), *map(str, args)],
                          capture_output=True, text=True, timeout=timeout)


def tree(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# -- item 6: one check for every path an output folder names ---------------------------------------

def test_contained_path_and_its_standalone_twin_agree(tmp_path):
    from dlopt.device import device_check

    folder = tmp_path / "out"
    (folder / "bundle" / "tvm-fp32").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    (folder / "bundle" / "link").symlink_to(tmp_path / "elsewhere")
    (folder / "inner").symlink_to(folder / "bundle")  # a link that stays inside is still a link
    good = {".": folder, "bundle/tvm-fp32": folder / "bundle" / "tvm-fp32", "bundle/./tvm-fp32/model.so":
            folder / "bundle" / "tvm-fp32" / "model.so", "not-yet": folder / "not-yet"}
    bad = {"/etc": "is absolute", str(tmp_path / "elsewhere"): "is absolute", "../elsewhere": "climbs out",
           "bundle/../../elsewhere": "climbs out", "bundle/link": "symlink bundle/link",
           "bundle/link/model.so": "symlink bundle/link", "inner/tvm-fp32": "symlink inner", "": "not a relative",
           None: "not a relative", 5: "not a relative", "a\x00b": "not a relative"}
    for name, want in good.items():
        assert contained_path(folder, name) == want
        assert device_check.contained_path(folder, name) == want
    for name, why in bad.items():
        with pytest.raises(ConfigError) as raised:
            contained_path(folder, name, named_in="verify.npz")
        assert why in str(raised.value) and "(verify.npz)" in str(raised.value) and "\n" not in str(raised.value)
        with pytest.raises(VerifyFileError) as twin:
            device_check.contained_path(folder, name)
        assert why in str(twin.value)


def test_select_refuses_a_bundle_path_outside_the_output_and_moves_nothing(out, tmp_path):
    from dlopt.workflows.promote import select

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("three years of work\n")
    before = tree(out)
    for where in (str(foreign), "../foreign", "bundle/../../foreign"):
        rewrite_manifest(out, lambda m: m["bundle"].update({"tvm/fp32": where}))
        before = tree(out)
        with pytest.raises(ConfigError, match="names the path"):
            select(out, "tvm/fp32")
        assert (foreign / "thesis.tex").read_text() == "three years of work\n"
        assert tree(out) == before
    # a bundle folder replaced by a symlink to the foreign folder: refused the same way
    rewrite_manifest(out, lambda m: m["bundle"].update({"tvm/fp32": "bundle/tvm-fp32"}))
    shutil.rmtree(out / "bundle" / "tvm-fp32")
    (out / "bundle" / "tvm-fp32").symlink_to(foreign)
    with pytest.raises(ConfigError, match="symlink"):
        select(out, "tvm/fp32")
    assert sorted(p.name for p in foreign.iterdir()) == ["thesis.tex"]
    # and an absolute name among the manifest's published entries
    (out / "bundle" / "tvm-fp32").unlink()
    rewrite_manifest(out, lambda m: m["published"].append(str(foreign)))
    with pytest.raises(ConfigError, match="is absolute"):
        select(out, "tvm/fp32")
    assert sorted(p.name for p in foreign.iterdir()) == ["thesis.tex"]


def test_select_carries_the_hashes_so_the_moved_library_still_loads(out):
    from dlopt.workflows.promote import select

    hashes = json.loads((out / "manifest.json").read_text())[FILE_HASHES]
    select(out, "tvm/fp32")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest[FILE_HASHES]["model.so"] == hashes["bundle/tvm-fp32/model.so"]
    assert manifest[FILE_HASHES]["bundle/ort-fp32/model.onnx"] == hashes["model.onnx"]
    assert "bundle/tvm-fp32/model.so" not in manifest[FILE_HASHES]
    check_native_files(out, out, manifest["files"])  # the top-level TVM library checks out
    done = dlopt("verify", out, "--json", "-q")
    assert done.returncode == 0, done.stderr
    rows = {r["key"]: r for r in json.loads(done.stdout)["candidates"]}
    assert rows["tvm/fp32"]["verified"] is True and rows["tvm/fp32"]["dir"] == "."


# -- item 2: verify.npz's candidate dir ------------------------------------------------------------

@pytest.mark.parametrize("how", ["absolute", "dotdot"])
def test_verify_npz_dir_outside_the_output_is_refused_before_anything_loads(out, tmp_path, how):
    marker = tmp_path / "marker"
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(out / "bundle" / "tvm-fp32", elsewhere)
    evil_library(elsewhere, marker)
    where = str(elsewhere) if how == "absolute" else "bundle/../../elsewhere"
    rewrite_meta(out, lambda m: m["candidates"]["tvm/fp32"].update(dir=where))
    for verb in ("verify", "bench"):
        line = one_error_line(here(verb, out, "-q", *(["--runs", "5"] if verb == "bench" else [])), 2)
        assert "names the path" in line and "(verify.npz)" in line
    done = run_script(out, "--verify-only")
    line = one_error_line(done, 2)
    assert line.startswith("run_candidates.py: error:") and "candidate folder" in line
    assert not marker.exists() and not (out / "device_report.json").exists()


# -- item 5: native code is loaded only as published -----------------------------------------------

def test_the_manifest_records_every_artefact_files_sha256(out):
    hashes = json.loads((out / "manifest.json").read_text())[FILE_HASHES]
    assert set(hashes) == {"model.onnx", "session_options.json", "bundle/tvm-fp32/model.so",
                           "bundle/tvm-fp32/tvm_build.json"}
    for name, digest in hashes.items():
        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == digest


def test_a_swapped_library_is_refused_and_its_constructor_never_runs(out, tmp_path):
    marker = tmp_path / "marker"
    evil_library(out / "bundle" / "tvm-fp32", marker)
    for verb in ("verify", "bench"):
        line = one_error_line(here(verb, out, "-q", *(["--runs", "5"] if verb == "bench" else [])), 2)
        assert "bundle/tvm-fp32/model.so" in line and "sha256 differs" in line and "recompile" in line
    with pytest.raises(ConfigError, match="sha256 differs"):  # what dlopt.load calls first (runner.load)
        check_native_files(out, out / "bundle" / "tvm-fp32", ["model.so", "tvm_build.json"])
    line = one_error_line(run_script(out, "--verify-only"), 2)  # the script on the device checks the same
    assert line.startswith("run_candidates.py: error: bundle/tvm-fp32/model.so") and "sha256 differs" in line
    # -c ort/fp32 alone loads no native code: it runs
    done = here("verify", out, "-q", "-c", "ort/fp32", "--json")
    assert done.returncode == 0, done.stderr
    assert run_script(out, "--verify-only", "--candidate", "ort/fp32").returncode == 0
    assert not marker.exists()


def test_a_planted_library_beside_the_candidate_is_refused(out, tmp_path):
    marker = tmp_path / "marker"
    evil_library(tmp_path / "evil", marker)
    shutil.copy(tmp_path / "evil" / "model.so", out / "bundle" / "tvm-fp32" / "libextra.so")
    line = one_error_line(here("verify", out, "-q"), 2)
    assert "bundle/tvm-fp32/libextra.so" in line and "did not write" in line
    assert "bundle/tvm-fp32/libextra.so is not a file dlopt published" in one_error_line(run_script(out), 2)
    assert not marker.exists()


def test_a_manifest_without_hashes_loads_no_native_code(out, tmp_path):
    rewrite_manifest(out, lambda m: m.pop(FILE_HASHES))
    line = one_error_line(here("verify", out, "-q"), 2)
    assert "records no file hashes" in line and "recompile" in line
    assert "records no file hashes" in one_error_line(run_script(out, "--verify-only"), 2)
    done = here("verify", out, "-q", "-c", "ort/fp32")  # no native code: loads as before
    assert done.returncode == 0, done.stderr


# -- item 3: emulation runs dlopt's copy of run_candidates.py --------------------------------------

def test_emulated_verify_runs_dlopts_script_not_the_folders(out, tmp_path):
    """A stand-in emulation environment (qemu-aarch64 on PATH runs the host Python) shows which script runs."""
    marker = tmp_path / "marker"
    (out / "run_candidates.py").write_text(f"open({str(marker)!r}, 'w').write('the folder script ran')\n")
    settings_path = out / "bundle" / "tvm-fp32" / "tvm_build.json"
    settings = json.loads(settings_path.read_text())
    settings["host"] = {"mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a76"}
    settings_path.write_text(json.dumps(settings))
    digest = hashlib.sha256(settings_path.read_bytes()).hexdigest()
    rewrite_manifest(out, lambda m: m[FILE_HASHES].update({"bundle/tvm-fp32/tvm_build.json": digest}))
    env_root = tmp_path / "arm64"
    (env_root / "sysroot" / "usr" / "bin").mkdir(parents=True)
    (env_root / "sysroot" / "usr" / "bin" / "python3.11").write_text("")
    for package in ("tvm", "tvm_ffi", "numpy"):
        (env_root / "site" / package).mkdir(parents=True)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    qemu = bin_dir / "qemu-aarch64"
    qemu.write_text('#!/bin/sh\nif [ "$1" = "-cpu" ]; then echo "Available CPUs:"; echo "  cortex-a76"; exit 0; fi\n'
                    f'shift\nunset PYTHONPATH\nexec {sys.executable} "$@"\n')
    qemu.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "DLOPT_ARM64_ENV": str(env_root)}
    done = subprocess.run([str(Path(sys.executable).parent / "dlopt"), "verify", str(out), "--json", "-q",
                           "-c", "tvm/fp32"], capture_output=True, text=True, timeout=300, env=env)
    assert not marker.exists(), "dlopt ran the output folder's own run_candidates.py"
    row = json.loads(done.stdout)["candidates"][0]
    assert row["ran_as"] == "qemu-aarch64 emulation (cortex-a76)"
    # dlopt's script ran on the stand-in (an x86 Python) and said why it could not run an aarch64 library
    assert "a TVM library for aarch64" in row["reason"]


# -- item 16: verify.npz through a declared-size guard ---------------------------------------------

def write_bomb(path: Path, size: int) -> None:
    """A deflated .npz member of ``size`` zero bytes: a few MB on disk."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as archive:
        with archive.open("in_0_0.npy", "w", force_zip64=True) as f:
            npy.write_array_header_1_0(f, {"descr": "<f4", "fortran_order": False, "shape": (size // 4,)})
            block = bytes(16 << 20)
            for _ in range(size // len(block)):
                f.write(block)


def test_a_zip_bomb_verify_file_is_refused_in_one_line(out):
    write_bomb(out / "verify.npz", VERIFY_READ_MAX + (32 << 20))
    assert (out / "verify.npz").stat().st_size < 8 << 20
    started = time.monotonic()
    for verb in ("verify", "bench"):
        line = one_error_line(dlopt(verb, out, "-q"), 2)
        assert "expands to" in line and "zip bomb" in line
    line = one_error_line(run_script(out, "--verify-only"), 2)
    assert line.startswith("run_candidates.py: error:") and "zip bomb" in line
    assert time.monotonic() - started < 60


def test_a_header_declaring_more_than_its_entry_holds_is_refused(tmp_path):
    path = tmp_path / "verify.npz"
    with zipfile.ZipFile(path, "w") as archive:
        with archive.open("in_0_0.npy", "w") as f:
            npy.write_array_header_1_0(f, {"descr": "<f4", "fortran_order": False, "shape": (600_000_000,)})
            f.write(bytes(64))
    with pytest.raises(VerifyFileError, match="declares 2400000000 bytes and holds 64"):
        read_arrays(path)
    pickled = tmp_path / "pickled.npz"
    np.savez(pickled, meta=np.array([{"a": 1}], dtype=object))
    with pytest.raises(VerifyFileError, match="pickled"):
        read_arrays(pickled)


def test_a_huge_timing_shape_is_refused_before_anything_runs(out):
    rewrite_meta(out, lambda m: m.update(timing_shapes={"x": [200_000_000, 3, 16, 16]}))
    line = one_error_line(here("bench", out, "-q", "--runs", "5"), 2)
    assert "timing shapes need 614400000000 bytes" in line
    line = one_error_line(run_script(out), 2)
    assert "timing shapes need" in line
    rewrite_meta(out, lambda m: m.update(timing_shapes={"x": ["many", 3, 16, 16]}))
    assert "not a list of sizes" in one_error_line(here("bench", out, "-q", "--runs", "5"), 2)


# -- item 15: thread counts in the files run_candidates.py reads -----------------------------------

def test_run_candidates_clamps_thread_counts_from_the_folder(out):
    from dlopt.device.device_check import cores, open_plain

    options = json.loads((out / "session_options.json").read_text())
    options.update(intra_op_num_threads=400, inter_op_num_threads=3000, execution_mode="ORT_PARALLEL")
    (out / "session_options.json").write_text(json.dumps(options))
    build = out / "bundle" / "tvm-fp32" / "tvm_build.json"
    build.write_text(json.dumps({**json.loads(build.read_text()), "threads": 5000}))
    before = len(os.listdir("/proc/self/task"))
    started = time.monotonic()
    run = open_plain(out, "ort")
    x = np.zeros((1, 3, 16, 16), np.float32)
    assert run({"x": x})[0].shape[0] == 1
    tvm_run = open_plain(out / "bundle" / "tvm-fp32", "tvm")
    assert tvm_run({"x": x})[0].shape[0] == 1
    grown = len(os.listdir("/proc/self/task")) - before
    assert grown <= 3 * cores() + 4, f"{grown} threads started for settings asking for 400, 3000 and 5000"
    assert time.monotonic() - started < 60


def test_a_changed_c_source_is_refused_before_gcc_builds_and_loads_it(tmp_path):
    """A C candidate (cortex-m7) is built with the host gcc and loaded by dlopt verify: a changed model.c
    with a constructor would run in dlopt's process."""
    out = tmp_path / "out"
    api.compile(models.conv_bn_relu(channels=4, size=8), target="cortex-m7", out=out, precision="fp32", runs=5,
                warmup=1, samples=4, cache=False)
    assert here("verify", out, "-q").returncode == 0
    marker = tmp_path / "marker"
    source = out / "model.c"
    source.write_text(source.read_text() + '\n#include <stdio.h>\n__attribute__((constructor)) static void evil(void)'
                      f' {{ FILE *f = fopen("{marker}", "w"); if (f) fclose(f); }}\n')
    line = one_error_line(here("verify", out, "-q"), 2)
    assert line.startswith("dlopt: error: model.c in ") and "sha256 differs" in line
    assert not marker.exists()
