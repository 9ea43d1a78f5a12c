"""A content-addressed cache of compiled artefacts, verified before every use.

Entries live in ``$DLOPT_CACHE`` (default ``~/.cache/dlopt``) under a key that
hashes everything the artefact depends on (the model after its passes, backend,
precision, target, tool versions).  Each entry carries the sha256 of every file;
an entry whose files are missing or do not match is deleted and rebuilt, never
used.  Entries are written to a temporary folder and renamed into place, so a
crash leaves no half-written entry.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from dlopt.model_io import sha256_file

logger = logging.getLogger(__name__)

INDEX = "entry.json"


def default_root() -> Path:
    return Path(os.environ.get("DLOPT_CACHE") or Path.home() / ".cache" / "dlopt")


def make_key(*parts: bytes | str) -> str:
    digest = hashlib.sha256()
    for part in parts:
        data = part.encode() if isinstance(part, str) else part
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
    return digest.hexdigest()


class ArtifactCache:
    def __init__(self, root: Path | None = None) -> None:
        self.root = Path(root) if root is not None else default_root()
        self.events: list[str] = []  # what happened, for the report

    def _entry(self, key: str) -> Path:
        return self.root / key[:2] / key

    def get(self, key: str, dest: Path) -> dict | None:
        """Copy a verified entry's files into ``dest`` and return its metadata, or None."""
        entry = self._entry(key)
        index = entry / INDEX
        if not index.is_file():
            return None
        try:
            meta = json.loads(index.read_text())
            damaged = [name for name, digest in meta["files"].items()
                       if not (entry / name).is_file() or sha256_file(entry / name) != digest]
        except (OSError, ValueError, KeyError, TypeError):
            damaged = [INDEX]
        if damaged:
            logger.warning("cache entry %s is damaged (%s); rebuilding", key[:12], ", ".join(damaged))
            self.events.append(f"cache entry {key[:12]} was damaged ({', '.join(damaged)}) and rebuilt")
            shutil.rmtree(entry, ignore_errors=True)
            return None
        dest.mkdir(parents=True, exist_ok=True)
        for name in meta["files"]:
            shutil.copy2(entry / name, dest / name)
        self.events.append(f"cache hit {key[:12]}")
        return meta.get("meta", {})

    def put(self, key: str, folder: Path, files: list[str], meta: dict) -> None:
        """Store ``files`` of ``folder`` under ``key`` (best effort: a full disk only logs)."""
        entry = self._entry(key)
        try:
            entry.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=entry.parent))
            digests = {}
            for name in files:
                shutil.copy2(folder / name, tmp / name)
                digests[name] = sha256_file(tmp / name)
            (tmp / INDEX).write_text(json.dumps({"files": digests, "meta": meta}, indent=2))
            if entry.exists():
                shutil.rmtree(entry, ignore_errors=True)
            os.replace(tmp, entry)
        except OSError as exc:
            logger.warning("could not store cache entry %s: %s", key[:12], exc)
            shutil.rmtree(locals().get("tmp", entry.parent / ".none"), ignore_errors=True)
