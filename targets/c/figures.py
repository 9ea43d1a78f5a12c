"""A microcontroller build's figures, as a compile's report keeps them: memory plan, flash/RAM, the qemu run.

Built from the C backend's settings (``c_build.json``); ``report.json`` writes them as the candidate's ``mcu``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

QEMU_KEYS = ("board", "samples", "max_abs_diff", "instructions_per_run", "instructions_note")


@dataclass(frozen=True)
class QemuRun:
    """The build run under qemu-system-arm against the host build's outputs."""

    board: str | None
    samples: int | None
    max_abs_diff: float | None
    instructions_per_run: list[int] | None  # a proxy for cost, not device latency
    instructions_note: str | None


@dataclass(frozen=True)
class McuFigures:
    mcpu: str | None
    arena_bytes: int | None
    liveness_lower_bound_bytes: int | None
    flash_bytes: int | None  # arm-none-eabi-size's, when the cross compiler is installed
    ram_bytes: int | None
    sections: dict | None
    stack_estimate_bytes: int | None
    compiler: str | None
    undefined_symbols: list[str] | None
    figures_unavailable: str | None  # why there are no Cortex-M sizes
    qemu: QemuRun | None

    @classmethod
    def from_settings(cls, settings) -> "McuFigures | None":
        """From the C backend's settings; None for any other build."""
        if not isinstance(settings, dict) or not isinstance(settings.get("memory"), dict):
            return None
        memory, figures, qemu = settings["memory"], settings.get("figures") or {}, settings.get("qemu") or {}
        return cls(settings.get("mcpu"), memory.get("arena_bytes"), memory.get("liveness_lower_bound_bytes"),
                   figures.get("flash_bytes"), figures.get("ram_bytes"), figures.get("sections"),
                   figures.get("stack_estimate_bytes"), figures.get("compiler"), figures.get("undefined_symbols"),
                   settings.get("figures_unavailable"), QemuRun(*(qemu.get(k) for k in QEMU_KEYS)) if qemu else None)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: "dict | McuFigures") -> "McuFigures":
        """From report.json's ``mcu`` (keys a report lacks are None; unknown ones ignored)."""
        if isinstance(data, McuFigures):
            return data
        values = {f.name: data.get(f.name) for f in fields(cls)}
        qemu = values["qemu"]
        values["qemu"] = QemuRun(*(qemu.get(k) for k in QEMU_KEYS)) if isinstance(qemu, dict) else qemu
        return cls(**values)
