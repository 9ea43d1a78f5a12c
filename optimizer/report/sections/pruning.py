"""What ``--prune`` reached, from MagnitudePrunePass's record (``passes[].facts``; it owns no field of its own).

One line, on the chosen candidate's row, in report.md's facts, report.html's summary and the summary line.
"""

from __future__ import annotations

from dlopt.report.sections.base import FACTS, Section


def text(passes: list[dict]) -> str | None:
    """ "pruned 50.0% of 824,096 weights; weights 0.52x compressed (deflate: 3.05 -> 1.60 MB)"; None when no
    pruning ran."""
    record = next((p for p in passes if p.get("name") == "MagnitudePrunePass"), None)
    if record is None:
        return None
    facts = record.get("facts") or {}
    if not facts.get("weights"):  # nothing large enough to prune: the pass says so
        return f"pruning: {record.get('note') or 'nothing pruned'}"
    before, after = facts["deflated_bytes_before"], facts["deflated_bytes_after"]
    return (f"pruned {facts['sparsity']:.1%} of {facts['weights']:,} weights; weights {after / before:.2f}x "
            f"compressed (deflate: {before / 1e6:.2f} -> {after / 1e6:.2f} MB)")


class Pruning(Section):
    slot = FACTS
    label = "pruning"

    def fact(self, report):
        return text(report.passes)
