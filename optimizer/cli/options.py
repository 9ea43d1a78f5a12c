"""The option groups the verbs share: each hands its command ONE frozen value instead of one parameter per option.

A group is a set of click options (flags, types, help, defaults: written once, here) and the frozen
dataclass their values arrive in.  ``@TIMING()`` adds all of a group's options, ``@TIMING("threads",
threads={"help": ...})`` some of them with a verb's own wording; the command receives ``timing:
TimingArgs``.  The dataclass holds what was typed; its ``config_kwargs()`` turns that into
``dlopt.compile``'s keyword arguments (``CompileConfig.build``'s flat options).  One group is one
section of :class:`dlopt.core.config.CompileConfig` and has its name (``data``, ``budget``,
``timing``, ``output``, ``tvm``, ``mcu``); ``target`` gives the top-level target and targets file.

Groups add their options in one block; ``@order(...)`` gives a verb's --help its own order.
Only click and light dlopt modules are imported here, so ``dlopt --help`` stays fast.
"""

from __future__ import annotations

import math
import dataclasses
import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from dlopt.core.precisions import CALIB_METHODS
from dlopt.core.progress import TerminalProgress


class OptionGroup:
    """Click options whose values reach the command as one ``values`` dataclass, in the parameter ``param``.

    ``options`` maps each dataclass field (also the click parameter name) to its option declarations
    and click attributes; a field's dataclass default is the option's default unless the attributes
    or a verb's override say otherwise.
    """

    def __init__(self, param: str, values: type, options: dict[str, tuple[tuple[str, ...], dict[str, Any]]]):
        fields = {f.name: f.default for f in dataclasses.fields(values)}
        if set(fields) != set(options):
            raise TypeError(f"{values.__name__}: fields {sorted(fields)} and options {sorted(options)} differ")
        self.param, self.values, self.options, self.defaults = param, values, options, fields

    def __call__(self, *names: str, **overrides: dict[str, Any]):
        """A decorator adding the options ``names`` (all when none are given), in that order.

        ``overrides[name]`` replaces click attributes of one option (its help, default, type) for this verb.
        """
        names = names or tuple(self.options)
        unknown = sorted((set(names) | set(overrides)) - set(self.options))
        if unknown or set(overrides) - set(names):
            raise TypeError(f"{self.values.__name__} has no option {unknown or sorted(set(overrides) - set(names))}")

        def decorate(func):
            for name in reversed(names):  # click lists the option applied last first
                decls, attrs = self.options[name]
                attrs = {"default": self.defaults[name], **attrs, **overrides.get(name, {})}
                func = click.option(*decls, name, **attrs)(func)

            @functools.wraps(func)
            def command(*args, **kwargs):
                values = self.values(**{name: kwargs.pop(name) for name in names})
                if self.param in kwargs:
                    raise TypeError(f"{func.__name__} has a parameter {self.param!r} and a group of that name")
                return func(*args, **kwargs, **{self.param: values})

            return command

        return decorate


def order(*names: str):
    """List a command's options in --help in this order (by parameter name); the ones not named follow,
    in the order their decorators gave (the publishing options, say).  Arguments keep their order."""

    def decorate(func):
        params = list(reversed(getattr(func, "__click_params__", [])))  # as --help would list them
        named = {p.name: p for p in params if isinstance(p, click.Option)}
        missing = [name for name in names if name not in named]
        if missing:
            raise TypeError(f"{func.__name__} has no option {missing}")
        arguments = [p for p in params if not isinstance(p, click.Option)]
        rest = [p for p in params if isinstance(p, click.Option) and p.name not in names]
        func.__click_params__ = list(reversed([*arguments, *(named[n] for n in names), *rest]))
        return func

    return decorate


def _floats(text: str | None, what: str) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise click.BadParameter(f"{what} must be comma-separated numbers, got {text!r}") from None


TARGETS_FILE_HELP = "TOML file with your own [targets.NAME] tables [default: ./dlopt.toml if present]."


@dataclass(frozen=True)
class TargetArgs:
    """Which target, and the TOML file that may define it."""

    target: str | None = "cpu"
    targets_file: Path | None = None

    def config_kwargs(self) -> dict[str, Any]:
        return {"target": self.target, "targets_file": self.targets_file}


TARGET = OptionGroup("target", TargetArgs, {
    "target": (("-t", "--target"), dict(show_default=True, help="Target preset (see `dlopt targets`).")),
    "targets_file": (("--targets-file",), dict(type=click.Path(path_type=Path, dir_okay=False),
                                               help=TARGETS_FILE_HELP)),
})


