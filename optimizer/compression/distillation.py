"""``dlopt.distill``: train a student to match a teacher (knowledge distillation).

The loss per batch is ``alpha * T^2 * KL(teacher || student at temperature T)``
(Hinton et al.'s soft targets; T^2 keeps the gradient scale independent of T)
``+ (1 - alpha) * cross-entropy with the labels`` (when the loader yields labels)
``+ feature_weight * sum of MSE between paired intermediate features``.  Features are
taken with forward hooks on named modules; where a student feature is narrower than
its teacher's, a learned 1x1 projection (a 1x1 convolution for NCHW maps, a linear
layer otherwise) widens it, and is trained with the student and then dropped.

Guarantees: the teacher is never updated (eval mode, no gradients); the student is
returned in eval mode; hooks are removed and torch's thread count restored even when a
callback or the loader raises.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence

from dlopt.core.errors import ConfigError
from dlopt.core.optional import require

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistillEvent:
    """What a callback receives after each step (``kind="step"``) and each epoch (``"epoch"``).

    Step events carry that batch's losses; epoch events their means over the epoch and,
    when ``eval_loader`` was given, the student's top-1 accuracy on it.
    """

    kind: str
    epoch: int
    step: int
    loss: float
    kd_loss: float
    ce_loss: float | None
    feature_loss: float | None
    accuracy: float | None = None
    seconds: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class DistillResult:
    """The trained student and one :class:`DistillEvent` per epoch; unpacks as ``student, history``."""

    student: Any
    history: list[DistillEvent]

    def __iter__(self):
        return iter((self.student, self.history))


def _torch():
    return require("torch", "torch", "distillation needs torch")


def kd_loss(student_logits, teacher_logits, temperature: float = 4.0):
    """``T^2 * KL(softmax(teacher / T) || softmax(student / T))``, averaged over the batch."""
    torch = _torch()
    f = torch.nn.functional
    return f.kl_div(f.log_softmax(student_logits / temperature, dim=-1),
                    f.log_softmax(teacher_logits / temperature, dim=-1),
                    reduction="batchmean", log_target=True) * temperature ** 2


def split_batch(batch) -> tuple[tuple, Any]:
    """(inputs, labels or None) from a loader's batch: a tensor, (x, y), or (x1, x2, ..., y) with labels last."""
    torch = _torch()
    if isinstance(batch, torch.Tensor):
        return (batch,), None
    if isinstance(batch, Mapping):
        raise ConfigError("the train loader yields dicts; distill needs tensors or (inputs..., labels) tuples")
    batch = tuple(batch)
    if len(batch) == 1:
        return batch, None
    return batch[:-1], batch[-1]


class _Features:
    """Forward hooks that keep the latest output of named modules."""

    def __init__(self, model, names: Sequence[str], who: str):
        modules = dict(model.named_modules())
        missing = [n for n in names if n not in modules]
        if missing:
            raise ConfigError(f"feature_pairs name {', '.join(repr(n) for n in missing)}, not modules of the {who} "
                              f"(see {who}.named_modules())")
        self.values: dict[str, Any] = {}
        self.hooks = [modules[n].register_forward_hook(self._keeper(n)) for n in names]

    def _keeper(self, name: str):
        def keep(_module, _inputs, output):
            self.values[name] = output[0] if isinstance(output, (tuple, list)) else output
        return keep

    def remove(self) -> None:
        for hook in self.hooks:
            hook.remove()


def _projection(student_feature, teacher_feature):
    """A learned map from the student's feature width to the teacher's, or None when they match."""
    torch = _torch()
    if student_feature.shape == teacher_feature.shape:
        return None
    s, t = student_feature.shape, teacher_feature.shape
    if len(s) != len(t) or s[0] != t[0] or (len(s) == 4 and s[2:] != t[2:]) or (len(s) != 4 and s[1:-1] != t[1:-1]):
        raise ConfigError(f"feature shapes {tuple(s)} (student) and {tuple(t)} (teacher) differ in more than width")
    if len(s) == 4:  # NCHW: widen the channels
        return torch.nn.Conv2d(s[1], t[1], kernel_size=1, bias=False)
    return torch.nn.Linear(s[-1], t[-1], bias=False)


