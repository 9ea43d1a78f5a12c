"""Does the rpi5 TVM artefact really run?  Build it here, run it on an emulated aarch64, compare.

Builds the ``rpi5`` library (Cortex-A76, NEON) with dlopt's TVM backend, runs it
under qemu-aarch64 emulating a Cortex-A76 with Debian's arm64 Python and PyPI's
aarch64 TVM runtime (``dlopt.device.emulation``), and compares its outputs with ONNX
Runtime on this host.  Prints the errors and timings; exits 1 on a mismatch, 2 when
something it needs is missing.  Emulated timings say nothing about a real Pi 5; they
only show it ran.

Nothing is installed by this script: ``make arm64-env`` builds the emulated
environment into .venv/arm64 (or set DLOPT_ARM64_ENV to one built elsewhere), and
``make system-deps`` installs the aarch64 cross compiler the build links with.

Usage:
    python bench/arm_qemu.py [--model conv|resnet18] [--feeds 5] [--runs 10] [--threads 1] [--timeout 600]
"""

from __future__ import annotations

import argparse
import json
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
    parser.add_argument("--timeout", type=float, default=600, help="seconds the emulated run may take")
    args = parser.parse_args()

    from dlopt.device.emulation import aarch64_python, qemu_cpu_models, run_emulated
    from dlopt.core.errors import TargetUnavailable

    emulated = aarch64_python()
    if isinstance(emulated, str):
        print(emulated)
        return 2

    from dlopt.passes import generic_passes
    from dlopt.core.pipeline import run_pipeline
    from dlopt.core.profiles import resolve_target
    from dlopt.targets.tvm import backend

    with tempfile.TemporaryDirectory(prefix="dlopt-qemu-") as tmp:
        work = Path(tmp)
        proto = model(args.model, work)
        if backend.BACKEND.available() is not True:  # also imports TVM, so the build time is the build's
            print(f"TVM backend unavailable: {backend.BACKEND.available()}")
            return 2
        # dlopt's generic passes first, as `dlopt compile` runs them (constant folding, BN folding, ...).
        passes = generic_passes() + backend.BACKEND.lowering_passes("fp32")
        optimised = run_pipeline(ir.serde.deserialize_model(proto), passes).model
        profile = resolve_target("rpi5")
        started = time.perf_counter()
        artifact = backend.BACKEND.compile(optimised, profile, work / "rpi5", precision="fp32",
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
        cpu = profile.mcpu if profile.mcpu in qemu_cpu_models() else None  # else qemu's "max"
        started = time.perf_counter()
        try:
            done = run_emulated(work / "runner.py", [artifact.entry_path, "feeds.npz", "outputs.npy", args.runs],
                                cwd=work, timeout=args.timeout, threads=args.threads, cpu=cpu)
        except TargetUnavailable as exc:  # it ran out of time
            print(exc)
            return 2
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
    print(f"emulated run     {figures['machine']} ({cpu or 'max'}), TVM {figures['tvm']} runtime only, "
          f"{figures['threads']} thread(s); "
          f"process {emulated_s:.1f} s (import {figures['import_s']:.1f} s, load {figures['load_s']:.2f} s)")
    print(f"latency (qemu)   p50 {runs[len(runs) // 2]:.2f} ms, min {runs[0]:.2f} ms over {len(runs)} runs "
          f"(emulated: not a Pi 5 figure)")
    print(f"max rel error    {max(errors):.2e} over {len(errors)} feeds vs ONNX Runtime on this host "
          f"-> {'OK' if ok else 'MISMATCH'} (limit 1e-4)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
