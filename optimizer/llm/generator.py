"""A text-generation output folder, opened for generation: ``dlopt.load(OUT).generate(prompt)`` and
``dlopt generate OUT``.

Guarantees: only a folder whose manifest is dlopt's and says ``"task": "text-generation"`` is opened; the model
files are the manifest's own list, each a plain file inside the folder whose sha256 is the one recorded at
publish; decoding is greedy and deterministic (the first of equal largest logits) and stops at the model's end
of sequence token or after ``max_new_tokens``.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from dlopt.core.artifacts import FILE_HASHES, MANIFEST, check_plain_files, read_folder_json, sha256_file
from dlopt.core.config import machine_cores
from dlopt.core.errors import ConfigError, DataError
from dlopt.llm.candidates import OPENVINO, ORT
from dlopt.llm.measure import open_session
from dlopt.llm.prepare import load_tokenizer, special_ids

TASK = "text-generation"


def load(path: str | os.PathLike, *, threads: int | None = None):
    """``dlopt.load``: a text-generation output as a :class:`TextGenerator` (``.generate(prompt)``), any other
    dlopt output (or one of its ``bundle/`` candidates) as a :class:`dlopt.measure.runner.Runner`; see
    :func:`dlopt.measure.runner.load` for the rules both follow."""
    if task_of(path) == TASK:
        return TextGenerator(path, threads=threads)
    from dlopt.measure.runner import load as load_runner

    return load_runner(path, threads=threads)


def task_of(folder: str | os.PathLike) -> str | None:
    """The task a dlopt output folder's manifest names (None: a folder of another kind, or no manifest)."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    try:
        manifest = read_folder_json(folder, MANIFEST, missing_ok=True)
    except ConfigError:
        return None
    return manifest.get("task") if isinstance(manifest, dict) else None


@dataclass(frozen=True)
class Generation:
    """What one ``generate`` call produced, with its time to first token and decode rate."""

    text: str
    tokens: tuple[int, ...]
    prompt_tokens: int
    ttft_ms: float
    tokens_per_s: float | None  # None for a single new token


class TextGenerator:
    """The decoder of a text-generation output folder with its tokenizer."""

    def __init__(self, folder: str | os.PathLike, *, threads: int | None = None):
        folder = Path(folder)
        manifest = read_folder_json(folder, MANIFEST)
        if not isinstance(manifest, dict) or manifest.get("task") != TASK:
            raise ConfigError(f"{folder} is not a text-generation output of dlopt (its manifest names no "
                              f"task {TASK!r})")
        backend, files = manifest.get("backend"), manifest.get("files")
        if backend not in (ORT, OPENVINO) or not isinstance(files, list) or not files:
            raise ConfigError(f"{folder}/{MANIFEST} names no decoder this dlopt can run (backend {backend!r})")
        check_plain_files(folder, files, named_in=MANIFEST)
        hashes = manifest.get(FILE_HASHES) if isinstance(manifest.get(FILE_HASHES), dict) else {}
        for name in files:
            if hashes.get(name) != sha256_file(folder / name):
                raise ConfigError(f"{folder / name} is not the file dlopt published (its sha256 differs from the "
                                  f"manifest's): compile again")
        if threads is None:  # the compile's, at most this machine's cores (a settings file is hostile too)
            written = manifest.get("threads")
            threads = written if isinstance(written, int) and not isinstance(written, bool) and written > 0 else 1
            threads = min(threads, machine_cores())
        elif isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise ConfigError(f"threads must be a positive integer, got {threads!r}")
        self.folder, self.backend, self.precision = folder, backend, manifest.get("precision")
        self.tokenizer = load_tokenizer(folder)
        if self.tokenizer is None:
            raise ConfigError(f"{folder} has no tokenizer.json")
        self.special = special_ids(folder, self.tokenizer)
        self.session = open_session(backend, folder / "model.onnx" if backend == ORT else folder, threads)

    def generate(self, prompt: str, max_new_tokens: int = 32) -> str:
        """The greedy continuation of ``prompt`` as text (the prompt itself not included)."""
        return self.run(prompt, max_new_tokens).text

    def generate_ids(self, ids: Sequence[int], max_new_tokens: int = 32) -> list[int]:
        """The greedy continuation of the token ids ``ids``: at most ``max_new_tokens`` ids, up to the end token."""
        return list(self.session.generate(list(ids), max_new_tokens, eos_token_id=self.special["eos"]))

    def run(self, prompt: str, max_new_tokens: int = 32) -> Generation:
        """``generate`` with its token ids and timings."""
        if not isinstance(prompt, str) or not prompt:
            raise DataError("the prompt must be a non-empty string")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise DataError(f"max_new_tokens must be a whole number of 1 or more, not {max_new_tokens!r}")
        ids = self.tokenizer.encode(prompt).ids
        if not ids:
            raise DataError("the prompt gives no tokens")
        import numpy as np

        start = time.perf_counter()
        tokens = [int(np.argmax(self.session.prefill(ids)[-1]))]
        first = time.perf_counter()
        while len(tokens) < max_new_tokens and tokens[-1] != self.special["eos"]:
            tokens.append(int(np.argmax(self.session.step(tokens[-1]))))
        end = time.perf_counter()
        rate = (len(tokens) - 1) / (end - first) if len(tokens) > 1 and end > first else None
        shown = tokens[:-1] if tokens[-1] == self.special["eos"] else tokens
        return Generation(self.tokenizer.decode(shown), tuple(tokens), len(ids), (first - start) * 1e3, rate)

    def __repr__(self) -> str:
        return f"<dlopt.TextGenerator {self.backend}/{self.precision} {self.folder}>"
