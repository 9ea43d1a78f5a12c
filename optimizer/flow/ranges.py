"""Activation ranges from calibration data, computed once per compile.

ONNX Runtime's ``quantize_static`` calibrates inside the call and its histogram
calibrators (entropy, percentile) keep every intermediate output of the whole
data set until the end: that is where calibration "eats memory".  Here
:func:`dlopt.calibration.collect.collect_ranges` feeds the calibrator one batch at
a time (memory: one batch of activations, whatever the sample count) and the
result is saved as ORT's calibration cache.  Every later quantisation — the plain INT8 model and
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

from dlopt.calibration.collect import collect_ranges
from dlopt.calibration.memory import PeakRSS
from dlopt.core.errors import DataError
from dlopt.core.layout import samples_in
from dlopt.core.model_io import EXTERNAL_DATA_THRESHOLD, save_ir

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
    progress: Callable[[int], None] | None = None,
) -> RangeStats:
    """Calibrate ``model`` on ``batches`` and write ORT's calibration cache to ``cache_path``."""
    from onnxruntime.quantization.calibrate import save_tensors_data

    if method not in METHODS:
        raise DataError(f"unknown calibration method {method!r}; choose from {', '.join(METHODS)}")
    counts = {"samples": 0, "batches": 0}

    def on_batch(feed: dict) -> None:
        counts["batches"] += 1
        counts["samples"] += samples_in(feed)
        if progress is not None:
            progress(counts["samples"])

    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="dlopt-calib-") as tmp, PeakRSS() as rss:
        model_path = Path(tmp) / "model.onnx"
        large = _write_model(model, model_path)
        tensors = collect_ranges(model_path, batches, method=method, op_types=op_types, workdir=Path(tmp),
                                 external_data=large, on_batch=on_batch)
        save_tensors_data(tensors, cache_path)
    return RangeStats(
        method=method, samples=counts["samples"], batches=counts["batches"],
        seconds=round(time.perf_counter() - start, 3),
        peak_rss_mb=round(rss.peak_bytes / 2**20, 1), rss_increase_mb=round(rss.delta_bytes / 2**20, 1),
    )
