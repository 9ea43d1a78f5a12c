"""``dlopt.export``: a torch module to one verified ONNX file.

Guarantees: when :func:`export` returns, ``path`` holds a model that passes
``onnx.checker`` and that ONNX Runtime runs on the example inputs to the same
outputs as the module in eval mode, within ``rtol``/``atol``; when an input's first axis
is symbolic, also at one more sample than the example (its rows repeated), so a batch
the exporter fixed in a Reshape is refused, not written.  Small models are one
self-contained file; weights too large for one protobuf go to ``<name>.data``
beside it.  When anything fails nothing is left at ``path``.  torch is imported
only here, inside the function, so the rest of dlopt runs without it.
"""

from __future__ import annotations

import contextlib

import inspect
import logging
import warnings
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from dlopt.core.errors import CompileError, ConfigError, ModelError, TargetUnavailable, first_line
from dlopt.core.model_io import save_ir
from dlopt.core.specs import input_specs

logger = logging.getLogger(__name__)


def export(
    module: Any,
    example_inputs: Any,
    path: str | os.PathLike,
    dynamic_axes: Mapping[str, Mapping[int, str] | Sequence[int]] | None = None,
    *,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    opset: int | None = None,
    rtol: float = 1e-4,
    atol: float = 1e-5,
    verify: bool = True,
    external_data: bool = False,
) -> Path:
    """Export ``module`` called on ``example_inputs`` (a tensor or tuple of tensors) to ``path``.

    ``dynamic_axes`` is the familiar ``{"input": {0: "batch"}}``: named axes stay
    symbolic in the ONNX graph.  Input names default to the parameter names of
    ``forward``, output names to ``output`` (``output_0``, ... for several).
    The dynamo exporter is tried first (without its graph optimiser, so the file is
    a plain translation for ``dlopt compile`` to optimise) and the TorchScript
    exporter when it fails.  The module is exported and checked in eval mode; its
    own mode is restored after.  ``verify=False`` leaves out the runs on ONNX Runtime (for a caller
    with a check of its own: ONNX Runtime's copy of the weights beside the module's doubles the
    memory); ``external_data`` writes every weight to ``<name>.data`` (no in-memory copy of them).

    Raises :class:`TargetUnavailable` without torch, :class:`ConfigError` when
    ``path``'s folder is missing or ``dynamic_axes`` names neither an input nor an
    output, :class:`ModelError` when the file declares a symbolic batch but does not
    run like the module at another batch, :class:`CompileError`
    when no exporter succeeds, the result is invalid, or its outputs differ from
    torch's.
    """
    try:
        import torch
    except ImportError as exc:
        raise TargetUnavailable("torch is not installed; install dlopt[torch]") from exc

    args = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    path = Path(path)
    if not path.parent.is_dir():
        raise ConfigError(f"cannot write {path}: folder {path.parent} does not exist")
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            expected = _flatten(module(*args))
        names_in = list(input_names) if input_names is not None else forward_names(module, len(args))
        names_out = list(output_names) if output_names is not None else (
            ["output"] if len(expected) == 1 else [f"output_{i}" for i in range(len(expected))])
        _check_axes(dynamic_axes, names_in, names_out)
        # Build in a private folder beside ``path`` so the final rename stays on one file system.
        work = Path(tempfile.mkdtemp(prefix=f".{path.name}.export-", dir=path.parent))
        try:
            with _quiet_exporter():
                model = _export_ir(torch, module, args, work, names_in, names_out, dynamic_axes, opset)
            files = _save_and_check(model, work / path.name, external=external_data)
            del model
            if verify:
                _verify(files[0], dict(zip(names_in, (_numpy(a) for a in args))), expected, rtol, atol)
                _verify_other_batch(torch, module, files[0], args, names_in, rtol, atol)
            # Weights first, model last: the model file appears only once it is complete.
            for staged in reversed(files):
                os.replace(staged, path.parent / staged.name)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    finally:
        module.train(was_training)
    logger.info("exported %s to %s", type(module).__name__, path)
    return path


