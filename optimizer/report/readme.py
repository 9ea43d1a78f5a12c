"""README.md of an output folder: what is in it, how to install, run, verify and time it on the device.

``render_readme`` renders report.json and manifest.json together with the settings each
shipped candidate carries (session_options.json, runtime_config.json, tvm_build.json,
tensorrt_build.json), read from the folder.

Guarantees:

* Every file the "What is inside" table names exists in the folder.
* No latency or speedup is stated that report.json does not hold; for a target that is not
  the machine dlopt ran on, the README says that nothing was timed on the device yet.
* Versions, thread counts, providers and OpenVINO properties in the install lines and code
  are those of the candidates' own settings files.
* Text from the model or the user (model file name, target description, input names) is
  Markdown-escaped in prose; in code it is a Python literal (``repr``) inside a fence longer
  than any run of backticks in the block, so no name can close the block or become HTML.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from dlopt.device.device_check import DEVICE_REPORT, SCRIPT, VERIFY_FILE
from dlopt.report.gate import printable
from dlopt.core.inputs import MASK_NAME
from dlopt.report.data import escape_markdown
from dlopt.targets import get_backend

README = "README.md"
# apache-tvm-ffi 0.1.15 crashes when TVM writes JSON; pyproject.toml pins this release.
TVM_FFI_VERSION = "0.1.14.post1"
NVIDIA_PROVIDERS = frozenset({"TensorrtExecutionProvider", "CUDAExecutionProvider"})
_VERSION = re.compile(r"[A-Za-z0-9][A-Za-z0-9.+!_-]*")
_ENUM = re.compile(r"ORT_[A-Z_]+")
_PROPERTY = re.compile(r"[A-Z][A-Z0-9_]*")
# Files beside the candidates, in the order the README names them, and what each is for.
_OTHER_FILES = {
    "report.md": "how each candidate was built, checked and chosen (also report.html, report.json)",
    VERIFY_FILE: "a few evaluation inputs, the original model's outputs on them and each candidate's allowed error",
    SCRIPT: "verifies and times the candidates with only numpy and the runtime",
    DEVICE_REPORT: "what the last verification and timing on a device found",
    "manifest.json": "input hash, tool versions, options and layout of this folder",
}

@dataclass(frozen=True)
class _Shipped:
    """A candidate in the folder: where it is, its report row and the settings it ships with."""

    where: str  # "." or "bundle/<backend>-<precision>"
    row: dict
    settings: dict

    @property
    def backend(self) -> str:
        return self.row["backend"]

    @property
    def key(self) -> str:
        return f"{self.row['backend']}/{self.row['precision']}"

    def path(self, name: str) -> str:
        return name if self.where == "." else f"{self.where}/{name}"


def render_readme(report: dict, manifest: dict, folder: str | os.PathLike) -> str:
    """README.md of the output in ``folder`` (report.json's and manifest.json's dicts; see the module)."""
    folder = Path(folder)
    shipped = _shipped(report, manifest, folder)
    lines = [*_heading(report, manifest), *_inside(report, shipped, folder), *_install(manifest, shipped),
             *_run(report, shipped), *_verify(shipped)]
    return "\n".join(lines) + "\n"


# -- what is where ----------------------------------------------------------------------------------

def _shipped(report: dict, manifest: dict, folder: Path) -> list[_Shipped]:
    """The top-level candidate, then every bundle/ one in the manifest's order."""
    rows = {f"{c['backend']}/{c['precision']}": c for c in report.get("candidates", [])}
    places = [(_top_key(manifest), ".")]
    places += [(k, v) for k, v in (manifest.get("bundle") or {}).items() if isinstance(v, str)]
    shipped = []
    for key, where in places:
        row = rows.get(key)
        if row is None or not (folder / where).is_dir():
            continue
        files = manifest.get("files", []) if where == "." else row.get("artifact_files", [])
        row = {**row, "artifact_files": [f for f in files if isinstance(f, str) and (folder / where / f).is_file()]}
        shipped.append(_Shipped(where, row, _settings(folder / where, row["backend"])))
    return shipped


def _settings(folder: Path, backend_name: str) -> dict:
    backend = get_backend(backend_name)
    try:
        settings = json.loads((folder / backend.settings_file).read_text()) if backend else {}
    except (OSError, ValueError):
        return {}
    return settings if isinstance(settings, dict) else {}


def _top_key(manifest: dict) -> str:
    return f"{manifest.get('backend')}/{manifest.get('precision')}"


def _timed(report: dict) -> bool:
    return bool((report.get("baseline") or {}).get("latency"))


