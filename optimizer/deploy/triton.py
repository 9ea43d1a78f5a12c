"""Triton Inference Server model repositories: ``REPO/NAME/config.pbtxt`` and ``REPO/NAME/N/<model>``.

The config is a ``inference.ModelConfig`` protobuf, the one ``tritonclient`` ships, printed
with protobuf's text format: Triton parses exactly that, so nothing here is a hand-written
format.  What goes into it comes from the artefact dlopt chose (or a bundle candidate), filled in by
its backend (``fill_triton`` of its class in dlopt.targets): ORT artefacts on Triton's onnxruntime
platform with the compile's thread settings and the execution accelerators its providers name,
OpenVINO IR on the openvino backend with the plugin properties, a TensorRT bundle as ``model.plan``
once the engine was built on the device (before that, its ONNX on ORT with the TensorRT accelerator).

Guarantees: the model folder ``REPO/NAME`` appears complete or not at all (staged beside REPO and
renamed in); an existing one is replaced only when dlopt wrote it (its ``dlopt_package.json``),
keeping its other versions, which a new version joins only when the one config serves them all (the
same backend or platform and model file, the same inputs and outputs; refused before anything is
written otherwise).  Packaging runs into one model take turns (a lock beside it, held from
reading the old folder to the swap), and the swap happens only if the folder is still as it was
read.  A version is re-packaged only when its folder holds nothing but the files dlopt put there;
a version folder, or a file in one, that is a link is refused, never followed.  Every file taken from
the output folder (the model files, what its manifest lists, report.json) is a plain file inside it,
reached through no link, and opened without following one: anything else is refused before the
repository is touched.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import shutil
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from dlopt.core.artifacts import contained_path, output_lock, read_folder_json, replace_folder
from dlopt.core.errors import ConfigError, OutputBusy, TargetUnavailable, first_line
from dlopt.core.optional import require
from dlopt.measure.runner import _specs
from dlopt.targets import get_backend, read_artifact

CONFIG = "config.pbtxt"
MARKER = "dlopt_package.json"  # what dlopt wrote into REPO/NAME; Triton ignores other files
DEFAULT_MAX_BATCH = 8
QUEUE_DELAY_US = 100
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
_DTYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "float64": "TYPE_FP64", "bfloat16": "TYPE_BF16",
           "int8": "TYPE_INT8", "int16": "TYPE_INT16", "int32": "TYPE_INT32", "int64": "TYPE_INT64",
           "uint8": "TYPE_UINT8", "uint16": "TYPE_UINT16", "uint32": "TYPE_UINT32", "uint64": "TYPE_UINT64",
           "bool": "TYPE_BOOL", "object": "TYPE_STRING", "str": "TYPE_STRING"}
_ENGINE_FILES = ("model.plan", "model.engine")  # a TensorRT engine built on the device, served as model.plan
LOCK_WAIT_S = 120.0  # another run packaging the same model copies its files meanwhile


@functools.lru_cache(maxsize=1)
def model_config_pb2():
    """tritonclient's ``model_config_pb2`` module (the ``inference.ModelConfig`` message).

    It lives in ``tritonclient/grpc/``, whose package ``__init__`` needs grpcio; without the
    ``grpc`` extra (which would pin an older protobuf) the module file is loaded on its own.
    """
    import importlib
    import importlib.util

    require("tritonclient", "triton", "Triton packaging needs tritonclient's ModelConfig protobuf", load=False)
    if importlib.util.find_spec("grpc") is not None:
        return importlib.import_module("tritonclient.grpc.model_config_pb2")
    root = Path(importlib.util.find_spec("tritonclient").submodule_search_locations[0])
    path = root / "grpc" / "model_config_pb2.py"
    if not path.is_file():
        raise TargetUnavailable(f"tritonclient at {root} has no grpc/model_config_pb2.py; "
                                f"reinstall it: pip install 'dlopt[triton]'")
    spec = importlib.util.spec_from_file_location("dlopt._tritonclient_model_config_pb2", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@dataclass(frozen=True)
class TritonModel:
    """What ``write_repository`` wrote: where, under which name and version, with which config."""

    repository: Path
    name: str
    version: int
    config: object  # inference.ModelConfig
    files: tuple[str, ...]  # in the version folder

    @property
    def folder(self) -> Path:
        return self.repository / self.name

    @property
    def device_kind(self) -> str:
        """"gpu" or "cpu": where Triton runs the model's instances."""
        group = self.config.instance_group[0]
        return "gpu" if group.kind == type(group).Kind.Value("KIND_GPU") else "cpu"


