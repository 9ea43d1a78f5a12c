"""The ``dlopt`` command: a thin shell over the Python API.

It turns arguments into a config and exceptions into exit codes (0 ok, 1 gate or
budget failure, 2 bad input, 3 compile failure, 130 interrupted).  All output a
person reads is printed here.  Heavy modules are imported inside the commands so
``dlopt --help`` stays fast.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
from pathlib import Path

import click

from dlopt import __version__
from dlopt.core.config import CALIB_METHODS, PRECISIONS
from dlopt.core.progress import EXIT_INTERRUPTED, TerminalProgress, install_interrupt_handlers, interrupted
from dlopt.deploy.options import publish_options  # imports only click

EXIT_INTERNAL = 70
# The reader of stdout went away (`dlopt inspect M | head -5`): end as git, cat or grep do, whom SIGPIPE
# ends and the shell reports as 128 + 13; quietly, and with any compile unwound (nothing published).
EXIT_BROKEN_PIPE = 128 + signal.SIGPIPE


def _one_line(text: str) -> str:
    from dlopt.core.errors import one_line

    return one_line(text)  # U+2028 and other odd breaks escaped, never a second terminal line


def _ignore_signals() -> None:
    """The compile has unwound (its staging folder is gone): a further signal must not kill the process
    during interpreter shutdown, which gives SIGINT back its default action (exit -2, not 130)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _closed_pipes() -> list:
    """stdout and stderr where they are a pipe or socket nobody reads any more (poll reports an error or
    hang-up on them): a BrokenPipeError from elsewhere (an RPC or Pushgateway socket) stays an error."""
    import select

    gone = []
    for stream in (sys.stdout, sys.stderr):
        try:
            poller = select.poll()
            poller.register(stream.fileno(), select.POLLOUT)
            if any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0)):
                gone.append(stream)
        except (OSError, ValueError, AttributeError):  # no real stream (closed, or a test runner's)
            pass
    return gone


def _quiet_exit(streams) -> int:
    """Point ``streams`` at /dev/null, so Python's flush at exit cannot raise a second BrokenPipeError (the
    recipe of Python's docs, "Note on SIGPIPE"), and give the exit code.  Nothing is printed: `head`
    asked for no more, and the pipe that broke may be stderr too (`2>&1 | head`)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        for stream in streams:
            os.dup2(devnull, stream.fileno())
    finally:
        os.close(devnull)
    return EXIT_BROKEN_PIPE


class _Group(click.Group):
    """Maps dlopt's errors to one-line messages and exit codes, for every command."""

    def main(self, *args, standalone_mode: bool = True, **kwargs):
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            code = super().main(*args, standalone_mode=False, **kwargs)
        except click.UsageError as exc:  # one line, not click's four-line "Usage: ..." block
            where = f" (see '{exc.ctx.command_path} --help')" if exc.ctx is not None else ""
            click.echo(f"dlopt: error: {_one_line(exc.format_message())}{where}", err=True)
            sys.exit(exc.exit_code)
        except click.ClickException as exc:
            click.echo(f"dlopt: error: {_one_line(exc.format_message())}", err=True)
            sys.exit(exc.exit_code)
        except click.exceptions.Abort:
            click.echo("dlopt: interrupted; nothing was written", err=True)
            sys.exit(130)
        try:
            sys.stdout.flush()  # output still buffered goes now, while a closed pipe can be answered quietly
        except BrokenPipeError:
            code = _quiet_exit([sys.stdout])
        sys.exit(code if isinstance(code, int) else 0)

    def invoke(self, ctx: click.Context):
        from dlopt.core.errors import DloptError

        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            _ignore_signals()
            click.echo("dlopt: interrupted; nothing was written", err=True)
            ctx.exit(EXIT_INTERRUPTED)
        except (click.exceptions.Exit, click.ClickException, click.exceptions.Abort):
            raise
        except Exception as exc:
            if isinstance(exc, BrokenPipeError) and (gone := _closed_pipes()):
                ctx.exit(_quiet_exit(gone))
            if interrupted() is not None:  # native code turned the interrupt into an error on its way out
                _ignore_signals()
                click.echo("dlopt: interrupted; nothing was written", err=True)
                ctx.exit(EXIT_INTERRUPTED)
            if isinstance(exc, DloptError):
                click.echo(f"dlopt: error: {_one_line(str(exc))}", err=True)
                ctx.exit(exc.exit_code)
            # a bug in dlopt or a library: one line unless asked for more
            if os.environ.get("DLOPT_DEBUG"):
                raise
            click.echo(f"dlopt: internal error: {type(exc).__name__}: {_one_line(str(exc))[:500]} "
                       f"(set DLOPT_DEBUG=1 for the traceback)", err=True)
            ctx.exit(EXIT_INTERNAL)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="dlopt")
