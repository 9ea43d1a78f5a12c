"""Feed data streamed from an ``.npz``: one array per model input, first axis = samples.

An optional integer ``labels`` array (one label per sample) comes in step with the
feeds.  The archive is never loaded whole: names, dtypes and shapes are checked from
the ``.npy`` headers before any data is read, then each member is read sequentially,
one batch of rows at a time, from its (stored or deflated) zip entry.  Nothing is
unpickled: a pickle file, or an array or header of object dtype, is refused.

Sizes are checked before anything is read, so a small crafted file cannot make
dlopt read or allocate gigabytes: an ``.npy`` header must not declare more bytes
than its zip entry holds (the zip directory's uncompressed size), and the samples
that will be read must fit in ``max_bytes`` (the evaluation set is kept in memory).
"""

from __future__ import annotations

import contextlib
import math
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
from numpy.lib import format as npy

from dlopt.calibration.dataset import LABELS, CalibrationDataset, expected
from dlopt.core.errors import DataError, first_line

_READ_ERRORS = (OSError, EOFError, ValueError, zipfile.BadZipFile, zlib.error)
# Most bytes of array data read from one archive (4 GiB).
DEFAULT_MAX_BYTES = 4 << 30


@dataclass(frozen=True)
class _Member:
    entry: str  # the zip entry, e.g. "x.npy"
    shape: tuple[int, ...]
    dtype: np.dtype  # as stored; may be non-native byte order
    fortran_order: bool
    stored_bytes: int  # data bytes the zip entry holds after its .npy header

    @property
    def row_bytes(self) -> int:
        return math.prod(self.shape[1:]) * self.dtype.itemsize


def _pickled(where: str) -> DataError:
    return DataError(f"{where} holds pickled data; dlopt never unpickles data files, "
                     "save plain numeric arrays with numpy.savez")


def _read_header(fp, where: str) -> tuple[tuple[int, ...], bool, np.dtype]:
    try:
        version = npy.read_magic(fp)
        if version == (1, 0):
            shape, fortran_order, dtype = npy.read_array_header_1_0(fp)
        elif version == (2, 0):
            shape, fortran_order, dtype = npy.read_array_header_2_0(fp)
        else:
            raise DataError(f"{where}: unsupported .npy format version {version[0]}.{version[1]}")
    except _READ_ERRORS as exc:
        raise DataError(f"{where}: not a valid .npy array: {first_line(exc)}") from exc
    if dtype.hasobject:
        raise _pickled(where)
    return shape, fortran_order, dtype


def _size(n: float) -> str:
    unit = "bytes"
    for bigger in ("KB", "MB", "GB", "TB"):
        if n < 1024:
            break
        n, unit = n / 1024, bigger
    return f"{n:.0f} bytes" if unit == "bytes" else f"{n:.1f} {unit}"


def _archive(path: Path) -> zipfile.ZipFile:
    if path.exists() and not path.is_file():  # a FIFO or a device: opening it could block or never end
        raise DataError(f"{path} is not a regular file; give an .npz file")
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    with path.open("rb") as f:
        head = f.read(8)
    if head.startswith(b"\x93NUMPY"):
        raise DataError(f"{path} is a single .npy array; expected an .npz with one array per model input "
                        "(numpy.savez(path, name=array, ...))")
    if head[:1] == b"\x80":  # pickle protocol 2 and later start with PROTO
        raise _pickled(str(path))
    try:
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise DataError(f"{path} is not an .npz file (not a zip archive): {first_line(exc)}") from exc


def _read_rows(fp, member: _Member, rows: int, where: str) -> np.ndarray:
    row_shape = member.shape[1:]
    size = rows * math.prod(row_shape) * member.dtype.itemsize
    buffer = bytearray(size)  # writable, and read into without a second copy
    try:
        got = fp.readinto(buffer)
    except _READ_ERRORS as exc:
        raise DataError(f"{where}: cannot read: {first_line(exc)}") from exc
    if got != size:
        raise DataError(f"{where}: the array ends early (truncated or corrupt file)")
    array = np.frombuffer(buffer, dtype=member.dtype).reshape((rows, *row_shape))
    native = member.dtype.newbyteorder("=")
    return array if member.dtype == native else array.astype(native)