def forward_names(module: Any, count: int) -> list[str]:
    """The dynamo exporter names inputs after ``forward``'s parameters; use them for both exporters."""
    try:
        params = [p.name for p in inspect.signature(module.forward).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):
        params = []
    if len(params) >= count:
        return params[:count]
    return ["input"] if count == 1 else [f"input_{i}" for i in range(count)]


def _flatten(outputs: Any) -> list:
    if isinstance(outputs, (tuple, list)):
        return [t for o in outputs for t in _flatten(o)]
    return [outputs]


def _numpy(tensor: Any) -> np.ndarray:
    return tensor.detach().cpu().numpy()


@contextlib.contextmanager
def _quiet_exporter():
    """torch's exporter logs a line per missing optional op library (torchvision) and warns about its
    own deprecations: noise for dlopt's users, so it goes to debug unless -vv."""
    torch_log = logging.getLogger("torch.onnx")
    level = torch_log.level
    if not logger.isEnabledFor(logging.DEBUG):
        torch_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            yield
    finally:
        torch_log.setLevel(level)


def _export_ir(torch, module, args, work: Path, names_in, names_out, dynamic_axes, opset):
    """An ``onnx_ir.Model`` from the dynamo exporter, or from TorchScript when dynamo fails."""
    import onnx_ir as ir

    common = dict(input_names=names_in, output_names=names_out, opset_version=opset, verbose=False)
    try:
        # optimize=False: dlopt's own pipeline optimises and reports each change; the exporter's
        # optimiser would do part of that unrecorded (it folds BatchNormalization, for one).
        program = torch.onnx.export(module, args, dynamo=True, optimize=False,
                                    dynamic_shapes=_dynamic_shapes(dynamic_axes, names_in), **common)
        return program.model
    except Exception as exc:  # torch.export raises many types; the fallback is the answer to all
        dynamo_reason = first_line(exc)
        logger.warning("dynamo exporter failed (%s); falling back to the TorchScript exporter", dynamo_reason)
    scratch = work / "torchscript.onnx"
    try:
        torch.onnx.export(module, args, str(scratch), dynamo=False, dynamic_axes=dict(dynamic_axes or {}), **common)
        return ir.load(str(scratch))
    except Exception as exc:
        raise CompileError(f"cannot export {type(module).__name__} to ONNX: dynamo exporter: {dynamo_reason}; "
                           f"TorchScript exporter: {first_line(exc)}") from exc


def _check_axes(dynamic_axes, names_in: list[str], names_out: list[str]) -> None:
    unknown = sorted(set(dynamic_axes or {}) - set(names_in) - set(names_out))
    if unknown:
        raise ConfigError(f"dynamic_axes names {unknown} are neither inputs {names_in} nor outputs {names_out}")


def _dynamic_shapes(dynamic_axes, names_in: list[str]):
    """``dynamic_axes`` as dynamo's positional ``dynamic_shapes``; names become the ONNX dim names.

    Output axes are left out: the exporter derives them from the inputs.
    """
    if not dynamic_axes:
        return None
    shapes = []
    for name in names_in:
        axes = dynamic_axes.get(name)
        if axes is None:
            shapes.append(None)
        elif isinstance(axes, Mapping):
            shapes.append({int(axis): str(label) for axis, label in axes.items()})
        else:  # a list of axes: name them like the TorchScript exporter does
            shapes.append({int(axis): f"{name}_dynamic_axes_{int(axis) + 1}" for axis in axes})
    return tuple(shapes)


def _save_and_check(model, target: Path, *, external: bool = False) -> list[Path]:
    """Write ``model`` inline (or with ``.data`` when huge or ``external``) and validate it with onnx.checker."""
    import onnx

    try:
        files = save_ir(model, target, external=external)
        onnx.checker.check_model(str(target))
    except Exception as exc:
        raise CompileError(f"exported model is not valid ONNX: {first_line(exc)}") from exc
    return files


