"""The CLI's shared option groups: one frozen value per group, together exactly the CompileConfig fields."""

from __future__ import annotations

import inspect
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from dlopt.cli import options
from dlopt.cli.app import VERBS, main
from dlopt.cli.options import CONFIG_GROUPS, DATA, OUTPUT, TARGET, TIMING, TVM, order
from dlopt.core.config import SECTION_OF, TOP_LEVEL, CompileConfig

NOT_FROM_GROUPS = {"precision", "prune", "seed", "torch_module", "example"}  # compile's own options; the API's seed and module


def test_each_group_gives_the_options_of_its_config_section_once_with_their_defaults():
    keys = [key for group in CONFIG_GROUPS for key in group.values().config_kwargs()]
    assert len(keys) == len(set(keys)) == 29  # no option set by two groups
    assert set(keys) == (set(SECTION_OF) | set(TOP_LEVEL)) - NOT_FROM_GROUPS
    for group in CONFIG_GROUPS:  # one group, one section (the target and the progress are top-level options)
        sections = {SECTION_OF.get(key, "top") for key in group.values().config_kwargs()}
        assert sections == ({"top"} if group is TARGET else {group.param, "top"} if group is OUTPUT else {group.param})
    defaults = {k: v for group in CONFIG_GROUPS for k, v in group.values().config_kwargs().items()}
    assert CompileConfig.build("m.onnx", **defaults) == CompileConfig(model="m.onnx")


def _probe(*groups):
    """A command of ``groups`` that records what it receives."""
    seen = {}

    def command(**values):
        seen.update(values)

    for group in reversed(groups):
        command = group()(command)
    return click.command()(command), seen


def test_a_command_receives_one_value_per_group_and_builds_the_config():
    command, seen = _probe(*CONFIG_GROUPS)
    args = ["-t", "rpi5", "-o", "out", "--eval", "e.npz", "--calib", "c", "--calib-samples", "3",
            "--calib-method", "minmax", "--calib-size", "4,6", "--calib-mean", "0.5", "--calib-std", "0.25",
            "--calib-color", "BGR", "--samples", "7", "--const", "sr=16000", "--no-mask",
            "--max-accuracy-drop", "0.5", "--metric", "cosine", "--search-time", "9", "--runs", "3",
            "--warmup", "0", "--timing-budget", "2", "--reference-timeout", "5", "--threads", "1", "--batch", "2",
            "--shape", "x=1x3x8x8", "--no-cache", "--wait", "1.5", "-q", "--no-tuning", "--rpc-tracker", "h:9190",
            "--rpc-key", "rpi5", "--max-ram", "4096", "--max-flash", "8192"]
    result = CliRunner().invoke(command, args)
    assert result.exit_code == 0, result.output
    assert sorted(seen) == ["budget", "data", "mcu", "output", "target", "timing", "tvm"]
    assert seen["timing"] == options.TimingArgs(runs=3, warmup=0, timing_budget=2.0, reference_timeout=5.0,
                                                   threads=1, batch=2, shapes=("x=1x3x8x8",))
    merged = {k: v for value in seen.values() for k, v in value.config_kwargs().items()}
    preprocess = merged.pop("calib_preprocess")
    assert (preprocess.size, preprocess.mean, preprocess.std, preprocess.color) == ((4, 6), (0.5,), (0.25,), "BGR")
    assert merged["progress"].enabled is False  # -q
    expected = CompileConfig.build(
        "m.onnx", target="rpi5", out=Path("out"), inputs=Path("e.npz"), calib=Path("c"), calib_samples=3,
        calib_method="minmax", samples=7, constants={"sr": 16000.0}, mask_input=False, max_accuracy_drop=0.5,
        metric="cosine", search_time=9.0, runs=3, warmup=0, timing_budget_s=2.0, reference_timeout_s=5.0, threads=1,
        batch=2, shapes={"x": (1, 3, 8, 8)}, cache=False, wait=1.5, tuning_db=False, rpc_tracker="h:9190",
        rpc_key="rpi5", max_ram=4096, max_flash=8192)
    assert CompileConfig.build("m.onnx", **merged) == expected
    assert (expected.timing.shapes, expected.tvm.tuning_db, expected.data.mask_input) == ({"x": (1, 3, 8, 8)}, False, False)