@dataclass(frozen=True)
class DataArgs:
    """Evaluation and calibration data, as typed: the files, the image preprocessing, constant inputs, the mask."""

    inputs: Path | None = None
    calib: Path | None = None
    calib_samples: int = 256
    calib_method: str = "auto"
    calib_size: str | None = None
    calib_layout: str = "NCHW"
    calib_mean: str | None = None
    calib_std: str | None = None
    calib_color: str = "RGB"
    samples: int | None = None
    constants: tuple[str, ...] = ()
    mask_input: str | None = None
    no_mask: bool = False

    def calib_preprocess(self):
        """The ImagePreprocess of --calib-size/-layout/-mean/-std/-color, or None without --calib-size."""
        if self.calib_size is None:
            return None
        from dlopt.calibration import ImagePreprocess

        size = tuple(int(v) for v in _floats(self.calib_size, "--calib-size"))
        extra = {k: v for k, v in (("mean", _floats(self.calib_mean, "--calib-mean")),
                                   ("std", _floats(self.calib_std, "--calib-std"))) if v is not None}
        return ImagePreprocess(size=size, layout=self.calib_layout, color=self.calib_color, **extra)

    def config_kwargs(self) -> dict[str, Any]:
        """The CompileConfig fields; checked here, after the publishing options, as the command always did."""
        from dlopt.core.shapes import parse_const

        if self.no_mask and self.mask_input:
            raise click.UsageError("--mask-input and --no-mask contradict each other; give one")
        preprocess = self.calib_preprocess()
        return {"inputs": self.inputs, "calib": self.calib, "calib_samples": self.calib_samples,
                "calib_method": self.calib_method, "calib_preprocess": preprocess, "samples": self.samples,
                "constants": dict(parse_const(text) for text in self.constants) or None,
                "mask_input": False if self.no_mask else self.mask_input}


DATA = OptionGroup("data", DataArgs, {
    "inputs": (("--eval", "--inputs"), dict(
        type=click.Path(path_type=Path),
        help="Evaluation .npz: one array per model input (first axis = samples) and optional integer "
             "'labels' for top-1 accuracy [default: random inputs, fidelity to the original].")),
    "calib": (("--calib",), dict(
        type=click.Path(path_type=Path),
        help="Calibration data for int8: an .npz like --eval, or a folder of images (see --calib-size).")),
    "calib_samples": (("--calib-samples",), dict(
        type=click.IntRange(min=1), show_default=True, help="Calibrate on at most this many samples (streamed).")),
    "calib_method": (("--calib-method",), dict(
        type=click.Choice(CALIB_METHODS), show_default=True,
        help="How activation ranges are chosen; auto: min-max for CNNs, a percentile "
             "for models with attention or normalisation (outliers dominate min-max).")),
    "calib_size": (("--calib-size",), dict(metavar="H,W", help="Image folders: resize to H,W.")),
    "calib_layout": (("--calib-layout",), dict(
        type=click.Choice(["NCHW", "NHWC"]), show_default=True, help="Image folders: tensor layout.")),
    "calib_mean": (("--calib-mean",), dict(
        metavar="M[,M,M]", help="Image folders: per-channel mean (after scaling to 0-1).")),
    "calib_std": (("--calib-std",), dict(metavar="S[,S,S]", help="Image folders: per-channel std.")),
    "calib_color": (("--calib-color",), dict(
        type=click.Choice(["RGB", "BGR", "GRAY"]), show_default=True, help="Image folders: channel order.")),
    "samples": (("--samples",), dict(
        type=click.IntRange(min=1),
        help="Without --eval: random feeds compared against the original [20]. With --eval: "
             "evaluate at most this many of its samples [10000].")),
    "constants": (("--const",), dict(
        multiple=True, metavar="NAME=VALUE",
        help="An input that is the same for every sample (a sample rate: sr=16000; a zero state: state=0), "
             "fed with random inputs and added to --eval/--calib data that lacks it (repeatable).")),
    "mask_input": (("--mask-input",), dict(
        metavar="NAME",
        help="The attention-mask input (0/1 per token) whose zeros mark padding: per-token outputs "
             "[batch, seq, ...] are scored on the kept tokens only [default: detected by name and values].")),
    "no_mask": (("--no-mask",), dict(is_flag=True, help="Score every output position, padding included.")),
})


@dataclass(frozen=True)
class BudgetArgs:
    """The accuracy budget, what it measures, and how long the mixed-precision search may look for it."""

    max_accuracy_drop: float = 1.0
    metric: str | None = None
    search_time: float = 120.0

    def config_kwargs(self) -> dict[str, Any]:
        return {"max_accuracy_drop": self.max_accuracy_drop, "metric": self.metric, "search_time": self.search_time}


