"""Target profiles: every per-target fact lives in this one table.

A profile says what a target *is* (ISA, triple, CPU, GPU arch), which backends
may build for it in order of preference, which precisions make sense there, the
cross toolchain a build needs and a simple power model for energy estimates.
Code elsewhere asks the profile instead of testing target names.
"""

from __future__ import annotations

import enum
import functools
import os
import platform
import shutil
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from dlopt.core.errors import ConfigError, first_line
from dlopt.core.toml_file import read_toml


@dataclass(frozen=True)
class PowerModel:
    """Estimate of power draw when no sensor exists: idle watts plus watts per busy core."""

    idle_watts: float
    watts_per_busy_core: float
    accelerator_watts: float = 0.0


class DeviceKind(str, enum.Enum):
    """What a target is: a CPU, a GPU (with its host CPU) or a microcontroller."""

    CPU = "cpu"
    GPU = "gpu"
    MCU = "mcu"

    # printed, formatted and repr'd as its value: reports, messages and the artefact cache key say "cpu"
    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)

    def __repr__(self) -> str:
        return repr(self.value)


@dataclass(frozen=True)
class TargetProfile:
    name: str
    description: str
    device: DeviceKind  # given as "cpu", "gpu" or "mcu"
    arch: str  # "x86_64", "aarch64", "armv7e-m", ...
    triple: str
    backends: tuple[str, ...]
    precisions: tuple[str, ...]
    mcpu: str | None = None
    cuda_arch: str | None = None
    cross_compiler: str | None = None
    power: PowerModel = field(default_factory=lambda: PowerModel(10.0, 15.0))
    int8_symmetric: bool = False  # symmetric int8 activations (TensorRT, GPUs) instead of uint8
    cpu_flags: tuple[str, ...] = ()  # /proc/cpuinfo flags the host needs to run these artefacts
    host_native: bool = False  # "this machine", whatever it is
    # CPU cores of the board: the thread count written into artefacts built for it.  None where
    # the target does not fix one (a generic arm64, a GPU host): the requested count is kept.
    cores: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "device", DeviceKind(self.device))

    def runs_here(self) -> bool:
        """True when artefacts for this target can be executed and timed on this host."""
        if self.host_native:
            return True
        return (
            self.device is DeviceKind.CPU
            and self.arch == host_arch()
            and set(self.cpu_flags) <= _host_cpu_flags()
        )

    def cross_toolchain(self) -> bool | str:
        """True when a build for this target needs no cross compiler or finds it on PATH, else what is
        missing and the line that installs it (the one answer `dlopt targets` and the compile give)."""
        if self.arch == host_arch():
            return True
        if not self.cross_compiler:
            return f"no cross compiler for {self.arch}: set cross_compiler in a TOML target"
        if shutil.which(self.cross_compiler):
            return True
        return f"{self.cross_compiler} missing ({install_line(self.cross_compiler)})"

    def int8_pairs_saturate(self) -> bool:
        """True where int8 kernels may add u8 x s8 pairs in 16 bits and saturate: x86 CPUs without VNNI
        (this host's flags when the target runs here, else the flags the target declares)."""
        flags = _host_cpu_flags() if self.runs_here() else frozenset(self.cpu_flags)
        return self.device is DeviceKind.CPU and self.arch == "x86_64" and not (_VNNI_FLAGS & flags)

    def threads_for(self, requested: int) -> tuple[int, str]:
        """Threads an artefact for this target should run with, and where that number came from.

        A target that runs here keeps ``requested`` (this host's count, or the user's);
        a device with known ``cores`` gets its own core count, never this host's.
        """
        if self.runs_here():
            return requested, "this host"
        if self.cores is not None:
            return self.cores, f"target {self.name}: {self.cores} cores"
        return requested, f"this host (target {self.name} states no cores; set cores in a TOML target)"


# Debian packages of the cross compilers the presets name (a bare-metal link needs newlib beside its gcc);
# another <triple>-gcc is Debian's gcc-<triple>.  The Makefile's system-deps installs these.
TOOLCHAIN_PACKAGES = {
    "aarch64-linux-gnu-gcc": ("gcc-aarch64-linux-gnu",),
    "arm-none-eabi-gcc": ("gcc-arm-none-eabi", "libnewlib-arm-none-eabi"),
}


def install_line(tool: str) -> str:
    """The command that installs ``tool`` on Debian or Ubuntu."""
    packages = TOOLCHAIN_PACKAGES.get(tool) or (f"gcc-{tool.removesuffix('-gcc')}",)
    return f"apt-get install {' '.join(packages)}"


def host_arch() -> str:
    machine = platform.machine().lower()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(machine, machine)


@functools.lru_cache(maxsize=1)
def _host_cpu_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith(("flags", "Features")):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


# int8 dot-product instructions that accumulate in 32 bits (no 16-bit saturation)
_VNNI_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})
_CPU_PRECISIONS = ("fp32", "fp16", "int8")
_GPU_PRECISIONS = ("fp32", "fp16", "int8")
_X86 = "x86_64-linux-gnu"
_A64 = "aarch64-linux-gnu"

