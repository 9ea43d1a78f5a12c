"""The report of a text-generation compile: report.json (the contract), report.md, README.md and manifest.json.

Every figure carries what it was measured at: the evaluation text's tokens, windows and stride for perplexity;
prompts and tokens for greedy agreement; prompt length, generated tokens, batch, threads and runs for timing.
Perplexity increases are in percent of float32's perplexity everywhere, as ``--max-ppl-increase`` is.
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path
from typing import Any, Sequence

from dlopt import __version__
from dlopt.core.artifacts import FILE_HASHES, MANIFEST, file_hashes, published_entries

SCHEMA = "llm-1.0"
README = "README.md"


def _candidate(cand: Any, reference_ppl: float | None) -> dict:
    q, s = cand.quality, cand.speed
    entry = {"key": cand.key, "backend": cand.recipe.backend, "precision": cand.recipe.precision,
             "recipe": cand.recipe.describe(), "status": str(cand.status), "reason": cand.reason, "note": cand.note,
             "size_mb": round(cand.size_bytes / 1e6, 2), "build_s": round(cand.build_s, 2)}
    if q is not None:
        entry["perplexity"] = round(q.perplexity.perplexity, 4)
        if reference_ppl:
            entry["ppl_increase_pct"] = round((q.perplexity.perplexity / reference_ppl - 1) * 100, 3)
        if q.agreement is not None:
            entry["greedy_agreement"] = {"prefix": round(q.agreement.prefix, 4), "exact": q.agreement.exact,
                                         "prompts": q.agreement.prompts}
    if s is not None:
        entry["timing"] = s.to_dict()
    return entry


def build_report(config: Any, source: Any, planned: Sequence[Any], verdict: Any, chosen: str | None, *, threads: int,
                 window: int, stride: int, eval_tokens: int, notes: list[str], seconds: float, peak_rss_mb: float,
                 children_peak_rss_mb: float, out: Path, peaks: dict | None = None) -> dict:
    reference = planned[0].quality
    ref_ppl = reference.perplexity.perplexity if reference is not None else None
    fp32_mb = planned[0].size_bytes / 1e6
    pick = next((c for c in planned if c.key == chosen), None)
    speed = None
    if pick is not None and pick.speed is not None and planned[0].speed is not None:
        base = planned[0].speed
        speed = {"tokens_per_s_ratio": round(pick.speed.tokens_per_s / base.tokens_per_s, 3),
                 "ttft_ratio": round(pick.speed.ttft_ms / base.ttft_ms, 3),
                 "request_ratio": round(pick.speed.request.p50_ms / base.request.p50_ms, 3), "words": verdict.speed}
    why = verdict.why if chosen is not None else (
        f"no candidate met the perplexity budget of +{config.max_ppl_increase:g}%: " +
        "; ".join(f"{c.key}: {c.reason}" for c in planned if c.reason))
    return {
        "schema_version": SCHEMA, "task": "text-generation", "dlopt_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "model": {"path": str(config.model), "exported_from": source.exported_from,
                  "export_s": round(source.export_s, 1), "fp32_mb": round(fp32_mb, 1)},
        "target": config.target, "threads": threads, "output": str(out),
        "shape": {"batch": 1, "prompt_len": config.prompt_len, "gen_len": config.gen_len},
        "eval": {"file": Path(config.eval_text).name, "tokens": eval_tokens, "window": window, "stride": stride,
                 "prompts": config.prompts, "agreement_tokens": config.agreement_tokens},
        "budget": {"max_ppl_increase_pct": config.max_ppl_increase},
        "timing": {"runs": config.runs, "warmup": config.warmup, "budget_s": config.timing_budget_s},
        "candidates": [_candidate(c, ref_ppl) for c in planned],
        "chosen": chosen, "why": why, "ties": list(verdict.ties),
        "reasons": dict(verdict.reasons), "speed_vs_fp32": speed,
        "memory": {"peak_rss_mb": round(peak_rss_mb, 1), "children_peak_rss_mb": round(children_peak_rss_mb, 1),
                   "export_peak_rss_mb": source.export_peak_rss_mb and round(source.export_peak_rss_mb, 1),
                   "bound_mb": round(2 * fp32_mb + 500, 1),
                   "peak_after_mb": {k: round(v, 1) for k, v in (peaks or {}).items()}},
        "seconds": round(seconds, 1), "notes": notes + list(verdict.notes),
    }


def _fmt(value: Any, spec: str = "") -> str:
    return "-" if value is None else format(value, spec)


def render_markdown(report: dict) -> str:
    shape, ev = report["shape"], report["eval"]
    lines = [f"# dlopt text-generation report: {Path(report['model']['path']).name}", "",
             f"Chosen: **{report['chosen'] or 'none'}** ({report['why']})", "",
             f"Perplexity on {ev['tokens']} tokens of {ev['file']} (windows of {ev['window']}, stride {ev['stride']}); "
             f"greedy agreement with fp32 over {ev['prompts']} prompts x {ev['agreement_tokens']} tokens; timing: "
             f"batch 1, a {shape['prompt_len']}-token prompt then {shape['gen_len']} tokens, {report['threads']} "
             f"thread(s), interleaved; budget +{report['budget']['max_ppl_increase_pct']:g}% perplexity.", "",
             "| candidate | status | perplexity | vs fp32 | greedy agreement | TTFT ms | decode tok/s | request ms "
             "(95% CI) | runs | MB |", "|---|---|---|---|---|---|---|---|---|---|"]
    for c in report["candidates"]:
        t = c.get("timing") or {}
        r = t.get("request") or {}
        agree = c.get("greedy_agreement")
        agreement = f"{agree['prefix']:.3f} ({agree['exact']}/{agree['prompts']} exact)" if agree else \
            "reference" if c["key"] == report["candidates"][0]["key"] else "-"
        lines.append(
            f"| {c['key']} | {c['status']}{' (chosen)' if c['key'] == report['chosen'] else ''} | "
            f"{_fmt(c.get('perplexity'), '.3f')} | {_fmt(c.get('ppl_increase_pct'), '+.2f')}{'%' if 'ppl_increase_pct' in c else ''} | "
            f"{agreement} | "
            f"{_fmt(t.get('ttft_ms'), '.1f')} | {_fmt(t.get('tokens_per_s'), '.1f')} | "
            f"{_fmt(r.get('p50_ms'), '.1f')} ({_fmt(r.get('ci_low_ms'), '.1f')}-{_fmt(r.get('ci_high_ms'), '.1f')}) | "
            f"{_fmt(r.get('runs'))} | {c['size_mb']:.1f} |")
    lines += ["", "Recipes and reasons:", ""]
    for c in report["candidates"]:
        why = c["reason"] or report["reasons"].get(c["key"], "")
        note = f"; {c['note']}" if c["note"] != c["recipe"] else ""
        lines.append(f"- `{c['key']}`: {c['recipe']}{note}{f' — {why}' if why else ''}")
    mem = report["memory"]
    lines += ["", f"Memory: this compile's peak RSS {mem['peak_rss_mb']:.0f} MB, its children's (export, builds) "
                  f"{mem['children_peak_rss_mb']:.0f} MB (the export's {_fmt(mem['export_peak_rss_mb'], '.0f')} MB); "
                  f"bound 2 x fp32 + 500 MB = {mem['bound_mb']:.0f} MB; this compile's peak after "
                  + ", ".join(f"{k} {v:.0f} MB" for k, v in mem.get("peak_after_mb", {}).items()) + ". "
                  f"Compile time {report['seconds']:.0f} s."]
    lines += [f"- {n}" for n in report["notes"]]
    return "\n".join(lines) + "\n"


def render_readme(report: dict, files: Sequence[str]) -> str:
    chosen = next((c for c in report["candidates"] if c["key"] == report["chosen"]), None)
    lines = ["# A decoder compiled by dlopt", "",
             f"`{report['chosen']}`: {chosen['recipe'] if chosen else ''}. See report.md for every candidate.", "",
             "Generate with dlopt (greedy):", "", "```sh", 'dlopt generate . --prompt "Once upon a time" '
             "--max-new-tokens 32", "```", "", "```python", "import dlopt", "",
             "decoder = dlopt.load(\".\")", 'print(decoder.generate("Once upon a time", max_new_tokens=32))', "```"]
    if "genai_config.json" in files:
        from dlopt.llm.genai_config import genai_snippet

        lines += ["", "Or with ONNX Runtime GenAI (`pip install onnxruntime-genai`), which reads genai_config.json:",
                  "", "```python", genai_snippet("."), "```"]
    return "\n".join(lines) + "\n"


def write_report(staged: Path, report: dict) -> None:
    (staged / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (staged / "report.md").write_text(render_markdown(report))
    (staged / README).write_text(render_readme(report, published_entries(staged)))


def write_manifest(staged: Path, report: dict) -> None:
    import onnxruntime

    chosen = next((c for c in report["candidates"] if c["key"] == report["chosen"]), None)
    names = published_entries(staged)
    model_files = [n for n in names if n.startswith(("model.onnx", "openvino_model."))]
    manifest = {
        "schema_version": SCHEMA, "dlopt_version": __version__, "task": "text-generation",
        "created": report["created"], "target": report["target"], "threads": report["threads"],
        "backend": chosen["backend"] if chosen else None, "precision": chosen["precision"] if chosen else None,
        "candidate": report["chosen"], "files": model_files,
        "versions": {"python": platform.python_version(), "onnxruntime": onnxruntime.__version__},
        "published": sorted({*names, MANIFEST}),
    }
    manifest[FILE_HASHES] = file_hashes(staged, model_files)
    (staged / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")

