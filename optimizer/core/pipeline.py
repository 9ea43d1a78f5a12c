"""Runs passes over a model and records what each one did.

Instrumentation lives here, around the passes, never inside them (the idea of
TVM's ``PassInstrument``): each pass gets a :class:`PassRecord` with its time,
whether it changed the model and the op histogram before and after.
"""

from __future__ import annotations

import collections
import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Sequence

import onnx_ir as ir

from dlopt.core.errors import CompileError, DloptError, first_line
from dlopt.core.graph_facts import op_label

logger = logging.getLogger(__name__)


def op_histogram(model: ir.Model) -> dict[str, int]:
    """Count nodes by op type over the main graph and its subgraphs."""
    counts: collections.Counter[str] = collections.Counter()
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        counts[op_label(node)] += 1
    return dict(sorted(counts.items()))


@dataclass
class PassRecord:
    name: str
    modified: bool
    seconds: float
    ops_before: dict[str, int]
    ops_after: dict[str, int]
    note: str = ""
    facts: dict = field(default_factory=dict)  # what the pass reached, as numbers (MagnitudePrunePass: sparsity, sizes)

    @property
    def nodes_before(self) -> int:
        return sum(self.ops_before.values())

    @property
    def nodes_after(self) -> int:
        return sum(self.ops_after.values())

    def changes(self) -> dict[str, int]:
        """Op-count deltas, only for op types whose count changed."""
        keys = set(self.ops_before) | set(self.ops_after)
        delta = {k: self.ops_after.get(k, 0) - self.ops_before.get(k, 0) for k in keys}
        return {k: v for k, v in sorted(delta.items()) if v}

    def to_dict(self) -> dict:
        data = asdict(self)
        data["changes"] = self.changes()
        return data


@dataclass
class PipelineResult:
    model: ir.Model
    records: list[PassRecord] = field(default_factory=list)


def run_pipeline(model: ir.Model, passes: Sequence[ir.passes.PassBase]) -> PipelineResult:
    """Apply ``passes`` in order; a pass that fails raises CompileError naming it."""
    result = PipelineResult(model)
    for pass_ in passes:
        name = type(pass_).__name__
        before = op_histogram(result.model)
        start = time.perf_counter()
        try:
            outcome = pass_(result.model)
        except DloptError:
            raise
        except Exception as exc:
            raise CompileError(f"pass {name} failed: {first_line(exc)}") from exc
        seconds = time.perf_counter() - start
        result.model = outcome.model
        record = PassRecord(
            name=name,
            modified=bool(outcome.modified),
            seconds=round(seconds, 6),
            ops_before=before,
            ops_after=op_histogram(result.model),
            note=getattr(pass_, "note", "") or "",
            facts=dict(getattr(pass_, "facts", None) or {}),
        )
        logger.debug("%s: modified=%s %.3fs %s", name, record.modified, seconds, record.changes())
        result.records.append(record)
    return result
