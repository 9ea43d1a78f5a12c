"""``dlopt.prune``: structured channel pruning of a torch module with torch-pruning.

Guarantees: the returned module is a new one (the argument is left as it was unless
``inplace=True``) whose convolutions and linear layers physically have fewer channels;
it runs on ``example_inputs`` to outputs of the original's shape.  Channels that must
change together (the two inputs of a residual Add, the parts of a concatenation, the
groups of a grouped or depthwise convolution) are pruned together: torch-pruning's
dependency graph finds them.  Layers whose output is a model output (a classifier's
classes) are never pruned, and the report names every layer left whole and why.

The report holds parameters and multiply-adds before and after (torch-pruning's
counter, at ``example_inputs``' shape) and, per convolution and linear layer, the
channels kept.  ``PruneResult.save`` writes the module whole, class-free, as ONNX and
as a rebuildable description; :func:`load_module` reads it back.
"""

from __future__ import annotations

import copy
import logging
import os
from collections import Counter
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

from dlopt.core.errors import ConfigError
from dlopt.core.optional import require

logger = logging.getLogger(__name__)

IMPORTANCE = ("l1", "l2", "lamp", "bn-scale", "random")
SAVED_BY = "dlopt.prune"
DESCRIPTION = "prune.json"


def _tp():
    return require("torch_pruning", "prune", "structured pruning needs torch-pruning")


@dataclass(frozen=True)
class LayerChange:
    """One convolution or linear layer: its channels and parameters before and after."""

    name: str
    kind: str
    out_before: int
    out_after: int
    in_before: int
    in_after: int
    params_before: int
    params_after: int
    why_whole: str = ""  # why its output channels were not pruned (empty when they were)


@dataclass(frozen=True)
class PruneReport:
    ratio: float
    importance: str
    global_pruning: bool
    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    layers: tuple[LayerChange, ...]
    torch_pruning: str = ""

    @property
    def kept_whole(self) -> dict[str, str]:
        """Layers whose output channels were not pruned, with the reason."""
        return {layer.name: layer.why_whole for layer in self.layers if layer.why_whole}

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        return (f"pruned {self.ratio:.0%} of channels ({self.importance} importance): parameters "
                f"{self.params_before:,} -> {self.params_after:,} ({self.params_after / self.params_before:.1%}), "
                f"multiply-adds {self.macs_before:,} -> {self.macs_after:,} "
                f"({self.macs_after / max(self.macs_before, 1):.1%})")

    def table(self) -> str:
        from tabulate import tabulate

        rows = [(layer.name, layer.kind, f"{layer.out_before} -> {layer.out_after}",
                 f"{layer.in_before} -> {layer.in_after}", f"{layer.params_before:,} -> {layer.params_after:,}",
                 layer.why_whole) for layer in self.layers]
        return self.summary() + "\n\n" + tabulate(
            rows, headers=("layer", "type", "out channels", "in channels", "parameters", "kept whole because"),
            tablefmt="github")


@dataclass
class PruneResult:
    """The pruned module and its report; unpacks as ``module, report = dlopt.prune(...)``."""

    module: Any
    report: PruneReport
    example_inputs: Any = field(repr=False, default=None)

    def __iter__(self):
        return iter((self.module, self.report))

    def save(self, folder: str | os.PathLike) -> Path:
        """Write ``folder`` with the module several ways, all at once or not at all; see :func:`save_module`."""
        return save_module(self.module, self.example_inputs, folder, report=self.report)


def _as_tuple(example_inputs) -> tuple:
    return tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)


def _importance(tp, name: str):
    if name not in IMPORTANCE:
        raise ConfigError(f"unknown importance {name!r}; choose from {', '.join(IMPORTANCE)}")
    return {
        "l1": lambda: tp.importance.GroupMagnitudeImportance(p=1),
        "l2": lambda: tp.importance.GroupMagnitudeImportance(p=2),
        "lamp": lambda: tp.importance.LAMPImportance(p=2),
        "bn-scale": lambda: tp.importance.BNScaleImportance(),
        "random": lambda: tp.importance.RandomImportance(),
    }[name]()


def _tensors(value) -> list:
    """Every tensor in a model's outputs: nested tuples, lists and dicts (a HuggingFace ModelOutput is
    one); anything else (an int, None) holds no channels."""
    import torch

    if isinstance(value, torch.Tensor):
        return [value]
    items = value.values() if isinstance(value, Mapping) else value if isinstance(value, (tuple, list)) else ()
    return [t for item in items for t in _tensors(item)]


