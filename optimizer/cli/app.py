"""The ``dlopt`` command: a thin shell over the Python API.

It turns arguments into a config and exceptions into exit codes (0 ok, 1 gate or
budget failure, 2 bad input, 3 compile failure, 130 interrupted).  This module
holds the group, its exit-code mapping and the list of verbs; each verb is its own
module beside it (``compile.py``, ``run.py``, ...), built from the shared option
groups of ``options.py``.  Heavy modules are imported inside the commands so
``dlopt --help`` stays fast.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading

import click

from dlopt import __version__
from dlopt.cli.compile import compile  # noqa: A004 - the verb (each verb module imports only click and light modules)
from dlopt.cli.demo import demo
from dlopt.cli.device import bench, verify
from dlopt.cli.gate import gate
from dlopt.cli.generate import generate
from dlopt.cli.inspect import inspect
from dlopt.cli.loadtest import loadtest
from dlopt.cli.package import package
from dlopt.cli.run import run
from dlopt.cli.serve import serve
from dlopt.cli.sweep import sweep
from dlopt.cli.targets import targets
from dlopt.cli.tune import tune
from dlopt.core.progress import EXIT_INTERRUPTED, install_interrupt_handlers, interrupted

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
      dlopt serve out/ --max-batch-size 16
      dlopt loadtest out/ --rate 50,100,200 --slo p99=20ms
      dlopt tune model.onnx --target cpu --trials 300 --time-budget 30m
      dlopt compile smollm2/ --task text-generation --eval book.txt -o out/
      dlopt generate out/ --prompt "Once upon a time" --max-new-tokens 32
      dlopt targets
      dlopt demo
    """
    # Ctrl-C and SIGTERM (CI cancelling a job) unwind once, so staged output is removed; the signal is
    # recorded too, so a build that swallowed the interrupt still ends the compile, and one that holds
    # on past a grace period, or a second signal, ends the process (dlopt.core.progress, "interrupts").
    install_interrupt_handlers()
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)


VERBS = (compile, inspect, targets, run, demo, gate, verify, bench, tune, package, serve, loadtest, sweep, generate)
for verb in VERBS:
    main.add_command(verb)