def default_name(report: dict) -> str:
    """A Triton model name from the report: the model file's stem, made safe."""
    stem = Path(str((report.get("model") or {}).get("path") or "model")).stem
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", stem).lstrip(".-") or "model"
    return name[:128]


def check_name(name: str) -> str:
    if not _NAME.match(name) or name in (".", ".."):
        raise ConfigError(f"Triton model name {name!r} must be 1-128 letters, digits, '_', '.' or '-', "
                          f"not starting with '.' or '-'")
    return name


def build_config(artifact, inputs, outputs, *, name: str, max_batch_size: int | None = None,
                 tuned: dict | None = None):
    """The ``inference.ModelConfig`` for ``artifact`` (a dlopt.targets.Artifact) and its tensor specs.

    ``max_batch_size``: None batches when every input and output has a symbolic first axis
    (up to DEFAULT_MAX_BATCH), 0 never batches.  ``tuned``: report.json's ``serving.chosen``
    (``dlopt loadtest --tune``): its largest batch (unless ``max_batch_size`` is given), queue delay
    and instance count.
    """
    tuned = tuned_config(tuned)
    if tuned and max_batch_size is None:
        max_batch_size = tuned["max_batch_size"]
    config = build_tensors(inputs, outputs, name=name, max_batch_size=max_batch_size)
    if tuned and config.max_batch_size > 1:
        del config.dynamic_batching.preferred_batch_size[:]  # as measured: the batcher's own choice
        config.dynamic_batching.max_queue_delay_microseconds = tuned["max_queue_delay_us"]
    _fill_backend(config, artifact)
    if tuned:
        config.instance_group[0].count = tuned["instances"]
    return config


_TUNED = {"max_batch_size": (0, 1 << 16), "max_queue_delay_us": (0, 10**8), "instances": (1, 256)}


def tuned_config(tuned) -> dict | None:
    """report.json's ``serving.chosen``, each value an integer in range; ConfigError (one line) otherwise."""
    if tuned is None:
        return None
    if not isinstance(tuned, dict):
        raise ConfigError("report.json's serving.chosen is not an object; run dlopt loadtest --tune again")
    for key, (low, high) in _TUNED.items():
        value = tuned.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise ConfigError(f"report.json's serving.chosen.{key} is {value!r:.40}, not an integer from {low} to "
                              f"{high}; run dlopt loadtest --tune again")
    return tuned