PRESETS: dict[str, TargetProfile] = {
    p.name: p
    for p in (
        TargetProfile(
            "cpu", "this host's CPU, every CPU backend available", "cpu", host_arch(),
            f"{host_arch()}-linux-gnu", ("ort", "openvino", "tvm", "executorch"), _CPU_PRECISIONS,
            mcpu="native", power=PowerModel(10.0, 15.0), host_native=True,
        ),
        TargetProfile(
            "x86-avx2", "x86-64 CPU with AVX2 (Haswell and newer)", "cpu", "x86_64", _X86,
            ("ort", "openvino", "tvm"), _CPU_PRECISIONS, mcpu="haswell", cpu_flags=("avx2", "fma"),
            power=PowerModel(10.0, 15.0),
        ),
        TargetProfile(
            "x86-avx512", "x86-64 CPU with AVX-512 (Skylake-SP and newer)", "cpu", "x86_64", _X86,
            ("ort", "openvino", "tvm"), _CPU_PRECISIONS, mcpu="skylake-avx512", cpu_flags=("avx512f",),
            power=PowerModel(15.0, 12.0),
        ),
        TargetProfile(
            "intel-cpu", "Intel CPU, OpenVINO first", "cpu", "x86_64", _X86,
            ("openvino", "ort", "tvm"), _CPU_PRECISIONS, mcpu="skylake-avx512", cpu_flags=("avx512f",),
            power=PowerModel(15.0, 12.0),
        ),
        TargetProfile(
            "arm64", "generic 64-bit ARM Linux CPU (ARMv8-A, NEON)", "cpu", "aarch64", _A64,
            ("ort", "tvm", "executorch"), _CPU_PRECISIONS, mcpu="generic",
            cross_compiler="aarch64-linux-gnu-gcc", power=PowerModel(2.0, 1.5),
        ),
        TargetProfile(
            "rpi4", "Raspberry Pi 4 (Cortex-A72)", "cpu", "aarch64", _A64,
            ("ort", "tvm", "executorch"), _CPU_PRECISIONS, mcpu="cortex-a72",
            cross_compiler="aarch64-linux-gnu-gcc", power=PowerModel(2.7, 1.0), cores=4,
        ),
        TargetProfile(
            "rpi5", "Raspberry Pi 5 (Cortex-A76)", "cpu", "aarch64", _A64,
            ("ort", "tvm", "executorch"), _CPU_PRECISIONS, mcpu="cortex-a76",
            cross_compiler="aarch64-linux-gnu-gcc", power=PowerModel(3.0, 1.6), cores=4,
        ),
        # Cores of the AGX Orin 64GB (12); the Orin NX 16GB has 8 and the Nano 6: a TOML target
        # with base = "jetson-orin" and its own cores serves those.
        TargetProfile(
            "jetson-orin", "NVIDIA Jetson AGX Orin (12x Cortex-A78AE + sm_87)", "gpu", "aarch64", _A64,
            ("tensorrt", "tvm", "ort"), _GPU_PRECISIONS, mcpu="cortex-a78ae", cuda_arch="sm_87",
            cross_compiler="aarch64-linux-gnu-gcc", power=PowerModel(5.0, 1.5, 15.0), int8_symmetric=True,
            cores=12,
        ),
        TargetProfile(
            "jetson-nano", "NVIDIA Jetson Nano (Cortex-A57 + sm_53)", "gpu", "aarch64", _A64,
            ("tensorrt", "tvm", "ort"), ("fp32", "fp16"), mcpu="cortex-a57", cuda_arch="sm_53",
            cross_compiler="aarch64-linux-gnu-gcc", power=PowerModel(1.5, 1.0, 5.0), int8_symmetric=True,
            cores=4,
        ),
        TargetProfile(
            "nvidia-gpu", "NVIDIA data-centre or desktop GPU on x86-64", "gpu", "x86_64", _X86,
            ("tensorrt", "ort", "tvm"), _GPU_PRECISIONS, cuda_arch="sm_80",
            power=PowerModel(30.0, 10.0, 250.0), int8_symmetric=True,
        ),
        TargetProfile(
            "cortex-m4", "ARM Cortex-M4F microcontroller", "mcu", "armv7e-m", "thumbv7em-none-eabihf",
            ("c",), ("int8", "fp32"), mcpu="cortex-m4",
            cross_compiler="arm-none-eabi-gcc", power=PowerModel(0.01, 0.03),
        ),
        TargetProfile(
            "cortex-m7", "ARM Cortex-M7 microcontroller", "mcu", "armv7e-m", "thumbv7em-none-eabihf",
            ("c",), ("int8", "fp32"), mcpu="cortex-m7",
            cross_compiler="arm-none-eabi-gcc", power=PowerModel(0.02, 0.1),
        ),
    )
}