def accuracy(model, batches: Iterable) -> float | None:
    """Top-1 of ``model`` over ``(inputs..., labels)`` batches; None when they carry no labels."""
    torch = _torch()
    correct = seen = 0
    with torch.no_grad():
        for batch in batches:
            inputs, labels = split_batch(batch)
            if labels is None:
                return None
            correct += int((model(*inputs).argmax(-1) == labels).sum())
            seen += len(labels)
    return correct / seen if seen else None


def distill(
    teacher: Any,
    student: Any,
    train_loader: Iterable,
    *,
    epochs: int = 1,
    temperature: float = 4.0,
    alpha: float = 0.7,
    feature_pairs: Mapping[str, str] | Sequence[tuple[str, str]] | None = None,
    feature_weight: float = 1.0,
    optimizer: Any = None,
    lr: float = 1e-3,
    eval_loader: Iterable | None = None,
    callbacks: Sequence[Callable[[DistillEvent], None]] = (),
    max_steps: int | None = None,
    threads: int | None = None,
) -> DistillResult:
    """Train ``student`` on ``train_loader`` to match ``teacher``; returns the student and a history.

    ``train_loader`` yields input tensors, or tuples whose last item is the labels (a
    torch DataLoader over a TensorDataset(x, y) does).  ``feature_pairs`` maps student
    module names to teacher module names (``{"layer2": "layer2"}``) whose outputs are
    matched.  ``optimizer`` defaults to Adam(lr) with cosine decay over the run; a given
    optimizer gets the projections as an extra parameter group.  ``callbacks`` get a
    :class:`DistillEvent` after every step and epoch.  ``max_steps`` stops early (tests).
    """
    torch = _torch()
    _check_arguments(torch, teacher, student, epochs, temperature, alpha)
    pairs = list(feature_pairs.items() if isinstance(feature_pairs, Mapping) else feature_pairs or ())
    threads_before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    teacher_mode = teacher.training
    teacher.eval()
    features = _FeatureMatch(student, teacher, pairs) if pairs else None
    history: list[DistillEvent] = []
    try:
        own_optimizer = optimizer is None
        if own_optimizer:
            optimizer = torch.optim.Adam(list(student.parameters()), lr=lr)
        total = _total_steps(train_loader, epochs, max_steps)
        schedule = (torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
                    if own_optimizer and total else None)
        step = 0
        loss = _Loss(teacher, student, temperature, alpha, features, feature_weight, optimizer)
        for epoch in range(1, epochs + 1):
            start = time.perf_counter()
            sums, batches, labelled, step = _train_epoch(loss, student, train_loader, optimizer, schedule, epoch,
                                                         step, callbacks, max_steps)
            student.eval()
            n = max(batches, 1)
            summary = DistillEvent(
                "epoch", epoch, step, sums["loss"] / n, sums["kd"] / n,
                sums["ce"] / n if labelled else None,
                sums["feature"] / n if pairs else None,
                accuracy=accuracy(student, eval_loader) if eval_loader is not None else None,
                seconds=round(time.perf_counter() - start, 3))
            history.append(summary)
            logger.info("distil epoch %d/%d: loss %.4f (kd %.4f)%s, %.0f s", epoch, epochs, summary.loss,
                        summary.kd_loss, "" if summary.accuracy is None else f", top-1 {summary.accuracy:.2%}",
                        summary.seconds)
            for callback in callbacks:
                callback(summary)
            if max_steps is not None and step >= max_steps:
                break
    finally:
        if features is not None:
            features.remove()
        teacher.train(teacher_mode)
        torch.set_num_threads(threads_before)
    student.eval()
    return DistillResult(student, history)


