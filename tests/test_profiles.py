"""Target presets and users' own targets from dlopt.toml."""

from __future__ import annotations

import json

import pytest

import models
from cli import dlopt

from dlopt.core.errors import ConfigError
from dlopt.core.profiles import PRESETS, DeviceKind, load_user_profiles, resolve_target


def test_presets_carry_their_facts():
    orin = resolve_target("jetson")
    assert orin.name == "jetson-orin" and orin.cuda_arch == "sm_87" and orin.mcpu == "cortex-a78ae"
    assert orin.triple == "aarch64-linux-gnu" and orin.int8_symmetric and orin.backends[0] == "tensorrt"
    assert resolve_target("rpi4").mcpu == "cortex-a72" and resolve_target("rpi5").mcpu == "cortex-a76"
    assert resolve_target("jetson-nano").cuda_arch == "sm_53"
    assert resolve_target("cortex-m7").device == "mcu"
    assert all(p.power.idle_watts > 0 for p in PRESETS.values())


def test_user_target_inherits_from_a_preset(tmp_path):
    path = tmp_path / "dlopt.toml"
    path.write_text('[targets.board]\nbase = "rpi5"\ndescription = "our board"\nbackends = ["ort"]\n'
                    '[targets.board.power]\nidle_watts = 1.5\nwatts_per_busy_core = 0.8\n')
    board = load_user_profiles(path)["board"]
    assert board.mcpu == "cortex-a76" and board.backends == ("ort",) and board.power.idle_watts == 1.5
    assert resolve_target("board", path).description == "our board"
    assert board.device is DeviceKind.CPU and f"{board.device}" == "cpu" and repr(board.device) == "'cpu'"


@pytest.mark.parametrize("text,message", [
    ('[targets.x]\nbase = "nope"\n', "unknown base 'nope'"),
    ('[targets.x]\nbase = "rpi5"\ncolour = "red"\n', "unknown keys ['colour']"),
    ('[targets.cpu]\nbase = "rpi5"\n', "would replace presets"),
    ("[targets.x\n", "cannot read targets"),
    ('[targets.x]\nbase = "rpi5"\ndevice = "npu"\n', "targets.x.device must be one of cpu, gpu, mcu, got 'npu'"),
])
def test_bad_user_targets(tmp_path, text, message):
    path = tmp_path / "dlopt.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        resolve_target("x", path)


def test_cli_uses_dlopt_toml_in_the_working_folder(tmp_path):
    (tmp_path / "dlopt.toml").write_text('[targets.my-board]\nbase = "rpi5"\nbackends = ["ort"]\n')
    data = json.loads(dlopt("targets", "--json", cwd=tmp_path).stdout)
    assert data["my-board"]["backends"] == ["ort"] and data["my-board"]["runs_here"] is False


def test_inspect_lists_unsupported_ops_per_backend(tmp_path):
    from onnx import helper

    model = models.conv_bn_relu()
    model.graph.node.append(helper.make_node("NonZero", ["logits"], ["nz"]))
    model.graph.output.append(helper.make_tensor_value_info("nz", 7, [2, None]))
    path = models.save(model, tmp_path / "m.onnx")
    result = dlopt("inspect", path, "--target", "jetson", "--json")
    assert result.returncode == 0, result.stderr
    backends = json.loads(result.stdout)["backends"]
    assert backends["tensorrt"]["unsupported"] == ["NonZero"]
    assert backends["ort"]["unsupported"] == [] and backends["ort"]["available"]