class NpzDataset(CalibrationDataset):
    """Batches of feed dicts streamed from an ``.npz`` file, checked from its headers up front.

    ``samples`` (known on construction) is how many samples iteration yields: all of
    them, or ``limit``, less any remainder a fixed batch dimension drops.
    ``total`` is how many samples the file holds.  ``batch_size=None`` means 1.
    """

    def __init__(self, path: str | Path, specs: Sequence, *, batch_size: int | None = 32,
                 limit: int | None = None, max_bytes: int = DEFAULT_MAX_BYTES,
                 constants: dict[str, np.ndarray] | None = None) -> None:
        self.path = Path(path)
        super().__init__(specs, where=str(self.path), batch_size=batch_size or 1, limit=limit, constants=constants)
        with _archive(self.path) as archive:
            self._members = self._headers(archive)
        self.has_labels = LABELS in self._members and LABELS not in {s.name for s in self.specs}
        self.total = self._check_headers()
        self.samples = self._usable(self.total)
        self._check_read_size(max_bytes)

    def _headers(self, archive: zipfile.ZipFile) -> dict[str, _Member]:
        members = {}
        for info in archive.infolist():
            if info.is_dir():
                continue
            name = info.filename[:-4] if info.filename.endswith(".npy") else info.filename
            where = f"{self.path}: array {name!r}"
            # NotImplementedError: an unsupported compression; RuntimeError: an encrypted entry.
            try:
                with archive.open(info) as fp:
                    shape, fortran_order, dtype = _read_header(fp, where)
                    header_bytes = fp.tell()
            except (zipfile.BadZipFile, OSError, NotImplementedError, RuntimeError) as exc:
                raise DataError(f"{where}: cannot read: {first_line(exc)}") from exc
            member = _Member(info.filename, shape, dtype, fortran_order, info.file_size - header_bytes)
            declared = math.prod(shape) * dtype.itemsize
            if declared > member.stored_bytes:
                raise DataError(f"{where}: its header declares shape {list(shape)} ({_size(declared)}) but the "
                                f"zip entry holds {_size(member.stored_bytes)} (corrupt or crafted file)")
            members[name] = member
        return members

    def _check_read_size(self, max_bytes: int) -> None:
        names = [s.name for s in self.specs] + ([LABELS] if self.has_labels else [])
        for name in names:
            member = self._members[name]
            needed = self.samples * member.row_bytes
            if needed > max_bytes:
                raise DataError(f"{self.path}: array {name!r} would need {_size(needed)} for {self.samples} "
                                f"sample(s), over the {_size(max_bytes)} dlopt reads from one file; "
                                "use fewer samples (--calib-samples) or a smaller file")

    def _check_headers(self) -> int:
        """Check names, dtypes, shapes and sample counts from the headers; return the sample count."""
        names = {s.name for s in self.specs}
        given = set(self._members) - ({LABELS} if self.has_labels else set())
        if given != names:
            missing, extra = sorted(names - given), sorted(given - names)
            parts = ([f"missing {missing}"] if missing else []) + ([f"unexpected {extra}"] if extra else [])
            raise DataError(f"{self.path}: {' and '.join(parts)}{expected(self.specs)}")
        counts = set()
        for spec in self.specs:
            member = self._members[spec.name]
            counts.add(member.shape[0] if member.shape else None)
        self.set_layout({s.name: self._members[s.name].shape for s in self.specs})  # a DataError names the rule
        for spec in self.specs:
            if self._members[spec.name].dtype.newbyteorder("=") != spec.dtype:
                raise DataError(f"{self.path}: {spec.name!r} is {self._members[spec.name].dtype.name}"
                                f"{expected(self.all_specs)}")
        if len(counts) != 1:
            raise DataError(f"{self.path}: arrays disagree on the number of samples (first axis)")
        samples = counts.pop()
        for member in self._members.values():
            if member.fortran_order and len(member.shape) > 1:
                # Column-major data puts one sample's values across the whole array: no row-wise streaming.
                raise DataError(f"{self.path}: {member.entry!r} is stored in Fortran (column-major) order and cannot "
                                "be streamed by samples; save numpy.ascontiguousarray(array)")
        if self.has_labels:
            labels = self._members[LABELS]
            if labels.dtype.kind not in "iu" or len(labels.shape) != 1:
                raise DataError(f"{self.path}: 'labels' must be a 1-D integer array, got "
                                f"{labels.dtype.name}{list(labels.shape)}")
            if labels.shape[0] != samples:
                raise DataError(f"{self.path}: 'labels' has {labels.shape[0]} entries, inputs have {samples} samples")
        return samples

    def _chunks(self, names: Sequence[str] | None = None) -> Iterator[tuple[dict, np.ndarray | None]]:
        names = list(names if names is not None else self._members)
        with _archive(self.path) as archive, contextlib.ExitStack() as stack:
            files = {}
            for name in names:
                fp = stack.enter_context(archive.open(self._members[name].entry))
                _read_header(fp, f"{self.path}: array {name!r}")  # leaves fp at the first row
                files[name] = fp
            for start in range(0, self.samples, self.batch_size):
                rows = min(self.batch_size, self.samples - start)
                feed = {name: _read_rows(fp, self._members[name], rows, f"{self.path}: array {name!r}")
                        for name, fp in files.items()}
                labels = feed.pop(LABELS) if self.has_labels else None
                yield feed, labels

    def label_batches(self) -> list[np.ndarray]:
        """The labels of each batch, read alone (the inputs are not read again); [] without labels."""
        if not self.has_labels:
            return []
        return [labels for _, labels in self._chunks([LABELS])]
