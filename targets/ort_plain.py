"""ONNX Runtime without dlopt: how ``run_candidates.py`` and ``dlopt verify`` open an ORT candidate.

A companion of ``dlopt.targets.ort`` with two lives, like ``dlopt.device.device_check``: imported
inside dlopt, and pasted into each output's run_candidates.py, so it imports only the standard
library and numpy at the top, and onnxruntime when a candidate needs it.  What it lets through of
session_options.json is what dlopt writes (twins of ``dlopt.targets.ort.CONFIG_ENTRIES``; tests hold
them equal): ORT's ep.context_* entries would write model files wherever they say.
"""

from __future__ import annotations

from pathlib import Path


class OrtPlain:
    """The ORT candidate's session over its session_options.json, with onnxruntime alone."""

    settings_file = "session_options.json"
    CONFIG_ENTRIES = {"session.x64quantprecision": "1"}  # exact int8 kernels on x86 CPUs without VNNI
    LEVELS = ("ORT_DISABLE_ALL", "ORT_ENABLE_BASIC", "ORT_ENABLE_EXTENDED", "ORT_ENABLE_LAYOUT", "ORT_ENABLE_ALL")

    @staticmethod
    def runtime():
        import onnxruntime

        return onnxruntime

    @classmethod
    def refusal(cls, settings: dict, shown) -> str | None:
        """What ``settings`` asks of ONNX Runtime that dlopt does not write, else None."""
        entries = settings.get("config_entries", cls.CONFIG_ENTRIES)
        if not isinstance(entries, dict):
            return "has config_entries that are not a JSON object"
        foreign = sorted(set(entries) - set(cls.CONFIG_ENTRIES))
        if foreign:
            return f"sets ONNX Runtime config entry {shown(foreign[0])}"
        level = settings.get("graph_optimization_level", "ORT_ENABLE_ALL")
        if level not in cls.LEVELS:
            return f"sets graph_optimization_level {shown(level)}"
        return None

    @staticmethod
    def not_here(settings: dict, machine: str) -> str | None:
        del settings, machine
        return None  # ONNX Runtime runs the portable ONNX anywhere

    @classmethod
    def open(cls, ort, folder: Path, settings: dict, threads: int | None, clamp):
        """``run(feeds) -> list of arrays``; ``clamp(value, default)``: a thread count within this machine's cores."""
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(threads or clamp(settings.get("intra_op_num_threads", 0), 0))
        options.inter_op_num_threads = clamp(settings.get("inter_op_num_threads", 1), 1)
        options.graph_optimization_level = getattr(ort.GraphOptimizationLevel,
                                                   settings.get("graph_optimization_level", "ORT_ENABLE_ALL"))
        options.enable_cpu_mem_arena = bool(settings.get("enable_cpu_mem_arena", True))
        for key, value in settings.get("config_entries", cls.CONFIG_ENTRIES).items():
            options.add_session_config_entry(str(key), str(value))
        have = set(ort.get_available_providers())
        providers = [p for p in settings.get("providers", []) if p in have] or ["CPUExecutionProvider"]
        session = ort.InferenceSession(str(folder / "model.onnx"), options, providers=providers,
                                       disabled_optimizers=settings.get("disabled_optimizers") or None)
        return lambda feeds: session.run(None, feeds)
