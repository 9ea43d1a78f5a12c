"""Apache TVM: the backend, RPC boards, MetaSchedule tuning and its database."""

import contextlib
import os
import shutil
import sys
import tempfile
from pathlib import Path

from dlopt.core.optional import hidden
from dlopt.core.scoped_env import environ

# What ``import torch`` meets in a worker ``workers_without_torch`` starts.
_NO_TORCH = ('raise ModuleNotFoundError("torch is hidden from TVM\'s worker processes by dlopt '
             '(dlopt.targets.tvm.workers_without_torch): they never convert torch tensors", name="torch")\n')


def import_tvm():
    """``import tvm``, leaving torch unimported where nobody has imported it yet; returns the module.

    tvm_ffi imports torch whenever it is installed (to convert torch tensors, which dlopt never passes it): 1.8
    of 3.2 CPU-s of TVM's import in a fresh process on this 2-core machine.  Only that first import reaches for
    torch; the frontends, MetaSchedule and RPC do not.  Every place in dlopt that imports tvm calls this first;
    where torch is imported already (a Python API caller with a module) nothing is hidden, and afterwards torch
    imports as usual.  The worker processes TVM starts have their own first import: ``workers_without_torch``.
    """
    with hidden("torch") if "tvm" not in sys.modules else contextlib.nullcontext():
        import tvm
    return tvm


@contextlib.contextmanager
def workers_without_torch():
    """TVM worker processes started in the block import TVM without torch; ``os.environ`` is as before afterwards.

    MetaSchedule's builder and runners (local and RPC) work in ``python -m tvm.exec.popen_worker`` processes that
    inherit this process's environment, with no hook before their ``import tvm``, which took torch in: 3.4 CPU-s
    a worker start instead of 1.4 on this 2-core machine, three or four workers a tune.  For the block a folder
    whose ``torch`` raises ModuleNotFoundError (what tvm_ffi expects without torch) goes first on PYTHONPATH.
    Pools start and restart workers lazily (a timeout, a recycled builder), so the block spans the pools' life.
    Python processes other threads start meanwhile get the same PYTHONPATH.
    """
    folder = Path(tempfile.mkdtemp(prefix="dlopt-no-torch-"))
    try:
        (folder / "torch.py").write_text(_NO_TORCH)
        with environ(PYTHONPATH=os.pathsep.join(filter(None, [str(folder), os.environ.get("PYTHONPATH")]))):
            yield
    finally:
        shutil.rmtree(folder, ignore_errors=True)
