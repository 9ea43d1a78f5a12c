"""Shared test helpers: run models on the real ONNX Runtime and compare."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort


def to_proto(model) -> onnx.ModelProto:
    return ir.serde.serialize_model(model) if isinstance(model, ir.Model) else model


def run_session(session, feeds: list[dict]) -> list[list]:
    """``session.run`` on each feed, the session closed afterwards whatever happens (a backend's
    loaded artefact: C's host build, a native library)."""
    try:
        return [session.run(feed) for feed in feeds]
    finally:
        session.close()


def run_ort(model, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    from dlopt.core.ort_sessions import cpu_session_options

    options = cpu_session_options()  # exact int8 kernels on x86 CPUs without VNNI, as dlopt's own sessions
    session = ort.InferenceSession(to_proto(model).SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def random_feed(model, seed: int = 0) -> dict[str, np.ndarray]:
    proto = to_proto(model)
    rng = np.random.default_rng(seed)
    inits = {i.name for i in proto.graph.initializer}
    feed = {}
    for value in proto.graph.input:
        if value.name in inits:
            continue
        shape = [d.dim_value or 1 for d in value.type.tensor_type.shape.dim]
        feed[value.name] = rng.standard_normal(shape).astype(np.float32)
    return feed


def max_rel_error(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(a))), 1e-30))


def assert_same_outputs(before, after, *, samples: int = 5, rel: float = 1e-5) -> None:
    """Run both models on the same random feeds and check every output agrees."""
    for seed in range(samples):
        feed = random_feed(before, seed)
        for ref, got in zip(run_ort(before, feed), run_ort(after, feed), strict=True):
            assert ref.shape == got.shape
            assert max_rel_error(ref, got) <= rel, max_rel_error(ref, got)


def op_counts(model) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in to_proto(model).graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts
