"""Build and run the C backend's sources: host gcc (a ctypes session), arm-none-eabi-gcc (sizes,
undefined symbols, stack), and a Cortex-M image under qemu-system-arm with semihosting.

The host build and the Cortex-M build compile the same files with the same float rules
(``-std=c99 -ffp-contract=off``: no fused multiply-add on either side), so their float
results agree bit for bit except where libm differs (expf/tanhf in Softmax/Sigmoid/Tanh).
"""

from __future__ import annotations

import ctypes
import re
import shutil
import subprocess
import tempfile
import weakref
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dlopt.core.errors import CompileError, TargetUnavailable
from dlopt.targets.c.codegen import _float

SOURCES = ("model.c", "dlopt_kernels.c")
COMMON_FLAGS = ("-std=c99", "-O2", "-ffp-contract=off", "-Wall", "-Wextra", "-Werror")
# -mfpu per core: the M4F has a single-precision FPv4, the M7 (single-precision variant) FPv5
CPU_FLAGS = {
    "cortex-m4": ("-mcpu=cortex-m4", "-mthumb", "-mfloat-abi=hard", "-mfpu=fpv4-sp-d16"),
    "cortex-m7": ("-mcpu=cortex-m7", "-mthumb", "-mfloat-abi=hard", "-mfpu=fpv5-sp-d16"),
}
QEMU_BOARDS = {"cortex-m4": ("mps2-an386", "cortex-m4"), "cortex-m7": ("mps2-an500", "cortex-m7")}
# What the objects may leave to the C library: memory functions and libm
ALLOWED_UNDEFINED = frozenset({"memcpy", "memset", "memmove", "expf", "tanhf", "rintf"})
FORBIDDEN = re.compile(r"malloc|calloc|realloc|free|tvm", re.IGNORECASE)
TIMEOUT = 120
NEWLIB = "libnewlib-arm-none-eabi"
# what arm-none-eabi-gcc prints when the C library (newlib) is not installed beside it
_NO_LIBC = re.compile(r"\b((?:string|stdint|stdlib|stdio|math)\.h: No such file"
                      r"|cannot read spec file '(?:nano|nosys)\.specs'|cannot find -lc(?:_nano)?\b)")


def _run(cmd: list[str], cwd: Path, what: str, timeout: int = TIMEOUT, *, stderr: bool = False) -> str:
    """stdout of ``cmd`` (with ``stderr``: its stderr, where qemu's semihosting console writes)."""
    try:
        done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        raise CompileError(f"{what} took over {timeout} s: {' '.join(cmd[:3])} ...") from exc
    if done.returncode != 0:
        missing = _NO_LIBC.search(done.stderr) if cmd[0].startswith("arm-none-eabi-") else None
        if missing:
            raise TargetUnavailable(f"{cmd[0]} has no C library ({missing.group(1)}): install newlib "
                                    f"(apt-get install {NEWLIB}) for Cortex-M sizes and the qemu check")
        detail = (done.stderr or done.stdout).strip().splitlines()
        raise CompileError(f"{what} failed ({cmd[0]}): {detail[0] if detail else 'exit ' + str(done.returncode)}")
    return done.stderr if stderr else done.stdout


def cpu_flags(mcpu: str) -> tuple[str, ...]:
    flags = CPU_FLAGS.get(mcpu)
    if flags is None:
        raise CompileError(f"no Cortex-M flags for -mcpu={mcpu}; the C backend knows {', '.join(CPU_FLAGS)}")
    return flags


# -- host ------------------------------------------------------------------------------------------

def build_host(folder: Path, out_dir: Path, defines: tuple[str, ...] = ()) -> Path:
    gcc = shutil.which("gcc") or shutil.which("cc")
    if gcc is None:
        raise TargetUnavailable("no host C compiler (gcc) to verify the C backend's sources; install gcc")
    lib = out_dir / "model_host.so"
    _run([gcc, *COMMON_FLAGS, *(f"-D{d}" for d in defines), "-fPIC", "-shared", *(str(folder / s) for s in SOURCES),
          "-o", str(lib), "-lm"],
         out_dir, "host build of the generated C")
    return lib


