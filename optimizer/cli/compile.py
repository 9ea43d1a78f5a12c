"""``dlopt compile``: the option groups become one compile's configuration; the report is printed."""

from __future__ import annotations

from pathlib import Path

import click

from dlopt.cli.options import BUDGET, DATA, MCU, OUTPUT, TARGET, TEXT_GENERATION, TIMING, TVM, order
from dlopt.cli.printing import print_report
from dlopt.core.precisions import CHOICES as PRECISIONS
from dlopt.deploy.options import publish_options  # imports only click


@click.command()
@order("target", "targets_file", "out", "precision", "inputs", "calib", "calib_samples", "calib_method",
       "calib_size", "calib_layout", "calib_mean", "calib_std", "calib_color", "max_accuracy_drop", "search_time",
       "samples", "batch", "shapes", "constants", "mask_input", "no_mask", "metric", "runs", "timing_budget",
       "reference_timeout", "warmup", "threads", "then_gate", "no_cache", "wait", "tuning_db", "prune", "max_ram",
       "max_flash", "no_tuning", "rpc_tracker", "rpc_key", "task", "prompt_len", "gen_len", "max_ppl_increase",
       "as_json", "quiet")
@click.argument("model", type=click.Path(path_type=Path, dir_okay=True))
@TARGET()
@click.option("--precision", type=click.Choice(PRECISIONS), default="auto",
              show_default=True,
              help="auto builds fp32, fp16 and int8 (mixed int8/float if int8 misses the budget) and keeps the "
                   "fastest within the budget; an fp16/int8 artefact not faster than fp32 is never chosen.")
@DATA()
@BUDGET()
@TIMING()
@OUTPUT()
@TVM()
@MCU()
@TEXT_GENERATION()
@click.option("--gate", "then_gate", is_flag=True,
              help="Then check the report against --max-accuracy-drop and the [gate] table of dlopt.toml, "
                   "like `dlopt gate`; exit 1 when a threshold is crossed.")
@click.option("--prune", type=float, default=None, metavar="FRACTION",
              help="Unstructured pruning: zero this fraction (e.g. 0.5) of each Conv/Gemm/MatMul layer's smallest "
                   "weights. The report gives the sparsity reached; dense backends gain compressed size, not speed "
                   "(for speed, prune channels with dlopt.prune / dlopt.compress in Python).")
@publish_options
def compile(model, target, precision, data, budget, timing, output, tvm, mcu, then_gate, prune, text_generation,  # noqa: A001
            publishing):
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
      dlopt compile SmolLM2/ --task text-generation --eval book.txt --max-ppl-increase 5%
    """
    if text_generation.on:
        from dlopt.cli.generate import compile_decoder

        return compile_decoder(click.get_current_context(), model, target, precision, data, timing, output,
                               text_generation, bool(then_gate or prune is not None or publishing))
    from click.core import ParameterSource

    ctx = click.get_current_context()
    stray = [f"--{n.replace('_', '-')}" for n in ("prompt_len", "gen_len", "max_ppl_increase")
             if ctx.get_parameter_source(n) is ParameterSource.COMMANDLINE]
    if stray or precision == "int4":
        raise click.UsageError(f"{', '.join(stray) or '--precision int4'} applies to --task text-generation only")
    import dlopt
    from dlopt.core.errors import AccuracyBudgetExceeded

    options = {**target.config_kwargs(), "precision": precision, **data.config_kwargs(), **timing.config_kwargs(),
               **budget.config_kwargs(), **output.config_kwargs(), **tvm.config_kwargs(), **mcu.config_kwargs(),
               "prune": prune}
    try:
        report = dlopt.compile(model, **options)
    except AccuracyBudgetExceeded as exc:  # the closest model was written: show its report, then fail
        print_report(exc.report, as_json=output.as_json)
        raise
    print_report(report, as_json=output.as_json)

    def record(gate_results=None) -> None:  # after the gate when there is one: a failed gate registers nothing
        from dlopt.deploy.options import deploy

        for line in deploy(report, report.output_dir, publishing, gate_results=gate_results):
            click.echo(line, err=output.as_json)

    if publishing and not then_gate:
        record()
    if then_gate:
        from dlopt.cli.gate import check_report, thresholds_from

        if not output.as_json:
            click.echo()
        check_report(report.to_dict(), thresholds_from(None, max_accuracy_drop=budget.max_accuracy_drop),
                     quiet=output.as_json, on_results=record if publishing else None)