BUDGET = OptionGroup("budget", BudgetArgs, {
    "max_accuracy_drop": (("--max-accuracy-drop",), dict(
        type=float, show_default=True, metavar="POINTS",
        help="Accuracy budget in points of --metric (100 x the metric): top-1 accuracy with labels, "
             "top-1 agreement with the original's predictions, or 0.01 of cosine similarity per point.")),
    "metric": (("--metric",), dict(
        metavar="top1|cosine|rel-error|MODULE:FUNCTION",
        help="What the accuracy budget measures [default: top-1 for classifier logits [N, C], else the "
             "per-sample cosine similarity with the original's outputs].")),
    "search_time": (("--search-time",), dict(
        type=float, show_default=True, metavar="SECONDS",
        help="Time limit of the mixed-precision search; the best model found is kept.")),
})


@dataclass(frozen=True)
class TimingArgs:
    """How latency is timed: runs, warm-up, the time budgets, threads and the shapes timed at."""

    runs: int = 100
    warmup: int = 10
    timing_budget: float = 30.0
    reference_timeout: float = 600.0
    threads: int | None = None
    batch: int | None = None
    shapes: tuple[str, ...] = ()

    def config_kwargs(self) -> dict[str, Any]:
        from dlopt.core.shapes import parse_shape

        return {"runs": self.runs, "warmup": self.warmup, "timing_budget_s": self.timing_budget,
                "reference_timeout_s": self.reference_timeout, "threads": self.threads, "batch": self.batch,
                "shapes": dict(parse_shape(text) for text in self.shapes) or None}


TIMING = OptionGroup("timing", TimingArgs, {
    "runs": (("--runs",), dict(
        type=click.IntRange(min=1), show_default=True, help="Timed runs per model, interleaved with the others.")),
    "warmup": (("--warmup",), dict(type=click.IntRange(min=0), show_default=True, help="Untimed runs first.")),
    "timing_budget": (("--timing-budget",), dict(
        type=click.FloatRange(min=0, min_open=True), show_default=True, metavar="SECONDS",
        help="Seconds the interleaved timing of all models may take together; past it "
             "each gets fewer runs than --runs (never under 20), and the report and summary say so.")),
    "reference_timeout": (("--reference-timeout",), dict(
        type=click.FloatRange(min=0, min_open=True), show_default=True, metavar="SECONDS",
        help="Seconds one run of the original model on ONNX Runtime may take while its "
             "reference outputs are made; past it the run is stopped and the compile fails (a Loop with a huge "
             "trip count never ends).")),
    "threads": (("--threads",), dict(type=click.IntRange(min=1), help="Intra-op threads [default: $DLOPT_THREADS, else all cores].")),
    "batch": (("--batch",), dict(
        type=click.IntRange(min=1), help="Batch at which latency is timed, for a symbolic first dimension [default: 1].")),
    "shapes": (("--shape",), dict(
        multiple=True, metavar="NAME=DxDx...",
        help="Timing shape of one input, e.g. x=1x3x224x224, or the size of a symbolic dim name for every "
             "input that uses it, e.g. seq=64 (repeatable). Other symbolic dims come from --eval (or --calib) "
             "data; any that nothing fixes are listed in one error.")),
})


@dataclass(frozen=True)
class OutputArgs:
    """Where the result goes and how it is shown: the folder, the cache, the lock wait, JSON, quiet."""

    out: Path | None = None
    no_cache: bool = False
    wait: float = 0.0
    as_json: bool = False
    quiet: bool = False

    @property
    def progress(self) -> TerminalProgress:
        """Progress bars on stderr, unless -q or --json asked for silence."""
        return TerminalProgress(not (self.quiet or self.as_json))

    def config_kwargs(self) -> dict[str, Any]:
        return {"out": self.out, "cache": not self.no_cache, "wait": self.wait, "progress": self.progress}


OUTPUT = OptionGroup("output", OutputArgs, {
    "out": (("-o", "--out"), dict(
        type=click.Path(path_type=Path),
        help="Output folder [default: ./<model>-<target>]. Replaced only if it is a previous dlopt output.")),
    "no_cache": (("--no-cache",), dict(
        is_flag=True, help="Build every artefact afresh instead of reusing verified "
                           "builds from $DLOPT_CACHE (default ~/.cache/dlopt).")),
    "wait": (("--wait",), dict(
        type=click.FloatRange(min=0), show_default=True, metavar="SECONDS",
        help="If another compile is writing the same output folder, wait this long for it.")),
    "as_json": (("--json",), dict(is_flag=True, help="Print the report as JSON on stdout.")),
    "quiet": (("-q", "--quiet"), dict(is_flag=True, help="No progress output.")),
})


