"""Tuning databases: MetaSchedule's JSON records for one model on one target, kept safe.

MetaSchedule's own database matches records by kernel alone and ignores the target
(apache/tvm #15549), so records from different hardware would mix: here each
(model, target) pair has its own folder, ``root/<model sha256[:16]>/<target sha256[:16]>/``.
MetaSchedule appends each measured trial as one JSON line, so a run killed at any point
leaves every finished trial on disk; a line cut short by SIGKILL is dropped on the next
open.  Folders are 0700 and dlopt deletes nothing in them.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import stat
import tempfile
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

from dlopt import __version__
from dlopt.core.errors import ConfigError, first_line

logger = logging.getLogger("dlopt.targets.tvm.tuning")
ENV_ROOT = "DLOPT_TUNING_DB"
WORKLOADS, RECORDS, META, LOCK = "database_workload.json", "database_tuning_record.json", "meta.json", ".lock"
FORMAT = 1
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


def default_root() -> Path:
    return Path(os.environ.get(ENV_ROOT) or Path.home() / ".cache" / "dlopt" / "tuning")


def target_key(target: dict) -> str:
    return hashlib.sha256(json.dumps(target, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def model_digest(model, shapes: dict | None = None) -> str:
    """sha256 of the model the TVM backend builds and of the static input shapes it builds for."""
    import onnx_ir as ir

    from dlopt.targets.tvm.backend import input_specs

    digest = hashlib.sha256(ir.serde.serialize_model(model).SerializeToString(deterministic=True))
    digest.update(json.dumps(input_specs(model, shapes), sort_keys=True).encode())
    return digest.hexdigest()


class TuningDatabase:
    """MetaSchedule's JSON database for one model on one target, plus ``meta.json``.

    Folders are created 0700; one that is a symlink, not this user's, or writable by
    others is refused, and so are files in it that are not plain files.  dlopt only
    appends to and trims the torn last line of files in a folder holding its
    ``meta.json``; it deletes nothing.
    """

    def __init__(self, root: Path, model_sha256: str, target: dict) -> None:
        if not (isinstance(model_sha256, str) and len(model_sha256) == 64
                and all(c in "0123456789abcdef" for c in model_sha256)):
            raise ConfigError(f"model_sha256 must be a sha256 hex digest, not {model_sha256!r:.80}")
        if not isinstance(target, dict) or "kind" not in target:
            raise ConfigError(f"a tuning target is a TVM target dict with a kind, not {target!r:.80}")
        self.root, self.model_sha256, self.target = Path(root), model_sha256, dict(target)
        self.target_key = target_key(self.target)
        self.path = self.root / model_sha256[:16] / self.target_key[:16]

    def __repr__(self) -> str:
        return f"TuningDatabase({self.path})"

    def meta(self) -> dict | None:
        """The folder's meta.json, or None when there is no database yet."""
        try:
            return json.loads(_read(self.path / META))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{self.path / META} is unreadable ({first_line(exc)}); "
                              f"move {self.path} away to start afresh") from exc

    def record_count(self) -> int:
        """Trials recorded (complete lines of the record file), 0 without a database."""
        try:
            return _read(self.path / RECORDS).count(b"\n")
        except FileNotFoundError:
            return 0

    @contextlib.contextmanager
    def writing(self):
        """An exclusive, repaired database to tune into: yields MetaSchedule's JSONDatabase."""
        from tvm.s_tir import meta_schedule as ms

        self._create()
        with _locked(self.path / LOCK):
            for name in (WORKLOADS, RECORDS):
                _trim_torn_line(self.path / name)
            try:
                database = ms.database.JSONDatabase(str(self.path / WORKLOADS), str(self.path / RECORDS),
                                                    module_equality="structural")
            except Exception as exc:
                raise ConfigError(f"tuning database {self.path} is damaged ({first_line(exc)}); "
                                  f"move it away to start afresh") from exc
            yield database

    def snapshot(self):
        """The records so far as an in-memory database (None when there are none), without locking
        or changing the folder: a tuning run may be appending to it meanwhile."""
        from tvm.s_tir import meta_schedule as ms

        if not os.path.lexists(self.path):
            return None
        self._check_folders()
        if self.meta() is None:
            return None
        # Records first: every record's workload line was written before the record.
        records, workloads = (_read(self.path / n) for n in (RECORDS, WORKLOADS))
        records, workloads = (data[:data.rfind(b"\n") + 1] for data in (records, workloads))
        if not records:
            return None
        with tempfile.TemporaryDirectory(prefix="dlopt-tuning-") as tmp:
            (Path(tmp) / WORKLOADS).write_bytes(workloads)
            (Path(tmp) / RECORDS).write_bytes(records)
            try:
                return ms.database.JSONDatabase(str(Path(tmp) / WORKLOADS), str(Path(tmp) / RECORDS),
                                                allow_missing=False, module_equality="structural")
            except Exception as exc:
                raise ConfigError(f"tuning database {self.path} is damaged ({first_line(exc)}); "
                                  f"move it away to start afresh") from exc

    def update_meta(self, *, seconds: float = 0.0) -> dict:
        """Record the trial count and add ``seconds`` of tuning to meta.json (written atomically)."""
        import tvm

        meta = self.meta() or {}
        now = datetime.now(timezone.utc).isoformat(timespec="seconds")
        meta = {"format": FORMAT, "model_sha256": self.model_sha256, "target": self.target,
                "target_key": self.target_key, "trials": self.record_count(),
                "seconds": round(float(meta.get("seconds", 0.0)) + seconds, 1),
                "dlopt_version": __version__, "tvm_version": tvm.__version__,
                "created": meta.get("created", now), "updated": now}
        fd, tmp = tempfile.mkstemp(prefix=".meta-", dir=self.path)
        with os.fdopen(fd, "w") as out:
            json.dump(meta, out, indent=2)
        os.replace(tmp, self.path / META)
        return meta

    def _create(self) -> None:
        try:
            self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:  # a file where the root (or a folder above it) should be
            raise _not_a_root(self.root, exc.strerror or first_line(exc)) from exc
        for folder in (self.path.parent, self.path):
            self._check_folders(upto=folder.parent)  # nothing is created in a folder others control
            with contextlib.suppress(FileExistsError):
                folder.mkdir(mode=0o700)
        self._check_folders()
        meta = self.meta()
        if meta is None:
            if any(self.path.iterdir()):
                raise ConfigError(f"{self.path} holds files but no {META}: not a dlopt tuning database; "
                                  f"dlopt leaves it alone (choose another --db)")
            self.update_meta()
        elif meta.get("model_sha256") != self.model_sha256 or meta.get("target") != self.target:
            raise ConfigError(f"{self.path} holds records for another model or target ({META} says "
                              f"{meta.get('target')}); move it away")

    def _check_folders(self, upto: Path | None = None) -> None:
        for path, follow in ((self.root, True), (self.path.parent, False), (self.path, False)):
            if upto is not None and len(path.parts) > len(upto.parts):
                return
            try:
                why = _distrust(os.stat(path) if follow else os.lstat(path))
            except OSError as exc:
                why = exc.strerror or str(exc)
            if why:
                raise ConfigError(f"refusing the tuning database folder {path}: {why}")
        for name in () if upto else (WORKLOADS, RECORDS, META, LOCK):
            with contextlib.suppress(FileNotFoundError):
                if not stat.S_ISREG(os.lstat(self.path / name).st_mode):
                    raise ConfigError(f"refusing {self.path / name}: not a plain file (a symlink?)")


