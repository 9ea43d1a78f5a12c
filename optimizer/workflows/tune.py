"""``dlopt tune``: MetaSchedule tuning of a model's TVM kernels for a target, into a database
that ``dlopt compile`` then applies by itself.

The database is keyed by the model *as the TVM backend receives it* (after dlopt's
generic passes and TVM's lowering passes, at the declared shapes) and the full target,
so ``dlopt tune`` runs exactly the passes a compile runs before building, and a compile
with the same ``--batch``/``--shape`` and thread count finds the records.
"""

from __future__ import annotations

import re
from pathlib import Path

from dlopt.core.config import CompileConfig
from dlopt.core.errors import ConfigError
from dlopt.core.pipeline import run_pipeline
from dlopt.core.profiles import DeviceKind, resolve_target
from dlopt.core.shapes import declared_shapes
from dlopt.core.specs import input_specs
from dlopt.flow.driver import _load
from dlopt.passes import generic_passes
from dlopt.targets import backend_status, get_backend, tunable_backend
from dlopt.targets.tvm.backend import tuning_database
from dlopt.targets.tvm.rpc import ms_runner
from dlopt.targets.tvm.tuning import default_root, tune
from dlopt.targets.tvm.tuning_db import check_root


def tuning_profile(config: CompileConfig):
    """(profile, backend name) of ``config``'s target, refused in one line when it cannot be tuned (before
    any model is loaded)."""
    profile = resolve_target(config.target, config.targets_file)
    name = tunable_backend(profile)
    if name is None:
        raise ConfigError(f"target {profile.name} has no TVM backend ({', '.join(profile.backends)}); nothing to tune")
    if profile.device is not DeviceKind.CPU:
        raise ConfigError(f"tuning covers CPU targets; {profile.name} is a {profile.device} target")
    status = backend_status(name)
    if status is not True:
        raise ConfigError(f"TVM is not usable here: {status}")
    return profile, name


def backend_model(config: CompileConfig):
    """(profile, model, shapes, info): the fp32 model the TVM backend builds in a compile of ``config``."""
    from onnx_ir.passes.common import CheckerPass

    profile, name = tuning_profile(config)
    proto, model, info = _load(config)
    shapes = declared_shapes(tuple(input_specs(proto)), batch=config.timing.batch, shapes=config.timing.shapes)
    generic = run_pipeline(model, generic_passes(model=model)).model
    backend = get_backend(name)
    ready = run_pipeline(generic.clone(), [*backend.lowering_passes("fp32"), CheckerPass()]).model
    return profile, ready, shapes, info


def run(config: CompileConfig, *, trials: int, time_budget_s: float | None, progress=None):
    """Tune for ``config``'s target into its tuning database; returns the TuneResult.  The arguments are
    checked first (the --db root, the target, where to measure), before the seconds the model and TVM take."""
    root = Path(config.tvm.tuning_db) if isinstance(config.tvm.tuning_db, (str, Path)) else default_root()
    check_root(root)
    profile, _ = tuning_profile(config)
    if config.tvm.remote is None and not profile.runs_here():
        raise ConfigError(f"{profile.name} is not this machine: tuning measures on the device; give --rpc-tracker "
                          f"and --rpc-key of its RPC servers")
    profile, model, shapes, _ = backend_model(config)
    runner = ms_runner(config.tvm.remote) if config.tvm.remote is not None else None
    db = tuning_database(model, profile, config.timing.thread_count, shapes, root)
    return tune(model, profile, trials=trials, time_budget_s=time_budget_s, db=db, threads=config.timing.thread_count,
                runner=runner, progress=progress, shapes=shapes)


_UNITS = {"s": 1, "m": 60, "h": 3600, "": 1}


def parse_duration(text: str) -> float:
    """"90", "90s", "30m", "1h30m" -> seconds."""
    parts = re.fullmatch(r"\s*((\d+(\.\d+)?)\s*([hms]?)\s*)+", text or "")
    if not parts:
        raise ConfigError(f"--time-budget {text!r}: give a duration such as 90s, 30m or 1h30m")
    seconds = sum(float(n) * _UNITS[u] for n, _, u in re.findall(r"(\d+(\.\d+)?)\s*([hms]?)", text))
    if not seconds > 0:
        raise ConfigError(f"--time-budget {text!r} must be more than 0")
    return seconds
