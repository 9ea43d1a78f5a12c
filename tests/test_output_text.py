"""What an output folder's README.md, report.md and report.html say, read as a user reads them:
the README's code runs on a masked model without NaN, counts agree in number, raw Markdown holds
no HTML entities, a Pi's README does not explain an x86 option, and a board's page captions no
missing plot."""

from __future__ import annotations

import html
import re
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from cli import dlopt

TARGETS = ('[targets.two]\nbase = "cpu"\nbackends = ["ort", "openvino"]\n'
           '[targets.pi-ort]\nbase = "rpi5"\nbackends = ["ort"]\n')
SEQ, WIDTH = 6, 8


def masked_attention(path, *, vocab: int = 20) -> str:
    """Self-attention over token embeddings whose padding (mask 0) is set to -inf before the softmax,
    as exported transformers do: a row of zeros in the mask makes every score -inf, and the output NaN."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((vocab, WIDTH)).astype(np.float32), "table"),
             numpy_helper.from_array(np.array([1], np.int64), "one"),
             numpy_helper.from_array(np.array(-np.inf, np.float32), "ninf")]
    nodes = [helper.make_node("Gather", ["table", "input_ids"], ["emb"]),
             helper.make_node("Transpose", ["emb"], ["embt"], perm=[0, 2, 1]),
             helper.make_node("MatMul", ["emb", "embt"], ["scores"]),
             helper.make_node("Cast", ["attention_mask"], ["keep"], to=TensorProto.BOOL),
             helper.make_node("Unsqueeze", ["keep", "one"], ["keep3"]),
             helper.make_node("Where", ["keep3", "scores", "ninf"], ["masked"]),
             helper.make_node("Softmax", ["masked"], ["p"], axis=-1),
             helper.make_node("MatMul", ["p", "emb"], ["out"])]
    graph = helper.make_graph(nodes, "masked", [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", SEQ]),
        helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", SEQ])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", SEQ, WIDTH])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return str(path)


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    """(cpu output, Pi output): the masked model compiled for this CPU (ort, openvino) and for a Pi."""
    tmp = tmp_path_factory.mktemp("text")
    model = masked_attention(tmp / "m.onnx")
    (tmp / "dlopt.toml").write_text(TARGETS)
    for target in ("two", "pi-ort"):
        done = dlopt("compile", model, "--target", target, "-o", tmp / target, "--precision", "fp32", "--runs", "5",
                     "-q", cwd=tmp, timeout=600)
        assert done.returncode == 0, done.stderr
    return tmp / "two", tmp / "pi-ort"


def _python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```$", text, re.MULTILINE | re.DOTALL)


def test_the_readme_code_feeds_a_mask_of_ones_and_gets_no_nan(outputs):
    folder = outputs[0]
    text = (folder / "README.md").read_text()
    assert "'attention_mask': np.ones((1, 6), 'int64')" in text and "'input_ids': np.zeros((1, 6), 'int64')" in text
    blocks = _python_blocks(text)
    assert len(blocks) == 2  # dlopt's, and ONNX Runtime's without dlopt
    for code in blocks:
        check = "\nimport numpy as _np\nprint(bool(_np.isnan(_np.asarray(outs[0])).any()), _np.asarray(outs[0]).shape)\n"
        run = subprocess.run([sys.executable, "-c", code + check], cwd=folder, capture_output=True, text=True,
                             timeout=120)
        assert run.returncode == 0, run.stderr[-2000:]
        assert run.stdout.strip() == f"False (1, {SEQ}, {WIDTH})", code


def test_one_candidate_not_shipped_is_singular(outputs):
    text = (outputs[0] / "README.md").read_text()
    assert "Not shipped (1 candidate rejected, failed or unavailable): see report.md." in text


def test_raw_markdown_shows_arrows_not_html_entities(outputs):
    readme, report = ((outputs[0] / name).read_text() for name in ("README.md", "report.md"))
    assert re.search(r"size \d\.\d\dx \(0\.00 MB -> 0\.00 MB\)", readme)  # the summary line
    assert "| 8 -> 8 " in report.replace("|  ", "| ").replace("  ", " ")  # a pass row's node counts
    for text in (readme, report):
        assert "&gt;" not in text and "&amp;" not in text


def test_a_pi_readme_does_not_explain_an_x86_option_as_if_it_ran_there(outputs):
    cpu, pi = ((folder / "README.md").read_text() for folder in outputs)
    entry = "options.add_session_config_entry('session.x64quantprecision', '1')"
    assert f"{entry}  # exact int8 kernels on x86 CPUs without VNNI" in cpu  # this host is x86-64
    (line,) = [line for line in pi.splitlines() if line.startswith(entry)]
    assert line == f"{entry}  # read by x86-64 builds only; ONNX Runtime on aarch64 ignores it"


def test_a_board_page_captions_no_plot_it_does_not_draw(outputs):
    page = (outputs[1] / "report.html").read_text()
    assert "No candidate has both a latency and an accuracy score to plot." in page
    assert "<figcaption>" not in page and "<svg" not in page
    assert "<figcaption>" in (outputs[0] / "report.html").read_text()  # timed here: plot and caption


def test_a_pruned_compile_says_what_sparsity_and_compression_it_reached(tmp_path):
    """--prune 0.5 on one 512x512 MatMul: the chosen row, report.md and report.html give the sparsity and the
    deflate-compressed size of the weights (random weights: about 1.0 MB, half zeros about 0.55 MB)."""
    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.standard_normal((512, 512)).astype(np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "mm",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 512])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 512])], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, tmp_path / "mm.onnx")
    (tmp_path / "dlopt.toml").write_text('[targets.ort-here]\nbase = "cpu"\nbackends = ["ort"]\n')
    done = dlopt("compile", tmp_path / "mm.onnx", "--target", "ort-here", "-o", tmp_path / "out", "--precision", "fp32",
                 "--runs", "5", "--prune", "0.5", "--max-accuracy-drop", "100", "-q", cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr
    said = re.compile(r"pruned 50\.0% of 262,144 weights; weights (0\.\d\d)x compressed \(deflate: (\d\.\d\d) -> "
                      r"(\d\.\d\d) MB\)")
    (row,) = [line for line in done.stdout.splitlines() if line.startswith("ort ")]  # the CLI table
    found = said.search(row)
    assert found and "CHOSEN" in row, row
    ratio, before, after = map(float, found.groups())
    assert 0.9 < before < 1.1 and 0.45 < after < 0.65 and ratio == pytest.approx(after / before, abs=0.01)
    assert f"- {found.group(0)}" in (tmp_path / "out" / "report.md").read_text()
    assert found.group(0) in done.stdout.strip().splitlines()[-1]  # the summary line says it too
    assert f"<dt>pruning</dt><dd>{html.escape(found.group(0))}</dd>" in (tmp_path / "out" / "report.html").read_text()
