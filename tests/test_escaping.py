"""Names from the model reach report.md (posted to PRs) and report.html as text, never as markup."""

from __future__ import annotations

import re
from html.parser import HTMLParser

import numpy as np
import onnx
import pytest
from onnx import helper

import models

import dlopt
from dlopt.report.data import escape_markdown

INPUT = "<script>alert(1)</script> @everyone `id` | x"
FILE = "<script>@everyone`m`&.onnx"


def test_escape_markdown_makes_text_literal_on_one_line():
    assert escape_markdown("a|b\n<i>&@team `x` [l](u) \\") == (
        "a\\|b &lt;i>&amp;@&#8203;team \\`x\\` \\[l\\](u) \\\\")
    assert escape_markdown("plain name_1.onnx") == "plain name_1.onnx"


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("escaping")
    w = models._init("w", np.random.default_rng(0).standard_normal((4, 3)).astype(np.float32))
    x = helper.make_tensor_value_info(INPUT, onnx.TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 3])
    model = models._model([helper.make_node("MatMul", [INPUT, "w"], ["y"])], [x], [y], [w],
                          name="<script>@everyone`g`")
    path = tmp / FILE
    models.save(model, path)
    report = dlopt.compile(path, out=tmp / "out", precision="fp32", runs=3)
    assert report.chosen == "ort/fp32" and report.model["inputs"][0].startswith(INPUT)
    return tmp / "out"


def test_markdown_report_escapes_model_and_input_names(compiled):
    md = (compiled / "report.md").read_text()
    assert md.splitlines()[0] == "# dlopt report: &lt;script>@&#8203;everyone\\`m\\`&amp;.onnx for cpu"
    assert "- inputs: &lt;script>alert(1)&lt;/script> @&#8203;everyone \\`id\\` \\| x" in md
    for raw in ("<script>", "</script>", "@everyone", "`id`", "`m`"):
        assert raw not in md
    # every table row still has its columns: no cell was split by a name
    for row in (line for line in md.splitlines() if line.startswith("|")):
        assert len(re.findall(r"(?<!\\)\|", row)) in (10, 7), row


class _Elements(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)

    def handle_data(self, data):
        self.text.append(data)


def test_html_report_escapes_model_and_input_names(compiled):
    page = (compiled / "report.html").read_text()
    assert "<script" not in page and "</script>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt; @everyone `id` | x" in page
    parsed = _Elements()
    parsed.feed(page)
    assert "script" not in parsed.tags
    assert any(INPUT in t for t in parsed.text) and any(FILE in t for t in parsed.text)  # shown as text
