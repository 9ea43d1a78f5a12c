"""Static memory plan for the C backend: every activation gets an offset in one arena.

Lifetimes come from the order the generated code runs its steps: a buffer is live from
the step that writes it to the last step that reads it (both inclusive).  Two buffers may
share bytes only when their lifetimes do not overlap.

Guarantees:
- ``plan(...)`` places every buffer at an ``ALIGN``-aligned offset, and no two buffers
  whose lifetimes overlap share a byte (``check`` proves it, and ``plan`` calls it).
- ``lower_bound`` is the largest sum of (aligned) sizes live at one step: no arena
  holding these buffers at once can be smaller.
- The arena is the smallest of several greedy placements (TFLM's largest-first, then
  longest-lived-first and first-written-first, each improved by re-placing each buffer
  as low as it fits), so it is never larger than TFLM's greedy-by-size plan.
"""

from __future__ import annotations

from dataclasses import dataclass

ALIGN = 8  # doubles-aligned: float and int32 kernels load whatever they are given


@dataclass(frozen=True)
class Buffer:
    name: str
    size: int  # bytes, before alignment
    first: int  # step that writes it
    last: int  # last step that reads it

    @property
    def aligned(self) -> int:
        return -(-self.size // ALIGN) * ALIGN

    def overlaps(self, other: Buffer) -> bool:
        return self.first <= other.last and other.first <= self.last


@dataclass(frozen=True)
class Plan:
    offsets: dict[str, int]
    arena: int  # bytes
    lower_bound: int  # bytes: peak of simultaneously live buffers
    strategy: str  # the ordering that won

    def to_dict(self) -> dict:
        over = (self.arena / self.lower_bound - 1) * 100 if self.lower_bound else 0.0
        return {"arena_bytes": self.arena, "liveness_lower_bound_bytes": self.lower_bound,
                "over_lower_bound_pct": round(over, 2), "strategy": self.strategy,
                "offsets": dict(self.offsets)}


def lower_bound(buffers: list[Buffer]) -> int:
    steps = {b.first for b in buffers}  # the live set only grows at a write
    return max((sum(b.aligned for b in buffers if b.first <= s <= b.last) for s in steps), default=0)


def _place(order: list[Buffer], fixed: dict[str, int] | None = None) -> dict[str, int]:
    """Put each buffer, in ``order``, at the lowest offset clear of the placed buffers it overlaps."""
    offsets: dict[str, int] = dict(fixed or {})
    placed: list[Buffer] = [b for b in order if b.name in offsets]
    for buf in order:
        if buf.name in offsets:
            continue
        clashes = sorted((offsets[o.name], offsets[o.name] + o.aligned) for o in placed if o.overlaps(buf))
        offset = 0
        for start, end in clashes:
            if offset + buf.aligned <= start:
                break
            offset = max(offset, end)
        offsets[buf.name] = offset
        placed.append(buf)
    return offsets


def _arena(buffers: list[Buffer], offsets: dict[str, int]) -> int:
    return max((offsets[b.name] + b.aligned for b in buffers), default=0)


def _improve(buffers: list[Buffer], offsets: dict[str, int]) -> dict[str, int]:
    """Re-place each buffer, highest first, as low as it fits among all the others; repeat while it helps."""
    best = dict(offsets)
    for _ in range(4):
        changed = False
        for buf in sorted(buffers, key=lambda b: -best[b.name]):
            others = [(best[o.name], best[o.name] + o.aligned) for o in buffers
                      if o.name != buf.name and o.overlaps(buf)]
            offset = 0
            for start, end in sorted(others):
                if offset + buf.aligned <= start:
                    break
                offset = max(offset, end)
            if offset < best[buf.name]:
                best[buf.name], changed = offset, True
        if not changed:
            break
    return best


_ORDERS = {
    "largest-first": lambda b: (-b.aligned, b.first),
    "longest-lived-first": lambda b: (-(b.last - b.first), -b.aligned),
    "first-written-first": lambda b: (b.first, -b.aligned),
    "largest-area-first": lambda b: (-b.aligned * (b.last - b.first + 1), b.first),
}


def plan(buffers: list[Buffer]) -> Plan:
    names = [b.name for b in buffers]
    if len(set(names)) != len(names):
        raise ValueError("buffer names must be unique")
    best: tuple[int, str, dict[str, int]] | None = None
    for strategy, key in _ORDERS.items():
        offsets = _improve(buffers, _place(sorted(buffers, key=key)))
        size = _arena(buffers, offsets)
        if best is None or size < best[0]:
            best = (size, strategy, offsets)
    size, strategy, offsets = best if best else (0, "empty", {})
    check(buffers, offsets)
    return Plan(offsets, size, lower_bound(buffers), strategy)


def check(buffers: list[Buffer], offsets: dict[str, int]) -> None:
    """Raise AssertionError-free ValueError when two live-together buffers share bytes."""
    for i, a in enumerate(buffers):
        if offsets[a.name] % ALIGN:
            raise ValueError(f"{a.name} is misaligned")
        for b in buffers[i + 1:]:
            if a.overlaps(b) and offsets[a.name] < offsets[b.name] + b.aligned \
                    and offsets[b.name] < offsets[a.name] + a.aligned:
                raise ValueError(f"{a.name} and {b.name} are live together and share bytes")
