"""The choice policy (dlopt.flow.select) on constructed timings: the rule, not the machine."""

from dlopt.core.precisions import Status
from dlopt.flow.select import MIN_GAIN, ORIGINAL, Entry, choose, speed_words
from dlopt.measure.timing import MIN_RUNS, Timing

BACKENDS = ("ort", "openvino", "tvm")


def _t(p50, spread=0.01, cv=0.01, runs=100):
    return Timing(p50, p50, p50, p50, p50 * (1 - spread), p50 * (1 + spread), cv, runs, 10, 2)


def _e(precision, p50=None, backend="ort", status=Status.OK, **kw):
    return Entry(f"{backend}/{precision}", backend, precision, status, None if p50 is None else _t(p50, **kw))


def test_int8_within_noise_of_fp32_is_a_tie_settled_by_the_simpler_precision():
    verdict = choose([_e("fp32", 10.0), _e("int8", 9.8), _e("fp16", 12.0)], _t(20.0), BACKENDS)
    assert verdict.chosen == "ort/fp32" and verdict.ties == ("ort/int8",)
    assert verdict.reasons["ort/int8"].startswith("tie with ort/fp32")
    assert verdict.reasons["ort/fp16"] == "slower than ort/int8 (12.000 ms vs 9.800 ms)"
    assert verdict.faster_than_original is True


def test_overlapping_intervals_are_a_tie_even_beyond_min_gain():
    # 8 vs 10 ms is a 20% gain, but the intervals overlap: the machine cannot tell them apart
    verdict = choose([_e("fp32", 10.0, spread=0.15), _e("int8", 8.0, spread=0.15)], _t(20.0), BACKENDS)
    assert verdict.chosen == "ort/fp32" and verdict.ties == ("ort/int8",)


def test_the_fastest_that_pays_wins():
    verdict = choose([_e("fp32", 10.0), _e("int8", 3.0), _e("mixed", 4.0)], _t(10.0), BACKENDS)
    assert verdict.chosen == "ort/int8" and verdict.ties == () and verdict.faster_than_original
    assert verdict.reasons["ort/fp32"] == "slower than ort/int8 (10.000 ms vs 3.000 ms)"


def test_rejected_for_accuracy_is_never_chosen():
    verdict = choose([_e("fp32", 10.0), _e("int8", 2.0, status=Status.REJECTED)], _t(20.0), BACKENDS)
    assert verdict.chosen == "ort/fp32"


def test_nothing_significantly_faster_than_the_original_ships_fp32():
    verdict = choose([_e("fp32", 10.1), _e("int8", 9.3, backend="openvino")], _t(9.7), BACKENDS)
    assert verdict.chosen == "ort/fp32" and verdict.faster_than_original is False
    assert "optimised fp32 ships" in verdict.why
    # 9.3 vs 9.7 ms with 1% intervals: faster, provably, but by 4%: the words say which rule held it back
    assert verdict.reasons["openvino/int8"].startswith("faster than the original, but by 4.1%, under the 5% that counts")
    assert verdict.speed == "not faster than the original"  # the fp32 that ships: 10.1 vs 9.7 ms


def test_every_candidate_slower_than_the_original_ships_the_original():
    # 8% slower is within the wider margin for going back to the original; 20% is not
    assert choose([_e("fp32", 10.8)], _t(10.0), BACKENDS, auto=False).chosen == "ort/fp32"
    verdict = choose([_e("fp32", 12.0)], _t(10.0), BACKENDS, auto=False)
    assert verdict.chosen == ORIGINAL and "original model ships unchanged" in verdict.why
    assert verdict.reasons["ort/fp32"] == "slower than the original (12.000 ms vs 10.000 ms)"


def test_explicit_precision_is_kept_when_it_ties_with_the_original():
    verdict = choose([_e("int8", 10.0)], _t(10.1), BACKENDS, auto=False)
    assert verdict.chosen == "ort/int8" and "not significantly faster than the original" in verdict.why


def test_ties_prefer_the_targets_backend_order():
    verdict = choose([_e("fp32", 5.0, backend="openvino"), _e("fp32", 5.05)], _t(10.0), BACKENDS)
    assert verdict.chosen == "ort/fp32" and verdict.ties == ("openvino/fp32",)


def test_noisy_machine_is_reported():
    verdict = choose([_e("fp32", 5.0, cv=0.3)], _t(10.0), BACKENDS)
    assert any("noisy" in note for note in verdict.notes)


def test_untimed_target_uses_precision_preference():
    verdict = choose([_e("fp32"), _e("fp16"), _e("int8")], None, BACKENDS)
    assert verdict.chosen == "ort/int8" and "precision preference" in verdict.why


