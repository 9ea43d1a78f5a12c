"""dlopt.measure.energy: the power-model estimate to the watt, labels, and real sensors where this machine has them."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest

from dlopt.measure.energy import MIN_WINDOW_S, EnergyMeter, estimate, sensor_status
from dlopt.core.profiles import resolve_target

SENSORS = sensor_status()
CPU_SENSOR = SENSORS["RAPL"]["readable"] or SENSORS["INA3221"]["readable"]


def _work(seconds: float) -> tuple[int, float, float]:
    """Real inferences-worth of work (matrix products) for about ``seconds``: runs, wall, cpu."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((128, 128)).astype(np.float32)
    runs, wall0, cpu0 = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - wall0 < seconds:
        a = np.tanh(a @ a)
        runs += 1
    return runs, time.perf_counter() - wall0, time.process_time() - cpu0


def test_estimate_is_the_power_model_for_given_numbers():
    cpu = resolve_target("cpu")  # 10 W idle + 15 W per busy core
    with EnergyMeter(cpu, measure_here=False) as meter:
        _work(0.01)
    busy = min(1.5, float(os.cpu_count()))
    result = meter.result(runs=10, wall_seconds=2.0, cpu_seconds=3.0)
    watts = 10.0 + 15.0 * busy
    assert result == {
        "joules_per_inference": pytest.approx(watts * 2.0 / 10, rel=1e-3),
        "kind": "estimated",
        "source": f"estimated (power model of cpu: 10.0 W idle + 15.0 W x {busy:.2f} busy cores)",
        "watts": watts,
    }
    if os.cpu_count() >= 2:
        assert result["joules_per_inference"] == 6.5 and result["watts"] == 32.5


def test_gpu_estimate_adds_the_accelerator_and_clamps_busy_cores():
    gpu = resolve_target("nvidia-gpu")  # 30 W idle + 10 W per core + 250 W accelerator
    result = estimate(gpu, runs=5, wall_seconds=0.5, cpu_seconds=0.5)
    assert (result["watts"], result["joules_per_inference"]) == (290.0, 29.0)
    assert result["source"].endswith("10.0 W x 1.00 busy cores + 250.0 W accelerator)")
    cores = os.cpu_count()
    assert estimate(gpu, 1, 1.0, 10_000.0)["watts"] == 30.0 + 10.0 * cores + 250.0  # no more cores than exist
    assert estimate(gpu, 1, 1.0, -1.0)["watts"] == 280.0
    rpi = estimate(resolve_target("rpi5"), runs=1000, wall_seconds=1.0, cpu_seconds=0.0)
    assert rpi["joules_per_inference"] == 0.003 and rpi["kind"] == "estimated"


def test_a_target_that_is_not_this_machine_is_never_measured_here():
    rpi5 = resolve_target("rpi5")
    with EnergyMeter(rpi5, measure_here=False) as meter:  # what a caller passes when not rpi5.runs_here()
        runs, wall, cpu = _work(0.06)
    result = meter.result(runs, wall, cpu)
    assert result == estimate(rpi5, runs, wall, cpu)
    assert result["source"].startswith("estimated (power model of rpi5: 3.0 W idle + 1.6 W x ")
    # the meter times its own window too, for callers that time nothing else
    assert wall <= meter.window_s < wall + 0.05 and 0 < meter.cpu_s
    assert meter.result(runs, meter.window_s, meter.cpu_s)["kind"] == "estimated"


@pytest.mark.skipif(CPU_SENSOR, reason="this machine has a readable CPU power sensor")
def test_without_a_readable_sensor_the_result_is_estimated_and_says_why():
    with EnergyMeter(resolve_target("cpu"), measure_here=True) as meter:
        runs, wall, cpu = _work(0.06)
    result = meter.result(runs, wall, cpu)
    assert result["kind"] == "estimated"
    assert result["source"].startswith("estimated (power model of cpu: 10.0 W idle + 15.0 W x ")
    assert f"RAPL: {SENSORS['RAPL']['detail']}" in result["source"]
    expected = estimate(resolve_target("cpu"), runs, wall, cpu)
    assert result["joules_per_inference"] == expected["joules_per_inference"]


def test_result_needs_the_window_closed_and_sane_numbers():
    meter = EnergyMeter(resolve_target("cpu"), measure_here=False)
    with pytest.raises(RuntimeError, match="after the with-block"):
        meter.result(1, 1.0, 1.0)
    with meter:
        pass
    with pytest.raises(ValueError, match="runs >= 1"):
        meter.result(0, 1.0, 1.0)
    with pytest.raises(ValueError, match="wall_seconds > 0"):
        meter.result(1, 0.0, 1.0)


def test_sensor_status_names_every_sensor_and_why():
    assert set(SENSORS) == {"RAPL", "NVML", "INA3221"}
    for name, status in SENSORS.items():
        assert isinstance(status["readable"], bool), name
        assert status["detail"], f"{name} gives no detail"
    if not os.path.isdir("/sys/class/powercap"):
        assert SENSORS["RAPL"] == {"readable": False,
                                   "detail": "/sys/class/powercap does not exist (no powercap driver)"}
    try:
        import pynvml  # noqa: F401
    except ImportError:
        assert SENSORS["NVML"]["detail"] == "pynvml is not installed (pip install nvidia-ml-py)"


@pytest.mark.skipif(not SENSORS["RAPL"]["readable"], reason=f"RAPL not readable here: {SENSORS['RAPL']['detail']}")
def test_rapl_measures_a_busy_loop():
    with EnergyMeter(resolve_target("cpu"), measure_here=True) as meter:
        runs, wall, cpu = _work(0.3)
    result = meter.result(runs, wall, cpu)
    assert result["kind"] == "measured" and result["source"].startswith("RAPL package-0")
    assert 0.5 < result["watts"] < 2000
    assert result["joules_per_inference"] == pytest.approx(result["watts"] * meter.window_s / runs, rel=1e-2)


@pytest.mark.skipif(not CPU_SENSOR, reason="no readable CPU power sensor here (RAPL/INA3221)")
def test_a_window_too_short_for_the_sensor_falls_back_to_the_estimate():
    with EnergyMeter(resolve_target("cpu"), measure_here=True) as meter:
        pass
    result = meter.result(1, 1e-4, 1e-4)
    assert result["kind"] == "estimated" and f"under the {MIN_WINDOW_S * 1e3:.0f} ms it resolves" in result["source"]


@pytest.mark.skipif(not SENSORS["NVML"]["readable"], reason=f"NVML not usable here: {SENSORS['NVML']['detail']}")
def test_nvml_measures_the_gpu():
    with EnergyMeter(resolve_target("nvidia-gpu"), measure_here=True) as meter:
        runs, wall, cpu = _work(0.5)
    result = meter.result(runs, wall, cpu)
    assert result["kind"] == "measured" and result["source"].startswith("NVML GPU")
    assert 1 < result["watts"] < 2000
