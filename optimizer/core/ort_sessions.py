"""ONNX Runtime session options for dlopt's own CPU sessions (reference runs, calibration probes,
sensitivity, pass checks) and the config entries every ORT session dlopt makes carries."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import onnxruntime

# ONNX Runtime's int8 matrix kernels on x86 CPUs without VNNI (AVX2, AVX-512 without VNNI) add pairs of
# uint8 x int8 products in 16 bits (vpmaddubsw), which saturates: on an AMD EPYC with AVX2 only (ORT 1.32)
# the test suite's static int8 Conv models were 10-15% (max relative error) off their own QDQ arithmetic and
# some int8 candidates missed the accuracy budget, while an AVX-512 VNNI machine ran the same models exactly.  This entry makes ORT use its
# exact U8U8 kernels on such CPUs; ORT ignores it on CPUs with VNNI and on ARM, and float models have no
# int8 kernels.  Every session dlopt opens or ships carries it: the int8 a user deploys is the int8 that
# was verified and timed.
CONFIG_ENTRIES = {"session.x64quantprecision": "1"}


def apply_config_entries(options, settings: dict | None = None) -> None:
    """Add the session config entries of ``settings`` (artefacts from before they were recorded: ours)."""
    entries = (settings or {}).get("config_entries", CONFIG_ENTRIES)
    for key, value in dict(entries).items():
        options.add_session_config_entry(str(key), str(value))


def cpu_session_options(threads: int = 0, *, level: str = "ORT_ENABLE_ALL", log_level: int = 3) -> "onnxruntime.SessionOptions":
    """Options for dlopt's own CPU sessions outside an artefact (calibration probes, sensitivity,
    reference runs): ``threads`` intra-op threads (0: ORT's default), one inter-op thread, and
    ``CONFIG_ENTRIES``."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = log_level
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
    apply_config_entries(options)
    return options
