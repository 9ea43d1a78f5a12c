"""Does the rpi5 TVM artefact really run?  Build it here, run it on an emulated aarch64, compare.

Builds the ``rpi5`` library (Cortex-A76, NEON) with dlopt's TVM backend, runs it
under qemu-aarch64 with Debian's arm64 Python and PyPI's aarch64 TVM wheel
(runtime only: ``TVM_USE_RUNTIME_LIB=1``), and compares its outputs with ONNX
Runtime on this host.  Prints the errors and timings; exits 1 on a mismatch.
Emulated timings say nothing about a real Pi 5; they only show it ran.

Nothing is installed by this script.  Requirements (Debian 12, as root, from the
repository root; about 50 MB of debs and 370 MB of wheels under build/arm64):

    apt-get install qemu-user gcc-aarch64-linux-gnu
    dpkg --add-architecture arm64 && apt-get update
    mkdir -p build/arm64/debs && cd build/arm64/debs && apt-get download \\
        python3.11-minimal:arm64 libpython3.11-minimal:arm64 libpython3.11-stdlib:arm64 libc6:arm64 \\
        libgcc-s1:arm64 libstdc++6:arm64 zlib1g:arm64 libexpat1:arm64 libffi8:arm64 && cd -
    for deb in build/arm64/debs/*.deb; do dpkg -x "$deb" build/arm64/sysroot; done
    .venv/bin/pip download -d build/arm64/wheels --only-binary=:all: --platform manylinux_2_28_aarch64 \\
        --python-version 3.11 --implementation cp apache-tvm==0.27.0.post1 apache-tvm-ffi==0.1.14.post1 numpy
    .venv/bin/pip install --no-deps --no-index --only-binary=:all: --platform manylinux_2_28_aarch64 \\
        --python-version 3.11 --implementation cp --target build/arm64/site build/arm64/wheels/*.whl

Usage:
    python bench/arm_qemu.py [--model conv|resnet18] [--feeds 5] [--runs 10] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the tiny models built in code

# Runs inside the emulated aarch64 Python: load, run every feed, time the first feed.
RUNNER = r"""
import json, sys, time
started = time.perf_counter()
import numpy as np
import tvm
from tvm.runtime.vm import VirtualMachine
imported = time.perf_counter()
library, feeds_path, out_path, runs = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
feeds = np.load(feeds_path)
names = json.loads(str(feeds["__names__"]))
main = VirtualMachine(tvm.runtime.load_module(library), tvm.cpu())["main"]
loaded = time.perf_counter()
count = len(feeds[names[0]])
outputs = [main(*[tvm.runtime.tensor(feeds[n][i]) for n in names]) for i in range(count)]
outputs = [o.numpy() if hasattr(o, "numpy") else o[0].numpy() for o in outputs]
first = [tvm.runtime.tensor(feeds[n][0]) for n in names]
times = []
for _ in range(runs):
    t = time.perf_counter(); main(*first); times.append(time.perf_counter() - t)
np.save(out_path, np.stack(outputs))
print(json.dumps({"import_s": imported - started, "load_s": loaded - imported,
                  "machine": __import__("platform").machine(), "tvm": tvm.__version__,
                  "threads": int(tvm.get_global_func("runtime.NumThreads")()),
                  "run_ms": sorted(1000 * t for t in times)}))
