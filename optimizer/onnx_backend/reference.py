"""The ONNX reference implementation (``onnx.reference.ReferenceEvaluator``) as the ``cpu``
engine's arbiter between runtimes.

It is the specification's own executable form (pure numpy, no kernels tuned for speed), so
it is asked only about small models on small inputs (``MAX_NODES`` nodes, ``MAX_ELEMENTS``
weight elements and as many input elements: the ONNX backend tests' largest input has 98,304),
and only to choose among the runtimes' outputs: its own outputs are never returned.
``matches`` holds a runtime's outputs to the ONNX backend tests' default tolerance.
"""

from __future__ import annotations

import logging
import warnings

import numpy as np
import onnx_ir as ir

from dlopt.core.errors import first_line

logger = logging.getLogger(__name__)

MAX_NODES = 1000  # nodes, counted through subgraphs
MAX_ELEMENTS = 1 << 20  # initializer elements, and input elements of a run (4 MB of float32 each)
RTOL, ATOL = 1e-3, 1e-7  # onnx.backend.test's defaults


def _elements(value) -> int:
    if isinstance(value, (list, tuple)):
        return sum(_elements(v) for v in value)
    return int(np.size(value)) if value is not None else 0


def _small(model: ir.Model, feeds: dict) -> bool:
    nodes = sum(1 for _ in ir.traversal.RecursiveGraphIterator(model.graph))
    weights = sum(int(np.prod(v.shape.numpy())) if v.shape is not None and v.shape.is_static() else 0
                  for v in model.graph.initializers.values())
    return nodes <= MAX_NODES and weights <= MAX_ELEMENTS and _elements(list(feeds.values())) <= MAX_ELEMENTS


def outputs(model: ir.Model, feeds: dict) -> list | None:
    """``model``'s outputs on ``feeds`` by the reference implementation, or None where the model is
    too large for it or it cannot run the model (an op it lacks, a custom domain)."""
    from onnx.reference import ReferenceEvaluator

    try:
        if not _small(model, feeds):
            return None
        proto = ir.serde.serialize_model(model)
        names = [v.name for v in model.graph.inputs]
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore")
            return list(ReferenceEvaluator(proto).run(None, {k: v for k, v in feeds.items() if k in names}))
    except Exception as exc:  # the arbiter is optional: without it the cpu engine keeps its order
        logger.debug("reference implementation cannot run the model: %s", first_line(exc))
        return None


def matches(got: list, want: list) -> bool:
    """Whether a runtime's outputs are the reference's to the ONNX backend tests' tolerance."""
    from dlopt.onnx_backend.engines import agree

    try:
        return agree(got, want, rtol=RTOL, atol=ATOL)
    except (TypeError, ValueError):  # an output the comparison cannot read (an unexpected type)
        return False
