"""Energy per inference, always labelled "measured" (a sensor read here) or "estimated".

A sensor is read only when the target runs on this machine (``measure_here``):
Linux RAPL package counters, NVIDIA NVML for GPU targets, or a Jetson's INA3221
rails.  Otherwise, or when no sensor is readable or the timed window is too short
for its resolution, the target profile's power model estimates the draw from how
many cores were busy.  The result always says which of the two it is and why.
"""

from __future__ import annotations

import os
import re
import threading
import time
from pathlib import Path
from typing import Any

from dlopt.core.profiles import DeviceKind

POWERCAP, HWMON, INA3221_IIO = Path("/sys/class/powercap"), Path("/sys/class/hwmon"), Path("/sys/bus/i2c/drivers")
# Counters tick every ~1 ms (RAPL) to ~100 ms (NVML, sampled rails): shorter windows read as noise.
MIN_WINDOW_S = 0.05
SAMPLE_PERIOD_S = 0.01
NO_SENSOR = "; no sensor used: "  # joins an estimate's source and why no sensor was read


def _read_int(path: Path) -> int:
    return int(path.read_text().strip())


# -- sensors: start() then stop() -> joules over the window ---------------------------------------
class _Rapl:
    def __init__(self, domains: list[Path]) -> None:
        self.domains = domains
        names = [(d / "name").read_text().strip() for d in domains]
        self.source = "RAPL " + names[0] + "".join("+" + n.removeprefix("package-") for n in names[1:])

    def start(self) -> None:
        self.before = [_read_int(d / "energy_uj") for d in self.domains]

    def stop(self) -> float:
        total = 0
        for domain, before in zip(self.domains, self.before, strict=True):
            delta = _read_int(domain / "energy_uj") - before
            if delta < 0:  # the counter wrapped around
                delta += _read_int(domain / "max_energy_range_uj")
            total += delta
        return total / 1e6


def _rapl_domains() -> tuple[list[Path], str]:
    """Readable package domains, or [] and why not."""
    if not POWERCAP.is_dir():
        return [], f"{POWERCAP} does not exist (no powercap driver)"
    found = [d for d in sorted(POWERCAP.glob("intel-rapl:*")) if re.fullmatch(r"intel-rapl:\d+", d.name)]
    packages = [d for d in found if (d / "name").is_file() and (d / "name").read_text().startswith("package")]
    if not packages:
        return [], "no RAPL package domain under " + str(POWERCAP)
    try:
        for d in packages:
            _read_int(d / "energy_uj")
    except (OSError, ValueError) as exc:
        why = f"{exc.__class__.__name__}; root only since Linux 5.10"
        return [], f"{packages[0] / 'energy_uj'} is not readable ({why})"
    return packages, ""


class _Sampled:
    """Integrates a power reading (watts) sampled in a thread over the window."""

    def __init__(self, read_watts, source: str) -> None:
        self.read_watts, self.source = read_watts, source

    def start(self) -> None:
        self.samples = [self.read_watts()]
        self.started = time.perf_counter()
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._sample, name="dlopt-power", daemon=True)
        self.thread.start()

    def _sample(self) -> None:
        while not self.done.wait(SAMPLE_PERIOD_S):
            self.samples.append(self.read_watts())

    def stop(self) -> float:
        self.done.set()
        self.thread.join()
        self.samples.append(self.read_watts())
        return sum(self.samples) / len(self.samples) * (time.perf_counter() - self.started)


class _NvmlCounter:
    def __init__(self, nvml, handle, index: int) -> None:
        self.nvml, self.handle, self.source = nvml, handle, f"NVML GPU {index} energy counter"

    def start(self) -> None:
        self.before = self.nvml.nvmlDeviceGetTotalEnergyConsumption(self.handle)

    def stop(self) -> float:
        return (self.nvml.nvmlDeviceGetTotalEnergyConsumption(self.handle) - self.before) / 1e3  # mJ