def _forward_facts(model, inputs: tuple) -> tuple[list, Counter]:
    """The layers whose channels reach a model output, and how often each layer with parameters runs.

    Walks autograd's graph back from every output tensor to the first convolution or linear layer on
    each path (through activations, reshapes and norms, whose channels pass through): a softmax
    after the classifier or a dict of outputs still finds it."""
    import torch

    layers = [m for m in model.modules() if not list(m.children()) and list(m.parameters(recurse=False))]
    produced: dict[Any, Any] = {}
    calls: Counter = Counter()

    def record(module, _inputs, output):
        calls[module] += 1
        for tensor in _tensors(output):
            if tensor.grad_fn is not None:
                produced[tensor.grad_fn] = module

    hooks = [m.register_forward_hook(record) for m in layers]
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for param, _ in flags:
            param.requires_grad_(True)
        with torch.enable_grad():
            outputs = model(*inputs)
    finally:
        for hook in hooks:
            hook.remove()
        for param, flag in flags:
            param.requires_grad_(flag)
    tensors = _tensors(outputs)
    if not tensors:
        raise ConfigError(f"{type(model).__name__} returned no tensor (it returned {type(outputs).__name__}); "
                          f"prune takes a model whose outputs are tensors, or tuples, lists or dicts of them")
    found: list = []
    seen: dict[int, Any] = {}  # holds the nodes too, so no id is reused while walking
    stack = [t.grad_fn for t in tensors if t.grad_fn is not None]
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen[id(node)] = node
        module = produced.get(node)
        if module is not None and module not in found:
            found.append(module)
        if module is None or not isinstance(module, _root_types()):
            stack.extend(n for n, _ in node.next_functions if n is not None)
    return found, calls


def _root_types() -> tuple:
    """The layer types whose output channels torch-pruning prunes (norms pass channels through)."""
    import torch

    return (torch.nn.modules.conv._ConvNd, torch.nn.Linear, torch.nn.Embedding)


def _shared_layers(model, calls: Counter) -> dict:
    """Layers that share a parameter with another or run more than once per forward pass: pruning one
    copy of a tied weight unties it (an embedding and its tied head) and a layer applied twice
    must keep its input and output channels equal."""
    owners: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(param), []).append(name.rpartition(".")[0])
    by_name = dict(model.named_modules())
    shared = {}
    for modules in owners.values():
        for name in dict.fromkeys(modules) if len(set(modules)) > 1 else ():
            others = ", ".join(n for n in dict.fromkeys(modules) if n != name)
            shared.setdefault(by_name[name], f"shares its weight with {others}")
    for module, count in calls.items():
        if count > 1:
            shared.setdefault(module, f"runs {count} times in one forward pass (its weights are shared)")
    return shared


def _channel_partners(graph, module) -> list:
    """The layers whose output channels must change with ``module``'s input or output channels."""
    pruner = graph.get_pruner_of_module(module)
    partners = []
    for prune_fn, count in ((getattr(pruner, "prune_out_channels", None), getattr(pruner, "get_out_channels", None)),
                            (getattr(pruner, "prune_in_channels", None), getattr(pruner, "get_in_channels", None))):
        if prune_fn is None or count is None or module not in graph.module2node or not count(module):
            continue
        try:
            group = graph.get_pruning_group(module, prune_fn, idxs=[0])
        except Exception:  # noqa: BLE001 - a layer torch-pruning cannot prune this way
            continue
        partners += [dep.target.module for dep, _ in group
                     if graph.is_out_channel_pruning_fn(dep.handler) and dep.target.module is not module]
    return partners


def _layer_sizes(model) -> dict[str, tuple[str, int, int, int]]:
    import torch

    sizes = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.modules.conv._ConvNd):
            sizes[name] = (type(module).__name__, module.out_channels, module.in_channels)
        elif isinstance(module, torch.nn.Linear):
            sizes[name] = (type(module).__name__, module.out_features, module.in_features)
        else:
            continue
        sizes[name] += (sum(p.numel() for p in module.parameters(recurse=False)),)
    return sizes


def _why_whole(pruner, tp, module, names: dict, protected: dict) -> str:
    if module in protected:
        return protected[module]
    try:
        group = pruner.DG.get_pruning_group(module, tp.prune_conv_out_channels
                                            if not hasattr(module, "out_features") else tp.prune_linear_out_channels,
                                            idxs=[0])
    except Exception as exc:  # noqa: BLE001 - the dependency graph does not know this layer
        return f"not in torch-pruning's dependency graph ({type(exc).__name__})"
    for dep, _ in group:
        other = dep.target.module
        if other is not module and other in protected:
            return f"its channels are tied to {names.get(other, type(other).__name__)}, which is kept whole"
    return "the pruner left it whole at this ratio (group too small or rounding)"


