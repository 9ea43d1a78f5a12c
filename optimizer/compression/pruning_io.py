"""Saving and loading pruned modules: ``save_module`` writes model.pt, model.pt2, model.onnx,
pruned_state.pth and prune.json; ``load_module`` reads them back without unpickling anything.

Guarantees: nothing read from a folder is unpickled (the state is tensors and plain values read
with ``torch.load(weights_only=True)``) and no native code is loaded: torch.export.load reads a
model.pt2 rebuilt from the entries save_module writes, each checked, and any other entry (pickled
or opaque objects, AOTInductor libraries, a name twice) or a models/model.json carrying Python (shape
expressions sympy evaluates, guard code, names pasted into generated source, calls that are not
torch operators) is refused before torch reads anything;
a folder is replaced only when an earlier save wrote it.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from dlopt.compression.exporter import export, forward_names
from dlopt.compression.pruning import DESCRIPTION, SAVED_BY, PruneReport, _as_tuple, _layer_sizes
from dlopt.compression.pt2_check import safe_pt2
from dlopt.core.errors import ConfigError, first_line


def save_module(module: Any, example_inputs: Any, folder: str | os.PathLike, *,
                report: PruneReport | None = None) -> Path:
    """Write ``folder``: model.pt (torch.save of the whole module: loading needs its class),
    model.pt2 (torch.export: loads without the class), model.onnx (``dlopt.export``, symbolic
    batch), pruned_state.pth (tensors and plain attribute values, read back with
    ``torch.load(weights_only=True)``: rebuilds a fresh instance of the original class) and
    prune.json (the report and the layer shapes).  model.pt is a pickle: dlopt never reads it.

    The folder is written beside its final place and renamed into it; an existing folder
    is replaced only if an earlier save wrote it; missing parent folders are created.
    """
    import torch

    folder = Path(folder)
    if folder.exists() and not _saved_by_us(folder):
        raise ConfigError(f"{folder} exists and was not written by dlopt.prune; choose another folder")
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)  # as compile's -o: build/pruned needs no mkdir first
    except OSError as e:
        raise ConfigError(f"cannot create {folder.parent}: {e.strerror}") from None
    inputs = _as_tuple(example_inputs)
    was_training = module.training
    module.eval()
    staged = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    os.chmod(staged, 0o755)  # mkdtemp's 0700 would outlive the rename
    try:
        torch.save(module, staged / "model.pt")
        # batch 2 for the example: torch.export specialises a dimension of size 1
        doubled = tuple(torch.cat([t, t]) for t in inputs)
        batch = torch.export.Dim("batch", min=1)
        program = torch.export.export(module, doubled, dynamic_shapes=tuple({0: batch} for _ in doubled))
        torch.export.save(program, staged / "model.pt2")
        names = forward_names(module, len(inputs))
        export(module, inputs, staged / "model.onnx", dynamic_axes={n: {0: "batch"} for n in names},
               input_names=names)
        torch.save(_plain_state(module), staged / STATE)
        description = {
            "saved_by": SAVED_BY,
            "class": f"{type(module).__module__}.{type(module).__qualname__}",
            "inputs": [{"name": n, "shape": list(t.shape), "dtype": str(t.dtype)} for n, t in zip(names, inputs)],
            "layers": {name: list(size[:3]) for name, size in _layer_sizes(module).items()},
            "report": report.to_dict() if report is not None else None,
        }
        (staged / DESCRIPTION).write_text(json.dumps(description, indent=2) + "\n")
        if folder.exists():
            shutil.rmtree(folder)
        staged.rename(folder)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    finally:
        module.train(was_training)
    return folder


def _saved_by_us(folder: Path) -> bool:
    try:
        return json.loads((folder / DESCRIPTION).read_text()).get("saved_by") == SAVED_BY
    except (OSError, ValueError, AttributeError):
        return False


def load_module(folder: str | os.PathLike, *, into: Any = None):
    """The module saved by :func:`save_module`, in eval mode.

    Without ``into``: from model.pt2, with no need for the original class (a
    ``torch.fx.GraphModule`` that computes the same function).  With ``into`` (a fresh,
    unpruned instance of the original class): that instance, reshaped to the pruned
    shapes and loaded with the saved weights.  Nothing in the folder is unpickled: the
    state holds tensors and plain values only, read with ``torch.load(weights_only=True)``,
    and model.pt2 is read only if it holds just the entries save_module writes (see
    :func:`dlopt.compression.pt2_check.safe_pt2`).
    """
    import torch

    folder = Path(folder)
    if not _saved_by_us(folder):
        raise ConfigError(f"{folder} is not a folder written by dlopt.prune (no {DESCRIPTION})")
    if into is not None:
        return _rebuilt(into, _read_state(folder / STATE)).eval()
    data = safe_pt2(_read_bytes(folder / "model.pt2"), folder / "model.pt2")
    try:
        return torch.export.load(io.BytesIO(data)).module()
    except Exception as exc:  # noqa: BLE001 - torch's deserialiser refusing a damaged archive
        raise ConfigError(f"{folder / 'model.pt2'} could not be read by torch.export.load: {first_line(exc)}; "
                          f"save the module again") from exc


# -- the state: tensors and plain values, never pickled objects ----------------------------------------

STATE = "pruned_state.pth"
STATE_FORMAT = "dlopt.prune.state/1"
_PLAIN = (bool, int, float, str, type(None))


def _plain(value) -> bool:
    return isinstance(value, _PLAIN) or (isinstance(value, (tuple, list)) and all(_plain(v) for v in value))


def _plain_state(module) -> dict:
    """Every parameter and buffer by name (shared ones under each of their names) and each module's
    public attributes that are plain values (channel counts, groups, normalized_shape, head counts):
    what a fresh instance needs to take the pruned shapes; torch.load(weights_only=True) reads it."""
    tensors = {n: t.detach() for n, t in module.named_parameters(remove_duplicate=False)}
    tensors.update((n, t.detach()) for n, t in module.named_buffers(remove_duplicate=False))
    attributes = {name: {k: v for k, v in vars(m).items() if not k.startswith("_") and k != "training" and _plain(v)}
                  for name, m in module.named_modules()}
    return {"format": STATE_FORMAT, "tensors": tensors, "attributes": attributes}


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {first_line(exc)}") from exc


def _read_state(path: Path) -> dict:
    import pickle

    import torch

    data = _read_bytes(path)
    try:
        state = torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as exc:
        raise ConfigError(f"{path} holds pickled Python objects, not only tensors; dlopt does not unpickle them "
                          f"(an older dlopt.prune or someone else wrote it): save the module again") from exc
    except Exception as exc:  # noqa: BLE001 - not a torch.save file at all
        raise ConfigError(f"{path} is not a state dlopt.prune wrote ({first_line(exc)}); save the module "
                          f"again") from exc
    if not (isinstance(state, dict) and state.get("format") == STATE_FORMAT and isinstance(state.get("tensors"), dict)
            and isinstance(state.get("attributes"), dict)):
        raise ConfigError(f"{path} is not a state this dlopt.prune wrote ({STATE_FORMAT}); save the module again")
    return state


def _rebuilt(into, state: dict):
    """``into`` with the saved attributes and tensors; parameters shared in ``into`` stay shared."""
    import torch

    if not isinstance(into, torch.nn.Module):
        raise ConfigError(f"into must be a fresh instance of the pruned model's class, not {type(into).__name__}")
    slots = {}  # name -> (owner, leaf, current tensor, is parameter)
    for name, _ in [*into.named_parameters(remove_duplicate=False), *into.named_buffers(remove_duplicate=False)]:
        owner_name, _, leaf = name.rpartition(".")
        owner = into.get_submodule(owner_name)
        is_param = leaf in owner._parameters
        slots[name] = (owner, leaf, (owner._parameters if is_param else owner._buffers)[leaf], is_param)
    tensors = state["tensors"]
    missing, unexpected = sorted(set(slots) - set(tensors)), sorted(set(tensors) - set(slots))
    modules = dict(into.named_modules())
    strange = sorted(set(state["attributes"]) - set(modules))
    if missing or unexpected or strange:
        absent = unexpected or strange
        what = f"it has no {absent[0]!r}" if absent else f"its {missing[0]!r} was not saved"
        raise ConfigError(f"into ({type(into).__name__}) does not match the saved module: {what}; give a fresh "
                          f"instance of the class that was pruned")
    for name, attrs in state["attributes"].items():
        module = modules[name]
        for key, value in (attrs.items() if isinstance(attrs, dict) else ()):
            if _plain(value) and key in vars(module) and _plain(getattr(module, key)):
                setattr(module, key, tuple(value) if isinstance(getattr(module, key), tuple) else value)
    replaced: dict[int, Any] = {}
    for name, (owner, leaf, current, is_param) in slots.items():
        saved = tensors[name]
        if not isinstance(saved, torch.Tensor):
            raise ConfigError(f"the saved {name!r} is not a tensor; save the module again")
        new = replaced.get(id(current))
        if new is None:
            new = (torch.nn.Parameter(saved.clone(), requires_grad=current.requires_grad) if is_param
                   else saved.clone())
            replaced[id(current)] = new
        elif new.shape != saved.shape:
            raise ConfigError(f"the saved {name!r} is shared in the model but saved with another shape; save the "
                              f"module again")
        (owner._parameters if is_param else owner._buffers)[leaf] = new
    return into
