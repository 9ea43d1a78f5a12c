"""The calibration data contract shared by every source.

A :class:`CalibrationDataset` is an iterable of feed dicts ``{input name: batch}``
that streams: a source hands over chunks of samples one at a time, and this base
class checks each chunk against the model's inputs, applies ``limit`` and cuts the
stream into batches.  What iteration guarantees, whatever the source:

- every feed holds exactly the model's input names, with the model's dtypes, ranks
  and fixed dimensions, and no NaN or Inf in floating-point inputs;
- all inputs of a feed share the first (sample) axis;
- a model with a fixed first dimension ``B`` gets batches of exactly ``B`` samples
  (a remainder is dropped); otherwise every batch holds ``batch_size`` samples except
  possibly the last (``batch_size=None``: the source's own batches, unchanged);
- at most ``limit`` samples are read from the source, and no more are pulled;
- each input's samples are items along its batch axis or whole tensors as fed
  (:mod:`dlopt.core.layout`); a source with whole-tensor samples yields one sample per feed;
- inputs given as ``constants`` need not be in the source and are added to every feed;
- anything else raises :class:`dlopt.core.errors.DataError` with a one-line message that
  names the input, the source's batch (0-based, as the source delivered it) and the
  sample range it was found in; mismatches end with what the model expects.
"""

from __future__ import annotations

import logging
from typing import Iterator, Sequence

import numpy as np

from dlopt.core.errors import ConfigError, DataError
from dlopt.core.layout import ITEM, Layout, layout_of, sample_kind

logger = logging.getLogger(__name__)

LABELS = "labels"

Feed = dict[str, np.ndarray]


def expected(specs: Sequence) -> str:
    """The tail of every mismatch message: what the model takes."""
    return "; the model expects " + ", ".join(spec.describe() for spec in specs)


def fixed_batch(specs: Sequence) -> int | None:
    """The model's fixed first dimension when its inputs agree on one, else None."""
    fixed = {s.shape[0] for s in specs if s.shape and isinstance(s.shape[0], int) and s.shape[0] > 0}
    return fixed.pop() if len(fixed) == 1 else None


def shape_mismatch(spec, shape: tuple[int, ...]) -> bool:
    """Whether ``shape`` (first axis = samples) is neither items nor whole tensors of ``spec`` (dlopt.core.layout)."""
    from dlopt.core.layout import batch_axes

    try:
        sample_kind(spec, tuple(shape), batch_axes([spec])[spec.name], "")
    except DataError:
        return True
    return False


def positive(name: str, value: int | None) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


