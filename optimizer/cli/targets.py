"""``dlopt targets``: the target presets and what each can build and run on this machine today."""

from __future__ import annotations

import json

import click

from dlopt.cli.options import OUTPUT, TARGET


@click.command()
@TARGET("targets_file")
@OUTPUT("as_json", as_json={"help": "Print JSON instead of a table."})
def targets(target, output):
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
    for profile in all_profiles(target.targets_file).values():
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
    if output.as_json:
        click.echo(json.dumps(status, indent=2))
        return
    from tabulate import tabulate

    click.echo(tabulate(rows, headers=["target", "what", "builds with", "not available here", "runs here"],
                        maxcolwidths=[None, 34, 16, 48, None]))
