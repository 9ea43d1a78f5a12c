"""``dlopt verify`` and ``dlopt bench``: the device's own check of an output, on the machine it runs on.

Only click and light dlopt modules are imported with this module so ``dlopt --help`` stays fast.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from dlopt.cli.options import OUTPUT, TIMING, TVM, order

# verify's and bench's own wording of the shared options
_THREADS = {"help": "Threads for every candidate [default: what each shipped with, at most this machine's cores]."}
_JSON = {"help": "Print the device report as JSON on stdout."}
_QUIET = {"help": "No progress lines on stderr."}


def _candidates(func):
    return click.option("-c", "--candidate", "keys", multiple=True, metavar="KEY",
                        help="Only this candidate (e.g. ort/int8, tvm/fp32); repeatable [default: all].")(func)


def _log(quiet: bool):
    return None if quiet else (lambda line: click.echo(f"dlopt: {line}", err=True))


def _print(report: dict, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    from tabulate import tabulate

    from dlopt.report.data import DEVICE_HEADERS, device_heading, device_rows

    click.echo(device_heading(report))
    click.echo(tabulate(device_rows(report), headers=DEVICE_HEADERS, tablefmt="simple", maxcolwidths=[None] * 6 + [60]))
    click.echo(report["why"])
    if report.get("original"):
        click.echo(report["original"])


def _exit_code(report: dict) -> int:
    rows = report["candidates"]
    if any(r.get("verified") is False for r in rows):
        click.echo("dlopt: " + ", ".join(r["key"] for r in rows if r.get("verified") is False)
                   + " failed verification on this machine", err=True)
        return 1
    if not any(r.get("verified") for r in rows):
        click.echo("dlopt: no candidate could be verified on this machine", err=True)
        return 1
    return 0


@click.command()
@order("keys", "threads", "as_json", "quiet")
@click.argument("out", type=click.Path(path_type=Path))
@_candidates
@TIMING("threads", threads=_THREADS)
@OUTPUT("as_json", "quiet", as_json=_JSON, quiet=_QUIET)
def verify(out, keys, timing, output):
    """Check every candidate of OUT against its verify.npz on this machine.

    Each candidate runs the feeds of OUT/verify.npz (a few evaluation inputs and the
    original model's outputs on them, written by `dlopt compile`) and must reproduce
    those outputs within the error it showed when built (twice that, and at least a
    floor per precision).  An aarch64 TVM library runs under qemu-aarch64 on an x86
    machine where the emulation is installed (`make arm64-env`).  Writes
    OUT/device_report.json; exits 1 when a candidate fails or none could be verified.

    Verifying a folder runs its native code (a TVM model.so, a C candidate built
    with gcc) in this process: only verify folders you trust.  dlopt first checks
    every such file against the sha256 its manifest recorded when it was compiled,
    and refuses (exit 2) a changed, added or unrecorded one, and paths in
    verify.npz or manifest.json that lead outside OUT.

    \b
    Examples:
      dlopt verify build/rpi5
      dlopt verify build/rpi5 --candidate ort/int8 --json
    """
    from dlopt.workflows.verify import check_output

    report = check_output(out, bench=False, keys=list(keys) or None, threads=timing.threads,
                          log=_log(output.quiet or output.as_json))
    _print(report, output.as_json)
    sys.exit(_exit_code(report))


@click.command()
@order("keys", "threads", "as_json", "quiet", "runs", "warmup", "rpc_tracker", "rpc_key", "select_fastest")
@click.argument("out", type=click.Path(path_type=Path))
@_candidates
@TIMING("threads", "runs", "warmup", threads=_THREADS, warmup={"help": None},
        runs={"help": "Timed runs per candidate, interleaved in rounds."})
@OUTPUT("as_json", "quiet", as_json=_JSON, quiet=_QUIET)
@TVM("rpc_tracker", "rpc_key", rpc_key={"help": "The key the device's RPC servers registered with."},
     rpc_tracker={"help": "Run and time the TVM libraries on a device behind this TVM RPC tracker (with --rpc-key); "
                          "refused when the candidates hold no TVM library."})
@click.option("--select", "select_fastest", is_flag=True,
              help="Move the fastest verified candidate to the top level of OUT when it is significantly faster "
                   "than the one there (the old one goes to bundle/).  Only on the target's own architecture: "
                   "refused elsewhere before anything runs.")
def bench(out, keys, timing, output, tvm, select_fastest):
    """Verify, then time every verified candidate of OUT on this machine.

    The candidates that run here natively are timed in one interleaved run at the
    shape the compile timed (the comparison `dlopt compile` makes, with 95% intervals
    of the median); a candidate run under qemu emulation is verified and timed apart,
    and its timings are marked as emulated, never compared.  Writes
    OUT/device_report.json and adds the results to OUT/report.md and report.html.
    The original model does not ship in OUT (unless it was chosen unchanged), so it
    is not timed here: a last line says so and gives the compile's timing of it
    (report.md has that comparison).

    Like `dlopt verify`, this runs the folder's native code (after checking its
    sha256 against the manifest): only bench folders you trust.

    \b
    Examples:
      dlopt bench build/rpi5
      dlopt bench build/rpi5 --select --runs 200
      dlopt bench build/rpi5 --rpc-tracker farm:9190 --rpc-key rpi5
    """
    from dlopt.workflows.promote import select
    from dlopt.workflows.verify import check_output

    report = check_output(out, bench=True, keys=list(keys) or None, threads=timing.threads, runs=timing.runs,
                          warmup=timing.warmup, remote=tvm.remote(), choosing=select_fastest,
                          log=_log(output.quiet or output.as_json))
    _print(report, output.as_json)
    code = _exit_code(report)
    best = report.get("fastest_verified")
    if select_fastest and code == 0 and best and best != report.get("top_level"):
        click.echo(select(out, best), err=output.as_json)
    sys.exit(code)
