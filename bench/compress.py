"""Prune 50% of a residual CNN's channels, distil it, compile it: the figures of ``dlopt.compress``.

Trains :class:`models.FashionResNet` (the teacher) on Fashion-MNIST's 60,000 training
images (Debian's ``dataset-fashion-mnist``; cached under ``--work``), then runs
``dlopt.compress``: structured pruning with torch-pruning, knowledge distillation from
the teacher, export, compile for ``--target``.  Prints the side-by-side table (parameters,
multiply-adds, ONNX size, latency at batch 1 measured interleaved, top-1 on the 10,000
test images) that ``compress.md`` holds.

    .venv/bin/python bench/compress.py --work /tmp/dlopt-bench-w14 --epochs 4 --distill-epochs 4
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fashion import bench_module, load_fashion_mnist, torch_accuracy  # noqa: E402


def train(model, x, y, *, epochs: int, batch_size: int = 128, lr: float = 3e-3, seed: int = 0, log=print):
    """Adam with a one-cycle schedule and random horizontal flips; returns the model in eval mode."""
    import torch

    inputs, targets = torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(y)
    order = torch.Generator().manual_seed(seed)
    steps = epochs * -(-len(inputs) // batch_size)
    optimiser = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=lr, total_steps=steps)
    loss_fn = torch.nn.CrossEntropyLoss()
    model.train()
    for epoch in range(epochs):
        start, total, seen = time.perf_counter(), 0.0, 0
        for batch in torch.randperm(len(inputs), generator=order).split(batch_size):
            images = inputs[batch]
            flip = torch.rand(len(batch), generator=order) < 0.5
            images = torch.where(flip[:, None, None, None], images.flip(-1), images)
            optimiser.zero_grad(set_to_none=True)
            loss = loss_fn(model(images), targets[batch])
            loss.backward()
            optimiser.step()
            schedule.step()
            total += loss.item() * len(batch)
            seen += len(batch)
        log(f"teacher epoch {epoch + 1}/{epochs}: mean loss {total / seen:.4f}, {time.perf_counter() - start:.0f} s")
    return model.eval()


def teacher(work: Path, x, y, *, width: int, epochs: int, log=print):
    """The trained teacher, from ``work/teacher-w{width}-e{epochs}.pt`` when it is there."""
    import torch

    models = bench_module("models")
    torch.manual_seed(0)
    model = models.FashionResNet(width=width)
    cached = work / f"teacher-w{width}-e{epochs}.pt"
    if cached.exists():
        model.load_state_dict(torch.load(cached, weights_only=True))
        log(f"teacher: loaded {cached}")
        return model.eval()
    start = time.perf_counter()
    train(model, x, y, epochs=epochs, log=log)
    log(f"teacher trained in {time.perf_counter() - start:.0f} s")
    partial = cached.with_suffix(".tmp")
    torch.save(model.state_dict(), partial)
    partial.replace(cached)
    return model


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/dlopt-bench-w14"))
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=4, help="teacher training epochs")
    parser.add_argument("--distill-epochs", type=int, default=4)
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--target", default="cpu")
    parser.add_argument("--runs", type=int, default=300, help="interleaved timed runs per model")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--teacher-only", action="store_true")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    x_train, y_train, x_test, y_test = load_fashion_mnist()
    model = teacher(args.work, x_train, y_train, width=args.width, epochs=args.epochs)
    print(f"teacher top-1 on the 10,000 test images: {100 * torch_accuracy(model, x_test, y_test):.2f}%")
    if args.teacher_only:
        return 0

    import dlopt

    train_set = torch.utils.data.TensorDataset(torch.from_numpy(x_train), torch.from_numpy(y_train))
    loader = torch.utils.data.DataLoader(train_set, batch_size=128, shuffle=True,
                                         generator=torch.Generator().manual_seed(1))
    start = time.perf_counter()
    result = dlopt.compress(
        model, torch.from_numpy(x_test[:1]), loader, eval=(x_test, y_test), ratio=args.ratio, target=args.target,
        epochs=args.distill_epochs, out=args.work / f"compressed-{args.target}", runs=args.runs,
        threads=args.threads, progress=True,
    )
    print(f"\ndlopt.compress took {time.perf_counter() - start:.0f} s "
          f"({args.threads} threads, batch 1, {args.runs} interleaved runs per model)\n")
    print(result.table())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
