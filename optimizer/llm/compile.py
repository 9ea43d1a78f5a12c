"""``dlopt compile MODEL --task text-generation``: weight-only candidates of a decoder, judged by perplexity and
greedy agreement, timed as time to first token and decode tokens/s, the fastest within the budget published.

The flow, one way: resolve the float32 decoder (exporting a model folder in a child) -> tokenise the evaluation
text -> from a model folder, the model builder's fused float32 graph (:mod:`dlopt.llm.fused`, in a child; the
plain export stays the reference) -> plan the recipes (ONNX Runtime's on the fused graph when there is one) ->
build each from its float32 file in a child -> judge each (perplexity over fixed
windows, greedy continuations of a few prompts against float32's) -> time the ones within the budget together,
interleaved -> choose with :func:`dlopt.flow.select.choose` (float32 is the original: a quantised pick must be
significantly faster than it) -> write the chosen decoder, its tokenizer, genai_config.json, the report and a
manifest, atomically.

Guarantees: the output folder appears whole or not at all, and replaces only an earlier dlopt output; candidates
are opened one at a time while judged; the report gives every candidate's figures with the shape, threads and
runs they were measured at, and the compile's own peak RSS beside its children's.
"""

from __future__ import annotations

import logging
import math
import resource
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from dlopt.core.artifacts import (check_output_dir, lock_path, output_lock, parents_made, remove_stale_staging,
                                  resolve_output, staging_dir)
from dlopt.core.config import default_threads, plain_name
from dlopt.core.errors import AccuracyBudgetExceeded, ConfigError, DataError, DloptError, first_line
from dlopt.core.precisions import Status
from dlopt.core.profiles import resolve_target
from dlopt.core.progress import raise_if_interrupted, removed_on_hard_exit
from dlopt.flow import select
from dlopt.llm import candidates as recipes
from dlopt.llm.measure import Quality, Speed, judge, open_session, time_generation
from dlopt.llm.prepare import DecoderSource, load_tokenizer, model_config, resolve, special_ids

logger = logging.getLogger(__name__)

TASK = "text-generation"
_TEXT_LIMIT = 8 << 20  # bytes of --eval read: far more than the tokens scored
_TOGETHER_BYTES = 256 << 20  # candidates' files up to this size are timed with every session open


@dataclass(frozen=True)
class TextGenerationConfig:
    """What one text-generation compile does; ``max_ppl_increase`` is in percent of float32's perplexity."""

    model: Path
    eval_text: Path
    out: Path | None = None
    target: str = "cpu"
    targets_file: Path | None = None
    precision: str = "auto"
    prompt_len: int = 128
    gen_len: int = 64
    max_ppl_increase: float = 5.0
    eval_tokens: int = 4096
    window: int = 512
    prompts: int = 4
    agreement_tokens: int = 32
    runs: int = 20
    warmup: int = 2
    timing_budget_s: float = 60.0
    threads: int | None = None
    wait: float = 0.0
    progress: Callable[[str, int, int], None] | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        for name in ("prompt_len", "gen_len", "eval_tokens", "prompts", "agreement_tokens", "runs"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name.replace('_', '-')} must be a whole number of 1 or more, not {value!r}")
        if not (isinstance(self.max_ppl_increase, (int, float)) and math.isfinite(self.max_ppl_increase)
                and self.max_ppl_increase >= 0):
            raise ConfigError(f"--max-ppl-increase must be a percentage of 0 or more, not {self.max_ppl_increase!r}")
        if self.window < 16:
            raise ConfigError(f"the perplexity window must be 16 tokens or more, not {self.window}")


@dataclass
class Candidate:
    recipe: recipes.Recipe
    status: Status = Status.OK
    reason: str = ""
    files: list[str] = field(default_factory=list)
    note: str = ""
    build_s: float = 0.0
    size_bytes: int = 0
    quality: Quality | None = None
    speed: Speed | None = None
    folder: Path | None = None  # its files (None: the float32 decoder is read where it is)
    source: Path | None = None  # what its session opens: an ONNX file, or an OpenVINO folder

    @property
    def key(self) -> str:
        return self.recipe.key