def test_min_gain_is_five_percent():
    assert MIN_GAIN == 0.05
    # 6% faster with tight intervals beats; 4% does not
    assert choose([_e("fp32", 10.0), _e("int8", 9.4)], _t(20.0), BACKENDS).chosen == "ort/int8"
    assert choose([_e("fp32", 10.0), _e("int8", 9.6)], _t(20.0), BACKENDS).chosen == "ort/fp32"


def _speedup_ci(candidate, original):
    """The interval the summary prints (dlopt.flow.write): original's bounds over the candidate's."""
    return original.ci_low_ms / candidate.ci_high_ms, original.ci_high_ms / candidate.ci_low_ms


def test_a_speedup_interval_above_one_is_never_called_not_faster():
    # the line: 1.11x (95% CI 1.08-1.15) called "not significantly faster"; here with too few runs
    few = _t(10.0, spread=0.015, runs=MIN_RUNS - 5)
    original = _t(11.15, spread=0.015, runs=MIN_RUNS - 5)
    low, high = _speedup_ci(few, original)
    assert round(low, 2) == 1.08 and round(high, 2) == 1.15
    assert speed_words(few, original) == \
        f"not shown faster than the original: 15 runs, under the {MIN_RUNS} the rule needs"
    # a separated interval with a 4% gain, and a 10% gain under the 5 us timing resolution
    assert speed_words(_t(9.6), _t(10.0)) == "faster than the original, but by 4.0%, under the 5% that counts"
    assert speed_words(_t(0.040), _t(0.0444)) == \
        "faster than the original, but by 4.4 us, under the 5 us timing resolution"
    assert speed_words(_t(9.0), _t(10.0)) == "significantly faster than the original"
    # over a grid of medians and spreads, words and interval never contradict each other
    for p50 in (8.0, 9.0, 9.6, 9.9, 10.0, 10.5):
        for spread in (0.005, 0.02, 0.1):
            for runs in (5, 100):
                cand, orig = _t(p50, spread, runs=runs), _t(10.0, 0.01, runs=runs)
                words = speed_words(cand, orig)
                if _speedup_ci(cand, orig)[0] > 1.0:
                    assert words.startswith(("significantly faster", "faster than", "not shown faster")), words
                    assert "not significantly" not in words and words != "not faster than the original"
                else:
                    assert not words.startswith(("significantly faster", "faster than")), words


def test_a_candidate_at_085x_the_fastest_is_never_a_tie():
    # int8 at 8.5 ms, fp32 at 10 ms: 15% apart, but the intervals overlap on a noisy machine
    verdict = choose([_e("fp32", 10.0, spread=0.12), _e("int8", 8.5, spread=0.12)], _t(20.0), BACKENDS)
    assert verdict.chosen == "ort/fp32" and verdict.ties == ("ort/int8",)
    reason = verdict.reasons["ort/int8"]
    assert reason == ("not told apart from ort/fp32 (ort/int8 at 0.85x its latency; not told apart: their 95% "
                      "intervals overlap); the simpler precision ships")
    assert "tie" not in reason and "tied" not in verdict.why
    assert verdict.why == "not told apart on speed from ort/int8; the simpler precision ships"
    # too few runs to separate anything: said so, not called a tie
    verdict = choose([_e("fp32", 10.0, runs=5), _e("int8", 8.5, runs=5)], _t(20.0, runs=5), BACKENDS)
    assert "5 runs, under the 20 the rule needs" in verdict.reasons["ort/int8"]
    assert "tie" not in verdict.reasons["ort/int8"]
    # within 5% with separated intervals: that, and only that, is a tie
    verdict = choose([_e("fp32", 10.0), _e("int8", 9.7)], _t(20.0), BACKENDS)
    assert verdict.reasons["ort/int8"] == ("tie with ort/fp32 (ort/int8 at 0.97x its latency; a tie: under the 5% "
                                           "gain that counts); the simpler precision ships")
    assert verdict.why == "tied with ort/int8; the simpler precision ships"


def test_an_explicit_prune_never_gives_back_the_original():
    """--prune asked for a changed model: a pruned artefact slower than the original still ships, with a note."""
    verdict = choose([_e("fp32", 12.0), _e("int8", 14.0)], _t(10.0), BACKENDS, lossy="--prune 0.5")
    assert verdict.chosen == "ort/fp32" and verdict.faster_than_original is False
    assert verdict.why.endswith("shipped because --prune 0.5 was asked for")
    assert verdict.notes == ("ort/fp32 is slower than the original (12.000 ms vs 10.000 ms) but ships: --prune 0.5 "
                             "asked for a changed model, so the original is not a candidate",)
    assert choose([_e("fp32", 12.0)], _t(10.0), BACKENDS).chosen == ORIGINAL  # without the request it would


