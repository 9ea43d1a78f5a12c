"""The choice among measured candidates (constructed figures: the rule, not the machine)."""

from dlopt.driver import _choose
from dlopt.report import Candidate, Measurement


def _cand(precision, p50, status="ok", backend="ort"):
    latency = None if p50 is None else {"p50_ms": p50, "p90_ms": p50, "p99_ms": p50}
    return Candidate(backend, precision, status, measurement=Measurement(latency, 1000))


def test_auto_never_picks_int8_that_is_not_faster_than_fp32():
    fp32, int8, fp16 = _cand("fp32", 10.0), _cand("int8", 9.8), _cand("fp16", 12.0)
    chosen = _choose([fp32, int8, fp16], auto=True)
    assert chosen is fp32
    assert int8.status == "rejected" and "not faster than fp32" in int8.reason and "5%" in int8.reason
    assert fp16.status == "rejected" and "12.000 ms vs 10.000 ms" in fp16.reason


def test_auto_picks_the_fastest_that_pays():
    fp32, int8, mixed = _cand("fp32", 10.0), _cand("int8", 3.0), _cand("mixed", 4.0)
    assert _choose([fp32, int8, mixed], auto=True) is int8
    assert fp32.reason == "slower than ort/int8" and mixed.reason == "slower than ort/int8"


def test_rejected_for_accuracy_is_never_chosen():
    fp32, int8 = _cand("fp32", 10.0), _cand("int8", 2.0, status="rejected")
    assert _choose([fp32, int8], auto=True) is fp32


def test_explicit_precision_is_kept_even_when_slower():
    int8 = _cand("int8", 12.0)
    assert _choose([int8], auto=False) is int8


def test_untimed_target_uses_precision_preference():
    fp32, fp16, int8 = _cand("fp32", None), _cand("fp16", None), _cand("int8", None)
    chosen = _choose([fp32, fp16, int8], auto=True)
    assert chosen is int8 and "precision preference" in chosen.reason