class HostSession:
    """The generated C compiled with the host gcc and called through ctypes, sample by sample."""

    def __init__(self, folder: Path, inputs: list[dict], outputs: list[dict], *, defines: tuple[str, ...] = ()) -> None:
        self._tmp = tempfile.mkdtemp(prefix="dlopt-c-host-")
        self._cleanup = weakref.finalize(self, shutil.rmtree, self._tmp, True)
        self._lib = ctypes.CDLL(str(build_host(folder, Path(self._tmp), defines)))
        self._fn = self._lib.dlopt_model_run
        self._fn.argtypes = [ctypes.c_void_p] * (len(inputs) + len(outputs))
        self._fn.restype = ctypes.c_int
        self._inputs, self._outputs = inputs, outputs
        self.input_names = [d["name"] for d in inputs]

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        arrays = [np.asarray(feeds[d["name"]], np.float32) for d in self._inputs]
        batch = arrays[0].shape[0] if arrays and arrays[0].ndim else 1
        results = [np.empty((batch, d["floats"]), np.float32) for d in self._outputs]
        for b in range(batch):
            ins = [np.ascontiguousarray(a[b] if a.ndim and a.shape[0] == batch else a, np.float32).reshape(-1)
                   for a in arrays]
            for a, d in zip(ins, self._inputs):
                if a.size != d["floats"]:
                    raise ValueError(f"input {d['name']} has {a.size} values per sample; the model takes {d['floats']}")
            outs = [np.empty(d["floats"], np.float32) for d in self._outputs]
            self._fn(*[a.ctypes.data for a in ins], *[o.ctypes.data for o in outs])
            for r, o in zip(results, outs):
                r[b] = o
        return [r.reshape((batch, *d["shape"][1:])) for r, d in zip(results, self._outputs)]

    def close(self) -> None:
        self._cleanup()


# -- Cortex-M objects -------------------------------------------------------------------------------

@dataclass(frozen=True)
class CrossBuild:
    sections: dict[str, int]  # section kind -> bytes, over both objects
    size_output: str  # arm-none-eabi-size (Berkeley) of the objects, as printed
    undefined: list[str]
    stack_bytes: int
    compiler: str
    objects: tuple[str, ...] = ()  # the objects measured: the qemu image links these, not a rebuild

    def to_dict(self) -> dict:
        return {"compiler": self.compiler, "sections": self.sections, "arm_none_eabi_size": self.size_output,
                "undefined_symbols": self.undefined, "stack_estimate_bytes": self.stack_bytes}


def cross_tools() -> bool | str:
    missing = [t for t in ("arm-none-eabi-gcc", "arm-none-eabi-size", "arm-none-eabi-nm", "arm-none-eabi-ld") if not shutil.which(t)]
    return True if not missing else (f"{', '.join(missing)} not installed "
                                     f"(apt-get install gcc-arm-none-eabi libnewlib-arm-none-eabi)")


def cross_compile(folder: Path, mcpu: str, build_dir: Path) -> CrossBuild:
    """Compile the sources for ``mcpu`` with -Wall -Wextra -Werror; sizes, undefined symbols, stack."""
    build_dir.mkdir(parents=True, exist_ok=True)
    objects = []
    for source in SOURCES:
        obj = build_dir / source.replace(".c", ".o")
        _run(["arm-none-eabi-gcc", *cpu_flags(mcpu), *COMMON_FLAGS, "-ffunction-sections", "-fdata-sections",
              "-fstack-usage", "-c", str(folder / source), "-o", str(obj)], build_dir,
             f"arm-none-eabi-gcc -mcpu={mcpu} -Wall -Werror build of {source}")
        objects.append(str(obj))
    sections = {"code": 0, "weights_rodata": 0, "data": 0, "bss": 0}
    for line in _run(["arm-none-eabi-size", "-A", *objects], build_dir, "arm-none-eabi-size").splitlines():
        parts = line.split()
        if len(parts) < 2 or not parts[1].isdigit():
            continue
        name, size = parts[0], int(parts[1])
        key = ("code" if name.startswith(".text") else "weights_rodata" if name.startswith(".rodata")
               else "data" if name.startswith(".data") else "bss" if name.startswith(".bss") else None)
        if key:
            sections[key] += size
    berkeley = _run(["arm-none-eabi-size", *[Path(o).name for o in objects]], build_dir, "arm-none-eabi-size")
    # one relocatable object of both, so the kernels model.o calls count as defined
    _run(["arm-none-eabi-ld", "-r", *objects, "-o", "dlopt_model_all.o"], build_dir, "arm-none-eabi-ld -r")
    undefined = sorted({line.split()[-1] for line in _run(["arm-none-eabi-nm", "-u", "dlopt_model_all.o"],
                                                          build_dir, "arm-none-eabi-nm").splitlines() if line.strip()})
    bad = [s for s in undefined if s not in ALLOWED_UNDEFINED or FORBIDDEN.search(s)]
    if bad:
        raise CompileError(f"the Cortex-M objects need symbols outside libm/libc memory functions: {', '.join(bad)}")
    return CrossBuild(sections, berkeley.strip(), undefined, _stack(build_dir), "arm-none-eabi-gcc " +
                      _run(["arm-none-eabi-gcc", "-dumpversion"], build_dir, "arm-none-eabi-gcc").strip(),
                      tuple(objects))


