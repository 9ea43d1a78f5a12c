"""Activation ranges from calibration data, computed once per compile.

ONNX Runtime's ``quantize_static`` calibrates inside the call and its histogram
calibrators (entropy, percentile) keep every intermediate output of the whole
data set until the end: that is where calibration "eats memory".  Here the
calibrator is fed the streamed data a few batches at a time (``collect_data``
merges each chunk into its running ranges or histograms) and the result is saved
as ORT's calibration cache.  Every later quantisation — the plain INT8 model and
each step of the mixed-precision search — reuses that cache instead of
calibrating again, and the cache ships with the artefact as its calibration table.
"""

from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable

import onnx
import onnx_ir as ir

from dlopt.errors import CompileError, DataError, first_line
from dlopt.model_io import EXTERNAL_DATA_THRESHOLD, save_ir
from dlopt.passes._ort_quant import quiet

logger = logging.getLogger(__name__)

METHODS = ("minmax", "entropy", "percentile")


@dataclass
class RangeStats:
    method: str
    samples: int
    batches: int
    seconds: float
    peak_rss_mb: float  # whole-process peak RSS during calibration
    rss_increase_mb: float  # peak minus RSS before calibration started

    def to_dict(self) -> dict:
        return asdict(self)


class _ChunkReader:
    """Gives the calibrator ``chunk`` batches, then ends, so each collect call stays small."""

    def __init__(self, batches: Iterable[dict], chunk: int, on_batch: Callable[[dict], None]) -> None:
        self._it = iter(batches)
        self._chunk = chunk
        self._left = chunk
        self._on_batch = on_batch
        self.exhausted = False

    def next_chunk(self) -> None:
        self._left = self._chunk

    def get_next(self):
        if self._left == 0 or self.exhausted:
            return None
        feed = next(self._it, None)
        if feed is None:
            self.exhausted = True
            return None
        self._left -= 1
        self._on_batch(feed)
        return feed


def _method(name: str):
    from onnxruntime.quantization import CalibrationMethod

    return {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
            "percentile": CalibrationMethod.Percentile}[name]


def _write_model(model: onnx.ModelProto | ir.Model, path: Path) -> bool:
    """Write ``model`` for ORT's calibrator; True if its weights went to an external data file.

    An ``ir.Model`` is written with ``save_ir``, which also copies weights still kept in
    the original's data file (a model over 1 GiB): its serialised proto would only
    point at a file that is not in this temporary folder.
    """
    if isinstance(model, ir.Model):
        return len(save_ir(model, path)) > 1
    if model.ByteSize() > EXTERNAL_DATA_THRESHOLD:
        copy = onnx.ModelProto()  # save_model moves tensors out of the proto it is given
        copy.CopyFrom(model)
        onnx.save_model(copy, path, save_as_external_data=True, location=path.name + ".data")
        return True
    onnx.save_model(model, path)
    return False


def compute_ranges(
    model: onnx.ModelProto | ir.Model,
    batches: Iterable[dict],
    cache_path: Path,
    *,
    method: str = "minmax",
    op_types: list[str] | None = None,
    chunk_batches: int = 8,
    progress: Callable[[int], None] | None = None,
) -> RangeStats:
    """Calibrate ``model`` on ``batches`` and write ORT's calibration cache to ``cache_path``."""
    from onnxruntime.quantization.calibrate import create_calibrator, save_tensors_data

    from dlopt.calibration.memory import PeakRSS

    if method not in METHODS:
        raise DataError(f"unknown calibration method {method!r}; choose from {', '.join(METHODS)}")
    counts = {"samples": 0, "batches": 0}

    def on_batch(feed: dict) -> None:
        counts["batches"] += 1
        counts["samples"] += len(next(iter(feed.values())))
        if progress is not None:
            progress(counts["samples"])

    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="dlopt-calib-") as tmp, PeakRSS() as rss:
        model_path = Path(tmp) / "model.onnx"
        large = _write_model(model, model_path)
        try:
            with quiet():
                calibrator = create_calibrator(
                    model_path, op_types, augmented_model_path=str(Path(tmp) / "augmented.onnx"),
                    calibrate_method=_method(method), use_external_data_format=large,
                    extra_options={"symmetric": False},
                )
        except Exception as exc:
            raise CompileError(f"cannot prepare calibration: {first_line(exc)}") from exc
        reader = _ChunkReader(batches, chunk_batches, on_batch)
        while not reader.exhausted:
            reader.next_chunk()
            try:
                with quiet():
                    calibrator.collect_data(reader)
            except DataError:
                raise
            except ValueError as exc:
                if "No data is collected" in str(exc) and counts["batches"]:
                    break  # the previous chunk ended exactly at the end of the data
                raise CompileError(f"calibration failed: {first_line(exc)}") from exc
        if counts["batches"] == 0:
            raise DataError("calibration data holds no samples")
        try:
            with quiet():
                tensors = calibrator.compute_data()
        except ValueError as exc:  # ORT's histogram methods, when no tensor of op_types was seen
            what = f"no {', '.join(op_types)} tensors" if op_types else "no float tensors"
            raise CompileError(f"{method} calibration found {what} to calibrate ({first_line(exc)})") from exc
        del calibrator
        save_tensors_data(tensors, cache_path)
    return RangeStats(
        method=method, samples=counts["samples"], batches=counts["batches"],
        seconds=round(time.perf_counter() - start, 3),
        peak_rss_mb=round(rss.peak_bytes / 2**20, 1), rss_increase_mb=round(rss.delta_bytes / 2**20, 1),
    )
