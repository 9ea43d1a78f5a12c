"""Output folders that appear whole or not at all, and the manifest that describes them.

Safety rules (a compile must never cost a user their files):
- an existing folder is replaced only when it is empty, or when its manifest is
  dlopt's own and every entry in it is one that manifest says dlopt published;
- the input model is never inside the folder being replaced;
- the output path is resolved first, so a symlink and its target share one lock;
- the lock file is created with O_EXCL|O_NOFOLLOW and is never a planted link;
- staging folders carry their owner's pid, and a later run removes those whose
  owner died (SIGKILL leaves them behind);
- a path an output folder names for its own files (verify.npz's candidate ``dir``, the
  manifest's ``bundle``, ``files`` and ``published``) is used only through
  :func:`contained_path`: relative, no ``..``, inside the folder, no symlink on the way;
- native code in a folder (a TVM ``model.so``, a C candidate's sources) is loaded only
  after :func:`check_native_files` found it as the manifest's sha256 recorded it at publish.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import stat
import tempfile
import threading
import time
from pathlib import Path, PurePosixPath
from typing import BinaryIO, Callable, Iterable, Iterator

from dlopt.core.errors import ConfigError, OutputBusy, first_line

MANIFEST = "manifest.json"
# What every dlopt output holds besides the artefact's own files (manifests older than
# the "published" list are checked against these plus their "files" and "bundle").
REPORT_FILES = ("manifest.json", "report.json", "report.md", "report.html", "model.onnx", "model.onnx.data",
                "calibration.json", "session_options.json")
NAME_MAX = 255
# The manifest's {path relative to the output: sha256} of every artefact file, written at publish.
FILE_HASHES = "file_sha256"
# Files dlopt turns into native code in its own process (TVM's model.so; a C candidate's sources,
# built with the host gcc and loaded with ctypes).
NATIVE_SUFFIXES = (".so", ".dylib", ".dll", ".c", ".h", ".cc", ".cpp", ".s", ".S", ".o", ".a")
_TMP_TAG, _OLD_TAG = "dlopt-tmp", "dlopt-old"
_STALE = re.compile(r"^\.(?P<name>.+)\.(?:dlopt-tmp|dlopt-old)-(?P<pid>\d+)-[^/]+$")


def resolve_output(out: Path) -> Path:
    """The real folder ``out`` names: links are followed once, here, so every later step agrees."""
    out = Path(out)
    if out.is_symlink() and not out.exists():
        raise ConfigError(f"output path {out} is a symlink to {os.readlink(out)}, which does not exist; "
                          f"point -o at a real folder")
    resolved = out.resolve()
    longest = len(f".{resolved.name}.{_TMP_TAG}-{2 ** 22}-xxxxxxxx")
    if longest > NAME_MAX:
        raise ConfigError(f"output folder name {resolved.name[:40]}... is too long ({len(resolved.name)} "
                          f"characters); dlopt needs room for its temporary names: use at most "
                          f"{len(resolved.name) - (longest - NAME_MAX)}")
    return resolved


def _manifest_entries(out: Path) -> set[str] | None:
    """The top-level names a dlopt manifest in ``out`` says dlopt published, or None if it is not dlopt's."""
    try:
        manifest = read_folder_json(out, MANIFEST, missing_ok=True)
    except ConfigError:  # a symlink, FIFO, device or garbage: not dlopt's
        return None
    if not isinstance(manifest, dict) or not {"schema_version", "dlopt_version"} <= manifest.keys():
        return None
    published = manifest.get("published")
    if isinstance(published, list) and all(isinstance(p, str) for p in published):
        return set(published)
    files = manifest.get("files") if isinstance(manifest.get("files"), list) else []
    names = set(REPORT_FILES) | {f for f in files if isinstance(f, str)}
    if isinstance(manifest.get("bundle"), dict) and manifest["bundle"]:
        names.add("bundle")
    return names


def _unknown_entries(out: Path) -> list[str]:
    """Entries of ``out`` that dlopt did not publish there (all of them if it is not a dlopt output)."""
    entries = sorted(os.listdir(out))
    if not entries:
        return []
    published = _manifest_entries(out)
    if published is None:
        return entries
    # dlopt writes plain files and folders, never links: a link is someone else's
    return [e for e in entries if e not in published or (out / e).is_symlink()]