def prune(
    model: Any,
    example_inputs: Any,
    ratio: float = 0.5,
    *,
    importance: str = "l2",
    ignored_layers: Sequence[Any] | None = None,
    global_pruning: bool = False,
    round_to: int | None = None,
    iterative_steps: int = 1,
    max_layer_ratio: float = 1.0,
    inplace: bool = False,
) -> PruneResult:
    """Remove ``ratio`` of the channels of ``model``'s convolutions and linear layers.

    ``importance`` ranks channels: l1/l2 (group magnitude), lamp, bn-scale (the
    BatchNorm scales after each conv) or random.  ``ignored_layers`` are modules
    (or their names in ``model.named_modules()``) kept whole; layers producing the
    model's outputs always are.  ``global_pruning`` ranks channels across layers
    instead of removing ``ratio`` of each (``max_layer_ratio`` caps any layer);
    ``round_to`` keeps channel counts multiples of it (8 suits SIMD and tensor cores);
    ``iterative_steps`` prunes in that many steps of growing ratio.
    """
    tp = _tp()
    import torch

    if not isinstance(model, torch.nn.Module):
        raise ConfigError(f"prune takes a torch.nn.Module, not {type(model).__name__}")
    if not 0 < ratio < 1:
        raise ConfigError(f"ratio is the fraction of channels to remove, between 0 and 1 (exclusive), got {ratio}")
    if iterative_steps < 1 or (round_to is not None and round_to < 1):
        raise ConfigError("iterative_steps and round_to must be at least 1")
    inputs = _as_tuple(example_inputs)
    was_training = model.training
    work = model if inplace else copy.deepcopy(model)
    work.eval()
    names = {module: name for name, module in work.named_modules()}
    by_name = dict(work.named_modules())
    protected: dict[Any, str] = {}
    for layer in ignored_layers or ():
        if isinstance(layer, str):
            if layer not in by_name:
                raise ConfigError(f"ignored layer {layer!r} is not a module of the model")
            protected[by_name[layer]] = "in ignored_layers"
        else:
            # a module of the argument: map it to its copy in the working model by name
            name = {m: n for n, m in model.named_modules()}.get(layer)
            if name is None:
                raise ConfigError(f"ignored layer {type(layer).__name__} is not a module of the model")
            protected[by_name[name]] = "in ignored_layers"
    outputs, calls = _forward_facts(work, inputs)
    shared = _shared_layers(work, calls)
    for layer, why in shared.items():
        protected.setdefault(layer, why)
    for layer in outputs:
        protected.setdefault(layer, "produces the model's output")
    if shared:  # a tied or reused layer keeps its input channels too: the layers feeding it stay whole
        graph = tp.DependencyGraph().build_dependency(work, example_inputs=inputs, output_transform=_tensors)
        for layer, why in shared.items():
            for partner in _channel_partners(graph, layer):
                protected.setdefault(partner, f"its channels are tied to {names[layer]}, which {why}")
    macs_before, params_before = tp.utils.count_ops_and_params(work, inputs)
    before = _layer_sizes(work)
    pruner = tp.pruner.BasePruner(
        work, inputs, importance=_importance(tp, importance), global_pruning=global_pruning,
        pruning_ratio=ratio, max_pruning_ratio=max_layer_ratio, iterative_steps=iterative_steps,
        ignored_layers=list(protected), round_to=round_to, output_transform=_tensors,
    )
    for _ in range(iterative_steps):
        pruner.step()
    macs_after, params_after = tp.utils.count_ops_and_params(work, inputs)
    after = _layer_sizes(work)
    layers = []
    for name, (kind, out_b, in_b, params_b) in before.items():
        _, out_a, in_a, params_a = after[name]
        why = "" if out_a < out_b else _why_whole(pruner, tp, by_name[name], names, protected)
        layers.append(LayerChange(name, kind, out_b, out_a, in_b, in_a, params_b, params_a, why))
    work.train(was_training)
    report = PruneReport(ratio=ratio, importance=importance, global_pruning=global_pruning,
                         params_before=int(params_before), params_after=int(params_after),
                         macs_before=int(macs_before), macs_after=int(macs_after), layers=tuple(layers),
                         torch_pruning=getattr(tp, "__version__", ""))
    logger.info(report.summary())
    return PruneResult(work, report, tuple(t.detach() for t in inputs))


# -- saving and loading -------------------------------------------------------------------------------


def save_module(module: Any, example_inputs: Any, folder: str | os.PathLike, *,
                report: PruneReport | None = None) -> Path:
    """See :func:`dlopt.compression.pruning_io.save_module`."""
    from dlopt.compression.pruning_io import save_module as save

    return save(module, example_inputs, folder, report=report)


def load_module(folder: str | os.PathLike, *, into: Any = None):
    """See :func:`dlopt.compression.pruning_io.load_module`."""
    from dlopt.compression.pruning_io import load_module as load

    return load(folder, into=into)
