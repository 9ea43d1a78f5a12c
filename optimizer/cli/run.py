"""``dlopt run``: run a compiled artefact on every sample of an .npz and save its outputs."""

from __future__ import annotations

import json
from pathlib import Path

import click

from dlopt.cli.options import OUTPUT, TIMING, order


@click.command()
@order("data", "predictions", "batch_size", "threads", "as_json", "quiet")
@click.argument("out", type=click.Path(path_type=Path))
@click.option("-i", "--input", "data", required=True, type=click.Path(path_type=Path),
              help=".npz with one array per model input, first axis = samples (no pickles).")
@click.option("-o", "--output", "predictions", required=True, type=click.Path(path_type=Path),
              help="Where to write the predictions: an .npz with one array per model output, by output name. "
                   "Written whole or not at all; never the input file, nor an existing file that is not an .npz.")
@click.option("--batch-size", type=click.IntRange(min=1), default=None,
              help="Samples per run [default: the artefact's fixed batch, else the batch it was timed at].")
@TIMING("threads", threads={"help": "Intra-op threads [default: the thread count the artefact shipped with]."})
@OUTPUT("as_json", "quiet", as_json={"help": "Print the summary as JSON on stdout."})
def run(out, data, predictions, batch_size, timing, output):
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

    with load(out, threads=timing.threads) as runner:
        summary = run_npz(runner, data, predictions, batch_size=batch_size, progress=output.progress)
    if output.as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    shapes = ", ".join(f"{k} {v['dtype']}{v['shape']}" for k, v in summary["outputs"].items())
    click.echo(f"ran {summary['candidate']} on {summary['samples']} samples in {summary['batches']} batches of "
               f"{summary['batch_size']} in {summary['seconds']:.3f} s; wrote {predictions} ({shapes})")
