"""Mixed precision: keep the most sensitive nodes in float until INT8 fits the budget.

1. Rank: every node the INT8 quantiser touched is quantised *alone* (all else
   float) and scored on a sample of the evaluation feeds; the drop it causes, then
   the output error, orders the nodes from most to least sensitive.
2. Search: keep the top 1, 2, 4, ... nodes in float until the budget holds on the
   full evaluation set, then bisect for the fewest.
Each trial reuses the calibration cache, so no step calibrates again.  The search
stops at its deadline and returns the best model found so far.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx_ir as ir

from dlopt.budget import Scorer
from dataclasses import replace

from dlopt.candidates import Built, Evaluation, build
from dlopt.precisions import Status

RANK_FEEDS = 16  # feeds used to rank nodes; the search itself uses all of them


@dataclass
class NodeSensitivity:
    name: str
    op_type: str
    drop_pp: float
    nmse: float

    def to_dict(self) -> dict:
        return {"name": self.name, "op_type": self.op_type, "drop_pp": round(self.drop_pp, 4),
                "nmse": float(f"{self.nmse:.4g}")}


def quantized_nodes(int8_model: ir.Model) -> list[tuple[str, str]]:
    """(name, op_type) of nodes fed by a DequantizeLinear, i.e. running on quantised data."""
    found = []
    for node in int8_model.graph:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            continue
        if any(v is not None and v.producer() is not None and v.producer().op_type == "DequantizeLinear"
               for v in node.inputs):
            found.append((node.name, node.op_type))
    return found


def _nmse(reference: list, outputs: list) -> float:
    errors = []
    for ref, got in zip(reference, outputs):
        r = np.asarray(ref[0], dtype=np.float64)
        g = np.asarray(got[0], dtype=np.float64)
        errors.append(float(np.sum((r - g) ** 2) / max(float(np.sum(r ** 2)), 1e-30)))
    return float(np.mean(errors)) if errors else 0.0


def search(ev: Evaluation, backend: str, model: ir.Model, int8_model: ir.Model, workdir: Path) -> tuple[Built | None, dict]:
    """Find the fewest float nodes that bring INT8 within the budget (see module doc)."""
    start = time.monotonic()
    deadline = start + ev.config.search_time
    budget = ev.config.max_accuracy_drop
    nodes = quantized_nodes(int8_model)
    info = {"nodes_considered": len(nodes), "ranked": 0, "trials": 0, "complete": False, "met_budget": False}
    limit = min(RANK_FEEDS, len(ev.data.feeds))
    sample_scorer = Scorer(ev.reference[:limit], ev.data.labels[:limit], ev.config.metric)

    with tempfile.TemporaryDirectory(prefix="dlopt-mixed-") as tmp:
        ranking: list[NodeSensitivity] = []
        for i, (name, op_type) in enumerate(nodes):
            if time.monotonic() > deadline:
                break
            trial = build(ev, backend, "mixed", model, Path(tmp) / f"rank{i}", only=(name,), limit=limit)
            info["trials"] += 1
            ev.progress("mixed: ranking nodes", i + 1, len(nodes))
            if trial.outputs is None:
                continue
            ranking.append(NodeSensitivity(name, op_type, sample_scorer.score(trial.outputs).drop_pp,
                                           _nmse(ev.reference, trial.outputs)))
        info["ranked"] = len(ranking)
        ranking.sort(key=lambda s: (s.drop_pp, s.nmse), reverse=True)
        # Nodes the deadline left unranked are the last to be kept in float.
        ranked = {s.name for s in ranking}
        order = ranking + [NodeSensitivity(n, t, float("nan"), float("nan")) for n, t in nodes if n not in ranked]

        tried: dict[int, Built] = {}

        def trial(k: int) -> Built | None:
            if k in tried:
                return tried[k]
            if time.monotonic() > deadline:
                return None
            exclude = tuple(s.name for s in order[:k])
            built = build(ev, backend, "mixed", model, Path(tmp) / f"keep{k}", exclude=exclude)
            info["trials"] += 1
            ev.progress("mixed: searching", k, len(order))
            tried[k] = built
            return built

        def fits(built: Built | None) -> bool:
            return built is not None and built.candidate.score is not None and built.candidate.score["drop_pp"] <= budget

        low, high = 0, None  # low: known to miss; high: known to fit
        k = 1
        while True:
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
        info["complete"] = time.monotonic() <= deadline and len(ranking) == len(nodes)
        if not any(b.candidate.score is not None for b in tried.values()):
            info["seconds"] = round(time.monotonic() - start, 2)
            return None, info
        scored = [k for k, b in tried.items() if b.candidate.score is not None]
        best_k = high if high is not None else min(scored, key=lambda k: tried[k].candidate.score["drop_pp"])
        info["met_budget"] = high is not None
        info["float_nodes"] = best_k
    # Rebuild the chosen configuration for real: full evaluation, publishable folder (timed with the others).
    final = build(ev, backend, "mixed", model, workdir, exclude=tuple(s.name for s in order[:best_k]))
    cand = replace(final.candidate, float_nodes=[s.to_dict() for s in order[:best_k]])
    if best_k == len(order) and cand.status is Status.OK:
        # Every quantised node had to stay in float: this is the float model under another name.
        cand = replace(cand, status=Status.REJECTED,
                       reason="no INT8 left: every quantised node had to stay in float to meet the budget")
        final = replace(final, runner=None)
    final = replace(final, candidate=cand)
    info["seconds"] = round(time.monotonic() - start, 2)
    return final, info
