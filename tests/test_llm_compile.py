"""`dlopt compile --task text-generation`, `dlopt generate` and `dlopt.load(OUT).generate` on a tiny random Llama
saved as a Hugging Face folder (config.json, model.safetensors, a byte-level tokenizer), scored on real prose
(the GPL-3 text Debian ships).  The fp32 candidate's perplexity is checked against the recipe written out in
torch on the module itself, and its greedy tokens against transformers' own generate(); the weight-only
candidates against the budget; the refusals leave nothing behind."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers", reason="the llm extra: pip install 'dlopt[llm]'")
tokenizers = pytest.importorskip("tokenizers", reason="the llm extra: pip install 'dlopt[llm]'")

from llm_models import save_byte_tokenizer, tiny_llama  # noqa: E402
from serving import dlopt_in  # noqa: E402

TEXT = Path("/usr/share/common-licenses/GPL-3")
pytestmark = pytest.mark.skipif(not TEXT.is_file(), reason=f"{TEXT} (Debian's base-files) is not here")
EOS = 255  # an end-of-text id for the tiny model (ONNX Runtime GenAI needs one)
SHAPE = ["--prompt-len", "16", "--gen-len", "8", "--timing-budget", "3"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("llm-compile")
    model = tiny_llama(3, tied=True, init_range=0.2)  # tied head, as SmolLM2; peaked predictions
    model.config.eos_token_id = model.generation_config.eos_token_id = EOS
    model.save_pretrained(str(root / "hf"))
    save_byte_tokenizer(root / "hf")
    return root, model


@pytest.fixture(scope="module")
def fp32_out(folder):
    root, _ = folder
    result = dlopt_in("compile", root / "hf", "--task", "text-generation", "--eval", TEXT, "-o", root / "out",
                      "--precision", "fp32", *SHAPE, "--json")
    assert result.returncode == 0, result.stderr
    return root / "out", json.loads(result.stdout)


def torch_perplexity(model, ids: list[int], window: int, stride: int) -> float:
    """The fixed-window recipe of huggingface.co/docs/transformers/perplexity, on the module."""
    ids_t = torch.tensor(ids)[None]
    nll, count, end = 0.0, 0, 0
    for begin in range(0, len(ids), stride):
        stop = min(begin + window, len(ids))
        target = ids_t[:, begin:stop].clone()
        target[:, :max(0, end - begin)] = -100  # scored already
        target[:, 0] = -100
        with torch.no_grad():
            logits = model(ids_t[:, begin:stop]).logits.double()
        losses = torch.nn.functional.cross_entropy(logits[0, :-1], target[0, 1:], ignore_index=-100, reduction="sum")
        nll += float(losses)
        count += int((target[0, 1:] != -100).sum())
        end = stop
        if stop == len(ids):
            break
    return math.exp(nll / count)


def test_fp32_perplexity_and_greedy_tokens_match_the_module(folder, fp32_out):
    root, model = folder
    out, report = fp32_out
    # the plain export (the reference) and the model builder's fused graph of the same weights
    assert [c["key"] for c in report["candidates"]] == ["ort/fp32", "ort/fused-fp32"]
    assert report["chosen"] in ("ort/fp32", "ort/fused-fp32")
    assert report["model"]["exported_from"] == "folder"
    fused = report["candidates"][1]
    assert fused["status"] == "ok" and fused["greedy_agreement"] == {"prefix": 1.0, "exact": 4, "prompts": 4}
    assert abs(fused["perplexity"] / report["candidates"][0]["perplexity"] - 1) < 1e-4, fused
    ev = report["eval"]
    assert (ev["tokens"], ev["window"], ev["stride"]) == (4097, 256, 128)  # the model's context is 256
    ids = tokenizers.Tokenizer.from_file(str(root / "hf" / "tokenizer.json")).encode(TEXT.read_text()).ids[:4097]
    want = torch_perplexity(model, ids, 256, 128)
    got = report["candidates"][0]["perplexity"]
    assert abs(got / want - 1) < 1e-4, (got, want)
    timing = report["candidates"][0]["timing"]
    assert timing["prompt_len"] == 16 and timing["gen_len"] == 8 and timing["request"]["runs"] >= 20
    assert timing["tokens_per_s"] > 0 and 0 < timing["ttft_ms"] < timing["request"]["p50_ms"]
    assert {"model.onnx", "tokenizer.json", "tokenizer_config.json", "config.json", "genai_config.json",
            "manifest.json", "report.json", "report.md", "README.md"} <= {p.name for p in out.iterdir()}
    assert "dlopt generate" in (out / "README.md").read_text()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["files"] == ["model.onnx", "model.onnx.data"]  # the export writes the weights apart
    assert set(manifest["file_sha256"]) == {"model.onnx", "model.onnx.data"}

    prompt = "The GNU General Public License is a free"
    prompt_ids = tokenizers.Tokenizer.from_file(str(out / "tokenizer.json")).encode(prompt).ids
    with torch.no_grad():
        want_tokens = model.generate(torch.tensor([prompt_ids]), max_new_tokens=12, do_sample=False,
                                     pad_token_id=0)[0, len(prompt_ids):].tolist()
    result = dlopt_in("generate", out, "--prompt", prompt, "-n", "12", "--json")
    assert result.returncode == 0, result.stderr
    generated = json.loads(result.stdout)
    assert generated["tokens"] == want_tokens and generated["prompt_tokens"] == len(prompt_ids)

    import dlopt

    decoder = dlopt.load(out)
    assert decoder.generate_ids(prompt_ids, 12) == want_tokens
    assert decoder.generate(prompt, max_new_tokens=12) == generated["text"]

    # the fused graph (GroupQueryAttention) writes into the cache it is given: GenAI keeps one buffer for it
    genai_config = json.loads((out / "genai_config.json").read_text())
    assert genai_config["search"]["past_present_share_buffer"] == (report["chosen"] == "ort/fused-fp32")
    og = pytest.importorskip("onnxruntime_genai", reason="ONNX Runtime GenAI 0.18+ (Python 3.11+)")
    genai = og.Model(str(out))
    params = og.GeneratorParams(genai)
    params.set_search_options(do_sample=False, max_length=len(prompt_ids) + 12)
    generator = og.Generator(genai, params)
    generator.append_tokens(og.Tokenizer(genai).encode(prompt))
    while not generator.is_done():
        generator.generate_next_token()
    tokens = list(generator.get_sequence(0))[len(prompt_ids):]
    assert tokens == [t for t in want_tokens if t != EOS][:len(tokens)] and len(tokens) >= min(
        12, want_tokens.index(EOS) if EOS in want_tokens else 12)


def test_weight_only_candidates_are_judged_against_the_budget(folder, fp32_out, tmp_path):
    """From dlopt's own output folder (model.onnx beside tokenizer.json, as optimum writes one)."""
    out, _ = fp32_out
    result = dlopt_in("compile", out, "--task", "text-generation", "--eval", TEXT, "-o", tmp_path / "int",
                      "--precision", "int4", "--max-ppl-increase", "4.5%", *SHAPE, "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    by_key = {c["key"]: c for c in report["candidates"]}
    assert report["model"]["exported_from"] is None
    # out holds the fused graph when it won the fp32 compile: NNCF cannot compress ONNX Runtime's fused operators
    fused = "com.microsoft" in {n.domain for n in onnx.load(str(out / "model.onnx"), load_external_data=False).graph.node}
    failed = [c for c in report["candidates"] if c["status"] == "failed"]
    assert all(fused and c["backend"] == "openvino" and "NNCF" in c["reason"] for c in failed), failed
    fp32 = by_key.pop("ort/fp32")
    int4 = {k: c for k, c in by_key.items() if k.startswith("ort/int4")}
    assert {"ort/int4-b32-acc4", "ort/int4-b32-asym-acc4", "ort/int4-b32-asym-acc4-head8"} <= set(int4)
    for key, cand in int4.items():
        assert cand["size_mb"] < fp32["size_mb"] * 0.9, key
        assert cand["precision"] == "int4" and 0 <= cand["greedy_agreement"]["prefix"] <= 1
        over = cand["ppl_increase_pct"] > 4.5
        assert cand["status"] == ("rejected" if over else "ok"), cand
    assert report["chosen"] in [k for k, c in {**by_key, "ort/fp32": fp32}.items() if c["status"] == "ok"]
    manifest = json.loads((tmp_path / "int" / "manifest.json").read_text())
    assert manifest["task"] == "text-generation" and manifest["candidate"] == report["chosen"]


def test_a_model_folder_gets_weight_only_candidates_on_the_fused_graph(folder, fp32_out, tmp_path):
    """From the Hugging Face folder: ONNX Runtime's INT8 is built on the model builder's fused graph (by dlopt's
    quantiser, not the builder's) and judged against the plain export's fp32."""
    root, _ = folder
    result = dlopt_in("compile", root / "hf", "--task", "text-generation", "--eval", TEXT, "-o", tmp_path / "int8",
                      "--precision", "int8", *SHAPE, "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    by_key = {c["key"]: c for c in report["candidates"]}
    assert list(by_key)[0] == "ort/fp32" and "ort/fused-int8-b32-acc4" in by_key, list(by_key)
    int8, fp32 = by_key["ort/fused-int8-b32-acc4"], by_key["ort/fp32"]
    assert int8["status"] == "ok" and abs(int8["ppl_increase_pct"]) < 1, int8
    assert int8["size_mb"] < fp32["size_mb"] * 0.5 and "fused graph" in int8["recipe"], int8
    assert "MatMulNBits INT8" in int8["note"] and "0 MatMul(s)" not in int8["note"], int8["note"]


def test_refusals_are_one_line_and_write_nothing(folder, fp32_out, tmp_path):
    root, _ = folder
    out, _ = fp32_out
    bad_text = tmp_path / "latin1.txt"
    bad_text.write_bytes("caf\xe9 ".encode("latin-1") * 50)
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text("{}")
    (pickled / "pytorch_model.bin").write_bytes(b"\x80\x04")
    cases = [
        (["compile", out, "--task", "text-generation"], "needs --eval FILE.txt"),
        (["compile", out, "--task", "text-generation", "--eval", TEXT, "--calib", TEXT], "--calib"),
        (["compile", out, "--task", "text-generation", "--eval", TEXT, "--max-ppl-increase", "lots"], "percentage"),
        (["compile", out, "--task", "text-generation", "--eval", bad_text], "not UTF-8"),
        (["compile", pickled, "--task", "text-generation", "--eval", TEXT], "pickle"),
        (["compile", out / "model.onnx", "--precision", "int4"], "--task text-generation only"),
        (["compile", root / "hf", "--task", "text-generation", "--eval", TEXT, "-o", root / "hf"], "is not a dlopt output"),
        (["generate", root / "hf", "--prompt", "x"], "manifest"),
        (["verify", out], "dlopt generate"),
        (["run", out, "-i", tmp_path / "x.npz", "-o", tmp_path / "never.npz"], "dlopt generate"),
        (["package", out, "--triton", tmp_path / "never"], "dlopt generate"),
        (["gate", out, "--max-accuracy-drop", "1"], "text-generation compile"),
    ]
    for args, words in cases:
        result = dlopt_in(*args, "-o", tmp_path / "never") if "-o" not in args and args[0] == "compile" \
            else dlopt_in(*args)
        assert result.returncode == 2, (args, result.stderr)
        assert words in result.stderr and len(result.stderr.strip().splitlines()) <= 3, (args, result.stderr)
    assert not (tmp_path / "never").exists()
    assert sorted(p.name for p in (root / "hf").iterdir()) == ["config.json", "generation_config.json",
                                                               "model.safetensors", "tokenizer.json",
                                                               "tokenizer_config.json"]


def test_a_changed_model_file_is_refused(fp32_out, tmp_path):
    import shutil

    import dlopt
    from dlopt.core.errors import ConfigError

    out, _ = fp32_out
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    data = bytearray((copy / "model.onnx").read_bytes())
    data[-1] ^= 1
    (copy / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(ConfigError, match="sha256"):
        dlopt.load(copy)
    assert np.isfinite(dlopt.load(out).run("Hello", 4).ttft_ms)


def test_sessions_dear_to_hold_are_timed_one_at_a_time(fp32_out):
    """time_generation with resident=1 (what a compile does when the candidates' files pass 256 MB): never two
    sessions alive at once, each candidate still timed for every run asked for."""
    import weakref

    from dlopt.llm.measure import time_generation
    from dlopt.llm.session import DecoderSession

    out, _ = fp32_out
    alive: set[str] = set()
    most = []

    def opener(key: str):
        def open_session():
            session = DecoderSession(out / "model.onnx", threads=1)
            alive.add(key)
            most.append(len(alive))
            weakref.finalize(session, alive.discard, key)
            return session
        return open_session

    speeds = time_generation({"a": opener("a"), "b": opener("b")}, list(range(1, 9)), 4, runs=20, warmup=1,
                             threads=1, max_seconds=2, resident=1)
    assert max(most) == 1 and len(most) > 2  # opened again and again, one at a time
    assert all(s.request.runs >= 20 and s.tokens_per_s > 0 and s.ttft_ms > 0 for s in speeds.values())


def test_the_fused_graph_is_checked_against_the_export(folder, tmp_path):
    """dlopt.llm.fused on the tiny folder: the builder's graph matches the plain export's logits (and says by how
    much); checked against another model's export, the same graph is refused in one line."""
    from dlopt.core.errors import CompileError
    from dlopt.llm.export import export_decoder
    from dlopt.llm.fused import TOLERANCE, build_fused, check_same

    root, model = folder
    for name in ("plain", "other"):
        (tmp_path / name).mkdir()
    plain = export_decoder(model, tmp_path / "plain" / "model.onnx")
    result = build_fused(root / "hf", tmp_path / "fused", kv_heads=2, head_dim=16, reference=str(plain))
    assert sorted(p.name for p in (tmp_path / "fused").iterdir()) == ["model.onnx", "model.onnx.data"]
    assert "GroupQueryAttention" in {n.op_type for n in onnx.load(str(tmp_path / "fused" / "model.onnx"),
                                                                   load_external_data=False).graph.node}
    assert check_same(plain, tmp_path / "fused" / "model.onnx") < TOLERANCE / 10
    assert "logits within" in result["note"]
    other = export_decoder(tiny_llama(4, tied=True, init_range=0.2), tmp_path / "other" / "model.onnx")
    with pytest.raises(CompileError, match="does not compute the exported model") as refused:
        check_same(other, tmp_path / "fused" / "model.onnx")
    assert "\n" not in str(refused.value)