def _run_ort(model_path: Path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # a failing kernel is reported once, in dlopt's error
    session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
    return session.run(None, {i.name: feeds[i.name] for i in session.get_inputs()})


def _difference(actual: list, expected: list, rtol: float, atol: float) -> tuple[str | None, float]:
    """(what differs, in words, or None; the largest absolute error) between ORT's and torch's outputs."""
    if len(actual) != len(expected):
        return f"the file has {len(actual)} outputs, the module returns {len(expected)}", float("inf")
    worst = 0.0
    for index, (got, want) in enumerate(zip(actual, (_numpy(e) for e in expected))):
        if got.shape != want.shape:
            return (f"output {index} has shape {list(got.shape)} where torch's has {list(want.shape)}",
                    float("inf"))
        diff = np.abs(got.astype(np.float64) - want.astype(np.float64))
        worst = max(worst, float(diff.max(initial=0.0)))
        if not np.all(diff <= atol + rtol * np.abs(want.astype(np.float64))):
            return f"max abs error {worst:.3e} (rtol {rtol:g}, atol {atol:g})", worst
    return None, worst


def _verify(model_path: Path, feeds: dict[str, np.ndarray], expected: list, rtol: float, atol: float) -> None:
    """Run the written file on ONNX Runtime and compare every output with torch's."""
    try:
        actual = _run_ort(model_path, feeds)
    except Exception as exc:
        raise CompileError(f"ONNX Runtime cannot run the exported model: {first_line(exc)}") from exc
    problem, worst = _difference(actual, expected, rtol, atol)
    if problem is not None:
        raise CompileError(f"exported model differs from the torch module: {problem}")
    logger.debug("exported outputs match torch: max abs error %.3e", worst)


def symbolic_batch_inputs(model_path: Path) -> dict[str, str]:
    """Input name -> the name of its symbolic first axis ("?" when unnamed), for inputs whose batch is not fixed."""
    import onnx

    proto = onnx.load(str(model_path), load_external_data=False)
    return {s.name: str(s.shape[0] or "?") for s in input_specs(proto) if s.shape and not isinstance(s.shape[0], int)}


def _verify_other_batch(torch, module, model_path: Path, args: tuple, names_in: list[str],
                        rtol: float, atol: float) -> None:
    """A file that declares a symbolic batch must run like the module at another batch too.

    torch's exporters can fix the batch in a Reshape (``x.view(1, ...)``, ``int(x.shape[0])``,
    or a batch of 1 that torch.export specialised) while the input still says ``batch``: such a
    file fails, or answers ``[1, ...]``, at any other batch.  The check feeds one more sample
    than the example, made by repeating its rows.
    """
    symbolic = symbolic_batch_inputs(model_path)
    grown = [i for i, name in enumerate(names_in)
             if name in symbolic and i < len(args) and hasattr(args[i], "shape") and args[i].dim() and len(args[i])]
    if not grown:
        return
    batch = len(args[grown[0]])
    size = batch + 1
    bigger = list(args)
    for i in grown:
        rows = torch.arange(size) % len(args[i])
        bigger[i] = torch.index_select(args[i], 0, rows)
    names = ", ".join(f"{names_in[i]} ({symbolic[names_in[i]]})" for i in grown)
    fix = ("write the module batch-agnostic (x.reshape(x.shape[0], ...) or x.flatten(1), not x.view(1, ...) or "
           "int(x.shape[0])) and export with an example batch of 2 or more, or leave the batch out of dynamic_axes")
    try:
        with torch.no_grad():
            expected = _flatten(module(*bigger))
    except Exception as exc:
        raise ModelError(f"the export declares a symbolic batch for {names}, but the module itself fails at batch "
                         f"{size} ({first_line(exc, 150)}): {fix}") from exc
    try:
        actual = _run_ort(model_path, dict(zip(names_in, (_numpy(a) for a in bigger))))
        problem, worst = _difference(actual, expected, rtol, atol)
    except Exception as exc:
        problem, worst = f"ONNX Runtime fails ({first_line(exc, 150)})", float("inf")
    if problem is not None:
        raise ModelError(f"the export declares a symbolic batch for {names} but works only at the example's batch "
                         f"{batch}: at batch {size} {problem}; the exporter fixed the batch in the graph: {fix}")
    logger.debug("exported outputs match torch at batch %d too: max abs error %.3e", size, worst)
