"""``dlopt sweep``: compile models x targets x option variants into one table, optionally on Ray.

Only click and light dlopt modules are imported with this module so ``dlopt --help`` stays fast.
"""

from __future__ import annotations

from pathlib import Path

import click

from dlopt.cli.options import OUTPUT, order


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@order("out", "ray_address", "num_cpus", "cpus_per_task", "as_json")
@click.argument("sweep_file", metavar="SWEEP.toml", type=click.Path(path_type=Path, dir_okay=False))
@OUTPUT("out", "as_json", as_json={"help": "Print the table as JSON."},
        out={"type": click.Path(path_type=Path, file_okay=False),
             "help": "Folder of the entries and the table [default: [sweep] out, else <file stem>-out beside it]."})
@click.option("--ray", "ray_address", default=None, is_flag=False, flag_value="", metavar="[ADDRESS]",
              help="Run each compile as a Ray task: on the cluster at ADDRESS, or on a local Ray started on this "
                   "machine, listening on loopback only, when no address is given [default: sequential, no Ray].")
@click.option("--num-cpus", type=click.IntRange(min=1), default=None,
              help="CPUs of the local Ray [default: all cores].")
@click.option("--cpus-per-task", type=click.IntRange(min=1), default=1, show_default=True,
              help="CPUs Ray reserves for each task (how many compile at once); artefacts keep the target's "
                   "threads (this machine's cores for cpu, or the options' threads), whatever the share.")
def sweep(sweep_file, output, ray_address, num_cpus, cpus_per_task):
    """Compile every model x target x variant of SWEEP.toml and write OUT/sweep.md and OUT/sweep.json.

    Each entry is a normal compile output in OUT/<model>/<target>/<variant>/ (model file stems,
    target and variant names are plain folder names, each listed once).  A rerun skips the
    entries whose output is complete and retries the others; one entry's failure is a row of
    the table, never the end of the sweep.  Exit 3 when an entry failed.

    An entry's options are [options], then its model's [models.STEM] table (what differs by
    model: data, shapes, metric, budget), then its variant's; a key in both a model's table
    and a variant is refused.

    \b
    sweep.toml:
      [sweep]
      models = ["cnn.onnx", "bert.onnx"]
      targets = ["cpu"]
      out = "nightly"
      [options]
      runs = 50
      [models.cnn]
      inputs = "images.npz"
      max-accuracy-drop = 1.0
      [models.bert]
      shapes = {input_ids = [1, 128], attention_mask = [1, 128]}
      metric = "cosine"
      [variants.fp32]
      precision = "fp32"
      [variants.auto]
      precision = "auto"

    \b
    Examples:
      dlopt sweep nightly.toml -o build/nightly
      dlopt sweep nightly.toml --ray                 # a local Ray, one task per core
      dlopt sweep nightly.toml --ray ray://head:10001
    """
    import json
    from dataclasses import asdict

    from tabulate import tabulate

    from dlopt.core.errors import CompileError
    from dlopt.workflows.sweep import HEADERS, load_sweep, run_sweep

    spec = load_sweep(sweep_file, out=output.out)
    if not output.as_json:
        click.echo(f"{len(spec.entries)} entries -> {spec.out}", err=True)

    def progress(row):
        if not output.as_json:
            click.echo(f"{row.model}/{row.target}/{row.variant}: {row.status}"
                       + (f" ({row.note})" if row.note and row.status == "failed" else ""), err=True)

    result = run_sweep(spec, ray=ray_address is not None, address=ray_address or None, num_cpus=num_cpus,
                       cpus_per_task=cpus_per_task, on_row=progress)
    if output.as_json:
        click.echo(json.dumps({"mode": result.mode, "wall_seconds": result.wall_seconds,
                               "entries": [asdict(r) for r in result.rows]}, indent=2))
    else:
        click.echo(tabulate([r.cells() for r in result.rows], headers=HEADERS))
        click.echo(f"\n{result.mode}: {result.wall_seconds:.1f} s wall; table in {spec.out / 'sweep.md'}")
    failed = [f"{r.model}/{r.target}/{r.variant}" for r in result.rows if r.status == "failed"]
    if failed:
        raise CompileError(f"{len(failed)} of {len(result.rows)} sweep entries failed: {', '.join(failed[:5])}; "
                           f"see {spec.out / 'sweep.md'}")


if __name__ == "__main__":
    sweep()