@click.option("-v", "--verbose", count=True, help="Log diagnostics to stderr (-vv for debug).")
def main(verbose: int) -> None:
    """dlopt: optimise a trained model for a target and prove it still works.

    \b
    Typical use:
      dlopt inspect model.onnx
      dlopt compile model.onnx --target cpu -o out/
      dlopt gate out/ --max-accuracy-drop 0.5
      dlopt run out/ --input data.npz --output preds.npz
      dlopt verify out/ && dlopt bench out/ --select
      dlopt tune model.onnx --target cpu --trials 300 --time-budget 30m
      dlopt targets
      dlopt demo
    """
    # Ctrl-C and SIGTERM (CI cancelling a job) unwind once, so staged output is removed; the signal is
    # recorded too, so a build that swallowed the interrupt still ends the compile, and one that holds
    # on past a grace period, or a second signal, ends the process (dlopt.core.progress, "interrupts").
    install_interrupt_handlers()
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)


def _print_report(report, *, as_json: bool) -> None:
    from tabulate import tabulate

    from dlopt.report import sections

    if as_json:
        click.echo(report.to_json(), nl=False)
        return
    for line in sections.terminal(report, (sections.HEAD,)):
        click.echo(line)
    click.echo(tabulate(report.pass_rows(), headers=report.PASS_HEADERS))
    click.echo()
    click.echo(tabulate(report.candidate_rows(), headers=report.CANDIDATE_HEADERS))
    for line in sections.terminal(report):  # the report's sections (dlopt.report.sections): calibration, notes, ...
        click.echo(line)
    click.echo(f"\n{report.summary}; artefacts in {report.output_dir}")


def _floats(text: str | None, what: str) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise click.BadParameter(f"{what} must be comma-separated numbers, got {text!r}") from None


@main.command()
@click.argument("model", type=click.Path(path_type=Path, dir_okay=True))
@click.option("-t", "--target", default="cpu", show_default=True, help="Target preset (see `dlopt targets`).")
@click.option("--targets-file", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="TOML file with your own [targets.NAME] tables [default: ./dlopt.toml if present].")
@click.option("-o", "--out", type=click.Path(path_type=Path), default=None,
              help="Output folder [default: ./<model>-<target>]. Replaced only if it is a previous dlopt output.")
@click.option("--precision", type=click.Choice(PRECISIONS), default="auto",
              show_default=True,
              help="auto builds fp32, fp16 and int8 (mixed int8/float if int8 misses the budget) and keeps the "
                   "fastest within the budget; an fp16/int8 artefact not faster than fp32 is never chosen.")
@click.option("--eval", "--inputs", "inputs", type=click.Path(path_type=Path), default=None,
              help="Evaluation .npz: one array per model input (first axis = samples) and optional integer "
                   "'labels' for top-1 accuracy [default: random inputs, fidelity to the original].")
@click.option("--calib", type=click.Path(path_type=Path), default=None,
              help="Calibration data for int8: an .npz like --eval, or a folder of images (see --calib-size).")
@click.option("--calib-samples", type=click.IntRange(min=1), default=256, show_default=True,
              help="Calibrate on at most this many samples (streamed).")
@click.option("--calib-method", type=click.Choice(CALIB_METHODS), default="auto",
              show_default=True, help="How activation ranges are chosen; auto: min-max for CNNs, a percentile "
                                      "for models with attention or normalisation (outliers dominate min-max).")
@click.option("--calib-size", default=None, metavar="H,W", help="Image folders: resize to H,W.")
@click.option("--calib-layout", type=click.Choice(["NCHW", "NHWC"]), default="NCHW", show_default=True,
              help="Image folders: tensor layout.")
