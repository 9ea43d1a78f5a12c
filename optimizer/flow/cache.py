"""A content-addressed cache of compiled artefacts, verified before every use.

Entries live in ``$DLOPT_CACHE`` (default ``~/.cache/dlopt``) under a key that
hashes everything the artefact depends on (the model after its passes, backend,
precision, target, tool versions).  Entries are written to a temporary folder and
renamed into place, so a crash leaves no half-written entry.

Trust: a cached artefact is code dlopt will load (a TVM ``model.so`` runs its
constructors in this process), and the sha256 in ``entry.json`` is written by
whoever can write the entry, so the hashes only catch damage, not tampering.
What keeps others out is ownership: the cache root and its entries are created
0700, and a root or entry not owned by this user, or writable by group or others,
is ignored with a warning (never used, never deleted) and the artefact is built
afresh.  Inside a trusted entry, file names must be plain names, symlinks are
refused (files are opened with ``O_NOFOLLOW``), and an ``entry.json`` of the wrong
shape is treated as damaged: the entry is deleted and rebuilt.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import hashlib
import json
import logging
import os
import re
import shutil
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path
from dlopt.targets.base import Artifact

logger = logging.getLogger(__name__)

INDEX = "entry.json"
_SHA256 = re.compile(r"[0-9a-f]{64}")
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CHUNK = 1 << 20


def default_root() -> Path:
    return Path(os.environ.get("DLOPT_CACHE") or Path.home() / ".cache" / "dlopt")


@functools.lru_cache(maxsize=1)
def code_fingerprint() -> str:
    """sha256 over dlopt's own source: an artefact that other code built is another artefact.

    The version number alone let a development checkout (and any edited install) reuse
    builds whose session settings an older dlopt wrote.
    """
    import importlib

    digest = hashlib.sha256()
    for package in ("dlopt", "dlopt.passes", "dlopt.targets", "dlopt.calibration"):
        folder = Path(importlib.import_module(package).__file__).parent
        for source in sorted(folder.rglob("*.py")):
            digest.update(source.relative_to(folder).as_posix().encode())
            digest.update(source.read_bytes())
    return digest.hexdigest()


def make_key(*parts: bytes | str) -> str:
    digest = hashlib.sha256()
    for part in parts:
        data = part.encode() if isinstance(part, str) else part
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
    return digest.hexdigest()


class CacheEventKind(enum.Enum):
    HIT = "hit"  # an entry restored whole
    DAMAGED = "damaged"  # an entry whose files no longer match its index: deleted, rebuilt
    IGNORED = "ignored"  # a root, folder or entry others can write: not used


@dataclass(frozen=True)
class CacheEvent:
    kind: CacheEventKind
    message: str  # one line, as the report shows it

    def __str__(self) -> str:
        return self.message


class ArtifactCache:
    def __init__(self, root: Path | None = None) -> None:
        self.root = Path(root) if root is not None else default_root()
        self.events: list[CacheEvent] = []  # what happened, for the report
        self._warned: set[Path] = set()

    @property
    def warnings(self) -> list[str]:
        """The events a report should show: everything but plain hits."""
        return [e.message for e in self.events if e.kind is not CacheEventKind.HIT]

    def _entry(self, key: str) -> Path:
        if not _SHA256.fullmatch(key):
            raise ValueError(f"cache keys are sha256 hex digests, not {key!r}")
        return self.root / key[:2] / key

    def _trusted(self, path: Path, what: str, *, follow: bool = False) -> bool | None:
        """True if only this user can write ``path``, None if it does not exist, else False (warned once)."""
        try:
            why = _distrust(os.stat(path) if follow else os.lstat(path))
        except FileNotFoundError:
            return None
        except OSError as exc:
            why = f"cannot inspect it: {exc.strerror or exc}"
        if why is None:
            return True
        if path not in self._warned:
            self._warned.add(path)
            logger.warning("ignoring the artefact cache %s %s: %s; building afresh", what, path, why)
            self.events.append(CacheEvent(CacheEventKind.IGNORED,
                                          f"cache {what} {path} ignored ({why}); built afresh without it"))
        return False

    def _trusted_entry(self, entry: Path) -> bool | None:
        """The root, its shard folder and the entry itself must all be this user's alone."""
        for path, what, follow in ((self.root, "root", True), (entry.parent, "folder", False),
                                   (entry, "entry", False)):
            state = self._trusted(path, what, follow=follow)
            if state is not True:
                return state
        return True

    def get(self, key: str, dest: Path) -> dict | None:
        """Copy a verified entry's files into ``dest`` and return its metadata, or None."""
        entry = self._entry(key)
        if not self._trusted_entry(entry):
            return None
        try:
            index = _read_index(entry / INDEX)
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            return self._damaged(key, entry, [f"{INDEX}: {exc}"])
        written: list[Path] = []
        damaged = []
        dest.mkdir(parents=True, exist_ok=True)
        for name, digest in index["files"].items():
            written.append(dest / name)
            try:
                if _copy_hashing(entry / name, dest / name) != digest:
                    damaged.append(name)
            except OSError as exc:
                damaged.append(f"{name}: {exc.strerror or exc}")
        if damaged:
            for path in written:  # nothing half-restored is left for the build to trip on
                path.unlink(missing_ok=True)
            return self._damaged(key, entry, damaged)
        self.events.append(CacheEvent(CacheEventKind.HIT, f"cache hit {key[:12]}"))
        return index["meta"]

    def _damaged(self, key: str, entry: Path, what: list[str]) -> None:
        logger.warning("cache entry %s is damaged (%s); rebuilding", key[:12], ", ".join(what))
        self.events.append(CacheEvent(CacheEventKind.DAMAGED,
                                      f"cache entry {key[:12]} was damaged ({', '.join(what)}) and rebuilt"))
        shutil.rmtree(entry, ignore_errors=True)  # ours alone (checked), so safe to delete
        return None

    def put(self, key: str, folder: Path, files: list[str], meta: dict) -> None:
        """Store ``files`` of ``folder`` under ``key`` (best effort: a full disk only logs)."""
        entry = self._entry(key)
        if not all(_plain_name(name) for name in files):
            logger.warning("not caching %s: its file names are not plain names", key[:12])
            return
        tmp = None
        try:
            self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
            if self._trusted(self.root, "root", follow=True) is not True:
                return
            entry.parent.mkdir(mode=0o700, exist_ok=True)
            state = self._trusted_entry(entry)
            if state is False:
                return
            tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=entry.parent))  # mkdtemp makes it 0700
            digests = {name: _copy_hashing(folder / name, tmp / name) for name in files}
            (tmp / INDEX).write_text(json.dumps({"files": digests, "meta": meta}, indent=2))
            if state:
                shutil.rmtree(entry, ignore_errors=True)
            os.replace(tmp, entry)
        except OSError as exc:
            logger.warning("could not store cache entry %s: %s", key[:12], exc)
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)


