"""Mutated models and data files only ever produce dlopt's own errors, with readable messages."""

from __future__ import annotations

import io
import itertools

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import models

import dlopt
from dlopt.core.errors import DloptError

MODEL = models.conv_bn_relu(channels=4, size=8).SerializeToString()
_buffer = io.BytesIO()
np.savez(_buffer, x=np.random.default_rng(0).standard_normal((4, 3, 8, 8)).astype(np.float32))
DATA = _buffer.getvalue()
COUNTER = itertools.count()
FUZZ = settings(max_examples=60, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


@st.composite
def mutated(draw, original: bytes) -> bytes:
    data = bytearray(original)
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "truncate", "insert", "delete"]))
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        if kind == "flip" and data:
            data[at] ^= draw(st.integers(1, 255))
        elif kind == "truncate":
            del data[at:]
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif kind == "delete":
            del data[at : at + draw(st.integers(1, 16))]
    return bytes(data)


def _compile_expecting_clean_result(tmp_path, **kwargs):
    out = tmp_path / f"out{next(COUNTER)}"
    try:
        dlopt.compile(target="cpu", out=out, precision="fp32", runs=1, warmup=0, samples=2, **kwargs)
    except DloptError as exc:
        message = str(exc)
        assert message and "\n" not in message and "Traceback" not in message
        assert not out.exists()  # failed compiles write nothing
        return type(exc).__name__
    assert (out / "report.json").is_file()
    return "ok"


@FUZZ
@given(blob=mutated(MODEL))
def test_mutated_models(tmp_path, blob):
    path = tmp_path / f"m{next(COUNTER)}.onnx"
    path.write_bytes(blob)
    _compile_expecting_clean_result(tmp_path, model=path)


@FUZZ
@given(blob=mutated(DATA))
def test_mutated_data_files(tmp_path, blob):
    model = tmp_path / "model.onnx"
    if not model.exists():
        model.write_bytes(MODEL)
    data = tmp_path / f"d{next(COUNTER)}.npz"
    data.write_bytes(blob)
    _compile_expecting_clean_result(tmp_path, model=model, inputs=data)


@pytest.mark.parametrize("blob", [b"", b"\x08", MODEL[:10], MODEL[:-1], MODEL + b"\x00" * 3])
def test_edge_cuts(tmp_path, blob):
    path = tmp_path / "edge.onnx"
    path.write_bytes(blob)
    assert _compile_expecting_clean_result(tmp_path, model=path) in {"ModelError", "ok"}