ALIASES = {"jetson": "jetson-orin"}

# A user's own targets: ``[targets.NAME]`` tables in this file (or the one named by
# ``DLOPT_TARGETS``), each optionally ``base = "<preset>"`` and overriding its fields.
USER_FILE = "dlopt.toml"
_TUPLE_FIELDS = ("backends", "precisions", "cpu_flags")


def _user_file() -> Path | None:
    path = Path(os.environ.get("DLOPT_TARGETS", USER_FILE))
    return path if path.is_file() else None


def load_user_profiles(path: str | Path) -> dict[str, TargetProfile]:
    """Target profiles from ``[targets.NAME]`` tables of a TOML file; ConfigError on bad entries."""
    path = Path(path)
    data = read_toml(path, f"targets from {path}")
    table = data.get("targets", {})
    if not isinstance(table, dict):
        raise ConfigError(f"{path}: [targets] must be a table of target tables")
    known = {f.name for f in fields(TargetProfile)} | {"base"}
    profiles = {}
    for name, entry in table.items():
        if not isinstance(entry, dict):
            raise ConfigError(f"{path}: targets.{name} must be a table")
        unknown = sorted(set(entry) - known)
        if unknown:
            raise ConfigError(f"{path}: targets.{name} has unknown keys {unknown}; known: {sorted(known)}")
        entry = dict(entry)
        base_name = entry.pop("base", None)
        _check_entry_types(path, name, entry)
        try:
            if "power" in entry:
                entry["power"] = PowerModel(**entry["power"])
            for key in _TUPLE_FIELDS:
                if key in entry:
                    entry[key] = tuple(entry[key])
            if base_name is not None:
                base = PRESETS.get(ALIASES.get(base_name, base_name))
                if base is None:
                    raise ConfigError(f"{path}: targets.{name} has unknown base {base_name!r}")
                profiles[name] = replace(base, name=name, host_native=False, **entry)
            else:
                profiles[name] = TargetProfile(name=name, **entry)
        except TypeError as exc:
            raise ConfigError(f"{path}: targets.{name}: {first_line(exc)}") from exc
    return profiles


# TOML key -> (accepted types, what to say); a string where a list belongs would be split into letters.
_ENTRY_TYPES = {
    "base": ((str,), "a preset name"), "description": ((str,), "a string"), "device": ((str,), "a string"),
    "arch": ((str,), "a string"), "triple": ((str,), "a string"), "mcpu": ((str,), "a string"),
    "cuda_arch": ((str,), "a string"), "cross_compiler": ((str,), "a string"),
    "int8_symmetric": ((bool,), "true or false"), "host_native": ((bool,), "true or false"),
    "power": ((dict,), "a table of numbers"), "cores": ((int,), "a positive integer"),
    **{key: ((list,), "a list of strings") for key in _TUPLE_FIELDS},
}


def _check_entry_types(path: Path, name: str, entry: dict) -> None:
    for key, value in entry.items():
        types, what = _ENTRY_TYPES.get(key, ((object,), ""))
        if not isinstance(value, types):
            hint = f' (write {key} = ["{value}"])' if key in _TUPLE_FIELDS and isinstance(value, str) else ""
            raise ConfigError(f"{path}: targets.{name}.{key} must be {what}, got {value!r:.60}{hint}")
        if key in _TUPLE_FIELDS and not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{path}: targets.{name}.{key} must be a list of strings")
        if key == "device" and value not in {kind.value for kind in DeviceKind}:
            raise ConfigError(f"{path}: targets.{name}.device must be one of "
                              f"{', '.join(kind.value for kind in DeviceKind)}, got {value!r:.60}")
        if key == "cores" and (isinstance(value, bool) or value < 1):
            raise ConfigError(f"{path}: targets.{name}.cores must be a positive integer, got {value!r:.60}")
        if key == "power" and not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                      for v in value.values()):
            raise ConfigError(f"{path}: targets.{name}.power must hold numbers")


def all_profiles(user_file: str | Path | None = None) -> dict[str, TargetProfile]:
    """Presets plus the user's own targets (which may not shadow a preset)."""
    path = Path(user_file) if user_file else _user_file()
    user = load_user_profiles(path) if path else {}
    clash = sorted((set(user) & set(PRESETS)) | (set(user) & set(ALIASES)))
    if clash:
        raise ConfigError(f"{path}: targets {clash} would replace presets; give them another name")
    return {**PRESETS, **user}


def known_targets(user_file: str | Path | None = None) -> list[str]:
    return sorted([*all_profiles(user_file), *ALIASES])


def resolve_target(name: str, user_file: str | Path | None = None) -> TargetProfile:
    """Return the target called ``name`` (presets, aliases, user file) or raise a ConfigError listing them."""
    profiles = all_profiles(user_file)
    try:
        return profiles[ALIASES.get(name, name)]
    except KeyError:
        raise ConfigError(
            f"unknown target {name!r}; known targets: {', '.join(known_targets(user_file))}"
        ) from None
