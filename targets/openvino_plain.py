"""OpenVINO without dlopt: how ``run_candidates.py`` and ``dlopt verify`` open an OpenVINO candidate.

A companion of ``dlopt.targets.openvino`` with two lives (see ``dlopt.targets.ort_plain``): standard
library and numpy at the top, openvino when a candidate needs it.  runtime_config.json may name only
the device and properties dlopt writes (twins of ``dlopt.targets.openvino``'s; tests hold them
equal): CACHE_DIR would write cache blobs outside the folder.
"""

from __future__ import annotations

from pathlib import Path


class OpenVinoPlain:
    """The OpenVINO candidate compiled with its runtime_config.json's properties, with openvino alone."""

    settings_file = "runtime_config.json"
    DEVICE = "CPU"
    VALUES = {"INFERENCE_PRECISION_HINT": ("f32", "bf16", "f16"), "PERFORMANCE_HINT": ("LATENCY", "THROUGHPUT")}
    COUNTS = ("INFERENCE_NUM_THREADS", "NUM_STREAMS")

    @staticmethod
    def runtime():
        import openvino

        return openvino

    @classmethod
    def refusal(cls, settings: dict, shown) -> str | None:
        """What ``settings`` asks of OpenVINO that dlopt does not write, else None."""
        device, properties = settings.get("device", cls.DEVICE), settings.get("properties")
        if device != cls.DEVICE:
            return f"names device {shown(device)} (dlopt artefacts run on {cls.DEVICE})"
        if not isinstance(properties, dict):
            return "has properties that are not a JSON object"
        for key, value in properties.items():
            if key not in cls.VALUES and key not in cls.COUNTS:
                return f"sets OpenVINO property {shown(key)}"
            if key in cls.VALUES and value not in cls.VALUES[key]:
                return f"sets {key} {shown(value)}"
        return None

    @staticmethod
    def not_here(settings: dict, machine: str) -> str | None:
        del settings, machine
        return None

    @classmethod
    def open(cls, ov, folder: Path, settings: dict, threads: int | None, clamp):
        """``run(feeds) -> list of arrays``; ``clamp(value, default)``: a count within this machine's cores."""
        properties = dict(settings["properties"])
        for key in cls.COUNTS:
            if key in properties:
                properties[key] = clamp(properties[key], 1 if key == "NUM_STREAMS" else 0)
        if threads:
            properties["INFERENCE_NUM_THREADS"] = threads
        core = ov.Core()
        model = core.read_model(str(folder / "model.xml"))
        if settings.get("static_shape"):
            model.reshape({k: list(v) for k, v in settings["static_shape"].items()})
        request = core.compile_model(model, cls.DEVICE, properties).create_infer_request()
        count = len(request.model_outputs)

        def run_ov(feeds):
            request.infer(feeds)
            return [request.get_output_tensor(i).data.copy() for i in range(count)]
        return run_ov