def _nvml_sensor() -> tuple[Any, str]:
    try:
        import pynvml as nvml  # nvidia-ml-py
    except ImportError:
        return None, "pynvml is not installed (pip install nvidia-ml-py)"
    try:
        nvml.nvmlInit()
        index = int((os.environ.get("CUDA_VISIBLE_DEVICES") or "0").split(",")[0])
        handle = nvml.nvmlDeviceGetHandleByIndex(index)
    except (nvml.NVMLError, ValueError) as exc:
        return None, f"NVML unusable: {exc}"
    try:
        nvml.nvmlDeviceGetTotalEnergyConsumption(handle)
        return _NvmlCounter(nvml, handle, index), ""
    except nvml.NVMLError:  # pre-Volta: no energy counter, sample the power reading instead
        try:
            nvml.nvmlDeviceGetPowerUsage(handle)
        except nvml.NVMLError as exc:
            return None, f"NVML GPU {index} reports no power: {exc}"
        return _Sampled(lambda: nvml.nvmlDeviceGetPowerUsage(handle) / 1e3, f"NVML GPU {index} sampled power"), ""


def _ina3221_rails() -> tuple[dict[str, Any], str]:
    """Jetson rails as {label: () -> watts}: hwmon (L4T 34+) or the older ina3221x iio driver."""
    rails: dict[str, Any] = {}
    for hw in sorted(HWMON.glob("hwmon*")) if HWMON.is_dir() else []:
        if (hw / "name").is_file() and (hw / "name").read_text().strip() == "ina3221":
            for volts in sorted(hw.glob("in[0-9]_input")):
                n = volts.name[2]
                amps, label = hw / f"curr{n}_input", hw / f"in{n}_label"
                if amps.is_file():
                    name = label.read_text().strip() if label.is_file() else f"{hw.name}/rail{n}"
                    rails[name] = lambda v=volts, a=amps: _read_int(v) * _read_int(a) / 1e6  # mV * mA
    for power in sorted(INA3221_IIO.glob("ina3221*/*/iio:device*/in_power[0-9]_input")):
        label = power.with_name(f"rail_name_{power.name[8]}")
        name = label.read_text().strip() if label.is_file() else str(power)
        rails[name] = lambda p=power: _read_int(p) / 1e3  # mW
    if not rails:
        return {}, "no INA3221 rails (not a Jetson)"
    try:
        for read in rails.values():
            read()
    except (OSError, ValueError) as exc:
        return {}, f"INA3221 rails are not readable ({exc.__class__.__name__})"
    return rails, ""


def _ina3221_sensor() -> tuple[Any, str]:
    rails, why = _ina3221_rails()
    if not rails:
        return None, why
    # The board's input rail (VDD_IN, POM_5V_IN, VIN_SYS_5V0) already includes every other rail.
    total = [n for n in rails if re.search(r"^VIN|(^|_)IN$", n)]
    chosen = total[:1] or list(rails)
    return _Sampled(lambda: sum(rails[n]() for n in chosen), "INA3221 " + "+".join(chosen)), ""


def sensor_status() -> dict[str, dict[str, Any]]:
    """Which power sensors this machine has, whether dlopt can read them, and why not."""
    domains, rapl_why = _rapl_domains()
    nvml, nvml_why = _nvml_sensor()
    rails, ina_why = _ina3221_rails()
    return {
        "RAPL": {"readable": bool(domains), "detail": rapl_why or ", ".join(d.name for d in domains)},
        "NVML": {"readable": nvml is not None, "detail": nvml_why or nvml.source},
        "INA3221": {"readable": bool(rails), "detail": ina_why or ", ".join(rails)},
    }


def _pick_sensor(profile) -> tuple[Any, str]:
    """The best readable sensor for ``profile`` on this machine, or None and why none is used."""
    reasons = []
    for name in (("INA3221", "NVML") if profile.device is DeviceKind.GPU else ("RAPL", "INA3221")):
        if name == "RAPL":
            domains, why = _rapl_domains()
            sensor = _Rapl(domains) if domains else None
        else:
            sensor, why = _nvml_sensor() if name == "NVML" else _ina3221_sensor()
        if sensor is not None:
            return sensor, ""
        reasons.append(f"{name}: {why}")
    return None, "; ".join(reasons)