def _heading(report: dict, manifest: dict) -> list[str]:
    model = Path(str((report.get("model") or {}).get("path") or "model")).name or "model"
    target = report.get("target") or {}
    name = _text(str(target.get("name", "?")))
    built = f"Built by dlopt {_text(str(manifest.get('dlopt_version')))} on {_text(str(report.get('created')))[:10]}"
    lines = [f"# {_text(model)} for {name}", "",
             f"{_text(str(target.get('description', '')))}. {built}; paths and commands below are relative to this "
             "folder.", ""]
    if _timed(report):
        lines += [f"Measured on the machine that compiled it: {_text(report.get('summary', ''))}.", ""]
    else:
        why = (report.get("verdict") or {}).get("why")
        kept = (f" Every candidate that built ships (bundle/); the top level holds {_text(_top_key(manifest))}"
                + (f", {_text(why)}" if why else "") + "." if manifest.get("bundle") else "")
        lines += [f"**Nothing here was timed on the {name} device yet**: the machine that compiled it could not "
                  f"time it.{kept} Time them there with `dlopt bench . --select` (below).", ""]
    if report.get("chosen") is None:
        lines += ["**The top-level artefact is over the accuracy budget** (see report.md).", ""]
    return lines


def _inside(report: dict, shipped: list[_Shipped], folder: Path) -> list[str]:
    lines = ["## What is inside", "", "| folder | candidate | files | size | status |",
             "| --- | --- | --- | --- | --- |"]
    for s in shipped:
        files = list(s.row["artifact_files"])
        if s.where == "." and "model.onnx" not in files and (folder / "model.onnx").is_file():
            files.append("model.onnx")  # the optimised ONNX the top-level artefact was built from
        size = ((s.row.get("measurement") or {}).get("size_bytes"))
        lines.append(f"| {'top level' if s.where == '.' else _text(s.where)} | {_text(s.key)} | "
                     f"{_text(', '.join(files))} | {_size(size)} | {_status(report, s)} |")
    dropped = [c for c in report.get("candidates", []) if not c.get("artifact_dir")]
    # manifest.json is the one given: publish writes it after this README
    also = [f"{name}: {what}" for name, what in _OTHER_FILES.items()
            if name == "manifest.json" or (folder / name).is_file()]
    lines += ["", *([f"Also here: {'; '.join(also)}."] if also else [])]
    if dropped:
        lines.append(f"Not shipped ({len(dropped)} candidate{'s' if len(dropped) != 1 else ''} rejected, failed or "
                     "unavailable): see report.md.")
    return [*lines, ""]


def _status(report: dict, s: _Shipped) -> str:
    row = s.row
    parts = ["**chosen**"] if row.get("chosen") else []
    fidelity = row.get("fidelity") or {}
    if fidelity.get("max_rel_error") is not None:
        runtime = " on ONNX Runtime" if s.backend == "tensorrt" else ""
        parts.append(f"outputs verified here{runtime} (max rel error {fidelity['max_rel_error']:.1e})")
    else:
        parts.append("outputs not checked here (dlopt could not run it on this machine)")
    tuning = (row.get("tuning") or {}).get("summary")
    if tuning:
        parts.append(_text(str(tuning)))  # "4 of 5 tasks tuned from <database> (64 trials)"
    latency = (row.get("measurement") or {}).get("latency") or {}
    if latency.get("p50_ms") is not None:
        timing = report.get("timing") or {}
        speed = f", {row['speedup']:.2f}x the original's speed" if row.get("speedup") else ""
        parts.append(f"measured here: p50 {latency['p50_ms']:.3f} ms{speed} at {_text(str(timing.get('shape')))}, "
                     f"{timing.get('threads')} threads")
    else:
        engine = "engine not built yet; " if s.backend == "tensorrt" else ""
        parts.append(f"{engine}not yet measured on the device; run `dlopt bench` there")
    return "; ".join(parts)


def _size(size) -> str:
    if not isinstance(size, int):
        return "-"
    return f"{size / 1e6:.2f} MB" if size >= 1e5 else f"{size / 1e3:.1f} kB"


# -- install ----------------------------------------------------------------------------------------