@click.option("--calib-mean", default=None, metavar="M[,M,M]", help="Image folders: per-channel mean (after scaling to 0-1).")
@click.option("--calib-std", default=None, metavar="S[,S,S]", help="Image folders: per-channel std.")
@click.option("--calib-color", type=click.Choice(["RGB", "BGR", "GRAY"]), default="RGB", show_default=True,
              help="Image folders: channel order.")
@click.option("--max-accuracy-drop", type=float, default=1.0, show_default=True, metavar="POINTS",
              help="Accuracy budget in points of --metric (100 x the metric): top-1 accuracy with labels, "
                   "top-1 agreement with the original's predictions, or 0.01 of cosine similarity per point.")
@click.option("--search-time", type=float, default=120.0, show_default=True, metavar="SECONDS",
              help="Time limit of the mixed-precision search; the best model found is kept.")
@click.option("--samples", type=click.IntRange(min=1), default=None,
              help="Without --eval: random feeds compared against the original [20]. With --eval: "
                   "evaluate at most this many of its samples [10000].")
@click.option("--batch", type=click.IntRange(min=1), default=None,
              help="Batch at which latency is timed, for a symbolic first dimension [default: 1].")
@click.option("--shape", "shapes", multiple=True, metavar="NAME=DxDx...",
              help="Timing shape of one input, e.g. x=1x3x224x224, or the size of a symbolic dim name for every "
                   "input that uses it, e.g. seq=64 (repeatable). Other symbolic dims come from --eval (or --calib) "
                   "data; any that nothing fixes are listed in one error.")
@click.option("--const", "constants", multiple=True, metavar="NAME=VALUE",
              help="An input that is the same for every sample (a sample rate: sr=16000; a zero state: state=0), "
                   "fed with random inputs and added to --eval/--calib data that lacks it (repeatable).")
@click.option("--mask-input", default=None, metavar="NAME",
              help="The attention-mask input (0/1 per token) whose zeros mark padding: per-token outputs "
                   "[batch, seq, ...] are scored on the kept tokens only [default: detected by name and values].")
@click.option("--no-mask", is_flag=True, help="Score every output position, padding included.")
@click.option("--metric", default=None, metavar="top1|cosine|rel-error|MODULE:FUNCTION",
              help="What the accuracy budget measures [default: top-1 for classifier logits [N, C], else the "
                   "per-sample cosine similarity with the original's outputs].")
@click.option("--runs", type=click.IntRange(min=1), default=100, show_default=True,
              help="Timed runs per model, interleaved with the others.")
@click.option("--timing-budget", type=click.FloatRange(min=0, min_open=True), default=30.0, show_default=True,
              metavar="SECONDS", help="Seconds the interleaved timing of all models may take together; past it "
              "each gets fewer runs than --runs (never under 20), and the report and summary say so.")
@click.option("--reference-timeout", type=click.FloatRange(min=0, min_open=True), default=600.0, show_default=True,
              metavar="SECONDS", help="Seconds one run of the original model on ONNX Runtime may take while its "
              "reference outputs are made; past it the run is stopped and the compile fails (a Loop with a huge "
              "trip count never ends).")
@click.option("--warmup", type=click.IntRange(min=0), default=10, show_default=True, help="Untimed runs first.")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="Intra-op threads [default: all cores].")
@click.option("--gate", "then_gate", is_flag=True,
              help="Then check the report against --max-accuracy-drop and the [gate] table of dlopt.toml, "
                   "like `dlopt gate`; exit 1 when a threshold is crossed.")
@click.option("--no-cache", is_flag=True, help="Build every artefact afresh instead of reusing verified "
              "builds from $DLOPT_CACHE (default ~/.cache/dlopt).")
@click.option("--wait", type=click.FloatRange(min=0), default=0.0, show_default=True, metavar="SECONDS",
              help="If another compile is writing the same output folder, wait this long for it.")
@click.option("--tuning-db", default=None, metavar="DIR",
              help="Root of TVM tuning databases (`dlopt tune`) [default: $DLOPT_TUNING_DB or ~/.cache/dlopt/tuning]; "
                   "the one for this model and target is applied when it exists.")