def check_output_dir(out: Path, *, inputs: tuple[Path, ...] = ()) -> None:
    """Fail early, before any work, when ``out`` (already resolved) cannot become an output folder.

    ``inputs`` are files the compile reads (the model and its data): a folder holding
    one of them is never replaced.
    """
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output path {out} exists and is not a folder")
    if out.exists():
        unknown = _unknown_entries(out)
        if unknown:
            shown = ", ".join(unknown[:5]) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
            what = ("is not a dlopt output (no dlopt manifest)" if _manifest_entries(out) is None
                    else "holds files dlopt did not write")
            raise ConfigError(f"output folder {out} {what}: {shown}; choose another -o or move them away")
    for path in inputs:
        real = Path(path).resolve()
        if real == out or out in real.parents:
            raise ConfigError(f"the output folder {out} holds the input {path}; choose another -o "
                              f"(dlopt replaces its output folder whole)")
    parent = next(p for p in out.parents if p.exists())  # missing parents are created, as mkdir -p does
    if not parent.is_dir():
        raise ConfigError(f"cannot create output folder {out}: {parent} is not a folder")
    if not os.access(parent, os.W_OK):
        raise ConfigError(f"cannot create output folder {out}: {parent} is not writable")


@contextlib.contextmanager
def parents_made(out: Path) -> Iterator[None]:
    """Create the missing parents of ``out``; remove the ones made here again if the compile fails."""
    made = []
    for folder in reversed(out.parents):
        if folder.exists():
            continue
        try:
            folder.mkdir()
        except FileExistsError:  # there already, or another compile (a sibling output) just made it
            continue
        made.append(folder)
    try:
        yield
    except BaseException:
        for folder in reversed(made):
            with contextlib.suppress(OSError):
                folder.rmdir()  # only when still empty: never anything another process put there
        raise


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_staging(out: Path) -> list[str]:
    """Remove the staging folders of earlier compiles to ``out`` whose process is gone.

    Only folders dlopt names (``.<out>.dlopt-tmp-<pid>-*``), owned by this user, whose
    pid is dead; the caller holds the output lock, so no live compile can own them.
    """
    removed = []
    for entry in out.parent.iterdir():
        match = _STALE.match(entry.name)
        if not match or match["name"] != out.name or entry.is_symlink() or not entry.is_dir():
            continue
        if entry.stat().st_uid != os.getuid() or _pid_alive(int(match["pid"])):
            continue
        shutil.rmtree(entry, ignore_errors=True)
        removed.append(entry.name)
    return removed


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Ignore SIGINT/SIGTERM while cleaning up, so a second Ctrl-C cannot leave half a folder."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextlib.contextmanager
def staging_dir(out: Path) -> Iterator[Path]:
    """Yield a temporary folder beside ``out`` (resolved); the caller moves it into place with :func:`move_into_place`.

    On any exception (including KeyboardInterrupt) the temporary folder is removed,
    so an interrupted or failed compile leaves nothing behind.
    """
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.{_TMP_TAG}-{os.getpid()}-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the published folder should not be
    try:
        yield tmp
    finally:
        with signals_deferred():
            shutil.rmtree(tmp, ignore_errors=True)


def published_entries(staged: Path) -> list[str]:
    """What the manifest lists as published: every top-level entry of the staged folder."""
    return sorted(os.listdir(staged))


def move_into_place(staged: Path, out: Path) -> None:
    """Move a complete staged folder to ``out`` (resolved), replacing an earlier dlopt output there."""
    def still_ours() -> None:
        unknown = _unknown_entries(out)
        if unknown:
            raise ConfigError(f"output folder {out} changed during the compile and now holds files dlopt "
                              f"did not write ({', '.join(unknown[:5])}); nothing was replaced")

    replace_folder(staged, out, check=still_ours)


def replace_folder(staged: Path, out: Path, *, check: Callable[[], None] | None = None,
                   old_dir: Path | None = None) -> None:
    """Rename ``staged`` to ``out``; an existing ``out`` is first moved aside into ``old_dir`` (default:
    its parent) and put back if the rename fails.  ``check`` runs (and may raise) before anything moves.
    Signals are deferred meanwhile, so an interrupt never leaves ``out`` missing."""
    with signals_deferred():
        if not out.exists():
            os.replace(staged, out)
            return
        if check is not None:
            check()
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.{_OLD_TAG}-{os.getpid()}-", dir=old_dir or out.parent))
        os.replace(out, old / "previous")
        try:
            os.replace(staged, out)
        except BaseException:
            os.replace(old / "previous", out)
            raise
        finally:
            shutil.rmtree(old, ignore_errors=True)


