"""Can the verdict be trusted?  Three checks the "Verdicts you can trust" issue asks for.

    python bench/verdicts.py [--repeats 3] [--runs 200]

1. The transformer case: a TransformerEncoder classifier (embedding 1000x64, 2 layers,
   4 heads, mean-pooled, 10 classes) taking int64 tokens ``[batch, seq]`` with dynamic
   axes, compiled with ``--eval`` (256 samples of 32 tokens).  The report must say it
   timed batch 1; the chosen artefact is then timed again here, independently of dlopt,
   against the original at that shape (interleaved blocks, same threads).
2. Stability: the same model and data compiled ``--repeats`` times in a row; each run's
   chosen key and reported ties are printed.
3. ``--precision fp32``: the shipped artefact's verdict against the original.

Prints figures; asserts nothing.  Everything runs in a temporary folder.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

DLOPT = str(Path(sys.executable).parent / "dlopt")
VOCAB, SEQ, CLASSES = 1000, 32, 10


def make_transformer(folder: Path) -> tuple[Path, Path]:
    import torch
    from torch import nn

    import dlopt

    class Classifier(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(VOCAB, 64)
            layer = nn.TransformerEncoderLayer(64, 4, dim_feedforward=128, batch_first=True, dropout=0.0)
            self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
            self.head = nn.Linear(64, CLASSES)

        def forward(self, tokens):
            return self.head(self.encoder(self.embed(tokens)).mean(1))

    torch.manual_seed(0)
    module = Classifier().eval()
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, VOCAB, size=(256, SEQ)).astype(np.int64)
    path = folder / "transformer.onnx"
    dlopt.export(module, (torch.from_numpy(tokens[:2]),), path, dynamic_axes={"tokens": {0: "batch", 1: "seq"}})
    with torch.no_grad():
        labels = module(torch.from_numpy(tokens)).argmax(1).numpy()
    flip = rng.random(len(labels)) < 0.1  # labels the model gets 90% right, so top-1 has room to move
    labels = np.where(flip, (labels + 1) % CLASSES, labels)
    data = folder / "eval.npz"
    np.savez(data, tokens=tokens, labels=labels)
    return path, data


def compile_json(model: Path, out: Path, *args: str) -> dict:
    result = subprocess.run([DLOPT, "compile", str(model), "-o", str(out), "--json", *args],
                            capture_output=True, text=True, cwd=out.parent)
    if result.returncode not in (0, 1):
        raise SystemExit(f"dlopt compile failed ({result.returncode}): {result.stderr.strip()}")
    return json.loads(result.stdout)


def time_independently(original: Path, out: Path, shape: tuple[int, ...], runs: int, threads: int) -> dict:
    """The original and the published artefact, loaded outside dlopt's compile, timed interleaved."""
    from dlopt.targets import load_artifact
    from dlopt.targets.ort import OrtSession, session_settings
    from dlopt.measure.timing import time_interleaved

    feed = {"tokens": np.random.default_rng(1).integers(0, VOCAB, size=shape).astype(np.int64)}
    orig = OrtSession(original, session_settings(threads))
    chosen = load_artifact(out)
    timings = time_interleaved({"original": orig.run, "chosen": chosen.run}, feed, runs=runs, warmup=20,
                               threads=threads, max_seconds=60)
    return timings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--runs", type=int, default=200)
    args = parser.parse_args()
    threads = len(os.sched_getaffinity(0))
    with tempfile.TemporaryDirectory(prefix="dlopt-verdicts-") as tmp:
        tmp = Path(tmp)
        model, data = make_transformer(tmp)
        print(f"model: TransformerEncoder classifier, tokens int64[batch, seq], eval {data.name}: 256 x {SEQ}; "
              f"{threads} threads, --runs {args.runs}\n")

        print("1. transformer, --eval, default timing shape")
        report = compile_json(model, tmp / "t1", "--eval", str(data), "--runs", str(args.runs), "--max-accuracy-drop",
                              "1")
        print(f"   report timed at: {report['timing']['shape']} ({report['timing']['runs']} interleaved runs, "
              f"noise cv {report['timing']['noise_cv']})")
        print(f"   {report['summary']}")
        shape = tuple(report["timing"]["shapes"]["tokens"])
        timings = time_independently(model, tmp / "t1", shape, args.runs, threads)
        o, c = timings["original"], timings["chosen"]
        print(f"   independent timing at {shape}: original p50 {o.p50_ms:.3f} ms [{o.ci_low_ms:.3f}-{o.ci_high_ms:.3f}], "
              f"chosen {report['chosen']} p50 {c.p50_ms:.3f} ms [{c.ci_low_ms:.3f}-{c.ci_high_ms:.3f}]: "
              f"chosen/original = {c.p50_ms / o.p50_ms:.3f}")

        print(f"\n2. stability: {args.repeats} consecutive compiles of the same model and data")
        for i in range(args.repeats):
            r = compile_json(model, tmp / f"s{i}", "--eval", str(data), "--runs", str(args.runs))
            print(f"   run {i + 1}: chosen {r['chosen']}; ties {r['verdict']['ties'] or 'none'}; "
                  f"faster than original: {r['verdict']['faster_than_original']}; noise cv {r['timing']['noise_cv']}")

        print("\n3. --precision fp32")
        r = compile_json(model, tmp / "fp32", "--eval", str(data), "--runs", str(args.runs), "--precision", "fp32")
        print(f"   {r['summary']}")
        print(f"   verdict: {r['verdict']['why']}")
        chosen = next(c for c in r["candidates"] if c["key" if "key" in c else "backend"] and c.get("artifact_dir") == ".")
        lat = chosen["measurement"]["latency"]
        base = r["baseline"]["latency"]
        print(f"   shipped {chosen['backend']}/{chosen['precision']}: p50 {lat['p50_ms']:.3f} ms "
              f"[{lat['ci_low_ms']:.3f}-{lat['ci_high_ms']:.3f}] vs original {base['p50_ms']:.3f} ms "
              f"[{base['ci_low_ms']:.3f}-{base['ci_high_ms']:.3f}]")


if __name__ == "__main__":
    main()
