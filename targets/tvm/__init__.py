"""Apache TVM: the backend, RPC boards, MetaSchedule tuning and its database."""

import sys


def import_tvm():
    """``import tvm``, leaving torch unimported where nobody has imported it yet; returns the module.

    tvm_ffi imports torch whenever it is installed (to convert torch tensors, which dlopt never passes it): 1.8
    of 3.2 CPU-s of TVM's import in a fresh process on this 2-core machine.  Only that first import reaches for
    torch; the frontends, MetaSchedule and RPC do not.  Every place in dlopt that imports tvm calls this first;
    where torch is imported already (a Python API caller with a module) nothing is hidden, and afterwards torch
    imports as usual.
    """
    if "tvm" in sys.modules or "torch" in sys.modules:
        import tvm

        return tvm
    sys.modules["torch"] = None  # ``import torch`` raises ImportError, which tvm_ffi expects without torch
    try:
        import tvm
    finally:
        if "torch" in sys.modules and sys.modules["torch"] is None:
            del sys.modules["torch"]
    return tvm
