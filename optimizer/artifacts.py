"""Output folders that appear whole or not at all, and the manifest that describes them.

Safety rules (a compile must never cost a user their files):
- an existing folder is replaced only when it is empty, or when its manifest is
  dlopt's own and every entry in it is one that manifest says dlopt published;
- the input model is never inside the folder being replaced;
- the output path is resolved first, so a symlink and its target share one lock;
- the lock file is created with O_EXCL|O_NOFOLLOW and is never a planted link;
- staging folders carry their owner's pid, and a later run removes those whose
  owner died (SIGKILL leaves them behind).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import stat
import tempfile
import threading
import time
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

from dlopt.errors import ConfigError, OutputBusy

MANIFEST = "manifest.json"
# What every dlopt output holds besides the artefact's own files (manifests older than
# the "published" list are checked against these plus their "files" and "bundle").
REPORT_FILES = ("manifest.json", "report.json", "report.md", "report.html", "model.onnx", "model.onnx.data",
                "calibration.json", "session_options.json")
NAME_MAX = 255
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
    path = out / MANIFEST
    if path.is_symlink() or not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError, RecursionError):
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
    """Yield a temporary folder beside ``out`` (resolved); the caller publishes it with :func:`publish`.

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


def publish(staged: Path, out: Path) -> None:
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


@contextlib.contextmanager
def output_lock(out: Path, *, wait: float = 0.0) -> Iterator[None]:
    """Hold an exclusive lock on ``out`` (resolved) so two compiles never write it at once.

    The lock is a hidden file beside ``out`` holding the owner's pid; the kernel
    drops the flock if the process dies, and the file is removed on release.  A
    second compile waits up to ``wait`` seconds, then fails naming the owner.
    """
    import fcntl

    path = out.parent / f".{out.name}.dlopt-lock"
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


def write_file(path: Path, content: str | Callable[[BinaryIO], None]) -> Path:
    """Write ``path`` whole or not at all: ``content`` is text (UTF-8) or ``f(binary_file)``.

    Written beside ``path``, synced, made 0644 and renamed over it; on any error the
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
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