def compile_text_generation(config: TextGenerationConfig) -> dict:
    """Run the compile (see the module's guarantees) and return its report."""
    profile = resolve_target(config.target, config.targets_file)
    if not profile.runs_here() or profile.device.value != "cpu":
        raise ConfigError(f"--task text-generation builds and times decoders on this machine's CPU; target "
                          f"{profile.name} is not one (use --target cpu)")
    backends = tuple(b for b in (recipes.ORT, recipes.OPENVINO) if b in profile.backends)
    threads = config.threads or default_threads()
    if not config.eval_text.is_file():
        raise ConfigError(f"--eval {config.eval_text}: no such file (a plain-text file the decoder is scored on)")
    name = plain_name(config.model.stem if config.model.is_file() else config.model.name)
    out = resolve_output(config.out or Path(f"{name}-{profile.name}"))
    check_output_dir(out, inputs=(config.model, config.eval_text))
    with parents_made(out), output_lock(out, wait=config.wait), removed_on_hard_exit(lock_path(out)):
        check_output_dir(out, inputs=(config.model, config.eval_text))
        notes = [f"removed {entry}, left by an earlier compile that was killed" for entry in remove_stale_staging(out)]
        with staging_dir(out) as staged, removed_on_hard_exit(staged), \
                tempfile.TemporaryDirectory(prefix="dlopt-llm-", dir=out.parent) as work:
            report = _run(config, Path(work), staged, out, backends, threads, notes)
            _publish(staged, out, report)
    if report["chosen"] is None:
        error = AccuracyBudgetExceeded(report["why"])
        error.report = report
        raise error
    return report


def _stage(config: TextGenerationConfig, what: str, done: int = 1, total: int = 1) -> None:
    raise_if_interrupted()
    if config.progress is not None:
        config.progress(what, done, total)