"""


def model(name: str, folder: Path):
    if name == "conv":
        import models

        return models.conv_bn_relu(channels=16, size=32)
    sys.path.insert(0, str(ROOT / "bench"))
    import onnx
    from models import export_resnet18  # torch; ~45 MB of random weights

    return onnx.load(str(export_resnet18(folder / "resnet18.onnx")))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["conv", "resnet18"], default="conv")
    parser.add_argument("--feeds", type=int, default=5)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--arm", type=Path, default=ROOT / "build" / "arm64", help="holds sysroot/ and site/")
    args = parser.parse_args()
    sysroot, site = args.arm / "sysroot", args.arm / "site"
    python = sysroot / "usr" / "bin" / "python3.11"
    missing = [what for what, ok in [("qemu-aarch64 (apt-get install qemu-user)", shutil.which("qemu-aarch64")),
                                     (f"arm64 Python at {python}", python.exists()),
                                     (f"aarch64 TVM wheel in {site}", (site / "tvm").is_dir())] if not ok]
    if missing:
        print("missing: " + "; ".join(missing) + " (see the set-up at the top of bench/arm_qemu.py)")
        return 2

    from dlopt.passes import generic_passes
    from dlopt.pipeline import run_pipeline
    from dlopt.profiles import resolve_target
    from dlopt.targets import tvm as backend

    with tempfile.TemporaryDirectory(prefix="dlopt-qemu-") as tmp:
        work = Path(tmp)
        proto = model(args.model, work)
        if backend.available() is not True:  # also imports TVM, so the build time is the build's
            print(f"TVM backend unavailable: {backend.available()}")
            return 2
        # dlopt's generic passes first, as `dlopt compile` runs them (constant folding, BN folding, ...).
        optimised = run_pipeline(ir.serde.deserialize_model(proto), generic_passes() + backend.lowering_passes("fp32")).model
        started = time.perf_counter()
        artifact = backend.compile(optimised, resolve_target("rpi5"), work / "rpi5", precision="fp32",
                                   threads=args.threads)
        build_s = time.perf_counter() - started
        inputs = artifact.settings["inputs"]
        rng = np.random.default_rng(0)
        feeds = {i["name"]: rng.standard_normal((args.feeds, *i["shape"])).astype(i["dtype"]) for i in inputs}
        np.savez(work / "feeds.npz", __names__=json.dumps([i["name"] for i in inputs]), **feeds)

        options = ort.SessionOptions()
        options.intra_op_num_threads = args.threads
        session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
        reference = [session.run(None, {n: a[k] for n, a in feeds.items()})[0] for k in range(args.feeds)]

        (work / "runner.py").write_text(RUNNER)
        env = {**os.environ, "PYTHONPATH": str(site), "TVM_USE_RUNTIME_LIB": "1", "QEMU_LD_PREFIX": str(sysroot),
               "TVM_NUM_THREADS": str(args.threads)}
        command = ["qemu-aarch64", str(python), str(work / "runner.py"), str(artifact.entry_path),
                   str(work / "feeds.npz"), str(work / "outputs.npy"), str(args.runs)]
        started = time.perf_counter()
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        emulated_s = time.perf_counter() - started
        if done.returncode != 0:
            print(done.stderr[-3000:])
            print(f"FAILED: the aarch64 run exited with {done.returncode}")
            return 1
        figures = json.loads(done.stdout.strip().splitlines()[-1])
        outputs = np.load(work / "outputs.npy")
        errors = [float(np.max(np.abs(r - o)) / max(float(np.max(np.abs(r))), 1e-30))
                  for r, o in zip(reference, outputs, strict=True)]
        elf = artifact.entry_path.read_bytes()
        size, machine = len(elf), int.from_bytes(elf[18:20], "little")  # ELF e_machine: 183 is aarch64

    ok = max(errors) <= 1e-4
    runs = figures["run_ms"]
    print(f"model            {args.model} {[i['shape'] for i in inputs]}")
    print(f"library          model.so, {size} bytes, ELF e_machine {machine} ({'aarch64' if machine == 183 else '?'})")
    print(f"target           {artifact.settings['host']}")
    print(f"build here       {build_s:.2f} s (untuned)")
    print(f"emulated run     {figures['machine']}, TVM {figures['tvm']} runtime only, {figures['threads']} thread(s); "
          f"process {emulated_s:.1f} s (import {figures['import_s']:.1f} s, load {figures['load_s']:.2f} s)")
    print(f"latency (qemu)   p50 {runs[len(runs) // 2]:.2f} ms, min {runs[0]:.2f} ms over {len(runs)} runs "
          f"(emulated: not a Pi 5 figure)")
    print(f"max rel error    {max(errors):.2e} over {len(errors)} feeds vs ONNX Runtime on this host "
          f"-> {'OK' if ok else 'MISMATCH'} (limit 1e-4)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
