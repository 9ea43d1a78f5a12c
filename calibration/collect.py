"""Activation statistics streamed one batch at a time through ONNX Runtime's calibrators.

ORT's calibrators keep the outputs of every batch a ``collect_data`` call reads until
that call ends: for the histogram methods (entropy, percentile) those outputs are every
float tensor of the model, so a call over eight batches held eight batches of all
activations (657 MiB for a 64 MiB-per-batch model, against 108 MiB one at a time).
Here each call reads exactly one batch: ORT then merges it into its running ranges or
histograms and drops it, so memory holds one batch of activations whatever the sample
count.  The calibrator's session runs in ORT's priority-based order: in its default
order the ReduceMin/ReduceMax nodes min-max calibration adds ran after the whole
network, so every activation stayed alive until the end (+121 MiB against +10 MiB for
the model above).  Kept apart from ``dataset.py`` because it imports onnxruntime.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable, Sequence

from dlopt.core.errors import CompileError, DataError, first_line

METHODS = ("minmax", "entropy", "percentile")


class _OneBatch:
    """ORT's reader protocol over a single feed: the feed, then None."""

    def __init__(self, feed: dict) -> None:
        self._feed: dict | None = feed

    def get_next(self) -> dict | None:
        feed, self._feed = self._feed, None
        return feed


def _method(name: str):
    from onnxruntime.quantization import CalibrationMethod

    if name not in METHODS:
        raise DataError(f"unknown calibration method {name!r}; choose from {', '.join(METHODS)}")
    return {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
            "percentile": CalibrationMethod.Percentile}[name]


def _session(path: str, providers: list[str]):
    """ORT's calibration session (no graph optimisation, so every tensor keeps its name), in
    priority-based order, which runs each added reduction as soon as its tensor exists."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.execution_order = ort.ExecutionOrder.PRIORITY_BASED
    options.log_severity_level = 3
    return ort.InferenceSession(path, options, providers=providers)


def collect_ranges(
    model_path: Path,
    batches: Iterable[dict],
    *,
    method: str = "minmax",
    op_types: Sequence[str] | None = None,
    workdir: Path,
    external_data: bool = False,
    on_batch: Callable[[dict], None] | None = None,
):
    """Calibrate the model saved at ``model_path`` on ``batches``; returns ORT's ``TensorsData``.

    Guarantees: ``batches`` is read once, one feed at a time, and no feed or its
    activations outlive the next one; ``on_batch`` sees each feed before it runs.
    The augmented model ORT writes goes to ``workdir``.  Errors: DataError for an
    unknown method or no batches; CompileError when ORT cannot prepare or run the
    calibration, or (histogram methods) finds no tensor of ``op_types`` to calibrate.
    """
    from onnxruntime.quantization.calibrate import create_calibrator

    from dlopt.passes._ort_quant import quiet

    calibrate_method = _method(method)
    try:
        with quiet():
            calibrator = create_calibrator(
                Path(model_path), list(op_types) if op_types else None,
                augmented_model_path=str(Path(workdir) / "augmented.onnx"),
                calibrate_method=calibrate_method, use_external_data_format=external_data,
                extra_options={"symmetric": False},
            )
    except Exception as exc:
        raise CompileError(f"cannot prepare calibration: {first_line(exc)}") from exc
    calibrator.infer_session = _session(calibrator.augmented_model_path, calibrator.execution_providers)
    seen = 0
    for feed in batches:
        if on_batch is not None:
            on_batch(feed)
        try:
            with quiet():
                calibrator.collect_data(_OneBatch(feed))
        except DataError:
            raise
        except Exception as exc:
            raise CompileError(f"calibration failed on batch {seen}: {first_line(exc)}") from exc
        seen += 1
        del feed
    if seen == 0:
        raise DataError("calibration data holds no samples")
    try:
        with quiet():
            return calibrator.compute_data()
    except ValueError as exc:  # ORT's histogram methods, when no tensor of op_types was seen
        what = f"no {', '.join(op_types)} tensors" if op_types else "no float tensors"
        raise CompileError(f"{method} calibration found {what} to calibrate ({first_line(exc)})") from exc