def _install(manifest: dict, shipped: list[_Shipped]) -> list[str]:
    backends = list(dict.fromkeys(s.backend for s in shipped))
    runnable = [s.backend for s in shipped if s.backend in ("openvino", "tvm") and _runs_with_dlopt(s)]
    extras = list(dict.fromkeys(runnable))  # dlopt's extras for the runtimes it can load
    package = f"dlopt[{','.join(extras)}]" if extras else "dlopt"
    version = _version(manifest.get("dlopt_version"))
    lines = ["## Install on the device", "",
             f"- dlopt, for `dlopt.load`, `dlopt run`, `dlopt verify` and `dlopt bench`: "
             f"`pip install \"{package}{'==' + version if version else ''}\"`",
             "- or only numpy and the runtime, enough for the code below and `python3 run_candidates.py`:"]
    for backend in backends:
        mine = [s for s in shipped if s.backend == backend]
        lines += [f"  - {line}" for line in _INSTALL[backend](mine)]
    return [*lines, ""]


def _version(value) -> str | None:
    return value if isinstance(value, str) and _VERSION.fullmatch(value) else None


def _install_ort(mine: list[_Shipped]) -> list[str]:
    lines = []
    for version in dict.fromkeys(s.settings.get("onnxruntime_version") for s in mine):
        ours = [s for s in mine if s.settings.get("onnxruntime_version") == version]
        gpu = any(NVIDIA_PROVIDERS & set(s.settings.get("providers") or []) for s in ours)
        pinned = f"=={_version(version)}" if _version(version) else ""
        package = ("onnxruntime-gpu" if gpu else "onnxruntime") + pinned
        why = (" (the TensorRT and CUDA providers the sessions ask for first; a provider the build lacks is "
               "skipped)" if gpu else "")
        lines.append(f"ONNX Runtime ({', '.join(s.key for s in ours)}): `pip install {package} numpy`{why}")
    return lines


def _install_openvino(mine: list[_Shipped]) -> list[str]:
    versions = {str(s.settings.get("openvino_version", "")).split("-", 1)[0] for s in mine}
    return [f"OpenVINO ({', '.join(s.key for s in mine)}): `pip install openvino"
            f"{'==' + _version(v) if _version(v) else ''} numpy`" for v in sorted(versions)]


def _install_tvm(mine: list[_Shipped]) -> list[str]:
    lines = []
    for s in mine:
        version = _version(s.settings.get("tvm_version"))
        needs = s.settings.get("device_needs")
        lines.append(f"TVM ({s.key}, {_text(str(s.settings.get('form', 'a shared library')))}): "
                     f"`pip install apache-tvm{'==' + version if version else ''} apache-tvm-ffi=={TVM_FFI_VERSION} "
                     "numpy`; `export TVM_USE_RUNTIME_LIB=1` loads only TVM's runtime library, no compiler"
                     + (f"; needs {_text(str(needs))}" if needs else ""))
    return lines


def _install_tensorrt(mine: list[_Shipped]) -> list[str]:
    folders = ", ".join(f"`{s.path('build_engine.sh')}`" for s in mine)
    settings = mine[0].settings  # every precision is built for the same shapes
    shapes = [f"{_text(n)} from {_dims(p.get('min'))} to {_dims(p.get('max'))} (tuned for {_dims(p.get('opt'))})"
              for n, p in (settings.get("optimization_profile") or {}).items()]
    shapes += [f"{_text(n)} at {_dims(shape)} only" for n, shape in (settings.get("static_shapes") or {}).items()]
    verb = "each call" if len(mine) > 1 else "calls"
    return [f"TensorRT ({', '.join(s.key for s in mine)}), on a Jetson from JetPack: {folders} {verb} `trtexec` "
            "(/usr/src/tensorrt/bin/trtexec; set TRTEXEC for another), which writes model.engine beside it"
            + (f"; the engine takes {', '.join(shapes)}" if shapes else "")
            + "; run_candidates.py and `dlopt verify` do not run TensorRT engines yet (they list them as skipped)"]


def _install_c(mine: list[_Shipped]) -> list[str]:
    del mine
    return ["C sources for a microcontroller: nothing to install on the device; build `model.c` and "
            "`dlopt_kernels.c` into the firmware (see INTEGRATION.md). For the figures here: "
            "`apt-get install gcc-arm-none-eabi libnewlib-arm-none-eabi qemu-system-arm`"]


_INSTALL = {"ort": _install_ort, "openvino": _install_openvino, "tvm": _install_tvm, "tensorrt": _install_tensorrt,
            "c": _install_c}


def _dims(shape) -> str:
    return "x".join(str(int(d)) for d in shape) if isinstance(shape, list) else "?"


# -- run --------------------------------------------------------------------------------------------