def build_tensors(inputs, outputs, *, name: str, max_batch_size: int | None = None):
    """The ``inference.ModelConfig`` without a backend: name, batching, inputs and outputs."""
    pb = model_config_pb2()
    config = pb.ModelConfig(name=name)
    batched = bool(inputs) and all(s.shape and not isinstance(s.shape[0], int) for s in (*inputs, *outputs))
    if max_batch_size is None:
        max_batch_size = DEFAULT_MAX_BATCH if batched else 0
    elif max_batch_size > 0 and not batched:
        fixed = [s.name for s in (*inputs, *outputs) if not s.shape or isinstance(s.shape[0], int)]
        raise ConfigError(f"--max-batch-size {max_batch_size}: the model has no symbolic batch axis "
                          f"({', '.join(fixed[:4])} have a fixed first dimension); use --max-batch-size 0")
    config.max_batch_size = max_batch_size
    for spec, field in [(s, config.input) for s in inputs] + [(s, config.output) for s in outputs]:
        dims = spec.shape[1:] if max_batch_size > 0 else spec.shape
        entry = field.add(name=spec.name, data_type=pb.DataType.Value(_data_type(spec)),
                          dims=[d if isinstance(d, int) and d > 0 else -1 for d in dims] or [1])
        if not dims:  # a per-sample scalar: Triton wants dims [1] reshaped to []
            entry.reshape.SetInParent()
    if max_batch_size > 1:
        preferred = sorted({max(max_batch_size // 2, 1), max_batch_size} - {1})
        config.dynamic_batching.preferred_batch_size.extend(preferred)
        config.dynamic_batching.max_queue_delay_microseconds = QUEUE_DELAY_US
    return config


def _data_type(spec) -> str:
    dtype = getattr(spec.dtype, "name", None) or "float32"
    if dtype not in _DTYPES:
        raise ConfigError(f"tensor {spec.name} has type {dtype}, which Triton has no TYPE_ for")
    return _DTYPES[dtype]


def _fill_backend(config, artifact) -> None:
    """platform/backend, instance group, parameters and accelerators: the artefact's backend fills them in."""
    backend = get_backend(artifact.backend)
    if backend is None:
        raise ConfigError(f"{artifact.backend}/{artifact.precision} artefacts are not loaded by this version of "
                          f"dlopt; package a candidate of a backend it knows")
    kind = backend.fill_triton(config, artifact, lambda name: _plain_file(artifact.folder, name))
    group = config.instance_group.add(count=1)
    group.kind = type(group).Kind.Value(kind)


def _plain_file(folder: Path, name: str, *, named_in: str = "") -> Path | None:
    """``folder/name`` when it is a regular file inside ``folder`` reached through no link, None when it
    is not there; ConfigError for anything else (a link, '..', an absolute path, a FIFO, a folder)."""
    path = contained_path(folder, name, named_in=named_in)
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ConfigError(f"{path} cannot be read ({exc.strerror or type(exc).__name__}); "
                          f"recompile with dlopt") from None
    if not stat.S_ISREG(mode):
        raise ConfigError(f"{path} is not a regular file; dlopt copies only plain files into the served "
                          f"repository (a crafted or damaged output: recompile it)")
    return path


def _copy_plain(src: Path, dest: Path) -> None:
    """Copy the regular file ``src`` to the new file ``dest`` without following a link at ``src``
    (one planted after the check is refused too) and without waiting on a FIFO."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(src, flags)
    except OSError as exc:  # ELOOP: a link planted since the check
        raise ConfigError(f"{src} cannot be opened as a plain file ({exc.strerror or type(exc).__name__}); "
                          f"dlopt copies only plain files into the served repository") from None
    with open(fd, "rb") as source:
        info = os.fstat(source.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise ConfigError(f"{src} is not a regular file; dlopt copies only plain files into the served "
                              f"repository (a crafted or damaged output: recompile it)")
        dest.parent.mkdir(parents=True, exist_ok=True)
        with open(dest, "xb") as target:
            shutil.copyfileobj(source, target, 1 << 20)
    os.chmod(dest, stat.S_IMODE(info.st_mode))
    os.utime(dest, ns=(info.st_atime_ns, info.st_mtime_ns))


def _model_files(artifact, config, root: Path) -> dict[str, Path]:
    """Version-folder name -> source file, each checked by _plain_file."""
    folder = artifact.folder
    if config.default_model_filename == "model.plan":  # an engine built on the device: model.plan or .engine
        return {"model.plan": next(p for p in (_plain_file(folder, f) for f in _ENGINE_FILES) if p)}
    listed = "manifest files" if Path(folder).resolve() == Path(root).resolve() else "report.json files"
    if config.default_model_filename == "model.xml":  # IR: the graph and its weights
        names = {"model.xml": "", "model.bin": ""}
    else:
        names = {"model.onnx": "", **{f: listed for f in artifact.files
                                      if isinstance(f, str) and f.startswith("model.onnx") and f != "model.onnx"}}
    files = {n: _plain_file(folder, n, named_in=where) for n, where in names.items()}
    missing = [n for n, p in files.items() if p is None]
    if missing:
        raise ConfigError(f"{folder} lacks {', '.join(missing)}, which the {artifact.backend} artefact needs; "
                          f"recompile with dlopt")
    return files


def config_text(config) -> str:
    from google.protobuf import text_format

    return text_format.MessageToString(config)


def read_config(path: Path):
    """Parse a config.pbtxt with tritonclient's ModelConfig (what Triton itself does)."""
    from google.protobuf import text_format

    return text_format.Parse(Path(path).read_text(), model_config_pb2().ModelConfig())


def write_repository(source: Path, repository: Path, *, name: str | None = None, version: int = 1,
                     max_batch_size: int | None = None) -> TritonModel:
    """Write the artefact of ``source`` (a dlopt output folder or bundle candidate) into a Triton
    model repository as ``repository/name/config.pbtxt`` and ``repository/name/version/``."""
    model_config_pb2()  # fail early when tritonclient is missing
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ConfigError(f"Triton model version must be a positive integer, got {version!r}")
    artifact, root = read_artifact(source)
    report = read_folder_json(root, "report.json", missing_ok=True)
    report = report if isinstance(report, dict) else {}
    name = check_name(name or default_name(report))
    inputs, outputs = _specs(artifact, root)
    serving = report.get("serving")
    config = build_config(artifact, inputs, outputs, name=name, max_batch_size=max_batch_size,
                          tuned=serving.get("chosen") if isinstance(serving, dict) else None)
    files = _model_files(artifact, config, root)

    repository = Path(repository)
    if repository.exists() and not repository.is_dir():
        raise ConfigError(f"Triton repository {repository} exists and is not a folder")
    repository.mkdir(parents=True, exist_ok=True)
    target = repository / name
    with lock_model(target):
        previous = _previous_versions(target)
        _check_replaceable(target, version, previous.get(version))
        _check_joinable(target, config, version, sorted(set(previous) - {version}), artifact)
        snapshot = _snapshot(target)
        staged = Path(tempfile.mkdtemp(prefix=f".{name}.dlopt-tmp-{os.getpid()}-", dir=_staging_root(repository)))
        try:
            os.chmod(staged, 0o755)
            for old in set(previous) - {version}:  # other versions stay served, with what the user added
                shutil.copytree(target / str(old), staged / str(old), symlinks=True)
            (staged / str(version)).mkdir()
            for dest, src in files.items():
                _copy_plain(src, staged / str(version) / dest)
            (staged / CONFIG).write_text(config_text(config))
            read_config(staged / CONFIG)  # what Triton will parse
            written = {**{str(v): list(f) for v, f in previous.items() if v != version},
                       str(version): sorted(files)}
            marker = {"dlopt_version": report.get("dlopt_version"), "versions": sorted({*previous, version}),
                      "files": dict(sorted(written.items(), key=lambda kv: int(kv[0]))),
                      "source": str(Path(source).resolve()), "candidate": f"{artifact.backend}/{artifact.precision}",
                      "model_sha256": (report.get("model") or {}).get("sha256")}
            (staged / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
            _swap(staged, target, snapshot)
        finally:
            shutil.rmtree(staged, ignore_errors=True)
    return TritonModel(repository, name, version, config, tuple(sorted(files)))


@contextlib.contextmanager
def lock_model(target: Path, *, wait: float = LOCK_WAIT_S) -> Iterator[None]:
    """Hold the lock on the model folder ``target`` (REPO/NAME): dlopt's output lock, a hidden file in
    REPO (Triton reads only folders there), removed on release; waits ``wait`` seconds for another run."""
    try:
        with output_lock(Path(target).resolve(), wait=wait):
            yield
    except OutputBusy as exc:
        owner = re.search(r"\(pid ([^)]*)\)", str(exc))
        raise OutputBusy(f"another dlopt run (pid {owner[1] if owner else '?'}) is packaging {target} and held it "
                         f"for {wait:g} s; wait for it, or choose another --name") from None


def _previous_versions(target: Path) -> dict[int, tuple[str, ...]]:
    """Version -> the files dlopt wrote in it, for the versions of ``target``; ConfigError when
    ``target`` holds anything dlopt did not write there, or a version folder that is a link."""
    if not target.exists() and not target.is_symlink():
        return {}
    if target.is_symlink() or not target.is_dir():
        raise ConfigError(f"{target} exists and is not a folder; choose another --name")
    entries = set(os.listdir(target))
    if not entries:
        return {}
    marker = _read_json(target / MARKER) if _regular(target / MARKER) else None
    versions = marker.get("versions") if isinstance(marker, dict) else None
    if not isinstance(versions, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in versions):
        raise ConfigError(f"{target} is a Triton model dlopt did not write (no {MARKER}); "
                          f"choose another --name or move it away")
    unknown = sorted(entries - {CONFIG, MARKER, *map(str, versions)})
    if unknown or not _regular(target / CONFIG):
        raise ConfigError(f"{target} holds files dlopt did not write ({', '.join(unknown[:5]) or CONFIG}); "
                          f"nothing was replaced")
    recorded = marker.get("files") if isinstance(marker.get("files"), dict) else {}
    found = {}
    for v in versions:
        folder = target / str(v)
        if not os.path.lexists(folder):
            continue  # the user removed that version: it stays removed
        mode = os.lstat(folder).st_mode
        if not stat.S_ISDIR(mode):
            raise ConfigError(f"{folder} is a link or not a folder; dlopt does not follow it: remove it or "
                              f"choose another --name")
        for entry in sorted(os.listdir(folder)):
            if not stat.S_ISREG(os.lstat(folder / entry).st_mode):
                raise ConfigError(f"{folder / entry} is a link or not a regular file; dlopt does not copy it "
                                  f"into the served repository: remove it or choose another --name")
        names = recorded.get(str(v))
        # markers before the "files" record: dlopt's model files are model.*
        found[v] = tuple(names) if isinstance(names, list) else tuple(
            e for e in sorted(os.listdir(folder)) if e.startswith("model."))
    return found


def _check_replaceable(target: Path, version: int, ours: tuple[str, ...] | None) -> None:
    """ConfigError when the folder of ``version`` holds files dlopt did not write there."""
    folder = target / str(version)
    if ours is None:  # a new version (a folder the marker does not list was refused as unknown)
        return
    theirs = sorted(set(os.listdir(folder)) - set(ours))
    if theirs:
        raise ConfigError(f"{folder} holds files dlopt did not write ({', '.join(theirs[:5])}); nothing was "
                          f"changed: move them away, or package as another --version")


def _check_joinable(target: Path, config, version: int, others: list[int], artifact) -> None:
    """ConfigError when ``config`` cannot serve the versions ``others`` that stay in ``target``: Triton
    loads every version of a model with its one config.pbtxt, so a version on another backend or
    platform (another model file), or with other inputs or outputs, would leave the others unloadable."""
    from google.protobuf import text_format

    if not others:
        return
    try:
        served = read_config(target / CONFIG)
    except (OSError, text_format.ParseError) as exc:
        raise ConfigError(f"{target / CONFIG} cannot be read ({first_line(exc)}); nothing was written: "
                          f"package under another --name") from None
    listed = ", ".join(map(str, others))
    head = (f"Triton model {target.name} serves version{'s' if len(others) > 1 else ''} {listed}")
    tail = "every version of a model shares its one config.pbtxt"
    if _runtime(served) != _runtime(config):
        suffix = f"_{artifact.backend}"
        article = "an" if artifact.backend[:1] in "aeiou" else "a"
        raise ConfigError(f"{head} on {_runtime(served)}, and {tail}: version {version}, {article} "
                          f"{artifact.backend}/{artifact.precision} artefact, would need {_runtime(config)}; "
                          f"package it under its own name (--name {target.name[:128 - len(suffix)]}{suffix}); "
                          f"nothing was written")
    if _signature(served) != _signature(config):
        raise ConfigError(f"{head} with {_signature(served)}, and {tail}: version {version} takes "
                          f"{_signature(config)}; package it under its own name (another --name); nothing was written")


def _runtime(config) -> str:
    """What loads the model's versions: "onnxruntime_onnx (model.onnx)", "openvino (model.xml)", ..."""
    return f"{config.platform or config.backend} ({config.default_model_filename})"


def _signature(config) -> str:
    """The model's tensors as Triton checks them against each version: "x[N,3,16,16] FP32 -> y[N,10] FP32"
    (N: the batch axis Triton adds when max_batch_size > 0)."""
    data_type = model_config_pb2().DataType.Name
    batch = ["N"] if config.max_batch_size > 0 else []

    def tensors(field) -> str:
        return ", ".join(f"{t.name}[{','.join([*batch, *map(str, t.dims)])}] {data_type(t.data_type)[5:]}"
                         for t in field)

    return f"{tensors(config.input)} -> {tensors(config.output)}"


def _regular(path: Path) -> bool:
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def _snapshot(target: Path) -> list[tuple] | None:
    """What ``target`` holds, two levels deep (name, inode, size, mtime), None when it is not there:
    compared again before the swap."""
    rows = []
    if not os.path.lexists(target):
        return None
    for top in sorted(os.listdir(target)):
        info = os.lstat(target / top)
        rows.append((top, info.st_ino, info.st_size, info.st_mtime_ns))
        if stat.S_ISDIR(info.st_mode):
            for entry in sorted(os.listdir(target / top)):
                sub = os.lstat(target / top / entry)
                rows.append((f"{top}/{entry}", sub.st_ino, sub.st_size, sub.st_mtime_ns))
    return rows


def _staging_root(repository: Path) -> Path:
    """Where to stage: beside the repository, so a Triton polling it never sees a half-written model
    folder; inside it only when the parent is not writable or on another filesystem (rename must work)."""
    parent = repository.resolve().parent
    if os.access(parent, os.W_OK) and parent.stat().st_dev == repository.stat().st_dev:
        return parent
    return repository


def _swap(staged: Path, target: Path, snapshot: list[tuple] | None) -> None:
    def still_as_read() -> None:
        if _snapshot(target) != snapshot:
            raise ConfigError(f"{target} changed while dlopt packaged it (something other than dlopt wrote "
                              f"there); nothing was replaced: package again")

    if snapshot is None:
        still_as_read()  # replace_folder checks only a folder that is there
    # the old folder goes beside the staging folder, never into the repository Triton polls
    replace_folder(staged, target, check=still_as_read, old_dir=staged.parent)


def _read_json(path: Path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