@click.option("--prune", type=float, default=None, metavar="FRACTION",
              help="Unstructured pruning: zero this fraction (e.g. 0.5) of each Conv/Gemm/MatMul layer's smallest "
                   "weights. The report gives the sparsity reached; dense backends gain compressed size, not speed "
                   "(for speed, prune channels with dlopt.prune / dlopt.compress in Python).")
@click.option("--max-ram", type=click.IntRange(min=1), default=None, metavar="BYTES",
              help="Microcontroller targets: fail when RAM (arena + data + stack estimate) exceeds BYTES.")
@click.option("--max-flash", type=click.IntRange(min=1), default=None, metavar="BYTES",
              help="Microcontroller targets: fail when flash (code + weights + data) exceeds BYTES.")
@click.option("--no-tuning", is_flag=True, help="Build TVM candidates untuned even where a tuning database exists.")
@click.option("--rpc-tracker", default=None, metavar="HOST:PORT",
              help="A TVM RPC tracker: TVM candidates for a target that is not this machine are verified and timed "
                   "on a device registered there under --rpc-key.")
@click.option("--rpc-key", default=None, metavar="KEY", help="The key the target device's RPC servers registered with.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON on stdout.")
@click.option("-q", "--quiet", is_flag=True, help="No progress output.")
@publish_options
def compile(model, target, targets_file, out, precision, inputs, calib, calib_samples, calib_method, calib_size, calib_layout,  # noqa: A001
            calib_mean, calib_std, calib_color, max_accuracy_drop, search_time, samples, batch, shapes, constants,
            mask_input, no_mask, metric, runs,
            timing_budget, reference_timeout,
            warmup, threads,
            then_gate, no_cache, wait, tuning_db, prune, max_ram, max_flash, no_tuning, rpc_tracker, rpc_key, as_json, quiet, publishing):
    """Optimise MODEL (.onnx) for a target and write verified artefacts.

    Runs the pass pipeline (shape inference, simplification, fusions), builds
    every backend x precision candidate the target allows, checks each against
    the original model's outputs on the same inputs, times it and keeps the
    fastest within the accuracy budget.  OUT gets model.onnx,
    session_options.json, manifest.json, report.json and report.md (plus
    calibration.json for int8), all at once or not at all.

    \b
    Examples:
      dlopt compile resnet.onnx --target cpu -o build/resnet-cpu
      dlopt compile cnn.onnx --precision int8 --calib calib.npz --eval test.npz --max-accuracy-drop 0.5
      dlopt compile cnn.onnx --target rpi5 --rpc-tracker farm:9190 --rpc-key rpi5
    """
    import dlopt
    from dlopt.core.errors import AccuracyBudgetExceeded
    from dlopt.core.shapes import parse_const, parse_shape

    if no_mask and mask_input:
        raise click.UsageError("--mask-input and --no-mask contradict each other; give one")
    preprocess = None
    if calib_size is not None:
        from dlopt.calibration import ImagePreprocess

        size = tuple(int(v) for v in _floats(calib_size, "--calib-size"))
        extra = {k: v for k, v in (("mean", _floats(calib_mean, "--calib-mean")),
                                   ("std", _floats(calib_std, "--calib-std"))) if v is not None}
        preprocess = ImagePreprocess(size=size, layout=calib_layout, color=calib_color, **extra)
    try:
        report = dlopt.compile(
            model, target=target, targets_file=targets_file, out=out, precision=precision, inputs=inputs, samples=samples,
            runs=runs, timing_budget_s=timing_budget, reference_timeout_s=reference_timeout, warmup=warmup, threads=threads, calib=calib, calib_samples=calib_samples, batch=batch,
            shapes=dict(parse_shape(text) for text in shapes) or None, metric=metric,
            constants=dict(parse_const(text) for text in constants) or None,
            mask_input=False if no_mask else mask_input,
            calib_method=calib_method, calib_preprocess=preprocess, max_accuracy_drop=max_accuracy_drop,
            search_time=search_time, wait=wait, cache=not no_cache, progress=TerminalProgress(not (quiet or as_json)),
            rpc_tracker=rpc_tracker, rpc_key=rpc_key, tuning_db=False if no_tuning else tuning_db, prune=prune,
            max_ram=max_ram, max_flash=max_flash,
        )
    except AccuracyBudgetExceeded as exc:  # the closest model was written: show its report, then fail
        _print_report(exc.report, as_json=as_json)
        raise
    _print_report(report, as_json=as_json)

    def record(gate_results=None) -> None:  # after the gate when there is one: a failed gate registers nothing
        from dlopt.deploy.options import deploy

        for line in deploy(report, report.output_dir, publishing, gate_results=gate_results):
            click.echo(line, err=as_json)

    if publishing and not then_gate:
        record()
    if then_gate:
        from dlopt.cli.gate import check_report, thresholds_from

        if not as_json:
            click.echo()
        check_report(report.to_dict(), thresholds_from(None, max_accuracy_drop=max_accuracy_drop),
                     quiet=as_json, on_results=record if publishing else None)


