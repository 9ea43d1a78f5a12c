"""ExecuTorch without dlopt: how ``run_candidates.py`` and ``dlopt verify`` open an ExecuTorch candidate.

A companion of ``dlopt.targets.executorch`` with two lives (see ``dlopt.targets.ort_plain``): standard
library and numpy at the top, the runtime when a candidate needs it.  ``model.pte`` runs on the
``executorch`` package's runtime (its Python bindings, which load torch's libraries) where it is
installed; elsewhere (a board without torch, or dlopt's emulated aarch64) on the runner library a
bundle ships beside it, ``libpte_run.so``: ExecuTorch's own C++ runtime with XNNPACK, through ctypes.
executorch.json names the inputs (order, dtype, the static shape the program was exported at).
"""

from __future__ import annotations

import ctypes
import math
from pathlib import Path

import numpy as np

_PTE_ERROR_BYTES = 512
_PTE_MAX_DIMS = 16
# an input's elements: a batch other than the exported one is zero-padded up to executorch.json's shape, so a
# crafted shape must not make that padding a huge allocation (1 GiB of float32; a board's model is far less)
_PTE_MAX_ELEMENTS = 1 << 28
# ExecuTorch's ScalarType codes (runtime/core/portable_type/scalar_type.h) that numpy holds as they are.
_PTE_DTYPES = {0: np.uint8, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.int64, 5: np.float16, 6: np.float32,
               7: np.float64, 11: np.bool_}


class ExecutorchPlain:
    """The .pte on ExecuTorch's runtime with executorch.json's threads and inputs."""

    settings_file = "executorch.json"
    DTYPES = ("float32", "float16", "float64", "int64", "int32", "int16", "int8", "uint8", "bool")
    NATIVE = "libpte_run.so"

    @staticmethod
    def runtime():
        """(torch, the executorch bindings), or None where they are not installed (the native runner then)."""
        try:
            import torch

            try:  # the extension module itself: its portable_lib wrapper imports all of exir (7 s)
                from executorch.extension.pybindings import _C as bindings
            except ImportError:
                from executorch.extension.pybindings import portable_lib as bindings
        except ImportError:
            return None
        return torch, bindings

    @classmethod
    def refusal(cls, settings: dict, shown) -> str | None:
        """What ``settings`` says that dlopt does not write, else None."""
        inputs = settings.get("inputs")
        if not isinstance(inputs, list) or not inputs:
            return "lists no inputs"
        for spec in inputs:
            if not (isinstance(spec, dict) and isinstance(spec.get("name"), str) and spec.get("dtype") in cls.DTYPES
                    and isinstance(spec.get("shape"), list)
                    and all(isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in spec["shape"])):
                return f"has an input entry {shown(spec)} that is not a name, a dtype and a static shape"
            if len(spec["shape"]) > _PTE_MAX_DIMS or math.prod(spec["shape"]) > _PTE_MAX_ELEMENTS:
                return (f"declares input {shown(spec['name'])} of shape {shown(spec['shape'])}, over the "
                        f"{_PTE_MAX_DIMS} dimensions and {_PTE_MAX_ELEMENTS} elements an input may have")
        threads = settings.get("threads", 0)
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 0:
            return f"sets threads {shown(threads)}"
        native = settings.get("native")
        if native is not None and not (isinstance(native, dict) and isinstance(native.get("arch"), str)):
            return "has a native entry that is not an object naming its arch"
        return None

    @classmethod
    def not_here(cls, settings: dict, machine: str) -> str | None:
        """Why this machine cannot run it: no executorch runtime and no runner library built for this CPU."""
        if cls.runtime() is not None:
            return None
        arch = (settings.get("native") or {}).get("arch")
        if arch == machine:
            return None
        have = f"its runner library is for {arch}" if arch else "it ships no runner library"
        return (f"the executorch package is not installed here (pip install executorch) and {have}; "
                f"this machine is {machine}")

    @classmethod
    def open(cls, runtime, folder: Path, settings: dict, threads: int | None, clamp):
        """``run(feeds) -> list of arrays``; ``clamp(value, default)``: a thread count within this machine's cores."""
        specs = settings["inputs"]
        count = threads or clamp(settings.get("threads", 0), 0)
        if runtime is None:
            program = cls.native(folder, count)
        else:
            torch, bindings = runtime
            # XNNPACK's pool is one per process; resetting it to its own size only prints a line
            if count and hasattr(bindings, "_unsafe_reset_threadpool") and count != getattr(
                    bindings, "_threadpool_get_thread_count", lambda: 0)():
                bindings._unsafe_reset_threadpool(int(count))
            module = bindings._load_for_executorch(str(folder / "model.pte"))

            def program(arrays):
                outputs = module.run_method("forward", tuple(torch.from_numpy(a) for a in arrays))
                return [o.numpy().copy() for o in outputs]

        def run_pte(feeds):
            # a fresh C-order copy: a size-1 axis with an odd stride (numpy's x[:, None]) reads as channels-last
            # to torch, and the program refuses a dim order it was not exported for
            arrays = [np.array(feeds[s["name"]], dtype=s["dtype"], order="C", copy=True) for s in specs]
            batch = [s["shape"][0] if s["shape"] else 1 for s in specs]
            if all(list(a.shape) == s["shape"] for a, s in zip(arrays, specs)):
                return program(arrays)
            # a program is exported at one shape: other batches run in slices of it, the last one zero-padded
            # (its padding rows' outputs dropped)
            counts = {a.shape[0] for a in arrays if a.ndim}
            if len(counts) != 1 or len(set(batch)) != 1 or any(
                    a.ndim != len(s["shape"]) or list(a.shape[1:]) != s["shape"][1:] for a, s in zip(arrays, specs)):
                got = ", ".join(f"{s['name']} {list(a.shape)}" for a, s in zip(arrays, specs))
                want = ", ".join(f"{s['name']} {s['shape']}" for s in specs)
                raise ValueError(f"this ExecuTorch program was exported for inputs {want}; got {got}")
            n, b = counts.pop(), batch[0]
            outs = []
            for start in range(0, n, b):
                part = [a[start:start + b] for a in arrays]
                if part[0].shape[0] < b:
                    part = [np.concatenate([p, np.zeros((b - p.shape[0], *p.shape[1:]), p.dtype)]) for p in part]
                outs.append(program(part))
            return [np.concatenate(o, axis=0)[:n] for o in zip(*outs)]
        return run_pte

    @classmethod
    def native(cls, folder: Path, threads: int):
        """The shipped runner library over model.pte (dlopt.targets.executorch_native builds it):
        ``program(arrays) -> list of arrays``."""
        if not (folder / cls.NATIVE).is_file():
            raise OSError(f"{folder} ships no {cls.NATIVE} and the executorch package is not installed here")
        return PteNative(folder, "model.pte", threads=threads or None).run