class CalibrationDataset:
    """Batches of checked feed dicts, streamed from a source; see the module docstring.

    Subclasses implement :meth:`_chunks`.  ``samples`` is the number of samples
    iteration yields when known (up front for files, after a first full pass for
    streams), else None.  ``has_labels`` is True, False or None (not known yet).
    """

    def __init__(self, specs: Sequence, *, where: str, batch_size: int | None = None,
                 limit: int | None = None, constants: dict[str, np.ndarray] | None = None) -> None:
        self.all_specs = list(specs)
        self.constants = dict(constants or {})
        self.specs = [s for s in self.all_specs if s.name not in self.constants]
        self.layout: Layout | None = None  # known from file headers, else from the first chunk
        self.where = where  # how messages name the source: a path, "DataLoader", ...
        self.limit = positive("limit", limit)
        requested = positive("batch_size", batch_size)
        fixed = fixed_batch(self.specs)
        self.fixed_batch = fixed is not None
        if fixed is not None and requested not in (None, fixed):
            logger.debug("%s: the model's fixed batch %d overrides batch_size=%d", where, fixed, requested)
        self.batch_size: int | None = fixed if fixed is not None else requested
        self.samples: int | None = None
        self.has_labels: bool | None = None
        self._batch_count: int | None = None

    # -- what a source provides ------------------------------------------------------

    def _chunks(self) -> Iterator[tuple[Feed, np.ndarray | None]]:
        """Yield ``(feed, labels or None)`` chunks of any number of samples, in order."""
        raise NotImplementedError

    def _usable(self, total: int) -> int:
        """How many of ``total`` samples iteration yields; raises when that is none."""
        count = total if self.limit is None else min(total, self.limit)
        if count == 0:
            raise DataError(f"{self.where} holds no samples{expected(self.specs)}")
        if self.fixed_batch:
            if count < self.batch_size:
                raise DataError(f"{self.where}: {count} samples, fewer than the model's fixed batch of "
                                f"{self.batch_size}")
            count -= count % self.batch_size
        return count

    # -- iteration -------------------------------------------------------------------

    def __iter__(self) -> Iterator[Feed]:
        for feed, _ in self.iter_with_labels():
            yield feed

    def iter_with_labels(self) -> Iterator[tuple[Feed, np.ndarray | None]]:
        """Checked batches with their labels (None when the source has none), in step."""
        batches = None
        seen = count = 0
        labelled = None
        for index, (feed, labels) in enumerate(self._chunks()):
            rows = self._check_names(feed, index)
            if self.layout is None:
                self.set_layout({n: a.shape for n, a in feed.items()}, at=f"in batch {index}")
            if batches is None:
                batches = _Rebatch(self.batch_size, keep_remainder=not self.fixed_batch)
            if labelled is not None and labelled != (labels is not None):
                raise DataError(f"{self.where}: batch {index} {'has no' if labelled else 'has'} labels but earlier "
                                f"batches {'do' if labelled else 'do not'}")
            labelled = labels is not None
            take = rows if self.limit is None else min(rows, self.limit - seen)
            if take < rows:
                feed = {name: array[:take] for name, array in feed.items()}
                labels = None if labels is None else labels[:take]
            self._check_values(feed, labels, index, seen, take)
            seen += take
            for batch, batch_labels in batches.add(feed, labels, take):
                count += 1
                yield self._model_feed(batch), batch_labels
            if self.limit is not None and seen >= self.limit:
                break  # pull nothing more: a generator may be expensive or endless
        for batch, batch_labels in (batches.finish() if batches is not None else ()):
            count += 1
            yield self._model_feed(batch), batch_labels
        self._usable(seen)  # raises for an empty source or one short of a fixed batch
        self.samples = seen - (seen % self.batch_size if self.fixed_batch else 0)
        self.has_labels = bool(labelled)
        self._batch_count = count

    def set_layout(self, shapes: dict[str, tuple[int, ...]], at: str = "") -> None:
        """Fix how samples of arrays of ``shapes`` (first axis = samples) map onto the inputs."""
        self.layout = layout_of(self.all_specs, shapes, self.where, expected(self.all_specs), at)
        if self.layout.per_sample:  # whole tensors as fed: one sample per feed, never batched together
            self.batch_size, self.fixed_batch = 1, False

    def _model_feed(self, batch: Feed) -> Feed:
        feed = self.layout.feed(batch) if self.layout is not None else dict(batch)
        for name, value in self.constants.items():
            axis = self.layout.axes.get(name) if self.layout is not None else None
            rows = len(next(iter(batch.values()))) if batch else 1
            if axis is not None and rows > 1 and value.ndim > axis and value.shape[axis] == 1:
                value = np.repeat(value, rows, axis=axis)  # one constant item for each sample of the batch
            feed[name] = value
        return feed

    def label_batches(self) -> list[np.ndarray]:
        """The labels of each batch, in iteration order; [] when the source has none."""
        labels = [batch_labels for _, batch_labels in self.iter_with_labels()]
        return [] if not labels or labels[0] is None else labels

    def __len__(self) -> int:
        """The number of batches, when known (raises TypeError otherwise, as iterables do)."""
        if self._batch_count is not None:
            return self._batch_count
        if self.samples is not None and self.batch_size is not None:
            return -(-self.samples // self.batch_size)
        raise TypeError(f"the number of batches of {self.where} is not known before a first pass")

    def as_reader(self):
        """An ``onnxruntime.quantization.CalibrationDataReader`` over this dataset."""
        from dlopt.calibration.reader import DatasetReader  # imports onnxruntime

        return DatasetReader(self)

    # -- checks ----------------------------------------------------------------------

    def _check_names(self, feed, index: int) -> int:
        """Check a chunk's names and that its inputs share a sample count; return that count."""
        if not isinstance(feed, dict):
            raise DataError(f"{self.where}: batch {index} is a {type(feed).__name__}, not a dict of arrays")
        names = {s.name for s in self.specs}
        if set(feed) != names:
            missing, extra = sorted(names - set(feed)), sorted(set(feed) - names)
            parts = ([f"missing {missing}"] if missing else []) + ([f"unexpected {extra}"] if extra else [])
            raise DataError(f"{self.where}: batch {index}: {' and '.join(parts)}{expected(self.specs)}")
        rows = set()
        for spec in self.specs:
            array = feed[spec.name]
            if not isinstance(array, np.ndarray):
                raise DataError(f"{self.where}: {spec.name!r} in batch {index} is a {type(array).__name__}, "
                                f"not a numpy array{expected(self.specs)}")
            if array.ndim == 0:
                raise DataError(f"{self.where}: {spec.name!r} in batch {index} is a scalar; an array holds N samples "
                                f"along its first axis (a scalar input: N scalars, or --const {spec.name}=VALUE)"
                                f"{expected(self.all_specs)}")
            rows.add(len(array))
        if len(rows) != 1:
            raise DataError(f"{self.where}: the inputs of batch {index} disagree on the number of samples (first axis)")
        return rows.pop()

    def _check_values(self, feed: Feed, labels, index: int, first: int, rows: int) -> None:
        at = f"in batch {index} (samples {first}-{first + rows - 1})"
        for spec in self.specs:
            array = feed[spec.name]
            if array.dtype != spec.dtype:
                raise DataError(f"{self.where}: {spec.name!r} is {array.dtype.name} {at}{expected(self.specs)}")
            kind = sample_kind(spec, array.shape, self.layout.axes.get(spec.name), self.where,
                               expected(self.all_specs), at)
            if kind != self.layout.kinds.get(spec.name, ITEM):
                raise DataError(f"{self.where}: {spec.name!r} has shape {list(array.shape)} {at}, unlike the first "
                                f"batch's samples (first axis = samples){expected(self.all_specs)}")
            if array.dtype.kind in "fc" and not np.isfinite(array).all():
                bad = "NaN" if np.isnan(array).any() else "Inf"
                raise DataError(f"{self.where}: {spec.name!r} contains {bad} values {at}")
        if labels is not None:
            if not isinstance(labels, np.ndarray) or labels.dtype.kind not in "iu" or labels.ndim == 0:
                raise DataError(f"{self.where}: labels {at} must be an integer array, one label per sample")
            if len(labels) != rows:
                raise DataError(f"{self.where}: {len(labels)} labels for {rows} samples {at}")


class _Rebatch:
    """Cut a stream of chunks into batches of ``size`` samples (None: pass chunks through)."""

    def __init__(self, size: int | None, *, keep_remainder: bool) -> None:
        self.size = size
        self.keep_remainder = keep_remainder
        self.pending: list[tuple[Feed, np.ndarray | None, int]] = []
        self.rows = 0

    def add(self, feed: Feed, labels, rows: int) -> Iterator[tuple[Feed, np.ndarray | None]]:
        if rows == 0:
            return
        if self.size is None:
            yield feed, labels
            return
        self.pending.append((feed, labels, rows))
        self.rows += rows
        while self.rows >= self.size:
            yield self._take(self.size)

    def finish(self) -> Iterator[tuple[Feed, np.ndarray | None]]:
        if self.rows and self.keep_remainder:
            yield self._take(self.rows)
        self.pending, self.rows = [], 0

    def _take(self, size: int) -> tuple[Feed, np.ndarray | None]:
        pieces, need = [], size
        while need:
            feed, labels, rows = self.pending[0]
            if rows <= need:
                pieces.append((feed, labels))
                self.pending.pop(0)
                need -= rows
            else:  # split the chunk: the rest stays pending
                pieces.append(({k: v[:need] for k, v in feed.items()}, None if labels is None else labels[:need]))
                self.pending[0] = ({k: v[need:] for k, v in feed.items()}, None if labels is None else labels[need:],
                                   rows - need)
                need = 0
        self.rows -= size
        if len(pieces) == 1:  # the common case (chunks already batch-sized): no copy
            return pieces[0]
        feed = {name: np.concatenate([p[0][name] for p in pieces]) for name in pieces[0][0]}
        labels = None if pieces[0][1] is None else np.concatenate([p[1] for p in pieces])
        return feed, labels
