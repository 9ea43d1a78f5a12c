"""TVM's runtime without dlopt: how ``run_candidates.py`` and ``dlopt verify`` open a TVM library.

A companion of ``dlopt.targets.tvm.backend`` with two lives (see ``dlopt.targets.ort_plain``):
standard library and numpy at the top, TVM's runtime when a candidate needs it.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np


class TvmPlain:
    """The library on TVM's virtual machine with tvm_build.json's threads and input specs."""

    settings_file = "tvm_build.json"

    @staticmethod
    def runtime():
        import sys

        # tvm_ffi imports torch, if installed, to convert torch tensors (none are passed here): 1.8 CPU-s
        hide = "tvm" not in sys.modules and "torch" not in sys.modules
        if hide:
            sys.modules["torch"] = None
        try:
            import tvm
            from tvm.runtime.vm import VirtualMachine
        finally:
            if hide and "torch" in sys.modules and sys.modules["torch"] is None:
                del sys.modules["torch"]
        return tvm, VirtualMachine

    @staticmethod
    def refusal(settings: dict, shown) -> str | None:
        del settings, shown
        return None

    @staticmethod
    def not_here(settings: dict, machine: str) -> str | None:
        """Why this machine cannot run the library (another CPU), else None."""
        arch = str((settings.get("host") or {}).get("mtriple") or "").split("-", 1)[0]
        return f"a TVM library for {arch}; this machine is {machine}" if arch and arch != machine else None

    @classmethod
    def open(cls, runtime, folder: Path, settings: dict, threads: int | None, clamp):
        """``run(feeds) -> list of arrays``; ``clamp(value, default)``: a thread count within this machine's cores."""
        tvm, VirtualMachine = runtime
        count = threads or clamp(settings.get("threads"), 0)
        if count:
            allowed = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
            try:
                tvm.get_global_func("runtime.config_threadpool")(1, int(count))
            finally:  # TVM pins the calling thread to one core; the rest of this process keeps its CPUs
                if allowed is not None:
                    os.sched_setaffinity(0, allowed)
        main = VirtualMachine(tvm.runtime.load_module(str(folder / "model.so")), tvm.cpu())["main"]
        specs = settings["inputs"]

        def run_tvm(feeds):
            n = len(next(iter(feeds.values())))
            if n > 1 and all(s.get("dynamic_batch") for s in specs):  # built for batch 1: sample by sample
                parts = [run_tvm({k: v[i:i + 1] for k, v in feeds.items()}) for i in range(n)]
                return [np.concatenate(p, axis=0) for p in zip(*parts)]
            out = main(*[tvm.runtime.tensor(np.ascontiguousarray(feeds[s["name"]], dtype=s["dtype"]))
                         for s in specs])
            return cls.flatten(out)
        return run_tvm

    @classmethod
    def flatten(cls, value) -> list:
        if hasattr(value, "numpy"):
            return [value.numpy()]
        return [array for item in value for array in cls.flatten(item)]
