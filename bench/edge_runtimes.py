"""ExecuTorch (XNNPACK) fp32/int8 beside ONNX Runtime and OpenVINO fp32/int8, and dlopt's pick (issue 27).

Two Fashion-MNIST classifiers, trained here briefly on two threads:

(a) a ResNet-18-shaped CNN: BasicBlocks [2, 2, 2, 2], widths 64-128-256-512, its stem adapted to
    1x28x28 (3x3 conv, stride 1, no max-pool): 11.2M parameters, ~0.45G multiply-adds per image;
(b) a transformer encoder: 7x7 patches -> 16 tokens of 128, 4 pre-norm blocks of 4-head softmax
    attention written with plain Linear layers (as tests/test_executorch.py's TinyTransformer), mean
    pool, linear head.

Each goes through ONE ``dlopt.compile(module, example=x[:1], ...)`` for this host with the backends
ort, openvino and executorch at fp32 and int8 (ORT/OpenVINO int8 calibrated by dlopt on the ONNX
export; ExecuTorch int8 is PT2E with XNNPACK's quantizer on the module, calibrated on the same
training images, none of which were trained on).  The compile's measure stage times every
candidate within the budget and the original (ONNX Runtime fp32) interleaved at batch 1, on the
threads asked for; the table prints its p50, the 95% interval of the median, p90 and speed-up.

Top-1 is counted twice for each candidate: by dlopt's scorer (the report) and here, from the
candidate's own outputs on the same held-out test images.  A host compile keeps only the chosen
artefact in its output, so the bench points ``$DLOPT_CACHE`` at an empty folder of its own: every
artefact the compile built lands there (content-addressed, sha256-checked), byte for byte what was
verified and timed, and is opened from there with its backend's own loader.

Prints figures; asserts nothing.  Needs torch, executorch, onnxruntime, openvino and Debian's
dataset-fashion-mnist.

    python bench/edge_runtimes.py [--cnn-train-images 3000] [--transformer-train-images 20000]
                                  [--eval-images 500] [--calib-images 128] [--runs 100] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fashion import load_fashion_mnist, torch_accuracy, write_npz  # noqa: E402

BACKENDS = ("ort", "openvino", "executorch")
TARGET = f"""[targets.edge-bench]
base = "cpu"
backends = [{", ".join(f'"{b}"' for b in BACKENDS)}]
precisions = ["fp32", "int8"]
"""


# -- the models ------------------------------------------------------------------------------------

class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                     if stride != 1 or cin != cout else nn.Identity())

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + self.down(x))


class ResNet18Fashion(nn.Module):
    """ResNet-18's body ([2, 2, 2, 2] BasicBlocks, 64-128-256-512) with a 28x28 stem: 28 -> 14 -> 7 -> 4."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU())
        layers, cin = [], 64
        for i, cout in enumerate((64, 128, 256, 512)):
            stride = 1 if i == 0 else 2
            layers.append(nn.Sequential(BasicBlock(cin, cout, stride), BasicBlock(cout, cout)))
            cin = cout
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(512, num_classes)

    def forward(self, image):
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(self.layers(self.stem(image)), 1), 1))


