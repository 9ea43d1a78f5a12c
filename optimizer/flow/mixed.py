"""Mixed precision: keep the most sensitive nodes in float until INT8 fits the budget.

1. Rank: every node the INT8 quantiser touched gets its own output error, its
   quantisation replayed on float activations cached once (:mod:`dlopt.flow.sensitivity`);
   seconds, not one quantisation per node.
2. Search: keep the top 1, 2, 4, ... nodes in float until the budget holds on the
   full evaluation set, then bisect for the fewest: O(log n) full builds.
A node kept in float takes with it the quantised nodes producing its quantised
inputs: the quantiser also puts Q/DQ on a quantised node's output, so without them
the node would still read the same rounded tensor.  Each trial reuses the
calibration cache, so no step calibrates again.  The search stops at its deadline
and returns the best model found so far.
"""

from __future__ import annotations

import logging
import math
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import onnx_ir as ir

from dlopt.flow.candidates import Built, build
from dlopt.flow.evaluation import Evaluation
from dlopt.core.precisions import Status
from dlopt.flow.sensitivity import NodeSensitivity, layer_errors, quantized_nodes, rank, tensor_names

logger = logging.getLogger(__name__)

SHOWN = 10  # ranked nodes listed in the report's search section


def _quantised_producers(int8_model: ir.Model) -> dict[str, list[str]]:
    """For each node, the quantised nodes whose outputs reach it through a Q -> DQ pair."""
    quantised = {name for name, _ in quantized_nodes(int8_model)}
    found: dict[str, list[str]] = {}
    for node in int8_model.graph:
        for value in node.inputs:
            dq = value.producer() if value is not None else None
            if dq is None or dq.op_type != "DequantizeLinear" or dq.inputs[0] is None:
                continue
            q = dq.inputs[0].producer()
            source = q.inputs[0].producer() if q is not None and q.op_type == "QuantizeLinear" and q.inputs[0] else None
            if source is not None and source.name in quantised and source.name != node.name:
                found.setdefault(node.name, []).append(source.name)
    return found


def _float_sets(order: list[NodeSensitivity], producers: dict[str, list[str]]) -> list[list[dict]]:
    """``sets[k]``: the nodes kept in float when the top ``k`` ranked nodes are, as report rows."""
    by_name = {s.name: s for s in order}
    sets, chosen, seen = [[]], [], set()
    for s in order:
        for name, reason in [(s.name, None), *((p, s.name) for p in producers.get(s.name, []))]:
            if name in seen:
                continue
            seen.add(name)
            row = by_name[name].to_dict() if name in by_name else {"name": name, "op_type": "?", "error": None}
            chosen.append({**row, **({"feeds": reason} if reason else {})})
        sets.append(list(chosen))
    return sets


def _float_twin(ev: Evaluation, model: ir.Model, int8_model: ir.Model) -> ir.Model:
    """The float model the INT8 one was quantised from: ``model``, or the SmoothQuant-ed model
    static INT8 starts from; the one holding more of the tensors the INT8 model quantises."""
    smoothed = getattr(getattr(ev, "smoothed", None), "model", None)
    if smoothed is None:
        return model
    quantised = {n.inputs[0].name for n in int8_model.graph if n.op_type == "QuantizeLinear" and n.inputs[0]}
    return max((model, smoothed), key=lambda m: len(quantised & tensor_names(m)))


def search(ev: Evaluation, backend: str, model: ir.Model, int8_model: ir.Model, workdir: Path) -> tuple[Built | None, dict]:
    """Find the fewest float nodes that bring INT8 within the budget (see module doc)."""
    start = time.monotonic()
    deadline = start + ev.config.budget.search_time
    budget = ev.config.budget.max_accuracy_drop
    nodes = quantized_nodes(int8_model)
    info = {"nodes_considered": len(nodes), "ranked": 0, "trials": 0, "complete": False, "met_budget": False}
    ev.progress("mixed: ranking nodes", 0, 1)
    try:
        errors, samples = layer_errors(_float_twin(ev, model, int8_model), int8_model, ev.data.feeds,
                                       threads=ev.config.timing.thread_count, deadline=deadline)
    except Exception as exc:  # ranking is a heuristic: without it the search still runs, in graph order
        logger.warning("mixed: per-layer errors failed (%s); searching in graph order", exc)
        errors, samples = [NodeSensitivity(n, t, math.nan) for n, t in nodes], 0
    order = rank(errors)
    ev.progress("mixed: ranking nodes", 1, 1)
    info.update({
        "ranking": f"per-layer output error on {samples} cached samples",
        "ranking_seconds": round(time.monotonic() - start, 2),
        "ranked": sum(1 for s in order if not math.isnan(s.error)),
        "sensitivity": [s.to_dict() for s in order[:SHOWN]],
    })
    sets = _float_sets(order, _quantised_producers(int8_model))

    def names(k: int) -> tuple[str, ...]:
        return tuple(row["name"] for row in sets[k])

    with tempfile.TemporaryDirectory(prefix="dlopt-mixed-") as tmp:
        tried: dict[int, Built] = {}

        def trial(k: int) -> Built | None:
            if k in tried:
                return tried[k]
            if time.monotonic() > deadline:
                return None
            built = build(ev, backend, "mixed", model, Path(tmp) / f"keep{k}", exclude=names(k))
            info["trials"] += 1
            ev.progress("mixed: searching", k, len(order))
            tried[k] = built
            return built

        def fits(built: Built | None) -> bool:
            return built is not None and built.candidate.score is not None and built.candidate.score.drop_pp <= budget

        low, high = 0, None  # low: known to miss; high: known to fit
        k = 1
        while order:
            built = trial(k)
            if built is None:
                break  # deadline
            if fits(built):
                high = k
                break
            low = k
            if k == len(order):
                break
            k = min(k * 2, len(order))
        while high is not None and high - low > 1:
            mid = (low + high) // 2
            built = trial(mid)
            if built is None:
                break
            low, high = (low, mid) if fits(built) else (mid, high)
        info["complete"] = time.monotonic() <= deadline
        if not any(b.candidate.score is not None for b in tried.values()):
            info["seconds"] = round(time.monotonic() - start, 2)
            return None, info
        scored = [k for k, b in tried.items() if b.candidate.score is not None]
        best_k = high if high is not None else min(scored, key=lambda k: tried[k].candidate.score.drop_pp)
        info["met_budget"] = high is not None
        info["float_nodes"] = len(sets[best_k])
    # Rebuild the chosen configuration for real: full evaluation, publishable folder (timed with the others).
    final = build(ev, backend, "mixed", model, workdir, exclude=names(best_k))
    cand = replace(final.candidate, float_nodes=sets[best_k])
    if len(sets[best_k]) >= len(nodes) and cand.status is Status.OK:
        # Every quantised node had to stay in float: this is the float model under another name.
        cand = replace(cand, status=Status.REJECTED,
                       reason="no INT8 left: every quantised node had to stay in float to meet the budget")
        final = replace(final, runner=None)
    final = replace(final, candidate=cand)
    info["seconds"] = round(time.monotonic() - start, 2)
    return final, info
