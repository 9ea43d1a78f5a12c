"""The standalone checks that every folder, file and setting an output names is one dlopt wrote,
before anything in it runs: candidate folders inside the output, JSON read only from plain files
of bounded size, verify.npz entries matching the manifest, native code matching its sha256,
thread counts within the cores, and only the runtime settings dlopt writes.

Two lives, like ``device_check``: imported as ``dlopt.device.device_guard`` inside dlopt, and pasted into
each output's ``run_candidates.py`` before ``device_check.py`` (so it imports only the standard
library).  The twins of ``dlopt.core.artifacts.contained_path``/``check_native_files``, because that
script cannot import dlopt; what each runtime may be asked is its backend's companion module's
(``dlopt.targets.ort_plain``, ...: ``plain_runtime``), pasted in after this one.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path, PurePosixPath


class VerifyFileError(ValueError):
    """verify.npz is missing or unreadable."""


def first_words(exc: BaseException, limit: int = 200) -> str:
    """The first line of ``exc``'s message, at most ``limit`` characters."""
    lines = str(exc).strip().splitlines()
    return lines[0][:limit] if lines else ""


def contained_path(folder: Path, name) -> Path:
    """``folder / name`` for a candidate ``dir`` that verify.npz names, checked first: relative, no
    ``..``, inside ``folder``, no symlink on the way; else VerifyFileError.  The standalone twin
    of ``dlopt.core.artifacts.contained_path`` (run_candidates.py cannot import dlopt)."""
    folder = Path(folder)

    def refuse(why: str) -> VerifyFileError:
        return VerifyFileError(f"{folder} names the candidate folder {shown(name)}, which {why}; only folders inside "
                               f"the output are run (a crafted or damaged output: recompile it)")

    if not isinstance(name, str) or not name or "\x00" in name:
        raise refuse("is not a relative path")
    pure = PurePosixPath(name)
    if pure.is_absolute():
        raise refuse("is absolute")
    if ".." in pure.parts:
        raise refuse("climbs out with '..'")
    path = folder
    try:  # a name the file system refuses (ENAMETOOLONG, ELOOP) is the folder's fault, not a crash
        for part in pure.parts:
            path = path / part
            if path.is_symlink():
                raise refuse(f"goes through the symlink {path.relative_to(folder).as_posix()}")
        root, real = folder.resolve(), path.resolve()
    except OSError as exc:
        raise refuse(f"cannot be checked ({exc.strerror or type(exc).__name__})") from exc
    if real != root and root not in real.parents:
        raise refuse("resolves outside it")
    return path


def shown(name, limit: int = 80) -> str:
    """``repr(name)``, cut to ``limit`` characters: a crafted 5000-character path stays one readable line."""
    text = repr(name)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(str(name))} characters)"


# The most bytes a JSON file of an output (manifest, settings) may hold: dlopt's are kilobytes
# (dlopt.core.artifacts.JSON_LIMIT; this script needs no dlopt).
JSON_MAX_BYTES = 16 << 20


def read_json(path: Path, max_bytes: int = JSON_MAX_BYTES):
    """The JSON value in ``path``, read only if it is a regular file (not a FIFO, a device or a
    symlink to one) of at most ``max_bytes``; else, or if it does not parse (nesting too deep
    included), VerifyFileError in one line.  A FIFO would block the read forever and
    /dev/zero would fill the memory."""
    path = Path(path)
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        why = "is a symlink" if path.is_symlink() else f"cannot be opened ({exc.strerror or type(exc).__name__})"
        raise VerifyFileError(f"{path} {why}; dlopt writes its JSON files as plain files: recompile") from exc
    try:
        with os.fdopen(fd, "rb") as f:
            info = os.fstat(f.fileno())
            if not stat.S_ISREG(info.st_mode):
                raise VerifyFileError(f"{path} is not a regular file; dlopt writes its JSON files as plain files: "
                                      f"recompile")
            if info.st_size > max_bytes:
                raise VerifyFileError(f"{path} holds {info.st_size} bytes, over the {max_bytes} read from a dlopt "
                                      f"JSON file: recompile")
            text = f.read(max_bytes + 1)
        if len(text) > max_bytes:
            raise VerifyFileError(f"{path} grew past {max_bytes} bytes while read: recompile")
        return json.loads(text)
    except VerifyFileError:
        raise
    except (OSError, ValueError, RecursionError, MemoryError) as exc:
        gist = "nested too deeply" if isinstance(exc, RecursionError) else first_words(exc)
        raise VerifyFileError(f"{path} is not readable JSON ({type(exc).__name__}: {gist}); recompile") from exc


def read_json_object(path: Path) -> dict:
    """``read_json`` of a file that must hold a JSON object."""
    value = read_json(path)
    if not isinstance(value, dict):
        raise VerifyFileError(f"{path} does not hold a JSON object; recompile")
    return value


def is_bundle_dir(value) -> bool:
    """``value`` is ``bundle/<name>`` exactly: one folder directly under bundle/, written plainly."""
    if not isinstance(value, str) or "\x00" in value:
        return False
    parts = value.split("/")
    return len(parts) == 2 and parts[0] == "bundle" and parts[1] not in ("", ".", "..") and "\\" not in value