class EncoderBlock(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, tokens):
        b, t, d = tokens.shape
        h = self.heads
        q, k, v = self.qkv(self.norm1(tokens)).reshape(b, t, 3, h, d // h).permute(2, 0, 3, 1, 4)
        attention = torch.softmax(q @ k.transpose(-1, -2) / (d // h) ** 0.5, dim=-1)
        tokens = tokens + self.proj((attention @ v).transpose(1, 2).reshape(b, t, d))
        return tokens + self.mlp(self.norm2(tokens))


class PatchEncoder(nn.Module):
    """16 patches of 7x7 pixels embedded to ``dim``, learned positions, ``depth`` encoder blocks, mean pool."""

    def __init__(self, dim: int = 128, depth: int = 4, heads: int = 4, num_classes: int = 10) -> None:
        super().__init__()
        self.embed = nn.Linear(49, dim)
        self.position = nn.Parameter(torch.randn(1, 16, dim) * 0.02)
        self.blocks = nn.Sequential(*(EncoderBlock(dim, heads) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, image):
        b = image.shape[0]
        patches = image.reshape(b, 4, 7, 4, 7).permute(0, 1, 3, 2, 4).reshape(b, 16, 49)
        tokens = self.blocks(self.embed(patches) + self.position)
        return self.head(self.norm(tokens).mean(dim=1))


def train(module: nn.Module, x: np.ndarray, y: np.ndarray, *, lr: float, batch_size: int = 64, seed: int = 0):
    """One epoch of AdamW with a one-cycle schedule; returns (module in eval mode, seconds)."""
    torch.manual_seed(seed)
    xs, ys = torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(y)
    order = torch.randperm(len(xs), generator=torch.Generator().manual_seed(seed)).split(batch_size)
    optimiser = torch.optim.AdamW(module.parameters(), lr=lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=lr, total_steps=len(order))
    start = time.perf_counter()
    module.train()
    for batch in order:
        optimiser.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(module(xs[batch]), ys[batch]).backward()
        optimiser.step()
        schedule.step()
    return module.eval(), time.perf_counter() - start


# -- the artefacts the compile built, from its own cache -----------------------------------------------

def built_artifacts(cache: Path) -> dict[str, "object"]:
    """{backend/precision: Artifact} of every entry in a cache folder that one compile filled."""
    from dlopt.targets.base import Artifact

    found = {}
    for index in sorted(cache.glob("*/*/entry.json")):
        meta = json.loads(index.read_text())["meta"]
        found[f"{meta['backend']}/{meta['precision']}"] = Artifact(folder=index.parent, **meta)
    return found


def top1_of(artifact, x: np.ndarray, y: np.ndarray, input_name: str) -> float:
    """Top-1 of the artefact's own outputs, one image at a time (batch 1, as it was built and timed, with
    the threads it was built with)."""
    from dlopt.targets import get_backend

    session = get_backend(artifact.backend).load(artifact)
    hits = sum(int(np.argmax(session.run({input_name: x[i:i + 1]})[0]) == y[i]) for i in range(len(x)))
    return hits / len(x)


# -- one model -----------------------------------------------------------------------------------------

def bench_model(title: str, module: nn.Module, data: dict, work: Path, args) -> list[str]:
    import dlopt

    x_eval, y_eval = data["x_eval"], data["y_eval"]
    torch_top1 = torch_accuracy(module, x_eval, y_eval, 100)
    print(f"  torch top-1 on the {len(x_eval)} evaluation images: {torch_top1:.4f}")
    folder = work / title
    folder.mkdir()
    (folder / "targets.toml").write_text(TARGET)
    inputs = write_npz(folder / "eval.npz", "image", x_eval, y_eval)
    calib = write_npz(folder / "calib.npz", "image", data["x_calib"])
    cache = folder / "cache"
    os.environ["DLOPT_CACHE"] = str(cache)  # an empty cache: every artefact built lands there, and only those
    start = time.perf_counter()
    report = dlopt.compile(module, example=torch.from_numpy(np.ascontiguousarray(x_eval[:1])), target="edge-bench",
                           targets_file=folder / "targets.toml", out=folder / "out", inputs=inputs, calib=calib,
                           calib_samples=len(data["x_calib"]), threads=args.threads, runs=args.runs,
                           warmup=args.warmup, timing_budget_s=args.timing_budget, max_accuracy_drop=args.max_drop,
                           search_time=0, progress=False)
    print(f"  dlopt.compile took {time.perf_counter() - start:.0f} s; evaluation on {report.evaluation['samples']} "
          f"labelled test images, calibration on {report.calibration['samples'] if report.calibration else '?'} "
          f"training images not trained on")
    built = built_artifacts(cache)
    timing = report.timing or {}
    base = report.baseline
    rows = [f"| {title} | the torch module (eager) | not timed | - | - | - | {_pct(torch_top1)} | |",
            f"| {title} | original (ORT fp32 of the ONNX export) | timed | {_latency(base.latency)} | 1.00x | "
            f"{_pct(base.accuracy)} | - | |"]
    notes = []
    for c in report.candidates:
        m = c.measurement
        speed = report.speedup(c)
        interval = (m.latency or {}).get("speedup_ci") if m else None
        speed_text = f"{speed:.2f}x" + (f" ({interval[0]:.2f}-{interval[1]:.2f})" if interval else "") if speed else "-"
        mine = None
        if c.key in built and c.status in ("ok", "rejected"):
            mine = top1_of(built[c.key], x_eval, y_eval, "image")
        status = "**chosen**" if c.chosen else c.status
        rows.append(f"| {title} | {c.key} | {status} | {_latency(m.latency if m else None)} | {speed_text} | "
                    f"{_pct(m.accuracy if m else None)} | {_pct(mine)} | {_drop(c)} |")
        if c.reason and not c.chosen:
            notes.append(f"{c.key}: {c.reason}")
        elif c.chosen:
            notes.insert(0, f"dlopt's pick: {c.key} ({c.reason})" if c.reason else f"dlopt's pick: {c.key}")
    print(f"  timed: {timing.get('shape')}, {timing.get('threads')} threads, {timing.get('runs')} interleaved runs "
          f"(warm-up {timing.get('warmup')}), round-to-round noise cv {timing.get('noise_cv')}"
          + (f"; {timing['cut']}" if timing.get("cut") else ""))
    for note in notes:
        print(f"  - {note}")
    for note in report.notes:
        print(f"  note: {note}")
    print(f"  summary: {report.summary}")
    return rows


def _latency(latency: dict | None) -> str:
    if not latency:
        return "not timed"
    return (f"{latency['p50_ms']:.3f} ({latency['ci_low_ms']:.3f}-{latency['ci_high_ms']:.3f}), "
            f"p90 {latency['p90_ms']:.3f}")


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.2f}"


def _drop(c) -> str:
    return "-" if c.score is None else f"{c.score.drop_pp:+.2f}"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cnn-train-images", type=int, default=3000,
                        help="training images for the ResNet-18-class CNN, one epoch [3000]")
    parser.add_argument("--transformer-train-images", type=int, default=20000,
                        help="training images for the transformer encoder, one epoch [20000]")
    parser.add_argument("--eval-images", type=int, default=500, help="held-out test images, labelled [500]")
    parser.add_argument("--calib-images", type=int, default=128,
                        help="calibration images: the last ones of the 60,000 training images, never trained on [128]")
    parser.add_argument("--runs", type=int, default=100, help="interleaved timed runs per candidate [100]")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--timing-budget", type=float, default=60.0,
                        help="seconds the interleaved timing of one model may take [60]")
    parser.add_argument("--threads", type=int, default=2, help="inference and training threads [2]")
    parser.add_argument("--max-drop", type=float, default=1.0, help="accuracy budget, top-1 points [1.0]")
    parser.add_argument("--only", choices=("cnn", "transformer"), help="bench one model")
    args = parser.parse_args()

    import logging
    from importlib import metadata

    logging.getLogger().setLevel(logging.ERROR)  # ORT's quantiser warns per tensor through the root logger
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    start = time.perf_counter()
    versions = ", ".join(f"{p} {metadata.version(p)}" for p in ("torch", "executorch", "onnxruntime", "openvino"))
    print(f"CPU: {_cpu_model()} ({os.cpu_count()} cores seen); {versions}")
    print(f"load average before: {' '.join(f'{v:.2f}' for v in load_before)}")

    x_train, y_train, x_test, y_test = load_fashion_mnist()
    n_calib = args.calib_images
    data = {"x_eval": x_test[:args.eval_images], "y_eval": y_test[:args.eval_images],
            "x_calib": x_train[len(x_train) - n_calib:]}  # the training set's tail: never trained on
    models = []
    if args.only in (None, "cnn"):
        models.append(("resnet18-class", ResNet18Fashion, args.cnn_train_images, 2e-3))
    if args.only in (None, "transformer"):
        models.append(("transformer", PatchEncoder, args.transformer_train_images, 2e-3))
    rows = []
    with tempfile.TemporaryDirectory(prefix="dlopt-edge-bench-") as tmp:
        for title, cls, n_train, lr in models:
            torch.manual_seed(0)
            module = cls()
            params = sum(p.numel() for p in module.parameters())
            module, seconds = train(module, x_train[:n_train], y_train[:n_train], lr=lr)
            print(f"\n== {title}: {type(module).__name__}, {params / 1e6:.2f}M parameters, 1x1x28x28 ==")
            print(f"  trained 1 epoch on {n_train} Fashion-MNIST training images in {seconds:.0f} s "
                  f"({args.threads} threads)")
            rows += bench_model(title, module, data, Path(tmp), args)
    load_after = os.getloadavg()
    print(f"\nload average after: {' '.join(f'{v:.2f}' for v in load_after)}; "
          f"total {time.perf_counter() - start:.0f} s")
    print(f"\nBatch 1, {args.threads} threads, ORT/OpenVINO/ExecuTorch timed interleaved by dlopt's measure stage "
          f"(p50 ms with the 95% interval of the median); top-1 on {args.eval_images} Fashion-MNIST test images, "
          f"by dlopt's scorer and recounted here from each artefact's own outputs; drop = points below the "
          f"original by dlopt's scorer (budget {args.max_drop} pp)\n")
    print("| model | candidate | status | p50 ms (95% CI), p90 | speed-up vs original (95% CI) | top-1 % (dlopt) "
          "| top-1 % (recount) | drop pp |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(row)


if __name__ == "__main__":
    main()