def _run(config: TextGenerationConfig, work: Path, staged: Path, out: Path, backends: tuple[str, ...], threads: int,
         notes: list[str]) -> dict:
    started = time.monotonic()
    _stage(config, "load decoder", 0)
    source = resolve(config.model, work / "fp32")
    _stage(config, "load decoder")
    peaks = {"loaded": _peak_rss_mb()}  # this process's peak RSS after each phase, in MB
    tokenizer = load_tokenizer(source.meta)
    if tokenizer is None:
        raise ConfigError(f"{source.meta} has no tokenizer.json: --task text-generation tokenises --eval with the "
                          "model's own tokenizer; put the model's tokenizer.json beside it")
    ids = _eval_ids(config, tokenizer)
    context = _whole(model_config(source.meta), "max_position_embeddings")
    window = min(config.window, len(ids), context or config.window)
    stride, prompts = window // 2, _prompts(config, ids)
    if context is not None and config.prompt_len + config.gen_len > context:
        raise ConfigError(f"--prompt-len {config.prompt_len} + --gen-len {config.gen_len} is more than the model's "
                          f"context of {context} tokens")
    fused = _fused(config, source, work, backends, notes)
    planned = [Candidate(r) for r in recipes.plan(config.precision, backends, fused=fused is not None)]
    reference: Quality | None = None
    for index, cand in enumerate(planned):
        folder = work / plain_name(cand.key.replace("/", "-"))
        _stage(config, f"build {cand.key}", index, len(planned))
        if cand.recipe.bits is None and cand.recipe.backend == recipes.ORT:
            if cand.recipe.fused:
                cand.source, cand.folder, cand.build_s = fused.onnx, fused.onnx.parent, fused.seconds
                cand.note, cand.files = fused.note, list(fused.files)
            else:
                cand.source, cand.note = source.onnx, "the float32 decoder, as exported"
                cand.files = [source.onnx.name, *_external_files(source.onnx)]
            cand.size_bytes = sum((cand.source.parent / f).stat().st_size for f in cand.files)
        else:
            start = time.monotonic()
            try:
                cand.files, cand.note = recipes.build(cand.recipe, fused.onnx if cand.recipe.fused else source.onnx,
                                                      folder)
            except DloptError as exc:
                cand.status, cand.reason = Status.FAILED, first_line(exc)
                logger.warning("%s: %s", cand.key, cand.reason)
                continue
            cand.build_s = time.monotonic() - start
            cand.folder = folder
            cand.source = folder if cand.recipe.backend == recipes.OPENVINO else folder / "model.onnx"
            cand.size_bytes = sum((folder / f).stat().st_size for f in cand.files)
        _stage(config, f"judge {cand.key}", index, len(planned))
        session = open_session(cand.recipe.backend, cand.source, threads)
        try:
            cand.quality = judge(session, ids, prompts, config.agreement_tokens, window=window, stride=stride,
                                 reference=reference)
        finally:
            del session
        if reference is None:
            reference = cand.quality
        increase = _increase(cand.quality, reference)
        if increase > config.max_ppl_increase:
            cand.status = Status.REJECTED
            cand.reason = (f"perplexity {cand.quality.perplexity.perplexity:.3f} is {increase:+.2f}% of fp32's, over "
                           f"the {config.max_ppl_increase:g}% budget")
    peaks["judged"] = _peak_rss_mb()
    ok = [c for c in planned if c.status is Status.OK]
    _stage(config, "time", 0, len(ok))
    # all sessions open together when they are small, else one at a time: open runtime sessions take more than
    # their files (SmolLM2-135M's fp32, ORT INT8 and OpenVINO INT8 together: 970 MB of files, 1.76 GB of RSS)
    together = sum(c.size_bytes for c in ok) <= _TOGETHER_BYTES
    openers = {c.key: _opener(c, threads) for c in ok}
    prompt = (ids * (config.prompt_len // len(ids) + 1))[:config.prompt_len]
    speeds = time_generation(openers, prompt, config.gen_len, runs=config.runs, warmup=config.warmup,
                             threads=threads, max_seconds=config.timing_budget_s, resident=None if together else 1,
                             progress=lambda d, t: _stage(config, "time", d, t))
    if not together:
        notes.append(f"timed one candidate session at a time (their files are {sum(c.size_bytes for c in ok) / 1e6:.0f} "
                     f"MB together): each opened again, untimed, before its timed blocks")
    peaks["timed"] = _peak_rss_mb()
    for cand in ok:
        cand.speed = speeds[cand.key]
    fp32 = planned[0]
    # a tie of the same precision and backend goes to the smaller perplexity increase
    entries = [select.Entry(c.key, c.recipe.backend, c.recipe.precision, c.status, c.speed.request if c.speed else None,
                            _increase(c.quality, reference) if c.quality and reference else None) for c in planned]
    verdict = select.choose(entries, fp32.speed.request if fp32.speed else None, (recipes.ORT, recipes.OPENVINO))
    chosen = fp32.key if verdict.chosen == select.ORIGINAL else verdict.chosen
    if chosen is not None:
        pick = next(c for c in planned if c.key == chosen)
        notes += _write_chosen(pick, source, staged, tokenizer, threads)
    from dlopt.llm.report import build_report, write_report

    report = build_report(config, source, planned, verdict, chosen, threads=threads, window=window, stride=stride,
                          eval_tokens=len(ids), notes=notes, seconds=time.monotonic() - started,
                          peak_rss_mb=_peak_rss_mb(), children_peak_rss_mb=_peak_rss_mb(children=True), out=out,
                          peaks=peaks)
    write_report(staged, report)
    return report


@dataclass(frozen=True)
class _Fused:
    onnx: Path
    files: tuple[str, ...]
    note: str
    seconds: float


def _fused(config: TextGenerationConfig, source: DecoderSource, work: Path, backends: tuple[str, ...],
           notes: list[str]) -> _Fused | None:
    """The model builder's fused float32 graph of a model folder (``dlopt.llm.fused``), or None (with a note)
    when there is no folder to build it from, ONNX Runtime is not offered, or the builder fails."""
    if source.hf_folder is None or recipes.ORT not in backends:
        return None
    import json

    from dlopt.llm.child import run_child

    _stage(config, "build the fused graph")
    layout, _, _ = _graph_facts(source.onnx)
    start = time.monotonic()
    try:
        result = run_child("dlopt.llm.fused", [str(source.hf_folder), str(work / "fused"),
                                               json.dumps({"kv_heads": layout.kv_heads, "head_dim": layout.head_dim,
                                                           "reference": str(source.onnx)})],
                           "building the fused graph")
    except DloptError as exc:
        shutil.rmtree(work / "fused", ignore_errors=True)
        notes.append(f"no fused graph ({first_line(exc)}): ONNX Runtime's candidates are built on the plain export")
        logger.warning("%s", notes[-1])
        return None
    return _Fused(work / "fused" / "model.onnx", tuple(result["files"]), result["note"], time.monotonic() - start)


def _opener(cand: Candidate, threads: int) -> Callable[[], Any]:
    return lambda: open_session(cand.recipe.backend, cand.source, threads)


def _increase(quality: Quality, reference: Quality) -> float:
    return (quality.perplexity.perplexity / reference.perplexity.perplexity - 1) * 100


def _eval_ids(config: TextGenerationConfig, tokenizer: Any) -> list[int]:
    # a token is rarely over 16 bytes of text: read what the tokens scored need, not a whole corpus
    limit = min(_TEXT_LIMIT, 16 * (config.eval_tokens + 1) + 4096)
    with open(config.eval_text, "rb") as handle:
        raw = handle.read(limit)
    try:
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:  # a character cut by the read limit is dropped; any other bad byte is not
            if len(raw) < limit or exc.start < len(raw) - 3:
                raise
            text = raw[:exc.start].decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"--eval {config.eval_text} is not UTF-8 text (byte {exc.start}): give a plain-text file") \
            from exc
    ids = tokenizer.encode(text).ids[:config.eval_tokens + 1]
    if len(ids) < 32:
        raise DataError(f"--eval {config.eval_text} gives {len(ids)} tokens: perplexity needs a text of 32 tokens "
                        f"or more (4096 are scored by default)")
    return ids


def _prompts(config: TextGenerationConfig, ids: list[int]) -> list[list[int]]:
    """``config.prompts`` prompts of up to 64 tokens, spread evenly over the evaluation text."""
    length = min(64, max(1, len(ids) // (config.prompts + 1)))
    starts = [round(i * (len(ids) - length) / max(1, config.prompts)) for i in range(config.prompts)]
    return [ids[s:s + length] for s in starts]


def _external_files(onnx_file: Path) -> list[str]:
    """The external data files an ONNX decoder names, each checked to be a plain file inside its folder."""
    from dlopt.core.artifacts import _external_locations, check_plain_files

    names = [n for n in _external_locations(onnx_file) if n]
    check_plain_files(onnx_file.parent, names, named_in=onnx_file.name)
    return names


def _graph_facts(path: Path):
    """The KV layout, vocabulary and op types of an ONNX decoder, read without its weights."""
    import onnx

    from dlopt.llm.kv import LOGITS, layout_from_proto

    proto = onnx.load(str(path), load_external_data=False)
    logits = next(o for o in proto.graph.output if o.name == LOGITS).type.tensor_type.shape.dim
    vocab = logits[-1].dim_value if logits and logits[-1].HasField("dim_value") else None
    return layout_from_proto(proto, path.name), vocab or None, {n.op_type for n in proto.graph.node}


def _write_chosen(pick: Candidate, source: DecoderSource, staged: Path, tokenizer: Any, threads: int) -> list[str]:
    """The chosen decoder, its tokenizer and config files, and (on ONNX Runtime) genai_config.json; notes.
    The float32 decoder keeps the names of its external data files (its graph names them) as ``model.onnx``."""
    for name in pick.files:
        origin = pick.folder / name if pick.folder is not None else source.onnx.parent / name
        shutil.copyfile(origin, staged / ("model.onnx" if pick.folder is None and name == source.onnx.name else name))
    for path in source.meta_files:
        shutil.copyfile(path, staged / path.name)
    if pick.recipe.backend != recipes.ORT:
        return []
    from dlopt.llm.genai_config import write_genai_config

    layout, vocab, ops = _graph_facts(staged / "model.onnx")
    in_place = "GroupQueryAttention" in ops  # writes the new keys into the past it is given
    config = model_config(source.meta)
    ids = special_ids(source.meta, tokenizer)
    if ids["eos"] is None:
        return ["no genai_config.json: the model names no end-of-text token, and ONNX Runtime GenAI always stops "
                "at one (it would stop at token 0)"]
    write_genai_config(staged, layout, vocab_size=vocab or tokenizer.get_vocab_size(),
                       context_length=_whole(config, "max_position_embeddings") or 2048,
                       bos_token_id=ids["bos"], eos_token_id=ids["eos"], pad_token_id=ids["pad"], threads=threads,
                       attention_heads=_whole(config, "num_attention_heads"), hidden_size=_whole(config, "hidden_size"),
                       share_buffer=in_place)
    return []



def _whole(config: dict, name: str) -> int | None:
    """A positive whole number from a model's config.json, else None (the file is the user's, or anyone's)."""
    value = config.get(name)
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _peak_rss_mb(children: bool = False) -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN if children else resource.RUSAGE_SELF)
    return usage.ru_maxrss / 1024


def _publish(staged: Path, out: Path, report: dict) -> None:
    from dlopt.llm.report import write_manifest

    write_manifest(staged, report)
    raise_if_interrupted()
    from dlopt.core.artifacts import move_into_place

    move_into_place(staged, out)
