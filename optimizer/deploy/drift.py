"""The calibration ranges an INT8 artefact was built with, and the inputs that fall outside them.

A statically quantised model maps each input onto 256 levels fixed at calibration: a value outside
``[(qmin - zero_point) * scale, (qmax - zero_point) * scale]`` is clipped, silently.  Served, the
count of such values per input is the drift signal that matters most for a quantised model
(``dlopt serve``'s ``dlopt_input_out_of_range`` metric).

The ranges are read from the artefact itself: the per-tensor QuantizeLinear that a QDQ model
(ONNX Runtime's static quantiser, as dlopt ships it) applies to a graph input.  An artefact without
one (fp32, fp16, dynamic INT8, an OpenVINO IR or a compiled library) has none, and nothing is counted.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

_LEVELS = {np.dtype(np.uint8): (0, 255), np.dtype(np.int8): (-128, 127),
           np.dtype(np.uint16): (0, 65535), np.dtype(np.int16): (-32768, 32767)}


def input_ranges(folder: str | Path) -> dict[str, tuple[float, float]]:
    """{graph input: (low, high)} from the per-tensor QuantizeLinear nodes reading an input of
    ``folder/model.onnx``; empty when there is none (or no regular model.onnx)."""
    import onnx
    from onnx import numpy_helper

    path = Path(folder) / "model.onnx"
    if not path.is_file() or path.is_symlink():
        return {}
    try:
        graph = onnx.load(str(path), load_external_data=False).graph
    except Exception:  # not an ONNX file: an artefact of another kind
        return {}
    constants = {i.name: i for i in graph.initializer}
    inputs = {i.name for i in graph.input} - set(constants)
    ranges: dict[str, tuple[float, float]] = {}
    for node in graph.node:
        if node.op_type != "QuantizeLinear" or node.domain not in ("", "ai.onnx") or node.input[0] not in inputs:
            continue
        scale = _array(constants, node.input[1] if len(node.input) > 1 else "", numpy_helper)
        zero = _array(constants, node.input[2] if len(node.input) > 2 else "", numpy_helper)
        zero = np.zeros((), np.uint8) if zero is None else zero
        if scale is None or scale.size != 1 or zero.size != 1 or zero.dtype not in _LEVELS:
            continue  # per-axis or float8 input quantisation: no single range to report
        qmin, qmax = _LEVELS[zero.dtype]
        z, s = float(zero.reshape(())), float(scale.reshape(()))
        low, high = (qmin - z) * s, (qmax - z) * s
        old = ranges.get(node.input[0])
        ranges[node.input[0]] = (min(low, old[0]), max(high, old[1])) if old else (low, high)
    return ranges


def _array(constants: dict, name: str, numpy_helper) -> np.ndarray | None:
    tensor = constants.get(name)
    return None if tensor is None else numpy_helper.to_array(tensor)


def outside(array: np.ndarray, low: float, high: float) -> int:
    """How many values of ``array`` the quantiser clips (NaN included)."""
    values = np.asarray(array)
    return int(values.size - np.count_nonzero((values >= low) & (values <= high)))