@dataclass(frozen=True)
class TuningApplied:
    """A tuning database a TVM build applied: where, how many of its tasks it tuned, and the report's line."""

    database: str
    tuned_tasks: int | None
    tasks: int | None
    summary: str | None  # "4 of 5 tasks tuned from <database> (64 trials)"

    @classmethod
    def from_settings(cls, settings) -> "TuningApplied | None":
        """From the build's settings (the TVM backend's ``tuning_db``, ``tuned_tasks``, ``tasks``, ``tuning``);
        None when it applied no database."""
        database = settings.get("tuning_db") if isinstance(settings, dict) else None
        if not database:
            return None
        return cls(database, settings.get("tuned_tasks"), settings.get("tasks"), settings.get("tuning"))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: "dict | TuningApplied") -> "TuningApplied":
        if isinstance(data, TuningApplied):
            return data
        return cls(data.get("database"), data.get("tuned_tasks"), data.get("tasks"), data.get("summary"))


def check_root(root: Path) -> None:
    """Refuse, creating nothing, a root that is not and cannot become a folder (a file at it or above it):
    the ConfigError ``TuningDatabase`` would give, before a tune spends seconds on the model and TVM."""
    root = Path(root)
    for path in (root, *root.parents):
        try:
            st = os.stat(path)
        except FileNotFoundError:
            continue
        except OSError as exc:  # ENOTDIR: a file further up
            raise _not_a_root(root, exc.strerror or first_line(exc)) from exc
        if not stat.S_ISDIR(st.st_mode):
            raise _not_a_root(root, os.strerror(errno.EEXIST if path == root else errno.ENOTDIR))
        return


def _not_a_root(root: Path, why: str) -> ConfigError:
    return ConfigError(f"cannot use {root} as the tuning database folder ({why}); give --db a folder")


def _distrust(st: os.stat_result) -> str | None:
    if not stat.S_ISDIR(st.st_mode):
        return "not a folder (a symlink?)"
    if hasattr(os, "geteuid") and st.st_uid != os.geteuid():
        return f"owned by uid {st.st_uid}, not by you"
    if st.st_mode & 0o022:
        return f"writable by group or others (mode {stat.S_IMODE(st.st_mode):o})"
    return None


def _read(path: Path) -> bytes:
    fd = os.open(path, os.O_RDONLY | _NOFOLLOW)
    with os.fdopen(fd, "rb") as fh:
        return fh.read()


def _trim_torn_line(path: Path) -> None:
    """Drop an unfinished last line (a run killed while appending it)."""
    try:
        fd = os.open(path, os.O_RDWR | _NOFOLLOW)
    except FileNotFoundError:
        return
    with os.fdopen(fd, "r+b") as fh:
        data = fh.read()
        keep = data.rfind(b"\n") + 1
        if keep < len(data):
            logger.warning("dropping the unfinished last line of %s (%d bytes) left by an interrupted "
                           "tuning run", path, len(data) - keep)
            fh.truncate(keep)


@contextlib.contextmanager
def _locked(path: Path):
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks; one tuning run at a time is the user's job
        yield
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT | _NOFOLLOW, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError(f"another dlopt tune is writing {path.parent}; wait for it to finish") from None
        yield
    finally:
        os.close(fd)