@main.command()
@click.argument("model", type=click.Path(path_type=Path, dir_okay=True))
@click.option("-t", "--target", default=None, help="Also list, per backend of this target, the ops it cannot take.")
@click.option("--targets-file", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="TOML file with your own [targets.NAME] tables [default: ./dlopt.toml if present].")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of tables.")
def inspect(model, target, targets_file, as_json):
    """Describe MODEL: opset, inputs and outputs, op histogram, parameters, size.

    With --target, also check each of the target's backends for ops it cannot
    take, before you spend time compiling.

    \b
    Example:
      dlopt inspect model.onnx --target jetson --json
    """
    from dlopt.core.model_io import read_model_proto
    from dlopt.report.summary import backend_support, summarize

    profile = None
    if target is not None:
        from dlopt.core.profiles import resolve_target

        profile = resolve_target(target, targets_file)
    info = {"path": str(model), "size_bytes": model.stat().st_size if model.is_file() else None}
    proto = read_model_proto(model)
    info.update(summarize(proto))
    if profile is not None:
        info["target"] = profile.name
        info["backends"] = backend_support(proto, profile)
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    from tabulate import tabulate

    click.echo(f"{model}  ({info['size_bytes'] / 1e6:.3f} MB, ir_version {info['ir_version']}, "
               f"opset {info['opset']}, {info['parameters']:,} parameters, {info['nodes']} nodes)")
    if info["producer"]:
        click.echo(f"producer: {info['producer']}")
    click.echo("inputs:  " + "; ".join(info["inputs"]))
    click.echo("outputs: " + "; ".join(info["outputs"]))
    click.echo()
    click.echo(tabulate(sorted(info["ops"].items(), key=lambda kv: -kv[1]), headers=["op", "count"]))
    if profile is not None:
        rows = [[name, "yes" if b["available"] else f"no: {b['reason']}",
                 ", ".join(b.get("precisions", [])) or "-",
                 ", ".join(b["unsupported"]) if b["unsupported"] else ("none" if b["available"] else "-")]
                for name, b in info["backends"].items()]
        click.echo(f"\nbackends of {profile.name}:")
        click.echo(tabulate(rows, headers=["backend", "usable here", "precisions", "unsupported ops"],
                            maxcolwidths=[None, 50, 30, 50]))


@main.command()
@click.option("--targets-file", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="TOML file with your own [targets.NAME] tables [default: ./dlopt.toml if present].")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def targets(targets_file, as_json):
    """List the target presets and what each can build and run on this machine today.

    Add your own targets in dlopt.toml, e.g. a preset with another CPU:

    \b
      [targets.my-board]
      base = "rpi5"
      description = "our carrier board"
      mcpu = "cortex-a76"

    \b
    Example:
      dlopt targets
    """
    from dlopt.core.profiles import ALIASES, all_profiles
    from dlopt.targets import backend_status, build_limits

    status = {}
    rows = []
    for profile in all_profiles(targets_file).values():
        backends = {name: backend_status(name, profile) for name in profile.backends}
        usable = [n for n, s in backends.items() if s is True]
        why_not = {n: s for n, s in backends.items() if s is not True}
        limited = {n: why for n in usable if (why := build_limits(n, profile))}
        aliases = [a for a, t in ALIASES.items() if t == profile.name]
        status[profile.name] = {
            "description": profile.description, "arch": profile.arch, "triple": profile.triple,
            "aliases": aliases, "backends": list(profile.backends), "precisions": list(profile.precisions),
            "can_build": usable, "cannot_build": why_not, "limited": limited, "runs_here": profile.runs_here(),
        }
        rows.append([
            profile.name + (f" ({', '.join(aliases)})" if aliases else ""), profile.description,
            ", ".join(usable) or "-",
            "; ".join([*(f"{n}: {s}" for n, s in why_not.items()),
                       *(f"{n} builds with {s}" for n, s in limited.items())]) or "-",
            "yes" if profile.runs_here() else "no",
        ])
    if as_json:
        click.echo(json.dumps(status, indent=2))
        return
    from tabulate import tabulate

    click.echo(tabulate(rows, headers=["target", "what", "builds with", "not available here", "runs here"],
                        maxcolwidths=[None, 34, 16, 48, None]))


