"""The C backend's static memory planner (dlopt.targets.c.memory)."""

import numpy as np
import pytest

from dlopt.targets.c.memory import ALIGN, Buffer, _arena, _place, check, lower_bound, plan


def test_a_chain_needs_two_buffers_at_a_time():
    # a -> b -> c -> d: each step reads the previous buffer and writes the next
    sizes = [4096, 8192, 2048, 1024]
    buffers = [Buffer(f"t{i}", s, i, i + 1) for i, s in enumerate(sizes)]
    result = plan(buffers)
    assert result.lower_bound == max(a + b for a, b in zip(sizes, sizes[1:])) == 12288
    assert result.arena == 12288
    check(buffers, result.offsets)


def test_sizes_are_aligned_and_counted_aligned():
    buffers = [Buffer("a", 3, 0, 1), Buffer("b", 10, 1, 2)]
    result = plan(buffers)
    assert all(offset % ALIGN == 0 for offset in result.offsets.values())
    assert result.lower_bound == 8 + 16 == result.arena


def test_the_plan_beats_tflites_largest_first_where_that_is_not_optimal():
    # largest-first places a (56 B) and c (56 B) at 0, then b (40 B, live with both) above them
    # at 56, and e on top: 104 B; the lower bound, 96 B, is reachable (b at 0, c and e above it)
    buffers = [Buffer("a", 56, 3, 3), Buffer("b", 40, 0, 2), Buffer("c", 56, 1, 1), Buffer("d", 32, 4, 4),
               Buffer("e", 8, 2, 3)]
    greedy = _place(sorted(buffers, key=lambda b: (-b.aligned, b.first)))
    assert _arena(buffers, greedy) == 104
    result = plan(buffers)
    check(buffers, result.offsets)
    assert result.arena == result.lower_bound == 96


def test_random_lifetimes_are_valid_and_near_the_bound():
    rng = np.random.default_rng(0)
    over = []
    for _ in range(200):
        n = int(rng.integers(2, 14))
        buffers = []
        for i in range(n):
            first = int(rng.integers(0, 12))
            buffers.append(Buffer(f"t{i}", int(rng.integers(1, 5000)), first, first + int(rng.integers(0, 5))))
        result = plan(buffers)
        check(buffers, result.offsets)
        assert result.lower_bound == lower_bound(buffers) <= result.arena
        greedy = _place(sorted(buffers, key=lambda b: (-b.aligned, b.first)))
        assert result.arena <= _arena(buffers, greedy)
        over.append(result.arena / result.lower_bound)
    assert np.median(over) <= 1.05


def test_check_refuses_overlapping_live_buffers():
    buffers = [Buffer("a", 16, 0, 2), Buffer("b", 16, 1, 3)]
    with pytest.raises(ValueError, match="a and b are live together"):
        check(buffers, {"a": 0, "b": 8})
    check(buffers, {"a": 0, "b": 16})
    with pytest.raises(ValueError, match="unique"):
        plan([Buffer("a", 1, 0, 0), Buffer("a", 1, 1, 1)])
