"""What dlopt knows about a TVM artefact beyond building it: whether this machine runs it, and the
output README's install line and plain-TVM code for it (read from its tvm_build.json)."""

from __future__ import annotations

from dlopt.core.errors import TargetUnavailable
from dlopt.core.profiles import host_arch
from dlopt.targets import snippets

# apache-tvm-ffi 0.1.15 crashes when TVM writes JSON; pyproject.toml pins this release.
TVM_FFI_VERSION = "0.1.14.post1"


def check_runs_here(artifact) -> None:
    """TargetUnavailable for a library of another kind (CUDA) or another CPU than this machine's."""
    key = f"{artifact.backend}/{artifact.precision}"
    settings = artifact.settings
    target, host = settings.get("target"), settings.get("host")
    kind = target.get("kind") if isinstance(target, dict) else None
    arch = str(host.get("mtriple") or "").split("-", 1)[0] if isinstance(host, dict) else ""
    form, needs = settings.get("form") or "TVM library", settings.get("device_needs") or "the TVM runtime"
    if kind not in (None, "llvm"):
        raise TargetUnavailable(f"{key} in {artifact.folder} is a {kind} library ({form}); dlopt runs TVM "
                                f"libraries on the CPU only: run it on a device with {needs}")
    if arch and arch != host_arch():
        raise TargetUnavailable(f"{key} in {artifact.folder} is an {form} built for another device "
                                f"(this machine is {host_arch()}); run it on a device with {needs}")


def library_cpu(settings: dict) -> tuple[str, str] | None:
    """(arch, mcpu) of a CPU library; None for a CUDA one."""
    host = settings.get("host") if isinstance(settings.get("host"), dict) else {}
    kind = (settings.get("target") or {}).get("kind") if isinstance(settings.get("target"), dict) else None
    if kind not in (None, "llvm"):
        return None
    return str(host.get("mtriple") or "").split("-", 1)[0], str(host.get("mcpu") or "")


def runs_with_dlopt(settings: dict) -> bool:
    return (settings.get("target") or {}).get("kind") == "llvm"


def install_lines(shipped: list, text) -> list[str]:
    lines = []
    for s in shipped:
        version = snippets.version(s.settings.get("tvm_version"))
        needs = s.settings.get("device_needs")
        lines.append(f"TVM ({s.key}, {text(str(s.settings.get('form', 'a shared library')))}): "
                     f"`pip install apache-tvm{'==' + version if version else ''} apache-tvm-ffi=={TVM_FFI_VERSION} "
                     "numpy`; `export TVM_USE_RUNTIME_LIB=1` loads only TVM's runtime library, no compiler"
                     + (f"; needs {text(str(needs))}" if needs else ""))
    return lines


def plain_code(s, feeds: str, arch: str) -> list[str]:
    del arch
    settings = s.settings
    device = "tvm.cuda()" if (settings.get("target") or {}).get("kind") == "cuda" else "tvm.cpu()"
    specs = [i for i in settings.get("inputs") or [] if isinstance(i, dict)]
    built = [(str(i.get("name")), snippets.dtype(i.get("dtype")), [int(d) for d in i.get("shape", [])])
             for i in specs]
    code = ["import os", "os.environ.setdefault('TVM_USE_RUNTIME_LIB', '1')  # TVM's runtime library only"]
    if settings.get("threads"):
        threads = int(settings["threads"])
        code.append(f"os.environ.setdefault('TVM_NUM_THREADS', '{threads}')  # tvm_build.json's threads")
    code += ["import numpy as np", "import tvm", "from tvm.runtime.vm import VirtualMachine",
             f"dev = {device}",
             f"main = VirtualMachine(tvm.runtime.load_module({s.path('model.so')!r}), dev)['main']",
             f"feeds = {snippets.feeds_literal(built) if built else feeds}  # the shapes it was built for",
             f"outs = main(*[tvm.runtime.tensor(feeds[n], dev) for n in {[name for name, _, _ in built]!r}])"
             "  # a tensor (.numpy()) or a tuple of them"]
    return code