def check_entry(manifest: dict, key, entry: dict, *, where: str) -> None:
    """verify.npz's ``entry`` for candidate ``key`` is the candidate the manifest ships under that key:
    ``dir`` is ``"."`` for the manifest's top-level candidate and exactly ``manifest["bundle"][key]``
    (a ``bundle/<name>`` folder) for the others, and its backend and precision are the key's.  Else
    VerifyFileError: a verify.npz pointing ``tvm/fp32`` at the top-level ONNX would call a swapped
    library verified without running it."""
    top = f"{manifest.get('backend')}/{manifest.get('precision')}"
    bundle = manifest.get("bundle") if isinstance(manifest.get("bundle"), dict) else {}
    want = "." if key == top else bundle.get(key)
    if key != top and not is_bundle_dir(want):
        raise VerifyFileError(f"{where} lists the candidate {shown(key)}, which the output's manifest.json does not "
                              f"ship (as bundle/<folder>); nothing was run: recompile")
    if entry.get("dir") != want:
        raise VerifyFileError(f"{where} puts the candidate {shown(key)} in {shown(entry.get('dir'))}; the manifest "
                              f"ships it in {want!r}; nothing was run (a crafted or damaged output: recompile)")
    backend, _, precision = str(key).partition("/")
    if (entry.get("backend"), entry.get("precision")) != (backend, precision):
        made = f"{entry.get('backend')}/{entry.get('precision')}"
        raise VerifyFileError(f"{where} calls the candidate {shown(key)} a {shown(made)} artefact; nothing was run "
                              f"(a crafted or damaged output: recompile)")


# Files a runtime turns into native code (dlopt.core.artifacts.NATIVE_SUFFIXES; this script needs no dlopt).
NATIVE_SUFFIXES = (".so", ".dylib", ".dll", ".c", ".h", ".cc", ".cpp", ".s", ".S", ".o", ".a")


def check_native(out: Path, folder: Path, manifest: dict) -> None:
    """Before a candidate's native code (a TVM model.so) is loaded: each of its files is the one the
    ``manifest``'s ``file_sha256`` recorded at publish; else VerifyFileError.  The standalone twin of
    ``dlopt.core.artifacts.check_native_files``: a swapped library must never run its constructor."""
    top = folder.resolve() == out.resolve()
    listed = manifest.get("files") if top and isinstance(manifest.get("files"), list) else []
    present = [p.name for p in folder.iterdir() if p.is_file() or p.is_symlink()] if folder.is_dir() else []
    names = sorted({n for n in listed if isinstance(n, str)}
                   | {n for n in present if not top or n.endswith(NATIVE_SUFFIXES)})
    if not any(n.endswith(NATIVE_SUFFIXES) for n in names):
        return
    hashes = manifest.get("file_sha256")
    if not isinstance(hashes, dict):
        raise VerifyFileError(f"{folder} holds native code and {out / 'manifest.json'} records no file hashes; "
                              f"it is not loaded unchecked: recompile the model with dlopt")
    rel = folder.resolve().relative_to(out.resolve()).as_posix()
    for name in names:
        key = name if rel == "." else f"{rel}/{name}"
        path = contained_path(out, key)
        if not isinstance(hashes.get(key), str) or not path.is_file():
            raise VerifyFileError(f"{key} is not a file dlopt published in {out}; native code is not loaded "
                                  f"from a folder holding files dlopt did not write: recompile")
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        if digest.hexdigest() != hashes[key]:
            raise VerifyFileError(f"{key} in {out} is not the file dlopt published there (its sha256 differs "
                                  f"from the manifest's); native code that changed is not loaded: recompile")


# Read once, at import: a runtime may later pin the calling thread to one core (TVM's thread pool does).
_CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def cores() -> int:
    """The CPUs this process may run on (as it started)."""
    return _CORES


def clamped_threads(value, default: int) -> int:
    """A thread or stream count read from a file, within 0 (the runtime's default) and this machine's cores:
    a settings file asking for 400 threads must not start 400 threads."""
    try:
        count = int(value)
    except (TypeError, ValueError, OverflowError):
        return default
    return max(0, min(count, cores()))


# -- the runtimes, without dlopt --------------------------------------------------------------------

def plain_runtime(backend) -> type | str | None:
    """The companion class that opens ``backend``'s candidates with the runtime alone (``OrtPlain``, ...), the
    reason this script does not run them, or None for a backend it does not know.  In run_candidates.py the
    companions and their table (PLAIN_RUNTIMES) are pasted above; inside dlopt, each backend's class names
    its companion (dlopt.targets.plain_runtime)."""
    if not isinstance(backend, str):
        return None
    table = globals().get("PLAIN_RUNTIMES")
    if table is not None:
        return table.get(backend)
    from dlopt.targets import plain_runtime as of_backend

    return of_backend(backend)


def check_settings(backend: str, settings: dict, source) -> None:
    """VerifyFileError (one line) unless ``settings`` asks ``backend``'s runtime only for what dlopt writes."""
    plain = plain_runtime(backend)
    what = plain.refusal(settings, shown) if isinstance(plain, type) else None
    if what:
        raise VerifyFileError(f"{source} {what}, which dlopt does not write (remove it, or recompile)")


def checked_settings(folder: Path, backend: str) -> dict:
    """The settings file of the ``backend`` candidate in ``folder``, read safely and checked."""
    source = folder / plain_runtime(backend).settings_file
    settings = read_json_object(source)
    check_settings(backend, settings, source)
    return settings