def _inputs(report: dict) -> list[tuple[str, str, list[int]]]:
    """(name, dtype, timed shape) of each model input."""
    dtypes = {}
    for described in (report.get("model") or {}).get("inputs", []):  # "name: float32[N,3,224,224]"
        name, _, kind = str(described).rpartition(": ")
        dtypes[name] = kind.split("[", 1)[0]
    shapes = (report.get("timing") or {}).get("shapes") or {}
    return [(name, _dtype(dtypes.get(name)), [int(d) for d in shape]) for name, shape in shapes.items()]


def _dtype(name) -> str:
    return name if isinstance(name, str) and re.fullmatch(r"[a-z][a-z0-9_]*", name) else "float32"


def _feeds(inputs: list[tuple[str, str, list[int]]]) -> str:
    """Zeros, and ones for a mask as the compile feeds (a mask of zeros hides every token: NaN from the softmax)."""
    return "{" + ", ".join(f"{name!r}: np.{'ones' if MASK_NAME.search(name) else 'zeros'}({tuple(shape)!r}, {dtype!r})"
                           for name, dtype, shape in inputs) + "}"


def _runs_with_dlopt(s: _Shipped) -> bool:
    if s.backend == "tvm":
        return (s.settings.get("target") or {}).get("kind") == "llvm"
    return s.backend in ("ort", "openvino")


def _run(report: dict, shipped: list[_Shipped]) -> list[str]:
    arch = str((report.get("target") or {}).get("arch") or "")
    inputs = _inputs(report)
    feeds = _feeds(inputs)
    lines = ["## Run", ""]
    first = next((s for s in shipped if _runs_with_dlopt(s)), None)
    if first is not None:
        note = "  # the top level is a TensorRT bundle: dlopt runs the others" if first.where != "." else ""
        others = [s.where for s in shipped if s is not first and _runs_with_dlopt(s)]
        also = f"; {', '.join(others[:2])}{', ...' if len(others) > 2 else ''} load the same way" if others else ""
        lines += [f"With dlopt (`dlopt run {first.where} --input data.npz --output preds.npz` runs an .npz with one "
                  f"array per input{also}):",
                  *_code("python", ["import numpy as np", "import dlopt",
                                    f"with dlopt.load({first.where!r}) as r:{note}", f"    outs = r.run({feeds})"])]
    plain = {s.backend: s for s in reversed(shipped)}  # the first folder of each backend
    writers = {"ort": _ort_code, "openvino": _openvino_code, "tvm": _tvm_code}
    for backend in dict.fromkeys(s.backend for s in shipped):
        if backend in writers:
            s = plain[backend]
            same = sum(o.backend == backend for o in shipped) > 1
            lines += [f"{_RUNTIME_NAMES[backend]} without dlopt, `{s.where}`"
                      + (f" (the other {backend} folders: same code, their path)" if same else "") + ":",
                      *_code("python", writers[backend](s, feeds, arch))]
    return [*lines, ""]


_RUNTIME_NAMES = {"ort": "ONNX Runtime", "openvino": "OpenVINO", "tvm": "TVM"}


def _ort_code(s: _Shipped, feeds: str, arch: str) -> list[str]:
    settings = s.settings
    level = _enum(settings.get("graph_optimization_level"), "ORT_ENABLE_ALL")
    mode = _enum(settings.get("execution_mode"), "ORT_SEQUENTIAL")
    providers = [p for p in settings.get("providers") or ["CPUExecutionProvider"] if isinstance(p, str)]
    disabled = [d for d in settings.get("disabled_optimizers") or [] if isinstance(d, str)]
    code = ["import numpy as np", "import onnxruntime as ort",
            "options = ort.SessionOptions()  # as session_options.json",
            f"options.intra_op_num_threads = {int(settings.get('intra_op_num_threads', 0))}",
            f"options.inter_op_num_threads = {int(settings.get('inter_op_num_threads', 1))}",
            f"options.execution_mode = ort.ExecutionMode.{mode}",
            f"options.graph_optimization_level = ort.GraphOptimizationLevel.{level}"]
    if settings.get("enable_cpu_mem_arena") is False:
        code.append("options.enable_cpu_mem_arena = False")
    entries = settings.get("config_entries")
    for key, value in (entries.items() if isinstance(entries, dict) else ()):
        code.append(f"options.add_session_config_entry({str(key)!r}, {str(value)!r})"
                    + (_x64_comment(arch) if key == "session.x64quantprecision" else ""))
    code += [f"providers = [p for p in {providers!r} if p in ort.get_available_providers()]",
             f"session = ort.InferenceSession({s.path('model.onnx')!r}, options, providers=providers"
             + (f", disabled_optimizers={disabled!r})" if disabled else ")"),
             f"outs = session.run(None, {feeds})"]
    return code


