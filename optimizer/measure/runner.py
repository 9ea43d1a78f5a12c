"""Run a compiled artefact: ``dlopt.load(out)`` and ``dlopt run OUT --input data.npz --output preds.npz``.

A :class:`Runner` (a :class:`dlopt.measure.timing.BaseRunner`: lifecycle, input metadata and
input checks) is open from ``load`` until ``close`` (or the end of a ``with`` block).  It runs
the artefact with the settings it shipped with (session options, OpenVINO properties, TVM
thread pool), checks every feed before the runtime sees it, and says in one line what was wrong.  Artefacts built for another device raise
TargetUnavailable when loaded, saying what that device needs.
"""

from __future__ import annotations

import os
import stat
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from dlopt.calibration import NpzDataset
from dlopt.core.artifacts import check_native_files, is_native, write_file
from dlopt.core.errors import ConfigError, DataError, DloptError, first_line
from dlopt.core.specs import input_specs, output_specs
from dlopt.measure.timing import BaseRunner
from dlopt.targets import get_backend, load as load_session, read_artifact, read_manifest

Feed = dict[str, np.ndarray]


@dataclass(frozen=True)
class TensorSpec:
    """An input or output: symbolic dimensions are strings ("N"), unknown ones "?"."""

    name: str
    dtype: np.dtype | None  # None: the artefact does not say (a bundle candidate without its ONNX)
    shape: tuple[int | str, ...]

    def describe(self) -> str:
        dtype = self.dtype.name if self.dtype is not None else "?"
        return f"{self.name}: {dtype}[{','.join(map(str, self.shape))}]"


