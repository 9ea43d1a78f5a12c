"""SimplifyPass: constant folding and dead-node elimination through onnxsim, under a budget.

onnxsim is C++ that cannot be interrupted from Python, and some small graphs
(deeply nested control flow, huge generated constants) make it run for minutes
or take gigabytes.  So it runs in a child process that is killed when it passes
its time or memory budget; the model then goes on unsimplified and the pass's
note says why.  Simplification is an optimisation, never a reason to fail.
"""

from __future__ import annotations

import argparse
import logging
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import onnx
import onnx_ir as ir

from dlopt.core.errors import first_line
from dlopt.core.model_io import has_external_tensors
from dlopt.passes.fold_constants import DEFAULT_FOLD_LIMIT

logger = logging.getLogger(__name__)

# onnxsim works on a serialised ModelProto, which protobuf caps at 2 GiB.
_MAX_PROTO_BYTES = 1_900_000_000
# Importing onnxsim (and ONNX Runtime with it) alone takes about 300 MB and 2 s.
_BASE_MEMORY = 768 << 20
_BASE_SECONDS = 30.0
_POLL_SECONDS = 0.02
BATCHED_GEMM_FUSION = "fuse_matmul_add_bias_into_gemm_batched"


def default_budget(model_bytes: int) -> tuple[float, int]:
    """Seconds and bytes of RSS onnxsim may use on a serialised model of ``model_bytes``."""
    return _BASE_SECONDS + 20.0 * model_bytes / 2**30, _BASE_MEMORY + 6 * model_bytes


def _rss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass  # the child has just exited, or no /proc here: only the time budget applies
    return 0


class SimplifyPass(ir.passes.FunctionalPass):
    """Fold constants, drop dead nodes and redundant ops with onnxsim.

    Guarantees: the returned model computes the same outputs (onnxsim's own
    optimisers only; BatchNormalization folding is left to ``FoldBatchNormPass``
    so the report attributes it); no folded constant over ``fold_limit`` bytes is
    created.  If onnxsim cannot process the model (too big for one protobuf,
    weights still in an external data file, an op it does not know) or passes
    ``time_limit`` seconds or ``memory_limit`` bytes of RSS (``None``: scaled to
    the model's size by ``default_budget``), the model is returned unchanged and
    ``note`` says why.
    """

    def __init__(self, *, fold_batchnorm: bool = False, fold_limit: int = DEFAULT_FOLD_LIMIT,
                 time_limit: float | None = None, memory_limit: int | None = None) -> None:
        super().__init__()
        self.fold_batchnorm = fold_batchnorm
        self.fold_limit = fold_limit
        self.time_limit = time_limit
        self.memory_limit = memory_limit
        self.note = ""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.note = ""
        if has_external_tensors(model):
            return self._skip(model, "skipped: weights over 1 GiB stay in their external data file")
        proto = ir.serde.serialize_model(model)
        size = proto.ByteSize()
        if size > _MAX_PROTO_BYTES:
            return self._skip(model, "skipped: model over 1.9 GB cannot go through onnxsim")
        seconds, memory = default_budget(size)
        seconds = self.time_limit if self.time_limit is not None else seconds
        memory = self.memory_limit if self.memory_limit is not None else memory
        original = proto.SerializeToString(deterministic=True)
        with tempfile.TemporaryDirectory(prefix="dlopt-onnxsim-") as tmp:
            source, target = Path(tmp) / "in.onnx", Path(tmp) / "out.onnx"
            source.write_bytes(original)
            del proto
            failure = self._run_child(source, target, Path(tmp) / "stderr.txt", seconds, memory)
            if failure:
                return self._skip(model, f"skipped: {failure}")
            simplified = onnx.load(str(target))
        modified = simplified.SerializeToString(deterministic=True) != original
        return ir.passes.PassResult(ir.serde.deserialize_model(simplified), modified)

    def _skip(self, model: ir.Model, note: str) -> ir.passes.PassResult:
        self.note = note
        logger.warning("SimplifyPass %s", note)
        return ir.passes.PassResult(model.clone(), False)

    def _run_child(self, source: Path, target: Path, log: Path, seconds: float, memory: int) -> str:
        """Run onnxsim on ``source`` in a child process; return why it failed, or '' on success."""
        command = [sys.executable, "-c", "from dlopt.passes.simplify import main; main()", str(source), str(target),
                   "--fold-limit", str(self.fold_limit)] + (["--fold-batchnorm"] if self.fold_batchnorm else [])
        with open(log, "wb") as stderr:
            child = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr)
            start = time.monotonic()
            try:
                while child.poll() is None:
                    if _rss_bytes(child.pid) > memory:
                        return f"onnxsim passed its memory budget ({memory / 2**20:.0f} MB)"
                    if time.monotonic() - start > seconds:
                        return f"onnxsim passed its time budget ({seconds:g} s)"
                    time.sleep(_POLL_SECONDS)
            finally:
                if child.poll() is None:
                    child.kill()
                    child.wait()
        if child.returncode != 0 or not target.is_file():
            lines = log.read_text(errors="replace").strip().splitlines()
            return f"onnxsim failed ({lines[-1] if lines else f'exit code {child.returncode}'})"
        return ""


def main() -> None:
    """The child process: simplify one model file into another."""
    parser = argparse.ArgumentParser(prog="dlopt-onnxsim", description="onnxsim on one model, for SimplifyPass")
    parser.add_argument("source")
    parser.add_argument("target")
    parser.add_argument("--fold-limit", type=int, required=True)
    parser.add_argument("--fold-batchnorm", action="store_true")
    args = parser.parse_args()
    # onnxsim's package __init__ imports torch only to probe for its optional PPQ bridge (and catches
    # the failure); simplify() never uses it.  That import was most of this pass's time: on the demo's
    # 16-node CNN the child took 10-12 s with it and 4-5 s without on a loaded 2-core machine, for
    # 0.2 s of simplifying.  This process only simplifies, so torch is hidden from it.
    sys.modules.setdefault("torch", None)
    import onnxsim

    try:
        simplified, _ = onnxsim.simplify(
            onnx.load(args.source), check_n=0, skip_fuse_bn=not args.fold_batchnorm,
            tensor_size_threshold=f"{args.fold_limit}B",
            # 3-D MatMul+Add -> Reshape/Gemm/Reshape (with Shape/Slice to rebuild the dims) made
            # all-MiniLM-L6-v2 7% slower on ONNX Runtime CPU (8x64: 55.6 vs 51.8 ms)
            skipped_optimizers=[BATCHED_GEMM_FUSION],
        )
    except Exception as exc:  # onnxsim raises bare RuntimeErrors from C++
        sys.stderr.write(first_line(exc) + "\n")
        sys.exit(1)
    onnx.save(simplified, args.target)