def _x64_comment(arch: str) -> str:
    if arch in ("x86_64", "amd64", ""):
        return "  # exact int8 kernels on x86 CPUs without VNNI"
    return f"  # read by x86-64 builds only; ONNX Runtime on {_ARCH_NAME.sub('?', arch)} ignores it"


_ARCH_NAME = re.compile(r"[^A-Za-z0-9_.-]")


def _enum(value, default: str) -> str:
    return value if isinstance(value, str) and _ENUM.fullmatch(value) else default


def _openvino_code(s: _Shipped, feeds: str, arch: str) -> list[str]:
    settings = s.settings
    properties = {k: v for k, v in (settings.get("properties") or {}).items()
                  if isinstance(k, str) and _PROPERTY.fullmatch(k) and isinstance(v, (str, int, float, bool))}
    code = ["import numpy as np", "import openvino as ov", "core = ov.Core()",
            f"model = core.read_model({s.path('model.xml')!r})"]
    static = settings.get("static_shape")
    if isinstance(static, dict) and static:
        code.append(f"model.reshape({ {str(k): [int(d) for d in v] for k, v in static.items()}!r})"
                    "  # the static shape it was timed at runs faster")
    code += [f"compiled = core.compile_model(model, {str(settings.get('device', 'CPU'))!r}, {properties!r})",
             f"outs = list(compiled({feeds}).values())"]
    return code


def _tvm_code(s: _Shipped, feeds: str, arch: str) -> list[str]:
    settings = s.settings
    device = "tvm.cuda()" if (settings.get("target") or {}).get("kind") == "cuda" else "tvm.cpu()"
    specs = [i for i in settings.get("inputs") or [] if isinstance(i, dict)]
    built = [(str(i.get("name")), _dtype(i.get("dtype")), [int(d) for d in i.get("shape", [])]) for i in specs]
    code = ["import os", "os.environ.setdefault('TVM_USE_RUNTIME_LIB', '1')  # TVM's runtime library only"]
    if settings.get("threads"):
        threads = int(settings["threads"])
        code.append(f"os.environ.setdefault('TVM_NUM_THREADS', '{threads}')  # tvm_build.json's threads")
    code += ["import numpy as np", "import tvm", "from tvm.runtime.vm import VirtualMachine",
             f"dev = {device}",
             f"main = VirtualMachine(tvm.runtime.load_module({s.path('model.so')!r}), dev)['main']",
             f"feeds = {_feeds(built) if built else feeds}  # the shapes it was built for",
             f"outs = main(*[tvm.runtime.tensor(feeds[n], dev) for n in {[name for name, _, _ in built]!r}])"
             "  # a tensor (.numpy()) or a tuple of them"]
    return code


# -- verify and benchmark ---------------------------------------------------------------------------

def _verify(shipped: list[_Shipped]) -> list[str]:
    lines = ["## Verify and benchmark", ""]
    trt = [s for s in shipped if s.backend == "tensorrt"]
    if trt:
        lines += [f"Build the TensorRT engine{'s' if len(trt) > 1 else ''} first ("
                  + ", ".join(f"`{s.path('build_engine.sh')}`" for s in trt) + "); "
                  "`trtexec --loadEngine=model.engine` in its folder times it alone.  Checking an engine's "
                  f"outputs against {VERIFY_FILE} is not automated yet: {SCRIPT} and `dlopt verify` skip TensorRT "
                  "candidates (their ONNX was verified on ONNX Runtime when built).", ""]
    lines += _code("sh", [
        f"dlopt verify .            # every candidate against {VERIFY_FILE}: the original model's outputs",
        f"dlopt bench . --select    # times the verified ones into {DEVICE_REPORT}; --select puts the fastest "
        "at the top level",
        f"python3 {SCRIPT}   # the same without dlopt: --verify-only, --candidate KEY, --json"])
    return lines


# -- Markdown ---------------------------------------------------------------------------------------

def _text(text: str) -> str:
    """Literal Markdown prose on one line: no HTML, links, table cells or terminal escapes."""
    return printable(escape_markdown(text))


def _code(language: str, code: list[str]) -> list[str]:
    """A fenced block no line of ``code`` can close: the fence is longer than any backtick run in it."""
    longest = max((len(run) for line in code for run in re.findall(r"`+", line)), default=0)
    fence = "`" * max(3, longest + 1)
    return [f"{fence}{language}", *code, fence]
