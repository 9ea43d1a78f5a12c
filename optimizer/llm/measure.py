"""Judging and timing text-generation candidates: perplexity and greedy agreement, then time to first token
and decode tokens/s, all candidates timed interleaved.

One timed run is one request at the declared shape: a prefill of ``prompt_len`` tokens from an empty cache
(the first token comes out of it: time to first token), then ``gen_len - 1`` decode steps with the growing KV
cache, greedy and never stopping early.  The runs go through :func:`dlopt.measure.timing.time_interleaved`
(rotating round-robin blocks, a 95% interval of each median), so the request latency compares the candidates
as every other compile does; the time to first token and the decode rate are read from the same runs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from dlopt.llm.candidates import OPENVINO
from dlopt.llm.evaluate import Agreement, Perplexity, greedy_agreement, perplexity
from dlopt.measure.timing import Timing, median_interval, time_interleaved


def open_session(backend: str, model: Path, threads: int) -> Any:
    """The decoding session (``prefill``/``step``/``generate``) of an ONNX decoder file, or of an OpenVINO
    candidate's folder."""
    if backend == OPENVINO:
        from dlopt.llm.openvino import OpenVINODecoderSession

        return OpenVINODecoderSession(model, threads=threads)
    from dlopt.llm.session import DecoderSession

    return DecoderSession(model, threads=threads)


@dataclass(frozen=True)
class Quality:
    perplexity: Perplexity
    continuations: tuple[tuple[int, ...], ...]  # greedy, one per prompt
    agreement: Agreement | None = None  # against the reference's continuations (None: this is the reference)


def judge(session: Any, eval_ids: Sequence[int], prompts: Sequence[Sequence[int]], new_tokens: int, *,
          window: int, stride: int, reference: Quality | None = None) -> Quality:
    """Perplexity of ``eval_ids`` and the greedy continuations of ``prompts`` (``new_tokens`` each, no early
    stop), with their agreement with ``reference``'s."""
    ppl = perplexity(session, eval_ids, window=window, stride=stride)
    continuations = tuple(tuple(session.generate(list(p), new_tokens)) for p in prompts)
    agreement = greedy_agreement(reference.continuations, continuations) if reference is not None else None
    return Quality(ppl, continuations, agreement)


@dataclass(frozen=True)
class Speed:
    """One candidate's requests at the declared shape."""

    request: Timing            # prefill + gen_len - 1 steps, in ms
    ttft_ms: float             # median time to first token
    ttft_ci_ms: tuple[float, float]
    tokens_per_s: float        # median decode rate over the steps after the first token
    tokens_per_s_ci: tuple[float, float]
    prompt_len: int
    gen_len: int

    def to_dict(self) -> dict:
        return {"request": self.request.to_dict(), "ttft_ms": round(self.ttft_ms, 3),
                "ttft_ci_ms": [round(v, 3) for v in self.ttft_ci_ms], "tokens_per_s": round(self.tokens_per_s, 2),
                "tokens_per_s_ci": [round(v, 2) for v in self.tokens_per_s_ci], "prompt_len": self.prompt_len,
                "gen_len": self.gen_len}


def time_generation(openers: Mapping[str, Callable[[], Any]], prompt: Sequence[int], gen_len: int, *, runs: int,
                    warmup: int, threads: int, max_seconds: float, resident: int | None = None,
                    progress: Callable[[int, int], None] | None = None) -> dict[str, Speed]:
    """Every candidate's requests (``prompt``, then ``gen_len`` tokens), timed interleaved.

    ``openers`` open each candidate's session.  ``resident``: at most this many sessions are open at once (None:
    all); a candidate whose session was closed to make room opens again in the untimed run before its next
    timed block, so the memory of a compile stays that of one or two decoders, and the timings span several
    sessions of each."""
    prompt = list(prompt)
    split: dict[str, list[tuple[float, float]]] = {key: [] for key in openers}
    meters = {key: _Timed() for key in openers}  # open around each timed block: warm-up runs are not recorded
    pool = _Sessions(openers, resident)

    def request(key: str) -> Callable[[object], None]:
        def run(_feed) -> None:
            session = pool.get(key)
            start = time.perf_counter()
            token = int(np.argmax(session.prefill(prompt)[-1]))
            first = time.perf_counter()
            for _ in range(gen_len - 1):
                token = int(np.argmax(session.step(token)))
            if meters[key].on:
                split[key].append((first - start, time.perf_counter() - first))
        return run

    try:
        timings = time_interleaved({k: request(k) for k in openers}, {}, runs=runs, warmup=warmup, threads=threads,
                                   max_seconds=max_seconds, progress=progress, meters=meters)
    finally:
        pool.close()
    speeds = {}
    for key, timing in timings.items():
        samples = np.array(split[key])
        ttft = samples[:, 0] * 1e3
        rate = (gen_len - 1) / samples[:, 1] if gen_len > 1 else np.full(len(samples), np.nan)
        speeds[key] = Speed(timing, float(np.median(ttft)), median_interval(ttft), float(np.median(rate)),
                            median_interval(rate), len(prompt), gen_len)
    return speeds


class _Sessions:
    """Open sessions, at most ``resident`` at once: the least recently used closes first."""

    def __init__(self, openers: Mapping[str, Callable[[], Any]], resident: int | None) -> None:
        self.openers, self.resident = openers, resident
        self.open: dict[str, Any] = {}

    def get(self, key: str) -> Any:
        if key in self.open:
            self.open[key] = self.open.pop(key)  # most recently used last
            return self.open[key]
        while self.resident is not None and len(self.open) >= self.resident:
            self.open.pop(next(iter(self.open)))
        self.open[key] = self.openers[key]()
        return self.open[key]

    def close(self) -> None:
        self.open.clear()


class _Timed:
    """A meter for ``time_interleaved``: ``on`` while a timed block runs."""

    on = False

    def __enter__(self) -> "_Timed":
        self.on = True
        return self

    def __exit__(self, *exc) -> None:
        self.on = False
