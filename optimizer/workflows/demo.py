"""``dlopt demo``: train a small CNN on scikit-learn's digits, export it, compile it for cpu.

Everything is offline and seeded: the digits ship inside scikit-learn, the split
and the training are fixed by ``seed``.  The whole run takes about a minute on two
cores (27-76 s measured on 2-core machines, quiet to shared): importing torch,
training (14-34 s of it), the export, and a full ``cpu`` compile that builds,
verifies and times nine candidates.  The network has Conv + BatchNormalization
blocks on purpose, so the report shows ``FoldBatchNormPass`` at work on a model
that still scores like the original on held-out labelled data.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Callable

import numpy as np

from dlopt.core.errors import TargetUnavailable, first_line
from dlopt.core.optional import torch_threads

logger = logging.getLogger(__name__)

MODEL_FILE = "digits_cnn.onnx"
CALIB_FILE = "digits_calib.npz"
DATA_FILE = "digits_test.npz"
TEST_FRACTION = 0.25
BATCH_SIZE = 64
# The digits CNN trains on one torch thread: its tensors are too small to split, and a second thread only
# spins. 12 epochs on 1,400 digits took 2.2 s (2.2 CPU-s) on one thread and 15 s (15 CPU-s) on two, on a
# 2-core machine with other work running (load 3).
TRAIN_THREADS = 1


def run_demo(
    out: str | os.PathLike,
    *,
    progress: Callable[[str, int, int], None] | None = None,
    seed: int = 0,
    epochs: int = 12,
) -> tuple[Any, dict[str, Any]]:
    """Train, export to ``out/digits_cnn.onnx``, write ``out/digits_test.npz``, compile to ``out/cpu``.

    Returns ``(report, accuracy)`` where ``accuracy`` has ``original`` and
    ``optimised`` (top-1 on the held-out digits, measured by ``dlopt.compile`` on
    ONNX Runtime), ``torch_accuracy`` (the same data through the torch model) and
    ``test_samples``.  Raises :class:`TargetUnavailable` without torch or
    scikit-learn, and whatever :func:`dlopt.compile` raises.
    """
    try:
        import torch
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as exc:
        missing = exc.name or first_line(exc)
        raise TargetUnavailable(f"the demo needs torch and scikit-learn ({missing} is missing); "
                                f"install dlopt[demo]") from exc
    import dlopt

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    digits = load_digits()
    # Pixels are 0..16; scale to [0, 1] and add the channel axis the CNN expects.
    images = (digits.images / 16.0).astype(np.float32)[:, None, :, :]
    labels = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        images, labels, test_size=TEST_FRACTION, stratify=labels, random_state=seed)

    with torch_threads(TRAIN_THREADS):
        torch.manual_seed(seed)
        model = _digits_cnn(torch)
        _train(torch, model, x_train, y_train, epochs=epochs, seed=seed, progress=progress)
        model.eval()
        with torch.no_grad():
            predicted = model(torch.from_numpy(x_test)).argmax(dim=1).numpy()
        torch_accuracy = float((predicted == y_test).mean())
        logger.info("torch model: %.4f top-1 on %d held-out digits", torch_accuracy, len(y_test))
        onnx_path = dlopt.export(model, torch.from_numpy(x_test[:2]), out / MODEL_FILE,
                           {"image": {0: "batch"}}, input_names=["image"], output_names=["logits"])

    npz_path = out / DATA_FILE
    name = _input_name(onnx_path)
    np.savez(npz_path, **{name: x_test, "labels": y_test})
    # INT8 is calibrated on training images, never on the held-out ones it is scored on.
    calib_path = out / CALIB_FILE
    np.savez(calib_path, **{name: x_train})
    # with the module it was exported from: ExecuTorch builds from it (torch.export), at batch 1 as timed
    report = dlopt.compile(onnx_path, target="cpu", out=out / "cpu", inputs=npz_path, calib=calib_path,
                           progress=progress, torch_module=model, example=torch.from_numpy(x_test[:1]))
    chosen = report.chosen_candidate()
    return report, {
        "original": report.baseline.accuracy,
        "optimised": chosen.measurement.accuracy if chosen and chosen.measurement else None,
        "test_samples": int(len(y_test)),
        "torch_accuracy": torch_accuracy,
    }


def _digits_cnn(torch):
    """Two Conv-BatchNorm-ReLU blocks, pooling to 4x4, then one Linear: about 10k weights."""
    nn = torch.nn
    return nn.Sequential(
        nn.Conv2d(1, 16, kernel_size=3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, kernel_size=3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 4 * 4, 10),
    )


def _train(torch, model, x: np.ndarray, y: np.ndarray, *, epochs: int, seed: int, progress) -> None:
    inputs, targets = torch.from_numpy(x), torch.from_numpy(y)
    # A private generator keeps the batch order fixed by ``seed`` whatever else draws random numbers.
    order = torch.Generator().manual_seed(seed)
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    loss_fn = torch.nn.CrossEntropyLoss()
    model.train()
    for epoch in range(epochs):
        for batch in torch.randperm(len(inputs), generator=order).split(BATCH_SIZE):
            optimiser.zero_grad()
            loss = loss_fn(model(inputs[batch]), targets[batch])
            loss.backward()
            optimiser.step()
        logger.debug("epoch %d: last batch loss %.4f", epoch + 1, loss.item())
        if progress is not None:
            progress("training", epoch + 1, epochs)


def _input_name(onnx_path: Path) -> str:
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    initializers = {t.name for t in graph.initializer}
    return next(i.name for i in graph.input if i.name not in initializers)