def test_a_verb_takes_some_options_of_a_group_in_its_own_words():
    sub = click.command()(TIMING("threads", threads={"help": "Threads of the artefact."})(lambda timing: None))
    text = CliRunner().invoke(sub, ["--help"]).output
    assert "Threads of the artefact." in text and "--runs" not in text
    with pytest.raises(TypeError, match="no option"):
        TIMING("thread")
    with pytest.raises(TypeError, match="no option"):
        TIMING("threads", runs={"help": "an override of an option not taken"})
    with pytest.raises(TypeError, match="no option"):
        order("nothing")(TIMING("threads")(lambda timing: None))


def test_contradicting_mask_options_are_a_usage_error():
    command, _ = _probe(DATA)
    result = CliRunner().invoke(command, ["--mask-input", "attention_mask", "--no-mask"])
    assert result.exit_code == 0  # the value holds what was typed; the config is where it is checked
    with pytest.raises(click.UsageError, match="--mask-input and --no-mask contradict each other"):
        options.DataArgs(mask_input="attention_mask", no_mask=True).config_kwargs()


def test_bench_rpc_options_pair_up():
    from dlopt.core.errors import ConfigError

    assert TVM.values().remote() is None
    assert TVM.values(rpc_tracker="127.0.0.1:9190", rpc_key="rpi5").remote().key == "rpi5"
    with pytest.raises(ConfigError, match="--rpc-tracker and --rpc-key go together"):
        TVM.values(rpc_tracker="127.0.0.1:9190").remote()


def test_compile_takes_one_parameter_per_group():
    compile_ = main.commands["compile"]
    params = list(inspect.signature(compile_.callback).parameters)
    assert params == ["model", "target", "precision", "data", "budget", "timing", "output", "tvm", "mcu",
                      "then_gate", "prune", "text_generation", "publishing"]
    assert len(compile_.params) == 1 + 43 + 11  # MODEL, compile's own options, the publishing options (--help)


def test_every_verb_is_its_own_module_and_app_only_registers_them():
    assert sorted(main.commands) == sorted(verb.name for verb in VERBS)
    homes = {name: command.callback.__module__ for name, command in main.commands.items()}
    family = {"verify": "device", "bench": "device"}
    assert homes == {name: f"dlopt.cli.{family.get(name, name)}" for name in main.commands}
    assert OUTPUT.values().progress.enabled is True


def test_dlopt_threads_sets_the_default_thread_count_and_a_bad_value_is_one_line(tmp_path, monkeypatch):
    import models
    from serving import dlopt_here

    from dlopt.core.config import TimingOptions, default_threads, machine_cores

    monkeypatch.delenv("DLOPT_THREADS", raising=False)
    assert default_threads() == machine_cores() == TimingOptions().thread_count
    monkeypatch.setenv("DLOPT_THREADS", " 1 ")
    assert default_threads() == TimingOptions().thread_count == 1
    assert TimingOptions(threads=machine_cores()).thread_count == machine_cores()  # --threads wins
    model = models.save(models.conv_bn_relu(), tmp_path / "m.onnx")
    for bad in ("0", str(machine_cores() + 1), "two", "1.5", "-1"):
        monkeypatch.setenv("DLOPT_THREADS", bad)
        code, err = dlopt_here("compile", model, "--target", "cpu", "--out", tmp_path / "out")
        assert code == 2, err
        assert err.strip().splitlines() == [f"dlopt: error: DLOPT_THREADS must be a whole number between 1 and "
                                            f"this machine's {machine_cores()} cores, got {bad!r}"]
        assert not (tmp_path / "out").exists()