def _stack(build_dir: Path) -> int:
    """dlopt_model_run's frame plus the deepest kernel's (kernels are leaves but for libm calls)."""
    frames = {}
    for su in build_dir.glob("*.su"):
        for line in su.read_text().splitlines():
            parts = line.split("\t")
            if len(parts) >= 2 and parts[1].isdigit():
                frames[parts[0].rsplit(":", 1)[-1]] = int(parts[1])
    run = frames.pop("dlopt_model_run", 0)
    return run + max(frames.values(), default=0)


# -- qemu -------------------------------------------------------------------------------------------

def qemu_tools() -> bool | str:
    if cross_tools() is not True:
        return cross_tools()
    return True if shutil.which("qemu-system-arm") else "qemu-system-arm not installed (apt-get install qemu-system-arm)"


LINKER_SCRIPT = """MEMORY { FLASH (rx) : ORIGIN = 0x00000000, LENGTH = 4M
         RAM (rwx) : ORIGIN = 0x20000000, LENGTH = 4M }
ENTRY(Reset_Handler)
SECTIONS {
  .isr_vector : { KEEP(*(.isr_vector)) } > FLASH
  .text : { *(.text*) *(.rodata*) . = ALIGN(8); } > FLASH
  .ARM.exidx : { *(.ARM.exidx*) } > FLASH
  _sidata = LOADADDR(.data);
  .data : { _sdata = .; *(.data*) . = ALIGN(8); _edata = .; } > RAM AT > FLASH
  .bss : { _sbss = .; *(.bss*) *(COMMON) . = ALIGN(8); _ebss = .; } > RAM
  _estack = ORIGIN(RAM) + LENGTH(RAM);
}
"""

# Bare-metal start-up and a harness: FPU on, .data/.bss set up, SysTick counting emulated time
# (with -icount shift=0 one instruction is one nanosecond), each output printed as hex float bits
# through semihosting, then SYS_EXIT.
HARNESS = r"""#include <stdint.h>
#include <string.h>
#include "model.h"
#include "inputs.h"
extern uint32_t _estack, _sidata, _sdata, _edata, _sbss, _ebss;
#define SYST_CSR (*(volatile uint32_t *)0xE000E010)
#define SYST_RVR (*(volatile uint32_t *)0xE000E014)
#define SYST_CVR (*(volatile uint32_t *)0xE000E018)
static volatile uint32_t wraps;
static int sh_call(int op, const void *arg) {
    register int r0 __asm__("r0") = op;
    register const void *r1 __asm__("r1") = arg;
    __asm__ volatile("bkpt 0xab" : "+r"(r0) : "r"(r1) : "memory");
    return r0;
}
static void put(const char *s) { sh_call(0x04, s); }
static void sh_exit(uint32_t reason) { sh_call(0x18, (const void *)reason); for (;;) {} } /* AArch32: reason in r1 */
static void hex(uint32_t v, char *at) { for (int i = 7; i >= 0; --i) { at[i] = "0123456789abcdef"[v & 15]; v >>= 4; } }
static uint64_t ticks(void) {
    uint32_t w, c;
    do { w = wraps; c = SYST_CVR; } while (w != wraps);
    return (uint64_t)w * 0x1000000u + (0xFFFFFFu - c);
}
void SysTick_Handler(void) { ++wraps; }
static float out[DLOPT_HARNESS_OUT_FLOATS];
int main(void) {
    char line[24];
    /* calibration: a loop of 2,000,000 instructions, timed the same way */
    uint64_t c0 = ticks();
    __asm__ volatile("mov r2, %0\n1:\n\tsubs r2, r2, #1\n\tbne 1b" : : "r"(1000000) : "r2", "cc");
    uint64_t c1 = ticks();
    hex((uint32_t)(c1 - c0), line); line[8] = '\n'; line[9] = 0; put("calib "); put(line);
    for (int s = 0; s < DLOPT_HARNESS_SAMPLES; ++s) {
        uint64_t t0 = ticks();
        DLOPT_HARNESS_CALL;
        uint64_t t1 = ticks();
        for (int i = 0; i < DLOPT_HARNESS_OUT_FLOATS; ++i) {
            uint32_t bits; memcpy(&bits, &out[i], 4); hex(bits, line); line[8] = ' '; line[9] = 0; put(line);
        }
        hex((uint32_t)((t1 - t0) >> 32), line); hex((uint32_t)(t1 - t0), line + 8);
        line[16] = '\n'; line[17] = 0; put("ticks "); put(line);
    }
    return 0;
}
void Reset_Handler(void) {
    *(volatile uint32_t *)0xE000ED88 |= (0xFu << 20); /* CPACR: full access to CP10/CP11 (the FPU) */
    __asm__ volatile("dsb\n\tisb");
    memcpy(&_sdata, &_sidata, (size_t)((char *)&_edata - (char *)&_sdata));
    memset(&_sbss, 0, (size_t)((char *)&_ebss - (char *)&_sbss));
    SYST_RVR = 0xFFFFFFu; SYST_CVR = 0; SYST_CSR = 7; /* processor clock, interrupt, enable */
    while (SYST_CVR == 0) {} /* the first reload is not a wrap */
    sh_exit(main() == 0 ? 0x20026u : 0x20023u);
}
void Fault_Handler(void) { put("fault\n"); sh_exit(0x20023u); }
__attribute__((section(".isr_vector"), used)) static void (*const vectors[16])(void) = {
    (void (*)(void))&_estack, Reset_Handler, Fault_Handler, Fault_Handler, Fault_Handler, Fault_Handler,
    Fault_Handler, 0, 0, 0, 0, Fault_Handler, Fault_Handler, 0, Fault_Handler, SysTick_Handler};
"""
CALIBRATION_INSNS = 2_000_000  # the harness's subs/bne loop


