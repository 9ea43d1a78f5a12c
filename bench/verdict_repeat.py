"""Does a verdict stay put?  Three small models compiled five times each; every run's chosen key and ties.

    python bench/verdict_repeat.py [--repeats 5] [--runs 200] [--precision fp32] [--threads 2]

Issue 28: two identical compiles of a Fashion-MNIST CNN shipped different artefacts,
because each candidate was timed through one session and a session's speed is
bimodal.  dlopt now times each through several sessions (dlopt.measure.timing.SESSIONS) and
its interval spans their medians.  The models:

1. the demo CNN (``dlopt demo``'s digits CNN, trained 2 epochs on scikit-learn's digits);
2. the Fashion-MNIST CNN (bench/models.py FashionCNN, 1 epoch on 10k images of Debian's
   dataset-fashion-mnist);
3. a TransformerEncoder classifier (bench/verdicts.py: int64 tokens [batch, seq]).

Each is compiled ``--repeats`` times with the same data and options (the build cache in
a temporary folder, shared by the repeats: only the timing and the choice are redone).
Prints the load average, each run's chosen key, ties and faster-than-original flag, and
per model whether every run said the same.  Asserts nothing.

    python bench/verdict_repeat.py --cost 3

instead compiles the demo CNN in this process 2x3 times, alternating one session per
candidate (``dlopt.measure.timing.SESSIONS = 1``, the timing before issue 28) with the default,
and prints each compile's wall time and its interleaved-timing stage: the price of
opening the sessions again.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from fashion import bench_module  # noqa: E402

DLOPT = str(Path(sys.executable).parent / "dlopt")


def demo_cnn(folder: Path) -> tuple[Path, Path]:
    import torch
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    import dlopt
    from dlopt.workflows.demo import TEST_FRACTION, _digits_cnn, _train

    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)[:, None, :, :]
    x_train, x_test, y_train, y_test = train_test_split(images, digits.target.astype(np.int64),
                                                        test_size=TEST_FRACTION, stratify=digits.target,
                                                        random_state=0)
    torch.manual_seed(0)
    model = _digits_cnn(torch)
    _train(torch, model, x_train, y_train, epochs=2, seed=0, progress=None)
    model.eval()
    path = dlopt.export(model, torch.from_numpy(x_test[:2]), folder / "digits_cnn.onnx", {"image": {0: "batch"}},
                        input_names=["image"], output_names=["logits"])
    data = folder / "digits_test.npz"
    np.savez(data, image=x_test, labels=y_test)
    return Path(path), data


def fashion_cnn(folder: Path) -> tuple[Path, Path]:
    import torch

    import dlopt

    fashion = bench_module("fashion")
    x_train, y_train, x_test, y_test = fashion.load_fashion_mnist()
    model = fashion.train_fashion_cnn(x_train[:10000], y_train[:10000], epochs=1, batch_size=64, seed=0, threads=2)
    path = dlopt.export(model, torch.from_numpy(x_test[:2]), folder / "fashion_cnn.onnx",
                        dynamic_axes={"input": {0: "batch"}}, input_names=["input"], output_names=["logits"])
    data = fashion.write_npz(folder / "fashion_eval.npz", "input", x_test[:1000], y_test[:1000])
    return Path(path), data


def transformer(folder: Path) -> tuple[Path, Path]:
    return bench_module("verdicts").make_transformer(folder)


MODELS = {"demo CNN": demo_cnn, "Fashion-MNIST CNN": fashion_cnn, "transformer classifier": transformer}


def compile_once(model: Path, data: Path, out: Path, args) -> tuple[dict, float]:
    start = time.perf_counter()
    done = subprocess.run([DLOPT, "compile", str(model), "-o", str(out), "--json", "--eval", str(data),
                           "--precision", args.precision, "--runs", str(args.runs), "--threads", str(args.threads)],
                          capture_output=True, text=True, cwd=out.parent)
    seconds = time.perf_counter() - start
    if done.returncode not in (0, 1):
        raise SystemExit(f"dlopt compile failed ({done.returncode}): {done.stderr.strip()}")
    return json.loads(done.stdout), seconds


def latency(report: dict, key: str) -> str:
    if key == "original":
        lat = report["baseline"]["latency"]
    else:
        lat = next((c["measurement"]["latency"] for c in report["candidates"]
                    if f"{c['backend']}/{c['precision']}" == key and c.get("measurement")), None)
    if not lat:
        return f"{key} -"
    return f"{key} {lat['p50_ms']:.3f} [{lat['ci_low_ms']:.3f}-{lat['ci_high_ms']:.3f}] x{lat.get('sessions', 1)}"


def cost(pairs: int, args) -> None:
    import dlopt
    import dlopt.measure.timing

    default = dlopt.measure.timing.SESSIONS
    with tempfile.TemporaryDirectory(prefix="dlopt-verdict-cost-") as tmp:
        tmp = Path(tmp)
        os.environ["DLOPT_CACHE"] = str(tmp / "cache")
        model, data = demo_cnn(tmp)
        walls: dict[int, list[float]] = {1: [], default: []}
        stages: dict[int, list[float]] = {1: [], default: []}
        for i in range(2 * pairs + 1):  # the first compile fills the build cache and is not counted
            sessions = (1, default)[i % 2]
            dlopt.measure.timing.SESSIONS = sessions
            seen: list[float] = []

            def progress(stage, done, total):
                if stage.startswith("timing"):
                    seen.append(time.perf_counter())

            start = time.perf_counter()
            report = dlopt.compile(str(model), target="cpu", out=tmp / f"out{i}", inputs=str(data),
                                   precision=args.precision, runs=args.runs, threads=args.threads, progress=progress)
            wall = time.perf_counter() - start
            timed = seen[-1] - seen[0] if len(seen) > 1 else float("nan")
            print(f"  compile {i}: sessions {sessions}: {wall:.2f} s, interleaved timing {timed:.2f} s; chosen "
                  f"{report.chosen}; load {os.getloadavg()[0]:.2f}" + ("  (fills the cache; not counted)" if i == 0
                                                                        else ""))
            if i:
                walls[sessions].append(wall)
                stages[sessions].append(timed)
        dlopt.measure.timing.SESSIONS = default
    for sessions in walls:
        print(f"sessions {sessions}: compile median {np.median(walls[sessions]):.2f} s, interleaved timing median "
              f"{np.median(stages[sessions]):.2f} s over {len(walls[sessions])} compiles")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated subset of: " + ", ".join(MODELS))
    parser.add_argument("--cost", type=int, default=0, metavar="PAIRS",
                        help="measure the compile time with 1 and with the default sessions instead")
    args = parser.parse_args()
    if args.cost:
        print(f"demo CNN, --precision {args.precision} --runs {args.runs} --threads {args.threads}; load average "
              f"{os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")
        cost(args.cost, args)
        return
    print(f"--precision {args.precision} --runs {args.runs} --threads {args.threads}, {args.repeats} compiles each; "
          f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")
    with tempfile.TemporaryDirectory(prefix="dlopt-verdict-repeat-") as tmp:
        tmp = Path(tmp)
        os.environ["DLOPT_CACHE"] = str(tmp / "cache")
        steady = {}
        for label in args.models.split(","):
            folder = tmp / label.replace(" ", "-")
            folder.mkdir()
            model, data = MODELS[label](folder)
            print(f"\n{label} ({model.name}, eval {data.name})")
            verdicts = []
            for i in range(args.repeats):
                report, seconds = compile_once(model, data, folder / f"out{i}", args)
                verdict = report["verdict"]
                ties = tuple(sorted(verdict.get("ties") or ()))
                verdicts.append((report["chosen"], ties))
                timed = [latency(report, "original")] + [latency(report, f"{c['backend']}/{c['precision']}")
                                                         for c in report["candidates"]
                                                         if (c.get("measurement") or {}).get("latency")]
                print(f"  run {i + 1}: chosen {report['chosen']}; ties {', '.join(ties) or 'none'}; faster than "
                      f"original: {verdict.get('faster_than_original')}; {seconds:.1f} s; load "
                      f"{os.getloadavg()[0]:.2f}\n         " + "; ".join(timed))
            steady[label] = len(set(verdicts)) == 1
            print(f"  same key and ties every time: {'yes' if steady[label] else 'NO'}")
    print("\nsummary: " + "; ".join(f"{k}: {'same' if v else 'DIFFERENT'}" for k, v in steady.items()))


if __name__ == "__main__":
    main()