class PteNative:
    """A ``.pte`` program's ``forward``, run by ``libpte_run.so`` in ``folder``.

    ``threads`` (> 0) resets ExecuTorch's process-wide thread pool, which XNNPACK and the kernels share;
    None keeps its default (the machine's performance cores).  Not safe to run from several threads at once.
    """

    def __init__(self, folder, pte_name, threads=None):
        folder = Path(folder).absolute()
        path = folder / pte_name
        if not path.is_file():
            raise OSError(f"no ExecuTorch program {path}")
        try:
            self._lib = _pte_bind(ctypes.CDLL(str(folder / ExecutorchPlain.NATIVE)))
        except OSError as exc:
            raise OSError(f"cannot load {folder / ExecutorchPlain.NATIVE}: {str(exc).splitlines()[0]}") from exc
        err = ctypes.create_string_buffer(_PTE_ERROR_BYTES)
        self._handle = self._lib.pte_open(str(path).encode(), int(threads or 0), err, _PTE_ERROR_BYTES)
        if not self._handle:
            raise RuntimeError(f"ExecuTorch: {err.value.decode(errors='replace')}")
        self.threads = self._lib.pte_threads(0)
        self._inputs = [self._input_info(i) for i in range(self._lib.pte_inputs(self._handle))]
        # What every run passes, allocated once: a run of a small model takes microseconds.
        count = max(1, len(self._inputs))
        self._pointers = (ctypes.c_void_p * count)()
        self._nbytes = (ctypes.c_size_t * count)(*(d.itemsize * int(np.prod(s)) for d, s in self._inputs))
        self._err = ctypes.create_string_buffer(_PTE_ERROR_BYTES)
        self._dtype, self._ndim, self._size = ctypes.c_int(), ctypes.c_int(), ctypes.c_size_t()
        self._sizes, self._data = (ctypes.c_int64 * _PTE_MAX_DIMS)(), ctypes.c_void_p()

    def _input_info(self, i):
        dtype, ndim, nbytes = ctypes.c_int(), ctypes.c_int(_PTE_MAX_DIMS), ctypes.c_size_t()
        sizes = (ctypes.c_int64 * _PTE_MAX_DIMS)()
        if self._lib.pte_input_info(self._handle, i, ctypes.byref(dtype), sizes, ctypes.byref(ndim),
                                    ctypes.byref(nbytes)):
            raise RuntimeError(f"ExecuTorch: cannot describe input {i} (more than {_PTE_MAX_DIMS} dimensions?)")
        if dtype.value not in _PTE_DTYPES:
            raise RuntimeError(f"ExecuTorch: input {i} has scalar type {dtype.value}, which numpy does not hold")
        return np.dtype(_PTE_DTYPES[dtype.value]), tuple(sizes[:ndim.value])

    def inputs(self) -> list[tuple[np.dtype, tuple[int, ...]]]:
        """(dtype, shape) of each input of ``forward``, in order."""
        return list(self._inputs)

    def run(self, arrays) -> list[np.ndarray]:
        """``forward`` on ``arrays`` (one per input, of its dtype and shape); copies of its outputs."""
        if self._handle is None:
            raise RuntimeError("ExecuTorch: the program is closed")
        if len(arrays) != len(self._inputs):
            raise RuntimeError(f"ExecuTorch: forward takes {len(self._inputs)} inputs, got {len(arrays)}")
        held = []
        for i, (array, (dtype, shape)) in enumerate(zip(arrays, self._inputs)):
            if not isinstance(array, np.ndarray) or not array.flags.c_contiguous:
                array = np.ascontiguousarray(array)
            if array.dtype != dtype or array.shape != shape:
                raise RuntimeError(f"ExecuTorch: input {i} is {array.dtype}{list(array.shape)}; "
                                   f"forward takes {dtype}{list(shape)}")
            held.append(array)  # alive until pte_run returns
            self._pointers[i] = array.ctypes.data
        if self._lib.pte_run(self._handle, self._pointers, self._nbytes, self._err, _PTE_ERROR_BYTES):
            raise RuntimeError(f"ExecuTorch: {self._err.value.decode(errors='replace')}")
        return [self._output(i) for i in range(self._lib.pte_outputs(self._handle))]

    def _output(self, i):
        dtype, ndim, nbytes, sizes, data = self._dtype, self._ndim, self._size, self._sizes, self._data
        ndim.value = _PTE_MAX_DIMS
        if self._lib.pte_output(self._handle, i, ctypes.byref(dtype), sizes, ctypes.byref(ndim),
                                ctypes.byref(data), ctypes.byref(nbytes)):
            raise RuntimeError(f"ExecuTorch: cannot read output {i} (more than {_PTE_MAX_DIMS} dimensions?)")
        if dtype.value not in _PTE_DTYPES:
            raise RuntimeError(f"ExecuTorch: output {i} has scalar type {dtype.value}, which numpy does not hold")
        shape = tuple(sizes[:ndim.value])
        out = np.empty(shape, _PTE_DTYPES[dtype.value])
        if out.nbytes != nbytes.value:
            raise RuntimeError(f"ExecuTorch: output {i} holds {nbytes.value} bytes, not {out.nbytes} for {shape}")
        if out.nbytes:
            ctypes.memmove(out.ctypes.data, data.value, out.nbytes)
        return out

    def close(self) -> None:
        if getattr(self, "_handle", None):
            self._lib.pte_close(self._handle)
        self._handle = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        self.close()


def _pte_bind(lib):
    """Argument and result types of the C ABI (ctypes would truncate pointers to int otherwise)."""
    p, c_int, size, errbuf = ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t, ctypes.c_char_p
    i64p, intp, sizep = ctypes.POINTER(ctypes.c_int64), ctypes.POINTER(c_int), ctypes.POINTER(size)
    signatures = {
        "pte_threads": (c_int, [c_int]),
        "pte_open": (p, [ctypes.c_char_p, c_int, errbuf, size]),
        "pte_inputs": (c_int, [p]),
        "pte_input_info": (c_int, [p, c_int, intp, i64p, intp, sizep]),
        "pte_run": (c_int, [p, ctypes.POINTER(p), sizep, errbuf, size]),
        "pte_outputs": (c_int, [p]),
        "pte_output": (c_int, [p, c_int, intp, i64p, intp, ctypes.POINTER(p), sizep]),
        "pte_close": (None, [p]),
    }
    for name, (restype, argtypes) in signatures.items():
        function = getattr(lib, name)
        function.restype, function.argtypes = restype, argtypes
    return lib