def _distrust(st: os.stat_result) -> str | None:
    """Why the file with status ``st`` is not a folder only this user can write, or None."""
    if not stat.S_ISDIR(st.st_mode):
        return "not a folder (a symlink?)"
    uid = os.geteuid() if hasattr(os, "geteuid") else st.st_uid
    if st.st_uid != uid:
        return f"owned by uid {st.st_uid}, not by you (uid {uid})"
    if st.st_mode & 0o022:
        return f"writable by group or others (mode {stat.S_IMODE(st.st_mode):o})"
    return None


def _plain_name(name: object) -> bool:
    """A file name with no folder part: it cannot point outside the entry or the output."""
    return (isinstance(name, str) and name not in ("", ".", "..") and "/" not in name
            and "\\" not in name and "\0" not in name and os.sep not in name)


def _artifact_fields() -> tuple[set[str], set[str]]:
    """(allowed, required) keys of a cached Artifact's metadata: its fields but ``folder``."""
    allowed, required = set(), set()
    for f in dataclasses.fields(Artifact):
        if f.name != "folder":
            allowed.add(f.name)
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                required.add(f.name)
    return allowed, required


def _read_index(path: Path) -> dict:
    """``entry.json`` checked for shape; ValueError when it is not what ``put`` writes."""
    fd = os.open(path, os.O_RDONLY | _NOFOLLOW)
    with os.fdopen(fd, "rb") as fh:
        if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
            raise ValueError("not a regular file")
        data = json.loads(fh.read())
    if not isinstance(data, dict) or set(data) != {"files", "meta"}:
        raise ValueError("not an object with 'files' and 'meta'")
    files, meta = data["files"], data["meta"]
    if not isinstance(files, dict) or not files or not all(
            _plain_name(n) and isinstance(d, str) and _SHA256.fullmatch(d) for n, d in files.items()):
        raise ValueError("'files' is not a map of plain file names to sha256 digests")
    allowed, required = _artifact_fields()
    names = list(files)
    if not (isinstance(meta, dict) and required <= set(meta) <= allowed and meta["files"] == names
            and isinstance(meta["backend"], str) and isinstance(meta["precision"], str)
            and meta["entry"] in names and meta.get("check_onnx") in (None, *names)
            and isinstance(meta.get("loadable_here", True), bool) and isinstance(meta.get("settings", {}), dict)):
        raise ValueError("'meta' does not describe an artefact of these files")
    return data


def _copy_hashing(src: Path, dst: Path) -> str:
    """Copy the regular file ``src`` (never through a symlink) to ``dst``; return its sha256."""
    fd = os.open(src, os.O_RDONLY | _NOFOLLOW)
    with os.fdopen(fd, "rb") as fin:
        st = os.fstat(fin.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise OSError(f"{src.name} is not a regular file")
        digest = hashlib.sha256()
        out = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | _NOFOLLOW, 0o600)
        with os.fdopen(out, "wb") as fout:
            while block := fin.read(_CHUNK):
                digest.update(block)
                fout.write(block)
            os.fchmod(fout.fileno(), stat.S_IMODE(st.st_mode) & 0o755)  # keeps build_engine.sh runnable
    return digest.hexdigest()