def run_qemu(folder: Path, mcpu: str, samples: list[list[np.ndarray]], inputs: list[dict], outputs: list[dict],
             build_dir: Path, objects: tuple[str, ...] = ()) -> tuple[list[list[np.ndarray]], list[int]]:
    """Outputs of the Cortex-M image under qemu for each sample, and instructions per run (±40).

    ``objects``: the library's objects as ``cross_compile`` built (and measured) them; without them
    the sources are compiled into the image."""
    board, cpu = QEMU_BOARDS[mcpu]
    build_dir.mkdir(parents=True, exist_ok=True)
    arrays = []
    for k, d in enumerate(inputs):
        values = np.stack([np.asarray(s[k], np.float32).reshape(-1) for s in samples])
        rows = ["{" + ", ".join(_float(float(v)) for v in row) + "}" for row in values]
        arrays.append(f"static const float dl_in{k}[{len(samples)}][{d['floats']}] = {{\n" + ",\n".join(rows) + "\n};")
    total_out = sum(d["floats"] for d in outputs)
    offsets = np.cumsum([0] + [d["floats"] for d in outputs])
    call = "dlopt_model_run(" + ", ".join([f"dl_in{k}[s]" for k in range(len(inputs))]
                                         + [f"out + {offsets[k]}" for k in range(len(outputs))]) + ")"
    (build_dir / "inputs.h").write_text(
        f"#define DLOPT_HARNESS_SAMPLES {len(samples)}\n#define DLOPT_HARNESS_OUT_FLOATS {total_out}\n"
        f"#define DLOPT_HARNESS_CALL {call}\n" + "\n".join(arrays) + "\n")
    (build_dir / "harness.c").write_text(HARNESS)
    (build_dir / "link.ld").write_text(LINKER_SCRIPT)
    elf = build_dir / "image.elf"
    _run(["arm-none-eabi-gcc", *cpu_flags(mcpu), *COMMON_FLAGS, "-Wno-unused-function", "-nostartfiles",
          "--specs=nano.specs", "--specs=nosys.specs", "-ffunction-sections", "-fdata-sections",
          "-Wl,--gc-sections", "-T", "link.ld", f"-I{folder}", f"-I{build_dir}", "harness.c",
          *(objects or [str(folder / s) for s in SOURCES]), "-lm", "-o", str(elf)], build_dir, "linking the qemu image")
    text = _run(["qemu-system-arm", "-M", board, "-cpu", cpu, "-display", "none", "-monitor", "none",
                 "-serial", "null", "-icount", "shift=0", "-semihosting-config", "enable=on,target=native",
                 "-kernel", str(elf)], build_dir, f"qemu-system-arm -M {board}", stderr=True)
    results, ticks = [], []
    words: list[str] = []
    calib = 0
    tokens = iter(text.split())
    for token in tokens:
        if token == "calib":
            calib = int(next(tokens, "0"), 16)
        elif token == "ticks":
            flat = np.array([int(w, 16) for w in words], np.uint32).view(np.float32)
            results.append([flat[offsets[k]:offsets[k + 1]].reshape(d["shape"]) for k, d in enumerate(outputs)])
            ticks.append(int(next(tokens, "0"), 16))
            words = []
        else:
            words.append(token)
    # -icount shift=0: emulated time is one ns per instruction; the calibration loop converts ticks
    counts = [round(t * CALIBRATION_INSNS / calib) for t in ticks] if calib else []
    if len(results) != len(samples):
        raise CompileError(f"the qemu run printed {len(results)} of {len(samples)} results: {text[-200:]!r}")
    return results, counts