@main.command()
@click.argument("out", type=click.Path(path_type=Path))
@click.option("-i", "--input", "data", required=True, type=click.Path(path_type=Path),
              help=".npz with one array per model input, first axis = samples (no pickles).")
@click.option("-o", "--output", "output", required=True, type=click.Path(path_type=Path),
              help="Where to write the predictions: an .npz with one array per model output, by output name. "
                   "Written whole or not at all; never the input file, nor an existing file that is not an .npz.")
@click.option("--batch-size", type=click.IntRange(min=1), default=None,
              help="Samples per run [default: the artefact's fixed batch, else the batch it was timed at].")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="Intra-op threads [default: the thread count the artefact shipped with].")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON on stdout.")
@click.option("-q", "--quiet", is_flag=True, help="No progress output.")
def run(out, data, output, batch_size, threads, as_json, quiet):
    """Run the artefact in OUT on every sample of an .npz and save its outputs.

    OUT is a `dlopt compile` output folder, or one of its bundle/<backend>-<precision>/
    candidates.  The artefact runs with the settings it shipped with; one built for
    another device (an aarch64 TVM library, a TensorRT bundle) is refused with what
    that device needs.

    \b
    Examples:
      dlopt run build/resnet-cpu --input test.npz --output preds.npz
      dlopt run build/rpi/bundle/ort-int8 -i test.npz -o preds.npz --batch-size 8 --json
    """
    from dlopt.measure.runner import load, run_npz

    with load(out, threads=threads) as runner:
        summary = run_npz(runner, data, output, batch_size=batch_size,
                          progress=TerminalProgress(not (quiet or as_json)))
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    shapes = ", ".join(f"{k} {v['dtype']}{v['shape']}" for k, v in summary["outputs"].items())
    click.echo(f"ran {summary['candidate']} on {summary['samples']} samples in {summary['batches']} batches of "
               f"{summary['batch_size']} in {summary['seconds']:.3f} s; wrote {output} ({shapes})")


@main.command()
@click.option("-o", "--out", type=click.Path(path_type=Path), default=Path("demo-out"), show_default=True,
              help="Where to write the demo model and its artefacts.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON on stdout.")
def demo(out, as_json):
    """Train a small CNN on scikit-learn's digits, export it, compile it for cpu and report.

    Needs the `demo` extra (torch, scikit-learn).  Takes about a minute on two cores
    (training a small CNN, exporting it, then a full cpu compile).

    \b
    Example:
      dlopt demo -o /tmp/dlopt-demo
    """
    from dlopt.workflows.demo import run_demo

    report, accuracy = run_demo(out, progress=TerminalProgress(not as_json))
    _print_report(report, as_json=as_json)
    if not as_json:
        click.echo(f"\ntop-1 accuracy on {accuracy['test_samples']} held-out digits: "
                   f"original {accuracy['original'] * 100:.2f}%, optimised {accuracy['optimised'] * 100:.2f}%")


from dlopt.cli.gate import gate  # noqa: E402 - imports only click; registered after the built-in verbs

main.add_command(gate)

from dlopt.cli.device import bench, verify  # noqa: E402 - imports only click

main.add_command(verify)
main.add_command(bench)

from dlopt.cli.tune import tune  # noqa: E402 - imports only click

main.add_command(tune)

from dlopt.cli.package import package  # noqa: E402 - imports only click
from dlopt.cli.sweep import sweep  # noqa: E402 - imports only click

main.add_command(package)
main.add_command(sweep)