class EnergyMeter:
    """Wraps the timed inferences; ``result()`` gives joules per inference with its label.

    ``measure_here`` must be true only when the target is this machine: a sensor
    here says nothing about a Raspberry Pi's draw.
    """

    def __init__(self, profile, *, measure_here: bool) -> None:
        self.profile = profile
        self.sensor, self.why_estimated = _pick_sensor(profile) if measure_here else (None, "")
        self.joules: float | None = None
        # Wall and process-CPU seconds of the with-block: result(runs, meter.window_s, meter.cpu_s).
        self.window_s: float | None = None
        self.cpu_s: float | None = None

    def __enter__(self) -> "EnergyMeter":
        if self.sensor is not None:
            try:
                self.sensor.start()
            except Exception as exc:  # noqa: BLE001 - any sensor failure falls back to the estimate
                self.sensor, self.why_estimated = None, f"{self.sensor.source} failed: {exc.__class__.__name__}"
        self._start, self._cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc_info) -> None:
        self.window_s, self.cpu_s = time.perf_counter() - self._start, time.process_time() - self._cpu
        if self.sensor is not None:
            try:
                self.joules = self.sensor.stop()
            except Exception as exc:  # noqa: BLE001 - a sensor vanishing mid-run must not lose the latency figures
                self.why_estimated = f"{self.sensor.source} failed: {exc.__class__.__name__}"

    def result(self, runs: int, wall_seconds: float, cpu_seconds: float) -> dict[str, Any]:
        if self.window_s is None:
            raise RuntimeError("EnergyMeter.result() is available after the with-block")
        if runs < 1 or not wall_seconds > 0:
            raise ValueError(f"need runs >= 1 and wall_seconds > 0, got {runs} and {wall_seconds}")
        if self.sensor is not None and self.joules is not None:
            if self.window_s >= MIN_WINDOW_S and self.joules > 0:
                return {"joules_per_inference": _sig(self.joules / runs), "kind": "measured",
                        "source": self.sensor.source, "watts": round(self.joules / self.window_s, 3)}
            self.why_estimated = (f"{self.sensor.source}: window of {self.window_s * 1e3:.1f} ms is under "
                                  f"the {MIN_WINDOW_S * 1e3:.0f} ms it resolves")
        return estimate(self.profile, runs, wall_seconds, cpu_seconds, why=self.why_estimated)


def estimate(profile, runs: int, wall_seconds: float, cpu_seconds: float, *, why: str = "") -> dict[str, Any]:
    """The power model: idle + per busy core (+ the accelerator on GPU targets), over the wall time."""
    power = profile.power
    busy = min(max(cpu_seconds / wall_seconds, 0.0), float(os.cpu_count() or 1))
    watts = power.idle_watts + power.watts_per_busy_core * busy
    text = f"{power.idle_watts:.1f} W idle + {power.watts_per_busy_core:.1f} W x {busy:.2f} busy cores"
    if profile.device is DeviceKind.GPU:
        watts += power.accelerator_watts
        text += f" + {power.accelerator_watts:.1f} W accelerator"
    source = f"estimated (power model of {profile.name}: {text})" + (f"{NO_SENSOR}{why}" if why else "")
    return {"joules_per_inference": _sig(watts * wall_seconds / runs), "kind": "estimated",
            "source": source, "watts": round(watts, 3)}


def _sig(value: float) -> float:
    """Four significant digits: more would claim a precision no meter or model has."""
    return float(f"{value:.4g}")


class EnergyAccount:
    """Energy of one runner timed in interleaved blocks: the meter wraps each block, totals add up."""

    def __init__(self, profile, *, measure_here: bool) -> None:
        self.meter = EnergyMeter(profile, measure_here=measure_here)
        self.joules: float | None = 0.0 if self.meter.sensor is not None else None
        self.window_s = self.cpu_s = 0.0

    def __enter__(self) -> "EnergyAccount":
        self.meter.__enter__()
        return self

    def __exit__(self, *exc_info) -> None:
        self.meter.__exit__(*exc_info)
        self.window_s += self.meter.window_s
        self.cpu_s += self.meter.cpu_s
        if self.joules is not None:
            self.joules = None if self.meter.joules is None else self.joules + self.meter.joules
            self.meter.joules = None

    def result(self, runs: int) -> dict[str, Any]:
        """Joules per inference over every block (each inference at the declared timing shape)."""
        meter = self.meter
        meter.window_s, meter.cpu_s, meter.joules = self.window_s, self.cpu_s, self.joules
        return meter.result(runs, self.window_s, self.cpu_s)
