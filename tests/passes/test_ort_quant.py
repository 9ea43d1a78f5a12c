"""passes/_ort_quant.quantise_to_proto: the one round trip through the file ORT's quantisers write."""

from __future__ import annotations

import onnx
import pytest
from onnxruntime.quantization import QuantType, quantize_dynamic

import models

from dlopt.core.errors import CompileError
from dlopt.passes._ort_quant import quantise_to_proto


def test_the_written_model_comes_back_and_its_folder_goes():
    written = []

    def quantise(out):
        written.append(out)
        quantize_dynamic(models.outlier_mlp(), out, weight_type=QuantType.QInt8)

    proto = quantise_to_proto(quantise, "dynamic INT8 quantisation")
    assert isinstance(proto, onnx.ModelProto)
    assert sum(n.op_type == "MatMulInteger" for n in proto.graph.node) == 3
    assert not written[0].parent.exists()


def test_a_failure_is_one_line_naming_the_step_and_leaves_nothing_behind(capsys):
    written = []

    def quantise(out):
        written.append(out)
        out.write_bytes(b"half a model")
        print("ORT's chatter goes to the debug log, not stdout")
        raise ValueError("cannot quantise this\nsecond line")

    with pytest.raises(CompileError) as err:
        quantise_to_proto(quantise, "INT8 quantisation")
    assert str(err.value) == "INT8 quantisation failed: cannot quantise this"
    assert not written[0].parent.exists()
    assert capsys.readouterr().out == ""
