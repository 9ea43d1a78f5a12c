"""``dlopt inspect``: describe a model, and per backend of a target the ops it cannot take."""

from __future__ import annotations

import json
from pathlib import Path

import click

from dlopt.cli.options import OUTPUT, TARGET


@click.command()
@click.argument("model", type=click.Path(path_type=Path, dir_okay=True))
@TARGET(target={"default": None, "show_default": False,
                "help": "Also list, per backend of this target, the ops it cannot take."})
@OUTPUT("as_json", as_json={"help": "Print JSON instead of tables."})
def inspect(model, target, output):
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
    if target.target is not None:
        from dlopt.core.profiles import resolve_target

        profile = resolve_target(target.target, target.targets_file)
    info = {"path": str(model), "size_bytes": model.stat().st_size if model.is_file() else None}
    proto = read_model_proto(model)
    info.update(summarize(proto))
    if profile is not None:
        info["target"] = profile.name
        info["backends"] = backend_support(proto, profile)
    if output.as_json:
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
