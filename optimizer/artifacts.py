"""Output folders that appear whole or not at all, and the manifest that describes them."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Iterator

from dlopt.errors import ConfigError, OutputBusy

MANIFEST = "manifest.json"


def _replaceable(out: Path) -> bool:
    """An existing folder may be replaced only if it is empty or a previous dlopt output."""
    return out.is_dir() and (not any(out.iterdir()) or (out / MANIFEST).is_file())


def check_output_dir(out: Path) -> None:
    """Fail early, before any work, when ``out`` cannot become an output folder."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output path {out} exists and is not a folder")
    if out.exists() and not _replaceable(out):
        raise ConfigError(
            f"output folder {out} exists and is not a dlopt output (no {MANIFEST}); "
            f"choose another -o or remove it"
        )
    parent = out.resolve().parent
    if not parent.is_dir():
        raise ConfigError(f"cannot create output folder {out}: {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise ConfigError(f"cannot create output folder {out}: {parent} is not writable")


@contextlib.contextmanager
def staging_dir(out: Path) -> Iterator[Path]:
    """Yield a temporary folder beside ``out``; the caller publishes it with :func:`publish`.

    On any exception (including KeyboardInterrupt) the temporary folder is removed,
    so an interrupted or failed compile leaves nothing behind.
    """
    parent = out.resolve().parent
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.dlopt-tmp-", dir=parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the published folder should not be
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def publish(staged: Path, out: Path) -> None:
    """Move a complete staged folder to ``out``, replacing an earlier dlopt output there."""
    out = out.resolve()
    if out.exists():
        if not _replaceable(out):
            raise ConfigError(f"output folder {out} appeared during the compile and is not a dlopt output")
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.dlopt-old-", dir=out.parent))
        os.replace(out, old / "previous")
        try:
            os.replace(staged, out)
        except BaseException:
            os.replace(old / "previous", out)
            raise
        finally:
            shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staged, out)


@contextlib.contextmanager
def output_lock(out: Path, *, wait: float = 0.0) -> Iterator[None]:
    """Hold an exclusive lock on ``out`` so two compiles never write it at once.

    The lock is a hidden file beside ``out`` holding the owner's pid; the kernel
    drops it if the process dies, and it is removed on release.  A second compile
    waits up to ``wait`` seconds, then fails with a message naming the owner.
    """
    import fcntl

    path = out.resolve().parent / f".{out.name}.dlopt-lock"
    deadline = time.monotonic() + wait
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
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
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
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