@dataclass(frozen=True)
class TextGenerationArgs:
    """``--task text-generation`` and its own options: the timed request's shape and the perplexity budget."""

    task: str = "auto"
    prompt_len: int = 128
    gen_len: int = 64
    max_ppl_increase: str = "5%"

    @property
    def on(self) -> bool:
        return self.task == "text-generation"

    def max_ppl_increase_pct(self) -> float:
        """``5%`` or ``5`` as 5.0; a click error for anything else."""
        text = str(self.max_ppl_increase).strip().removesuffix("%").strip()
        try:
            number = float(text)
        except ValueError:
            number = math.nan
        if not 0 <= number < math.inf:
            raise click.BadParameter(f"{self.max_ppl_increase!r} is not a percentage of 0 or more, such as 5% or 0.5",
                                     param_hint="--max-ppl-increase")
        return number


TEXT_GENERATION = OptionGroup("text_generation", TextGenerationArgs, {
    "task": (("--task",), dict(
        type=click.Choice(["auto", "text-generation"]), show_default=True,
        help="text-generation: MODEL is a decoder (an ONNX decoder with its KV cache, or a model folder with "
             "config.json and *.safetensors or one *.gguf); its candidates are weight-only INT8/INT4, judged by "
             "perplexity on --eval FILE.txt and greedy agreement, timed as time to first token and decode tokens/s.")),
    "prompt_len": (("--prompt-len",), dict(
        type=click.IntRange(min=1), show_default=True, help="text-generation: prompt tokens of each timed request.")),
    "gen_len": (("--gen-len",), dict(
        type=click.IntRange(min=1), show_default=True,
        help="text-generation: tokens generated per timed request (batch 1, greedy).")),
    "max_ppl_increase": (("--max-ppl-increase",), dict(
        show_default=True, metavar="PERCENT",
        help="text-generation: the budget, the largest perplexity increase over fp32 a candidate may have (5% or 5).")),
})


@dataclass(frozen=True)
class TvmArgs:
    """TVM's tuning databases and the RPC tracker that reaches a target device."""

    tuning_db: str | None = None
    no_tuning: bool = False
    rpc_tracker: str | None = None
    rpc_key: str | None = None

    def remote(self):
        """The RemoteDevice of --rpc-tracker/--rpc-key, or None; ConfigError when only one is given."""
        from dlopt.core.errors import ConfigError
        from dlopt.core.remote import RemoteDevice

        if (self.rpc_tracker is None) != (self.rpc_key is None):
            raise ConfigError("--rpc-tracker and --rpc-key go together: the tracker and the key of the device's servers")
        return RemoteDevice.parse(self.rpc_tracker, self.rpc_key) if self.rpc_tracker is not None else None

    def config_kwargs(self) -> dict[str, Any]:
        return {"tuning_db": False if self.no_tuning else self.tuning_db, "rpc_tracker": self.rpc_tracker,
                "rpc_key": self.rpc_key}


TVM = OptionGroup("tvm", TvmArgs, {
    "tuning_db": (("--tuning-db",), dict(
        metavar="DIR",
        help="Root of TVM tuning databases (`dlopt tune`) [default: $DLOPT_TUNING_DB or ~/.cache/dlopt/tuning]; "
             "the one for this model and target is applied when it exists.")),
    "no_tuning": (("--no-tuning",), dict(
        is_flag=True, help="Build TVM candidates untuned even where a tuning database exists.")),
    "rpc_tracker": (("--rpc-tracker",), dict(
        metavar="HOST:PORT",
        help="A TVM RPC tracker: TVM candidates for a target that is not this machine are verified and timed "
             "on a device registered there under --rpc-key.")),
    "rpc_key": (("--rpc-key",), dict(
        metavar="KEY", help="The key the target device's RPC servers registered with.")),
})


@dataclass(frozen=True)
class McuArgs:
    """A microcontroller build's RAM and flash limits, in bytes."""

    max_ram: int | None = None
    max_flash: int | None = None

    def config_kwargs(self) -> dict[str, Any]:
        return {"max_ram": self.max_ram, "max_flash": self.max_flash}


MCU = OptionGroup("mcu", McuArgs, {
    "max_ram": (("--max-ram",), dict(
        type=click.IntRange(min=1), metavar="BYTES",
        help="Microcontroller targets: fail when RAM (arena + data + stack estimate) exceeds BYTES.")),
    "max_flash": (("--max-flash",), dict(
        type=click.IntRange(min=1), metavar="BYTES",
        help="Microcontroller targets: fail when flash (code + weights + data) exceeds BYTES.")),
})

# The groups whose config_kwargs() together give a compile's options (all but model, precision, prune
# and seed), each option from one group; a group's options are those of the config section of its name.
CONFIG_GROUPS = (TARGET, DATA, BUDGET, TIMING, OUTPUT, TVM, MCU)