class Runner(BaseRunner):
    """A loaded artefact: ``run(feeds) -> list of arrays``, ``inputs``/``outputs``, ``close()``.

    Open from ``dlopt.load`` on (``open()`` after ``close()`` loads the artefact again: a new session,
    which is how ``time_interleaved`` samples the spread between sessions).
    """

    def __init__(self, session, *, folder: Path, backend: str, precision: str, inputs: list[TensorSpec],
                 outputs: list[TensorSpec], manifest: dict, reload: Callable[[], object] | None = None) -> None:
        super().__init__(f"{backend}/{precision}", inputs=inputs, outputs=outputs)
        self._session, self._reload = session, reload
        self._is_open = session is not None
        self.folder, self.backend, self.precision = folder, backend, precision
        self.manifest = manifest  # of the output folder the artefact belongs to

    @property
    def key(self) -> str:
        """The candidate's key in report.json ("ort/fp32")."""
        return self.name

    @property
    def ran_as(self) -> str:
        """The precision the runtime executes in (OpenVINO reads it back from its compiled graph)."""
        return getattr(self._session, "ran_as", None) or self.precision

    @property
    def default_batch(self) -> int:
        """The fixed batch of the inputs, else the batch the artefact was timed at, else 1."""
        fixed = {s.shape[0] for s in self.inputs if s.shape and isinstance(s.shape[0], int) and s.shape[0] > 0}
        if len(fixed) == 1:
            return fixed.pop()
        shapes = self.manifest.get("timing_shapes") or {}
        batches = {v[0] for v in shapes.values() if isinstance(v, list) and v and isinstance(v[0], int)}
        return batches.pop() if len(batches) == 1 and min(batches) > 0 else 1

    def run(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """The outputs for ``feeds`` ({input name: array}), in the order of ``outputs``."""
        return super().run(feeds)

    def _run(self, feeds: Feed) -> list[np.ndarray]:
        try:
            return [np.asarray(out) for out in self._session.run(feeds)]
        except DloptError:
            raise
        except Exception as exc:  # shapes the artefact cannot take get past the checks above
            shapes = ", ".join(f"{k}{list(v.shape)}" for k, v in feeds.items())
            raise DataError(f"{self.key} could not run feeds of shape {shapes}: {first_line(exc)}") from exc

    def _not_open(self) -> Exception:
        return ConfigError(f"the runner of {self.folder} is closed; dlopt.load() it again")

    def _open(self) -> None:
        if self._reload is None:
            raise self._not_open()
        self._session = self._reload()

    def _close(self) -> None:
        """Release the runtime session (and its threads)."""
        self._session = None

    def __repr__(self) -> str:
        state = "open" if self._is_open else "closed"
        return f"<dlopt.Runner {self.key} {self.folder} ({state})>"


def load(path: str | os.PathLike, *, threads: int | None = None) -> Runner:
    """Load a dlopt output folder, or one of its ``bundle/<backend>-<precision>/`` candidates.

    The artefact runs with the settings it shipped with; ``threads`` replaces their
    thread count (at most this machine's cores, as every count read from a settings file).
    Loading a TVM library runs its native code: it must be the file the manifest's sha256
    recorded at publish.  Raises ConfigError for a folder dlopt did not write (or whose
    native files changed) and TargetUnavailable for an artefact built for another device.
    """
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ConfigError(f"threads must be a positive integer, got {threads!r}")
    artifact, root = read_artifact(path)
    inputs, outputs = _specs(artifact, root)
    # a TVM library runs its code as it loads: only as the manifest hashed it at publish (its settings
    # file may differ: every value read from it is checked on the way in)
    native = [f for f in artifact.files if isinstance(f, str) and is_native(f)]

    def session():  # checked again at every opening: a session opened afresh loads the files afresh
        check_native_files(root, artifact.folder, native, read_manifest(root))
        try:
            return load_session(artifact, threads=threads)
        except DloptError:
            raise
        except Exception as exc:  # a runtime refusing the artefact (ORT's Fail on an unknown op): one line, exit 2
            raise ConfigError(f"{artifact.backend}/{artifact.precision} in {path} cannot be loaded by its runtime: "
                              f"{first_line(exc)}") from exc

    return Runner(session(), folder=Path(path), backend=artifact.backend, precision=artifact.precision,
                  inputs=inputs, outputs=outputs, manifest=read_manifest(root) or {}, reload=session)


def _specs(artifact, root: Path) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """Inputs and outputs from the candidate's ONNX, else the output's or another candidate's (every
    candidate of a compile keeps the original's inputs and outputs; after `dlopt bench --select` the
    ONNX may sit in bundle/); a TVM library's own record wins where it is stricter."""
    import onnx

    near = (artifact.folder / "model.onnx", root / "model.onnx", *sorted(root.glob("bundle/*/model.onnx")))
    onnx_file = next((p for p in near if p.is_file() and not p.is_symlink()), None)  # regular files, no links
    inputs: list[TensorSpec] = []
    outputs: list[TensorSpec] = []
    if onnx_file is not None:
        try:
            proto = onnx.load(str(onnx_file), load_external_data=False)
        except Exception as exc:  # DecodeError, OSError
            raise ConfigError(f"{onnx_file} is not a readable ONNX model: {first_line(exc)}") from exc
        inputs = [_spec(s) for s in input_specs(proto)]
        outputs = [_spec(s) for s in output_specs(proto)]
    backend = get_backend(artifact.backend)
    built = backend.built_inputs(artifact.settings) if backend is not None else None
    if isinstance(built, list):  # static shapes; a symbolic batch is served sample by sample
        symbolic = {s.name: s.shape[0] for s in inputs if s.shape}
        inputs = [TensorSpec(i["name"], np.dtype(i["dtype"]),
                             tuple(symbolic.get(i["name"], "N") if d == 0 and i.get("dynamic_batch") else s
                                   for d, s in enumerate(i["shape"])))
                  for i in built]
        if not outputs:
            outputs = [TensorSpec(n, None, ()) for n in artifact.settings.get("outputs", [])]
    if not inputs:
        raise ConfigError(f"{artifact.folder}: cannot tell the artefact's inputs (no model.onnx here or in {root})")
    return inputs, outputs


def _spec(spec) -> TensorSpec:
    return TensorSpec(spec.name, spec.dtype, tuple("?" if d is None else d for d in spec.shape))


# -- dlopt run: an .npz in, an .npz out ------------------------------------------------------------

def check_output_path(output: Path, data: Path) -> None:
    """Refuse before any work an output that would clobber the input, a folder or a file dlopt did not write."""
    if output.suffix != ".npz":
        raise ConfigError(f"--output {output} must end in .npz")
    if output.is_dir():
        raise ConfigError(f"--output {output} is a folder; give a file name ending in .npz")
    if not output.parent.is_dir():
        raise ConfigError(f"--output {output}: the folder {output.parent} does not exist")
    if output.exists() or output.is_symlink():
        if data.exists() and output.exists() and os.path.samefile(output, data):
            raise ConfigError(f"--output {output} is the input file; give another name")
        if not output.is_file() or output.is_symlink():
            raise ConfigError(f"--output {output} exists and is not a regular file; dlopt will not replace it")
        with output.open("rb") as f:
            head = f.read(4)
        if head and head != b"PK\x03\x04":  # an .npz is a zip archive
            raise ConfigError(f"--output {output} exists and is not an .npz archive; dlopt will not replace it")
        if not _written_by_us(output):
            raise ConfigError(f"--output {output} exists and was not written by dlopt run; dlopt will not replace "
                              f"it (remove it or give another name)")


# The zip comment of every .npz `dlopt run` writes: the mark that lets a later run replace it.
MARK = b"written by dlopt run"


def _written_by_us(path: Path) -> bool:
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            return archive.comment == MARK
    except (OSError, zipfile.BadZipFile):
        return False


def run_npz(runner: Runner, data: Path, output: Path, *, batch_size: int | None = None,
            progress: Callable[[str, int, int], None] | None = None) -> dict:
    """Run every sample of ``data`` through ``runner`` in batches and write the outputs to ``output``
    (one array per model output, by name) atomically; returns what a summary needs."""
    check_output_path(output, data)
    dataset = NpzDataset(data, runner.inputs, batch_size=batch_size or runner.default_batch)
    total = dataset.total
    if dataset.samples != total:
        raise DataError(f"{data}: {total} samples is not a multiple of the artefact's fixed batch of "
                        f"{dataset.batch_size}")
    batches = len(dataset)
    parts: list[list[np.ndarray]] = []
    start = time.perf_counter()
    for index, feed in enumerate(dataset):
        if progress is not None:
            progress("running", index, batches)
        parts.append(runner.run(feed))
    seconds = time.perf_counter() - start
    if progress is not None:
        progress("running", batches, batches)
    names = [s.name for s in runner.outputs] or [f"output_{i}" for i in range(len(parts[0]))]
    arrays = {name: _joined(name, [p[i] for p in parts]) for i, name in enumerate(names)}
    _write_npz(output, arrays)
    return {"artifact": str(runner.folder), "candidate": runner.key, "input": str(data), "output": str(output),
            "samples": total, "batches": batches, "batch_size": dataset.batch_size, "seconds": round(seconds, 4),
            "outputs": {k: {"dtype": v.dtype.name, "shape": list(v.shape)} for k, v in arrays.items()}}


def _joined(name: str, parts: list[np.ndarray]) -> np.ndarray:
    if len(parts) == 1:
        return parts[0]
    if any(p.ndim == 0 for p in parts):
        raise DataError(f"output {name!r} has no sample axis; run the whole file as one batch (--batch-size)")
    return np.concatenate(parts, axis=0)


def _write_npz(output: Path, arrays: dict[str, np.ndarray]) -> None:
    """np.savez's archive with MARK as its comment, written whole or not at all; a file it replaces (one
    an earlier run wrote) keeps its mode: predictions a user made 0600 stay private."""
    import zipfile

    try:
        found = os.lstat(output)
    except FileNotFoundError:
        mode = 0o644
    else:  # checked before the run too; a file that appeared since is as foreign
        if not stat.S_ISREG(found.st_mode) or not _written_by_us(output):
            raise ConfigError(f"--output {output} appeared while dlopt ran and was not written by dlopt run; "
                              f"dlopt will not replace it")
        mode = stat.S_IMODE(found.st_mode)

    def write(f) -> None:
        with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
            for name, array in arrays.items():
                with archive.open(f"{name}.npy", "w", force_zip64=True) as entry:
                    np.lib.format.write_array(entry, np.asanyarray(array), allow_pickle=False)
            archive.comment = MARK

    write_file(output, write, mode=mode)