def _check_arguments(torch, teacher, student, epochs: int, temperature: float, alpha: float) -> None:
    if not isinstance(teacher, torch.nn.Module) or not isinstance(student, torch.nn.Module):
        raise ConfigError("distill takes a teacher and a student that are torch.nn.Modules")
    if epochs < 1:
        raise ConfigError(f"epochs must be at least 1, got {epochs}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ConfigError(f"temperature must be a positive number, got {temperature}")
    if not 0 <= alpha <= 1:
        raise ConfigError(f"alpha weighs the soft targets against the labels and lies in [0, 1], got {alpha}")


def _total_steps(train_loader: Iterable, epochs: int, max_steps: int | None) -> int | None:
    """Steps of the whole run, for the cosine schedule; None when the loader has no length and no cap is set."""
    try:
        steps_per_epoch = len(train_loader)  # type: ignore[arg-type]
    except TypeError:
        steps_per_epoch = None
    total = steps_per_epoch * epochs if steps_per_epoch else None
    if max_steps is not None:
        total = min(total, max_steps) if total else max_steps
    return total


class _FeatureMatch:
    """Hooks on the paired modules of both models, and a projection per student module whose output's
    channels differ from its teacher's (made at the first batch, added to the optimizer then)."""

    def __init__(self, student, teacher, pairs: list[tuple[str, str]]) -> None:
        self.pairs = pairs
        self.student = _Features(student, [s for s, _ in pairs], "student")
        try:
            self.teacher = _Features(teacher, [t for _, t in pairs], "teacher")
        except BaseException:  # a teacher module that is not there: the student keeps no hook either
            self.student.remove()
            raise
        self.projections: dict[str, Any] = {}

    def loss(self, optimizer):
        """The summed MSE between each pair's last outputs (the student's projected where needed)."""
        torch = _torch()
        feature = 0
        for s_name, t_name in self.pairs:
            s_value, t_value = self.student.values[s_name], self.teacher.values[t_name].detach()
            if s_name not in self.projections:
                self.projections[s_name] = _projection(s_value, t_value)
                if self.projections[s_name] is not None:
                    optimizer.add_param_group({"params": list(self.projections[s_name].parameters())})
            if self.projections[s_name] is not None:
                s_value = self.projections[s_name](s_value)
            feature = feature + torch.nn.functional.mse_loss(s_value, t_value)
        return feature

    def remove(self) -> None:
        self.student.remove()
        self.teacher.remove()


@dataclass
class _Loss:
    """One batch's loss: soft targets, labels where the batch has them, matched features."""

    teacher: Any
    student: Any
    temperature: float
    alpha: float
    features: _FeatureMatch | None
    feature_weight: float
    optimizer: Any

    def __call__(self, batch):
        """(loss, kd, ce or None, feature or None) as tensors."""
        torch = _torch()
        inputs, labels = split_batch(batch)
        with torch.no_grad():
            teacher_logits = self.teacher(*inputs)
        student_logits = self.student(*inputs)
        soft = kd_loss(student_logits, teacher_logits, self.temperature)
        hard = torch.nn.functional.cross_entropy(student_logits, labels) if labels is not None else None
        loss = self.alpha * soft + (1 - self.alpha) * hard if hard is not None else soft
        feature = None
        if self.features is not None:
            feature = self.features.loss(self.optimizer)
            loss = loss + self.feature_weight * feature
        return loss, soft, hard, feature


def _train_epoch(loss_of: _Loss, student, train_loader: Iterable, optimizer, schedule, epoch: int, step: int,
                 callbacks, max_steps: int | None) -> tuple[dict[str, float], int, bool, int]:
    """One pass over ``train_loader``: (summed losses, batches, whether any had labels, the step reached)."""
    student.train()
    sums = {"loss": 0.0, "kd": 0.0, "ce": 0.0, "feature": 0.0}
    batches, labelled = 0, False
    for batch in train_loader:
        loss, soft, hard, feature = loss_of(batch)
        labelled = labelled or hard is not None
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if schedule is not None:
            schedule.step()
        step += 1
        batches += 1
        event = DistillEvent("step", epoch, step, loss.item(), soft.item(),
                             None if hard is None else hard.item(), None if feature is None else feature.item())
        for key, value in (("loss", event.loss), ("kd", event.kd_loss), ("ce", event.ce_loss),
                           ("feature", event.feature_loss)):
            sums[key] += value or 0.0
        for callback in callbacks:
            callback(event)
        if max_steps is not None and step >= max_steps:
            break
    return sums, batches, labelled, step
