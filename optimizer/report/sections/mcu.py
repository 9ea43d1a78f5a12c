"""A microcontroller build's figures (``candidates[].mcu``: arena and its liveness bound, flash/RAM, the qemu run).

One clause, written where a C candidate is verified (its reason) and in the summary line when it ships:
"4192 B flash, 1224 B RAM for cortex-m7 (arm-none-eabi-gcc 12.2.1); arena 1040 B (liveness lower bound 1040 B);
qemu mps2-an500 gave the host's outputs on 3 inputs ...".
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from dlopt.report.sections.base import Section

if TYPE_CHECKING:  # the gate's import of the sections loads no backend package
    from dlopt.targets.c.figures import McuFigures


def describe(mcu: "McuFigures") -> str:
    """One clause: flash, RAM, arena against its lower bound, and the emulator check."""
    text = f"arena {mcu.arena_bytes} B (liveness lower bound {mcu.liveness_lower_bound_bytes} B)"
    if mcu.flash_bytes is not None:
        text = f"{mcu.flash_bytes} B flash, {mcu.ram_bytes} B RAM for {mcu.mcpu} ({mcu.compiler}); " + text
    elif mcu.figures_unavailable:
        text += f"; no Cortex-M sizes: {mcu.figures_unavailable}"
    qemu = mcu.qemu
    if qemu:
        runs = qemu.instructions_per_run or []
        text += (f"; qemu {qemu.board} gave the host's outputs on {qemu.samples} inputs (max difference "
                 f"{qemu.max_abs_diff:.1e})" + (f", {max(runs):,} emulator instructions per run (a proxy, "
                                                f"not device latency)" if runs else ""))
    return text


def verified(mcu: "McuFigures") -> str:
    """A C candidate's reason when it was verified here."""
    return (f"C sources verified on this machine (host gcc build); {describe(mcu)}; a microcontroller "
            f"build is not timed here")


def shipped(mcu: "McuFigures") -> str:
    """The summary line's clause for a shipped microcontroller build."""
    return f"a microcontroller build, not timed: {describe(mcu)}"


class Mcu(Section):
    """Owns ``candidates[].mcu``; its clause is written into the candidate's reason and the summary line when the
    compile runs (dlopt.flow), so no table renders it again."""

    candidate_key = "mcu"
