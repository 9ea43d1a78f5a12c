"""Microcontroller backend: the model as a standalone C99 library for Cortex-M4/M7.

``compile`` writes model.c / model.h (one ``dlopt_model_run(const float *input, float *output)``,
weights as ``const`` arrays in flash, activations in one static arena), the kernels
(dlopt_kernels.c/.h), a Makefile, a CMake snippet and a README.  With arm-none-eabi-gcc
installed it cross-compiles them with -Wall -Wextra -Werror for the profile's core and
records flash and RAM per section (arm-none-eabi-size), the undefined symbols
(arm-none-eabi-nm -u: libm and memcpy only) and a stack estimate (-fstack-usage); with
qemu-system-arm it also runs a Cortex-M image of them on a few inputs and checks its
outputs equal the host build's.  ``load`` builds the same sources with the host gcc and
runs them through ctypes, so the compile flow verifies the C code's outputs and accuracy
against ONNX Runtime.  Nothing is timed: the microcontroller is not this machine.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import tempfile
from functools import lru_cache
from pathlib import Path

import numpy as np
import onnx_ir as ir

from dlopt.core.errors import CompileError, TargetUnavailable
from dlopt.core.graph_facts import op_label
from dlopt.core.model_io import save_ir
from dlopt.targets.base import Artifact, Backend

log = logging.getLogger(__name__)
name = "c"
ENTRY = "model.c"
SETTINGS_FILE = "c_build.json"
CODEGEN_VERSION = "1"
KERNEL_FILES = ("dlopt_kernels.c", "dlopt_kernels.h")
QEMU_SAMPLES = 3
REFERENCE = "reference.onnx"
INTEGRATION = "INTEGRATION.md"  # not README.md: a compile's output folder has its own


def available() -> bool | str:
    if not (shutil.which("gcc") or shutil.which("cc")):
        return "no host C compiler (gcc) to verify the generated C; install gcc"
    return True


@lru_cache(maxsize=1)
def runtime_version() -> str:
    def version(tool: str) -> str:
        if not shutil.which(tool):
            return "absent"
        done = subprocess.run([tool, "-dumpversion"], capture_output=True, text=True, check=False)
        return done.stdout.strip() or "unknown"

    cross = version("arm-none-eabi-gcc")
    if cross != "absent":  # a cached build without Cortex-M figures is not reused once newlib is installed
        found = subprocess.run(["arm-none-eabi-gcc", "-print-file-name=libc.a"], capture_output=True, text=True,
                               check=False).stdout.strip()
        cross += "" if Path(found).is_absolute() else " (no newlib)"
    return f"dlopt-c {CODEGEN_VERSION}, gcc {version('gcc')}, arm-none-eabi-gcc {cross}"


def precisions(profile) -> tuple[str, ...]:
    return ("fp32", "int8") if profile.device == "mcu" else ()


def supports(model) -> list[str]:
    from dlopt.targets.c.codegen import SUPPORTED_OPS

    missing = set()
    opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 13))
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        if node.op_type not in SUPPORTED_OPS or node.domain not in ("", "ai.onnx"):
            missing.add(op_label(node))
        elif node.op_type == "ReduceMean":
            missing.update(filter(None, [_reduce_mean_form(node, opset)]))
    return sorted(missing)


def _reduce_mean_form(node, opset: int) -> str | None:
    """A label for a ReduceMean the code generator would refuse (computed axes, axes that are not one
    block), or None; a shape known only at compile time is left to the generator."""
    from dlopt.core.errors import ModelError
    from dlopt.targets.c.codegen import mean_block

    attr = node.attributes.get("axes")
    axes = list(attr.as_ints()) if attr is not None else None
    if opset >= 18 and len(node.inputs) > 1 and node.inputs[1] is not None:
        if node.inputs[1].const_value is None:
            return "ReduceMean with computed axes"
        axes = [int(a) for a in node.inputs[1].const_value.numpy().reshape(-1)]
    shape = node.inputs[0].shape
    dims = [d if isinstance(d, int) else (1 if k == 0 else None) for k, d in enumerate(shape or ())]
    if shape is None or None in dims:
        return None
    try:
        mean_block(node.name, dims, axes)
    except ModelError:
        return f"ReduceMean over non-adjacent axes {axes}"
    return None


def build_options(config, model, profile, shapes) -> dict:
    """--max-ram / --max-flash (bytes) from the config; they enter the cache key so a cached
    build is checked against the limits it was asked for."""
    del model, profile, shapes
    limits = {k: getattr(config, k, None) for k in ("max_ram", "max_flash")}
    return {**{k: v for k, v in limits.items() if v is not None},
            **{f"cache:{k}": v for k, v in limits.items() if v is not None}}


def _support_files(mcpu: str) -> dict[str, str]:
    from dlopt.targets.c.verify import COMMON_FLAGS, cpu_flags

    flags = " ".join(cpu_flags(mcpu))
    common = " ".join(COMMON_FLAGS)
    makefile = (f"# Builds libdlopt_model.a for {mcpu}. Generated by dlopt.\n"
                f"CROSS ?= arm-none-eabi-\nCPUFLAGS ?= {flags}\n"
                f"CFLAGS ?= {common} -ffunction-sections -fdata-sections\n"
                "OBJS = model.o dlopt_kernels.o\n\n"
                "libdlopt_model.a: $(OBJS)\n\t$(CROSS)ar rcs $@ $^\n\n"
                "%.o: %.c model.h dlopt_kernels.h\n\t$(CROSS)gcc $(CPUFLAGS) $(CFLAGS) -c $< -o $@\n\n"
                "size: $(OBJS)\n\t$(CROSS)size $(OBJS)\n\n"
                "clean:\n\trm -f $(OBJS) libdlopt_model.a\n\n.PHONY: size clean\n")
    cmake = ("# include(dlopt_model.cmake) from your firmware's CMakeLists.txt, then link dlopt_model.\n"
             "add_library(dlopt_model STATIC ${CMAKE_CURRENT_LIST_DIR}/model.c ${CMAKE_CURRENT_LIST_DIR}/dlopt_kernels.c)\n"
             "target_include_directories(dlopt_model PUBLIC ${CMAKE_CURRENT_LIST_DIR})\n"
             "set_property(TARGET dlopt_model PROPERTY C_STANDARD 99)\n"
             "target_compile_options(dlopt_model PRIVATE -ffp-contract=off -ffunction-sections -fdata-sections)\n"
             "target_link_libraries(dlopt_model PUBLIC m)\n")
    return {"Makefile": makefile, "dlopt_model.cmake": cmake}


def _readme(settings: dict) -> str:
    from dlopt.targets.c.program import comment_text

    io_in, io_out = settings["inputs"], settings["outputs"]
    memory, figures = settings["memory"], settings.get("figures", {})
    lines = [
        f"# {settings['target']} model library ({settings['precision']})", "",
        "Plain C99 generated by dlopt: no operating system, no heap, no runtime library.", "",
        "```c", '#include "model.h"',
        *[f"static float {d['c_name']}[DLOPT_MODEL_{d['c_name'].upper()}_FLOATS];  /* {comment_text(d['name'])} "
          f"{d['shape']} */"
          for d in io_in + io_out],
        f"dlopt_model_run({', '.join(d['c_name'] for d in io_in + io_out)});", "```", "",
        "Inputs and outputs are float32 in ONNX (NCHW) order, batch 1. `dlopt_model_run` is not re-entrant: "
        "it uses one static arena.", "",
        "## Build", "",
        "- Make: `make` builds `libdlopt_model.a` with arm-none-eabi-gcc (`CROSS`, `CPUFLAGS` override it).",
        "- CMake: `include(path/to/dlopt_model.cmake)` then `target_link_libraries(app dlopt_model)`.",
        "- Any other build: compile `model.c` and `dlopt_kernels.c` with `-std=c99 -ffp-contract=off`, link libm.",
        "- INT8: `-DDLOPT_REQUANT_FLOAT` replaces TFLite's fixed-point requantisation by ONNX Runtime's float one "
        "(bit-identical to ONNX Runtime; adds the float scales to flash).", "",
        "## Memory", "",
        f"- activation arena: {memory['arena_bytes']} bytes (liveness lower bound {memory['liveness_lower_bound_bytes']}"
        f" bytes, {memory['over_lower_bound_pct']}% over)",
        f"- weights: {settings['weights_bytes']} bytes of const data",
    ]
    if figures:
        lines += [f"- flash: {figures['flash_bytes']} bytes (code {figures['code_bytes']} + const "
                  f"{figures['rodata_bytes']} + data {figures['data_bytes']})",
                  f"- RAM: {figures['ram_bytes']} bytes (arena/bss {figures['bss_bytes']} + data {figures['data_bytes']}"
                  f" + stack estimate {figures['stack_bytes']})", "",
                  "```", figures["arm_none_eabi_size"], "```"]
    elif settings.get("figures_unavailable"):
        lines.append(f"- flash and RAM not measured: {settings['figures_unavailable']}")
    qemu = settings.get("qemu")
    if isinstance(qemu, dict):
        lines += ["", f"Ran under qemu-system-arm -M {qemu['board']} on {qemu['samples']} inputs: outputs equal the "
                      f"host build's (max abs difference {qemu['max_abs_diff']}). Emulator instruction count per run "
                      f"(a proxy, not device latency): {qemu['instructions_per_run']}."]
    return "\n".join(lines) + "\n"


def compile(model, profile, workdir: Path, *, precision: str, threads: int, shapes=None,
            max_ram: int | None = None, max_flash: int | None = None) -> Artifact:
    from dlopt.targets.c import verify as c_verify
    from dlopt.targets.c.codegen import generate, prepare
    from dlopt.targets.c.kernels import HEADER, SOURCE

    del threads  # one core, no threads
    mcpu = profile.mcpu or "cortex-m7"
    gen = generate(prepare(ir.serde.serialize_model(model), shapes),
                   header_note=f" for {profile.name} ({precision})")
    workdir.mkdir(parents=True, exist_ok=True)
    files = {"model.c": gen.model_c, "model.h": gen.model_h, "dlopt_kernels.c": SOURCE, "dlopt_kernels.h": HEADER,
             **_support_files(mcpu)}
    for file, text in files.items():
        (workdir / file).write_text(text)
    reference = [f.name for f in save_ir(model, workdir / REFERENCE)]  # the graph the C computes, for ORT
    settings = {
        "target": profile.name, "mcpu": mcpu, "precision": precision, "codegen_version": CODEGEN_VERSION,
        "entry_point": "dlopt_model_run", "inputs": gen.inputs, "outputs": gen.outputs, "ops": gen.ops,
        "memory": gen.plan.to_dict(), "weights_bytes": gen.weights_bytes,
        "timing": f"not timed: the {profile.name} is not this machine; outputs verified with the host gcc build",
    }
    with tempfile.TemporaryDirectory(prefix="dlopt-c-") as tmp:
        tools, cross = c_verify.cross_tools(), None
        if tools is True:
            try:
                cross = c_verify.cross_compile(workdir, mcpu, Path(tmp) / "obj")
            except TargetUnavailable as exc:  # e.g. arm-none-eabi-gcc without newlib: keep the host-verified C
                tools = str(exc)
                log.warning("no Cortex-M sizes or qemu check: %s", exc)
        if cross is not None:
            s = cross.sections
            settings["figures"] = {
                "code_bytes": s["code"], "rodata_bytes": s["weights_rodata"], "data_bytes": s["data"],
                "bss_bytes": s["bss"], "stack_bytes": cross.stack_bytes,
                "flash_bytes": s["code"] + s["weights_rodata"] + s["data"],
                "ram_bytes": s["data"] + s["bss"] + cross.stack_bytes,
                **cross.to_dict(), "note": "the library's objects; libm functions it calls are not counted"}
        else:
            settings["figures_unavailable"] = str(tools)
        _check_limits(settings, gen, max_ram, max_flash)
        qemu_ok = c_verify.qemu_tools() if tools is True else tools
        if qemu_ok is True and mcpu in c_verify.QEMU_BOARDS:
            try:
                settings["qemu"] = _qemu_check(workdir, mcpu, gen, Path(tmp), cross.objects if cross else ())
            except TargetUnavailable as exc:  # newlib's libraries missing for the image's link
                settings["qemu_unavailable"] = str(exc)
                log.warning("no qemu check: %s", exc)
        else:
            settings["qemu_unavailable"] = str(qemu_ok) if qemu_ok is not True else f"no qemu board for {mcpu}"
    (workdir / INTEGRATION).write_text(_readme(settings))
    (workdir / SETTINGS_FILE).write_text(json.dumps(settings, indent=2) + "\n")
    names = [*files, *reference, INTEGRATION, SETTINGS_FILE]
    return Artifact(backend=name, precision=precision, folder=workdir, files=names, entry=ENTRY,
                    loadable_here=True, settings=settings)


def _check_limits(settings: dict, gen, max_ram: int | None, max_flash: int | None) -> None:
    figures = settings.get("figures")
    ram = figures["ram_bytes"] if figures else gen.plan.arena
    flash = figures["flash_bytes"] if figures else gen.weights_bytes
    basis = "arm-none-eabi-size" if figures else "arena and weights only (arm-none-eabi-gcc not installed)"
    if max_ram is not None and ram > max_ram:
        raise CompileError(f"the model needs {ram} bytes of RAM (arena {gen.plan.arena}, by {basis}), over "
                           f"--max-ram {max_ram}; the liveness lower bound is {gen.plan.lower_bound} bytes")
    if max_flash is not None and flash > max_flash:
        raise CompileError(f"the model needs {flash} bytes of flash (weights {gen.weights_bytes}, by {basis}), "
                           f"over --max-flash {max_flash}")


def _qemu_check(folder: Path, mcpu: str, gen, tmp: Path, objects: tuple[str, ...] = ()) -> dict:
    """Run a few seeded random inputs on the host build and under qemu; they must agree."""
    from dlopt.targets.c import verify as c_verify

    rng = np.random.default_rng(0)
    samples = [[rng.standard_normal(d["floats"]).astype(np.float32) for d in gen.inputs] for _ in range(QEMU_SAMPLES)]
    host = c_verify.HostSession(folder, gen.inputs, gen.outputs)
    try:
        expected = [host.run({d["name"]: x.reshape(1, *d["shape"][1:]) for d, x in zip(gen.inputs, s)})
                    for s in samples]
    finally:
        host.close()
    board = c_verify.QEMU_BOARDS[mcpu][0]
    got, counts = c_verify.run_qemu(folder, mcpu, samples, gen.inputs, gen.outputs, tmp / "qemu", objects)
    diff = max(float(np.max(np.abs(np.asarray(e, np.float32).reshape(-1) - np.asarray(g, np.float32).reshape(-1))))
               for exp, out in zip(expected, got) for e, g in zip(exp, out))
    if not diff <= 1e-5:
        raise CompileError(f"the Cortex-M image under qemu-system-arm -M {board} disagrees with the host build "
                           f"(max abs difference {diff:g})")
    return {"board": board, "samples": QEMU_SAMPLES, "inputs": "seeded standard normal", "max_abs_diff": diff,
            "instructions_per_run": counts,
            "instructions_note": "emulator instruction count (qemu -icount, SysTick resolution 40): a proxy, "
                                 "not device latency"}


def load(artifact: Artifact):
    from dlopt.targets.c.verify import HostSession

    return HostSession(artifact.folder, artifact.settings["inputs"], artifact.settings["outputs"])


class CBackend(Backend):
    name, entry, settings_file = name, ENTRY, SETTINGS_FILE
    available, runtime_version = staticmethod(available), staticmethod(runtime_version)
    precisions, supports = staticmethod(precisions), staticmethod(supports)
    build_options = staticmethod(build_options)
    compile, load = staticmethod(compile), staticmethod(load)

    def runs_with_dlopt(self, settings: dict) -> bool:
        return False  # dlopt.load runs the sources through the host's gcc; the device runs the firmware

    def install_lines(self, shipped: list, text) -> list[str]:
        return ["C sources for a microcontroller: nothing to install on the device; build `model.c` and "
                "`dlopt_kernels.c` into the firmware (see INTEGRATION.md). For the figures here: "
                "`apt-get install gcc-arm-none-eabi libnewlib-arm-none-eabi qemu-system-arm`"]


BACKEND = CBackend()
