"""The choice policy (dlopt.select) on constructed timings: the rule, not the machine."""

from dlopt.precisions import Status
from dlopt.select import MIN_GAIN, ORIGINAL, Entry, choose
from dlopt.timing import Timing

BACKENDS = ("ort", "openvino", "tvm")


def _t(p50, spread=0.01, cv=0.01):
    return Timing(p50, p50, p50, p50, p50 * (1 - spread), p50 * (1 + spread), cv, 100, 10, 2)


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
    assert verdict.reasons["openvino/int8"].startswith("not significantly faster than the original")


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