def _open_lock(path: Path) -> int:
    """Open the lock file: create it, or reuse one only if it is a plain dlopt lock of this user."""
    flags = os.O_RDWR | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
    try:
        return os.open(path, flags | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        pass
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        return _open_lock(path)  # its owner just removed it
    except OSError as exc:  # ELOOP: a symlink planted where the lock goes
        raise ConfigError(f"lock path {path} is a symlink or not a file; dlopt will not write through it; "
                          f"remove it") from exc
    info = os.fstat(fd)
    content = os.pread(fd, 64, 0)
    if not stat.S_ISREG(info.st_mode) or info.st_uid != os.getuid() or not re.fullmatch(rb"\d*", content.strip()):
        os.close(fd)
        raise ConfigError(f"{path} exists and is not a dlopt lock file; remove it or choose another -o")
    return fd



def lock_path(out: Path) -> Path:
    """The lock file beside output folder ``out`` that one compile or package holds while writing it."""
    return out.parent / f".{out.name}.dlopt-lock"


@contextlib.contextmanager
def output_lock(out: Path, *, wait: float = 0.0) -> Iterator[None]:
    """Hold an exclusive lock on ``out`` (resolved) so two compiles never write it at once.

    The lock is a hidden file beside ``out`` holding the owner's pid; the kernel
    drops the flock if the process dies, and the file is removed on release.  A
    second compile waits up to ``wait`` seconds, then fails naming the owner.
    """
    import fcntl

    path = lock_path(out)
    deadline = time.monotonic() + wait
    while True:
        fd = _open_lock(path)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            if time.monotonic() >= deadline:
                raise OutputBusy(
                    f"another dlopt compile (pid {owner}) is writing {out}; wait for it, pass --wait "
                    f"SECONDS, or choose another -o"
                ) from None
            time.sleep(0.2)
            continue
        try:
            same = os.fstat(fd).st_ino == os.lstat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the previous owner removed the file after we opened it: take the new one
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # unlink before unlocking so a waiter sees a new file, not this one
        os.close(fd)


def write_file(path: Path, content: str | Callable[[BinaryIO], None], *, mode: int = 0o644) -> Path:
    """Write ``path`` whole or not at all: ``content`` is text (UTF-8) or ``f(binary_file)``.

    Written beside ``path``, synced, given ``mode`` and renamed over it; on any error the
    temporary file goes and ``path`` is as it was.  (``device_check.write_text`` is the
    same for the scripts that run on a device without dlopt.)
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            if isinstance(content, str):
                f.write(content.encode("utf-8"))
            else:
                content(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


# -- paths an output folder names, and the native code it holds ------------------------------------

def contained_path(folder: Path, name, *, named_in: str = "") -> Path:
    """``folder / name`` for a path that an output folder's own files name, checked first.

    ``name`` must be a relative path (``"."`` is the folder itself) without ``..``, that
    stays inside ``folder`` with no symlink on the way (whatever exists of it is checked;
    the rest may be created).  Anything else is a ConfigError: such a folder was crafted
    or damaged, and following it would read, load or move files elsewhere.  Code that
    takes a path from an output folder (verify, bench, select, Triton, MLflow upload)
    goes through here; ``device_check.contained_path`` is the standalone twin for
    run_candidates.py.
    """
    folder = Path(folder)
    where = f" ({named_in})" if named_in else ""

    def refuse(why: str) -> ConfigError:
        shown = repr(name) if not isinstance(name, str) or len(name) <= 120 else f"{name[:100]!r}... ({len(name)} characters)"
        return ConfigError(f"{folder} names the path {shown}{where}, which {why}; dlopt uses only paths inside "
                           f"the folder it was given (a crafted or damaged output: recompile it)")

    if not isinstance(name, str) or not name or "\x00" in name:
        raise refuse("is not a relative path")
    pure = PurePosixPath(name)
    if pure.is_absolute():
        raise refuse("is absolute")
    if ".." in pure.parts:
        raise refuse("climbs out with '..'")
    path = folder
    try:
        for part in pure.parts:
            path = path / part
            if path.is_symlink():
                raise refuse(f"goes through the symlink {path.relative_to(folder).as_posix()}")
        root = folder.resolve()
        real = path.resolve()
    except OSError as exc:  # ENAMETOOLONG, ELOOP, EACCES: is_symlink swallows only some of them
        raise refuse(f"cannot be checked ({exc.strerror or type(exc).__name__})") from None
    if real != root and root not in real.parents:
        raise refuse("resolves outside it")
    return path


# The largest settings file (manifest.json, report.json, session_options.json, ...) dlopt reads back
# from an output folder, and how deeply its JSON may nest: a compile writes a few KB, a few levels deep.
JSON_LIMIT = 16 << 20
JSON_DEPTH = 64


def read_folder_json(folder: Path, name: str, *, limit: int = JSON_LIMIT, missing_ok: bool = False):
    """The JSON value of the file ``name`` in output folder ``folder``, read as data and bounded.

    Every JSON file dlopt reads back from an output folder (manifest.json, report.json, a
    candidate's session_options.json, runtime_config.json, tvm_build.json, c_build.json)
    comes through here.  The path goes through :func:`contained_path` and is opened with
    O_NOFOLLOW|O_NONBLOCK, so a symlink, a FIFO, a device or a folder is refused at once
    (never read until memory runs out, never waited on); so are files over ``limit``
    bytes, text that is not UTF-8 JSON, and JSON nested deeper than JSON_DEPTH.  Each
    refusal is a one-line ConfigError naming the file.  A missing file is None when
    ``missing_ok``, else a ConfigError too.
    """
    path = contained_path(folder, name)
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)

    def refuse(why: str) -> ConfigError:
        return ConfigError(f"{path} {why}; dlopt reads only the plain JSON files it wrote there "
                           f"(a crafted or damaged output: recompile it)")

    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        if missing_ok:
            return None
        raise refuse("is missing") from None
    except OSError as exc:  # ELOOP: a symlink planted after the check; EACCES; ENXIO
        raise refuse(f"cannot be opened ({exc.strerror or type(exc).__name__})") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise refuse("is not a regular file")
        if info.st_size > limit:
            raise refuse(f"is {info.st_size} bytes, over dlopt's limit of {limit} for a settings file")
        chunks, size = [], 0
        while size <= limit:
            chunk = os.read(fd, min(1 << 20, limit + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    except OSError as exc:
        raise refuse(f"cannot be read ({exc.strerror or type(exc).__name__})") from None
    finally:
        os.close(fd)
    if size > limit:
        raise refuse(f"grew over dlopt's limit of {limit} bytes for a settings file while being read")
    try:
        value = json.loads(b"".join(chunks).decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        detail = "nested too deeply" if isinstance(exc, RecursionError) else first_line(exc, 120)
        raise refuse(f"is not valid JSON ({detail})") from None
    if _json_depth(value) > JSON_DEPTH:
        raise refuse(f"nests deeper than {JSON_DEPTH} levels")
    return value


def _json_depth(value) -> int:
    """How deeply ``value`` nests (a scalar is 0), without recursion."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            item = item.values()
        elif not isinstance(item, list):
            deepest = max(deepest, depth)
            continue
        deepest = max(deepest, depth + 1)
        if deepest > JSON_DEPTH:
            return deepest
        stack.extend((child, depth + 1) for child in item)
    return deepest


def check_plain_files(folder: Path, names: Iterable[str], *, named_in: str = "") -> None:
    """Before a loader opens the artefact files ``names`` of ``folder``: each is a contained path
    (:func:`contained_path`: no symlink, no ``..``) to a regular file, or a folder holding only
    regular files and folders; an ONNX file's external data files likewise (a location that is
    absolute or climbs out with ``..`` is ONNX Runtime's to refuse, as it does).  A symlink, FIFO or
    device among them is a one-line ConfigError (a loader would read another file, or wait
    forever); a missing file is left to the loader, which names it."""
    folder = Path(folder)
    for name in dict.fromkeys(n for n in names if isinstance(n, str)):
        path = contained_path(folder, name, named_in=named_in)
        _check_plain(folder, path)
        if name.endswith(".onnx") and path.is_file():
            base = PurePosixPath(name).parent
            for location in _external_locations(path):
                if PurePosixPath(location).is_absolute() or ".." in PurePosixPath(location).parts:
                    continue  # ONNX Runtime refuses these itself, in one line (tests/test_loader_safety.py)
                _check_plain(folder, contained_path(folder, (base / location).as_posix(), named_in=name))


def _not_plain(folder: Path, path: Path, why: str) -> ConfigError:
    return ConfigError(f"{path} {why}; dlopt loads only the plain files it wrote in {folder} and refuses "
                       f"symlinks, FIFOs and devices there (a crafted or damaged output: recompile it)")


def _check_plain(folder: Path, path: Path) -> None:
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    except OSError as exc:
        raise _not_plain(folder, path, f"cannot be checked ({exc.strerror or type(exc).__name__})") from None
    if stat.S_ISDIR(mode):
        for base, dirs, files in os.walk(path):  # never follows links
            for entry in (*dirs, *files):
                _check_plain(folder, Path(base) / entry)
    elif stat.S_ISLNK(mode):
        raise _not_plain(folder, path, f"is a symlink (to {os.readlink(path)!r})")
    elif not stat.S_ISREG(mode):
        raise _not_plain(folder, path, "is not a regular file")


def _external_locations(path: Path) -> list[str]:
    """The external data files an ONNX file names (its own text, not yet read); [] when it does not parse
    (the loader then says why)."""
    import onnx

    from dlopt.core.model_io import _external_tensors  # onnx and onnx_ir: 1.1 CPU-s a verb need not pay first

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # DecodeError: the loader reports it in its own words
        return []
    return sorted({info.get("location", "") for _, info in _external_tensors(model)})


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def sha256_of(path: Path) -> str:
    return sha256_file(path)


def file_hashes(folder: Path, names: Iterable[str]) -> dict[str, str]:
    """{name: sha256} of the files ``names`` (relative to ``folder``; a folder counts as all its files)."""
    hashes = {}
    for name in names:
        path = folder / name
        if path.is_dir() and not path.is_symlink():
            for file in sorted(path.rglob("*")):
                if file.is_file() and not file.is_symlink():
                    hashes[file.relative_to(folder).as_posix()] = sha256_of(file)
        elif path.is_file() and not path.is_symlink():
            hashes[PurePosixPath(name).as_posix()] = sha256_of(path)
    return hashes


def is_native(name: str) -> bool:
    return name.endswith(NATIVE_SUFFIXES)


def check_native_files(root: Path, folder: Path, files: Iterable[str] = (), manifest: dict | None = None) -> None:
    """Before dlopt loads native code from output ``root``: the candidate in ``folder`` is as published.

    ``folder`` is ``root`` or one of its bundle candidates, ``files`` the candidate's files
    (relative to ``folder``).  When it holds native code (a file named in ``files`` or lying
    in ``folder`` with a suffix of NATIVE_SUFFIXES), each of those files must be one the
    manifest's FILE_HASHES recorded at publish, with the same sha256.  Else a ConfigError,
    before anything is loaded: a swapped ``model.so`` never runs its constructor.  A manifest
    from before the hashes (dlopt 0.1.0 before issue 23) is refused the same way: recompile.
    Candidates without native code (ONNX Runtime, OpenVINO) are not checked here (their
    outputs are checked by ``dlopt verify``).
    """
    root, folder = Path(root), Path(folder)
    if manifest is None:
        manifest = read_folder_json(root, MANIFEST, missing_ok=True)
    try:
        rel = folder.resolve().relative_to(root.resolve())
    except ValueError:
        raise ConfigError(f"{folder} is not inside the output {root}; dlopt loads candidates of an output "
                          f"only from inside it") from None
    listed = {f for f in files if isinstance(f, str)}
    lying = {p.name for p in folder.iterdir() if is_native(p.name)} if folder.is_dir() else set()
    names = sorted(listed | lying)
    native = [n for n in names if is_native(n)]
    if not native:
        return
    hashes = manifest.get(FILE_HASHES) if isinstance(manifest, dict) else None
    if not isinstance(hashes, dict):
        raise ConfigError(f"{folder} holds native code ({native[0]}) and its manifest records no file hashes "
                          f"(written before dlopt recorded them); dlopt loads native code only after checking "
                          f"it: recompile the model with this dlopt")
    for name in names:
        key = (PurePosixPath(rel.as_posix()) / name).as_posix() if rel.parts else PurePosixPath(name).as_posix()
        path = contained_path(root, key, named_in=MANIFEST)
        expected = hashes.get(key)
        if not isinstance(expected, str):
            raise ConfigError(f"{key} in {root} is not among the files its manifest hashed at publish; dlopt does "
                              f"not load native code from a folder holding files it did not write: remove it or "
                              f"recompile")
        if not path.is_file():
            raise ConfigError(f"{key} in {root} is missing or not a file; recompile the model")
        if sha256_of(path) != expected:
            raise ConfigError(f"{key} in {root} is not the file dlopt published there (its sha256 differs from "
                              f"the manifest's); dlopt does not load native code that changed: recompile, or "
                              f"restore the file")
