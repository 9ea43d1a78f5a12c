"""Fashion-MNIST from Debian's ``dataset-fashion-mnist`` package, read with numpy alone.

The four IDX files (gzip-compressed) are parsed by hand: a big-endian header with a
magic number (0x00000803 for images, 0x00000801 for labels) and the dimensions,
then unsigned bytes.  Images come back as float32 ``(n, 1, 28, 28)`` normalised with
the training set's mean and standard deviation; labels as int64.

Also here: a deterministic trainer for :class:`models.FashionCNN` and the ``.npz``
writer that ``dlopt compile --inputs/--calib`` reads.
"""

from __future__ import annotations

import gzip
import importlib.util
import os
import sys
import time
from pathlib import Path

import numpy as np

DEFAULT_ROOT = "/usr/share/datasets/fashion-mnist"
FILES = {
    "x_train": "train-images-idx3-ubyte.gz",
    "y_train": "train-labels-idx1-ubyte.gz",
    "x_test": "t10k-images-idx3-ubyte.gz",
    "y_test": "t10k-labels-idx1-ubyte.gz",
}
IMAGE_MAGIC, LABEL_MAGIC = 0x00000803, 0x00000801
# Pixel mean and standard deviation of the 60,000 training images, on the 0..1 scale.
MEAN, STD = 0.2860, 0.3530
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
           "Ankle boot")


def bench_module(name: str):
    """``bench/<name>.py`` imported as ``dlopt_bench_<name>``.

    bench/ is not a package, and tests/ has its own ``models`` module on sys.path:
    a unique module name keeps the two apart whoever imports first.
    """
    key = f"dlopt_bench_{name}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, Path(__file__).with_name(f"{name}.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[key] = module
        spec.loader.exec_module(module)
    return sys.modules[key]


class DatasetMissing(FileNotFoundError):
    """The Fashion-MNIST files are not where they were looked for."""


def _read_idx(path: Path, magic: int, ndim: int) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{path}: too short for an IDX header ({len(data)} bytes)")
    found = int.from_bytes(data[:4], "big")
    if found != magic:
        raise ValueError(f"{path}: IDX magic number {found:#010x}, expected {magic:#010x}")
    dims = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    if len(data) - header != int(np.prod(dims)):
        raise ValueError(f"{path}: header says {dims} ({int(np.prod(dims))} bytes) but "
                         f"{len(data) - header} bytes follow (truncated or corrupt file)")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def load_fashion_mnist(root: str | os.PathLike = DEFAULT_ROOT) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(x_train, y_train, x_test, y_test)``: float32 (n, 1, 28, 28) normalised images, int64 labels.

    Raises :class:`DatasetMissing` (a ``FileNotFoundError``) when a file is absent and
    ``ValueError`` when one is not a valid IDX file of the expected kind.
    """
    root = Path(root)
    missing = [name for name in FILES.values() if not (root / name).is_file()]
    if missing:
        raise DatasetMissing(f"Fashion-MNIST not found in {root} (missing {', '.join(missing)}); "
                             f"on Debian/Ubuntu: apt-get install dataset-fashion-mnist")
    out = {}
    for key, name in FILES.items():
        if key.startswith("x"):
            raw = _read_idx(root / name, IMAGE_MAGIC, 3)
            out[key] = ((raw.astype(np.float32) / 255.0 - MEAN) / STD)[:, None, :, :]
        else:
            out[key] = _read_idx(root / name, LABEL_MAGIC, 1).astype(np.int64)
    for split in ("train", "test"):
        if len(out[f"x_{split}"]) != len(out[f"y_{split}"]):
            raise ValueError(f"{root}: {split} images ({len(out[f'x_{split}'])}) and labels "
                             f"({len(out[f'y_{split}'])}) differ in number")
    return out["x_train"], out["y_train"], out["x_test"], out["y_test"]


def train_fashion_cnn(x: np.ndarray, y: np.ndarray, *, epochs: int = 1, batch_size: int = 64, seed: int = 0,
                      threads: int = 2, lr: float = 3e-3, log=None):
    """Train a fresh :class:`models.FashionCNN` on ``x``/``y``; returns it in eval mode.

    Deterministic for a given (data, seed, threads): weights and batch order come
    from ``seed`` through private generators, and torch's thread count is set for
    the call and restored after.  Adam with a one-cycle learning rate reaches
    88% test accuracy after one epoch on 30k images.
    """
    import torch

    FashionCNN = bench_module("models").FashionCNN  # noqa: N806 - a class

    threads_before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = FashionCNN()
        inputs, targets = torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(np.asarray(y, np.int64))
        order = torch.Generator().manual_seed(seed)
        steps = epochs * -(-len(inputs) // batch_size)
        optimiser = torch.optim.Adam(model.parameters(), lr=lr)
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=lr, total_steps=steps)
        loss_fn = torch.nn.CrossEntropyLoss()
        model.train()
        for epoch in range(epochs):
            start, total, seen = time.perf_counter(), 0.0, 0
            for batch in torch.randperm(len(inputs), generator=order).split(batch_size):
                optimiser.zero_grad(set_to_none=True)
                loss = loss_fn(model(inputs[batch]), targets[batch])
                loss.backward()
                optimiser.step()
                schedule.step()
                total += loss.item() * len(batch)
                seen += len(batch)
            if log is not None:
                log(f"epoch {epoch + 1}/{epochs}: mean loss {total / seen:.4f}, "
                    f"{time.perf_counter() - start:.1f} s on {threads} thread(s)")
        model.eval()
    finally:
        torch.set_num_threads(threads_before)
    return model


def torch_accuracy(model, x: np.ndarray, y: np.ndarray, batch_size: int = 1000) -> float:
    """Top-1 accuracy of ``model`` (eval mode) on ``x``/``y``, in torch."""
    import torch

    correct = 0
    with torch.no_grad():
        for start in range(0, len(x), batch_size):
            logits = model(torch.from_numpy(np.ascontiguousarray(x[start:start + batch_size])))
            correct += int((logits.argmax(1).numpy() == y[start:start + batch_size]).sum())
    return correct / len(x)


def write_npz(path: str | os.PathLike, input_name: str, x: np.ndarray, labels: np.ndarray | None = None) -> Path:
    """An uncompressed ``.npz`` with ``x`` under the model's input name (and int64 ``labels``)."""
    path = Path(path)
    arrays = {input_name: np.ascontiguousarray(x, dtype=np.float32)}
    if labels is not None:
        labels = np.asarray(labels, dtype=np.int64)
        if labels.shape != (len(x),):
            raise ValueError(f"labels must be 1-D with one entry per sample: got {labels.shape} for {len(x)} samples")
        arrays["labels"] = labels
    with path.open("wb") as f:  # a file object: np.savez would append .npz to a name without it
        np.savez(f, **arrays)
    return path