# -- when nothing met the budget: the policy on frozen values (dlopt.flow.select) ---------------------

def _candidate(key, status, drop=None, reason=""):
    from dlopt.report.data import Candidate

    backend, precision = key.split("/")
    score = None if drop is None else {"metric": "top-1 accuracy", "drop_pp": drop}
    return Candidate(backend, precision, status, reason=reason, score=score)


def test_the_original_is_the_floor_when_it_can_ship():
    from dlopt.flow.select import Verdict, original_floor

    nothing = Verdict(None, "no candidate met the budget")
    verdict, notes = original_floor(nothing, can_ship=True)
    assert verdict.chosen == ORIGINAL and verdict.why.endswith("the original model ships unchanged")
    assert notes == ["no optimised candidate met the accuracy budget and its checks; ort/original (the input "
                     "model, unchanged) ships instead"]
    assert original_floor(nothing, can_ship=False) == (nothing, [])
    chosen = Verdict("ort/fp32", "fastest")
    assert original_floor(chosen, can_ship=True) == (chosen, [])


def test_the_closest_scored_and_built_candidate_is_written_over_the_budget():
    import pytest

    from dlopt.core.errors import CompileError, ModelError
    from dlopt.flow.select import Verdict, closest_over_budget

    cands = [_candidate("ort/int8", Status.REJECTED, 4.0, "accuracy budget: ..."),
             _candidate("ort/fp16", Status.REJECTED, 1.5, "accuracy budget: ..."),
             _candidate("tvm/fp16", Status.REJECTED, 0.5, "accuracy budget: ..."),  # closest, but no artefact
             _candidate("openvino/fp32", Status.FAILED, None, "could not run")]
    out = closest_over_budget(Verdict(None, "none"), cands, {"ort/int8", "ort/fp16", "openvino/fp32"}, "cpu")
    assert (out.verdict.chosen, out.verdict.why) == ("ort/fp16", "closest to the budget; no candidate met it")
    assert out.closest.key == "ort/fp16" and [c.key for c in out.scored] == ["ort/int8", "ort/fp16"]
    assert out.notes == ("no candidate met the accuracy budget; ort/fp16 (closest) was written anyway",)
    met = closest_over_budget(Verdict("ort/fp32", "fastest"), cands, set(), "cpu")
    assert (met.verdict.chosen, met.closest, met.notes) == ("ort/fp32", None, ())
    with pytest.raises(CompileError, match=r"^no backend of target cpu produced a usable artefact "
                                           r"\(openvino/fp32: could not run\)$"):
        closest_over_budget(Verdict(None, "none"), cands[3:], {"openvino/fp32"}, "cpu")
    unsupported = [_candidate("ort/fp32", Status.UNSUPPORTED, None, "unsupported ops: Foo")]
    with pytest.raises(ModelError, match=r"^no backend of target cpu supports this model"):
        closest_over_budget(Verdict(None, "none"), unsupported, set(), "cpu")


def test_the_driver_plans_once_and_leaves_the_fallback_to_select():
    import ast
    from pathlib import Path

    source = (Path(__file__).resolve().parent.parent / "optimizer" / "flow" / "driver.py").read_text()
    calls = [n for n in ast.walk(ast.parse(source)) if isinstance(n, ast.Call) and getattr(n.func, "id", None) == "plan"]
    assert len(calls) == 1
    assert "closest to the budget" not in source and "ships unchanged" not in source


def test_a_tie_of_the_same_precision_and_backend_goes_to_the_smaller_loss():
    # two INT4 recipes on one backend, not told apart on speed: the one giving up less accuracy ships,
    # whatever their order; a loss never outranks a simpler precision
    a = Entry("ort/int4-a", "ort", "int4", Status.OK, _t(7.0), loss=30.3)
    b = Entry("ort/int4-b", "ort", "int4", Status.OK, _t(7.05), loss=21.6)
    for entries in ([a, b], [b, a]):
        verdict = choose(entries, _t(23.0), BACKENDS)
        assert verdict.chosen == "ort/int4-b" and verdict.ties == ("ort/int4-a",)
        assert verdict.why.endswith("the smaller accuracy loss ships")
        assert verdict.reasons["ort/int4-a"].endswith("the smaller accuracy loss ships")
    int8 = Entry("ort/int8", "ort", "int8", Status.OK, _t(7.02), loss=0.4)
    verdict = choose([a, b, int8], _t(23.0), BACKENDS)
    assert verdict.chosen == "ort/int8" and verdict.why.endswith("the simpler precision ships")
