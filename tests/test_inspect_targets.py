import json

import models
from cli import dlopt


def test_inspect_json_figures(tmp_path):
    path = models.save(models.conv_bn_relu(channels=8), tmp_path / "m.onnx")
    result = dlopt("inspect", path, "--json")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["opset"] == 17 and info["ir_version"] == 8
    assert info["inputs"] == ["x: float32[1,3,16,16]"] and info["outputs"] == ["logits: float32[1,10]"]
    assert info["ops"]["BatchNormalization"] == 1 and info["nodes"] == 7
    # conv 8*3*3*3 + 8, bn 4*8, fc 8*10 + 10
    assert info["parameters"] == 216 + 8 + 32 + 80 + 10
    assert info["size_bytes"] == (tmp_path / "m.onnx").stat().st_size


def test_inspect_table(tmp_path):
    path = models.save(models.conv_bn_relu(), tmp_path / "m.onnx")
    result = dlopt("inspect", path)
    assert result.returncode == 0
    assert "opset 17" in result.stdout and "BatchNormalization" in result.stdout


def test_targets_says_what_builds_here_and_why_not():
    result = dlopt("targets", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert {"cpu", "x86-avx2", "x86-avx512", "intel-cpu", "arm64", "rpi4", "rpi5", "jetson-orin",
            "jetson-nano", "nvidia-gpu", "cortex-m4", "cortex-m7"} <= set(data)
    assert data["jetson-orin"]["aliases"] == ["jetson"]
    assert "ort" in data["cpu"]["can_build"] and data["cpu"]["runs_here"]
    assert data["rpi5"]["runs_here"] is False
    for reasons in (d["cannot_build"] for d in data.values()):
        assert all(isinstance(r, str) and r for r in reasons.values())
