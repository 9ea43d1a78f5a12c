"""``dlopt generate`` (and ``dlopt compile --task text-generation``, which it serves): the CLI of :mod:`dlopt.llm`."""

from __future__ import annotations

import json
from pathlib import Path

import click

from dlopt.cli.options import OUTPUT, TIMING, order

# The options of `dlopt compile` a text-generation compile reads; any other given is refused, not ignored.
_APPLY = {"model", "target", "targets_file", "out", "precision", "inputs", "runs", "warmup", "timing_budget",
          "threads", "wait", "as_json", "quiet", "task", "prompt_len", "gen_len", "max_ppl_increase", "no_cache"}
_TEXT_RUNS, _TEXT_BUDGET_S = 20, 60.0  # one run is a whole request: 20 of them, not the 100 single runs of a CNN


def compile_decoder(ctx: click.Context, model: Path, target, precision, data, timing, output, text_generation,
                    publishing: bool) -> None:
    """``dlopt compile MODEL --task text-generation``: the options become a TextGenerationConfig."""
    from click.core import ParameterSource

    given = [p for p in ctx.command.params if p.name not in _APPLY
             and ctx.get_parameter_source(p.name) in (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT)]
    if given or publishing:
        names = [p.opts[0] for p in given] or ["--gate/--prune/publishing"]
        raise click.UsageError(f"{', '.join(names)} do(es) not apply to --task text-generation (its options: "
                               f"--eval FILE.txt, --precision, --prompt-len, --gen-len, --max-ppl-increase, --runs, "
                               f"--warmup, --timing-budget, --threads, -o)")
    if data.inputs is None:
        raise click.UsageError("--task text-generation needs --eval FILE.txt: a plain-text file the decoder is "
                               "scored on (perplexity over its first 4096 tokens)")
    from dlopt.llm.compile import TextGenerationConfig, compile_text_generation

    def default(name: str, value, text_value):
        return value if ctx.get_parameter_source(name) is ParameterSource.COMMANDLINE else text_value

    config = TextGenerationConfig(
        model=model, eval_text=data.inputs, out=output.out, target=target.target, targets_file=target.targets_file,
        precision=precision, prompt_len=text_generation.prompt_len, gen_len=text_generation.gen_len,
        max_ppl_increase=text_generation.max_ppl_increase_pct(),
        runs=default("runs", timing.runs, _TEXT_RUNS), warmup=default("warmup", timing.warmup, 2),
        timing_budget_s=default("timing_budget", timing.timing_budget, _TEXT_BUDGET_S), threads=timing.threads,
        wait=output.wait, progress=output.progress)
    from dlopt.core.errors import AccuracyBudgetExceeded

    try:
        report = compile_text_generation(config)
    except AccuracyBudgetExceeded as exc:
        _print(getattr(exc, "report", None), output.as_json)
        raise
    _print(report, output.as_json)


def _print(report: dict | None, as_json: bool) -> None:
    if report is None:
        return
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    from dlopt.llm.report import render_markdown

    click.echo(render_markdown(report), nl=False)
    click.echo(f"\nwritten to {report['output']}")


@click.command()
@order("prompt", "max_new_tokens", "threads", "as_json")
@click.argument("out", type=click.Path(path_type=Path))
@click.option("-p", "--prompt", required=True, help="The text to continue.")
@click.option("-n", "--max-new-tokens", type=click.IntRange(min=1, max=1 << 16), default=32, show_default=True,
              help="Generate at most this many tokens (fewer when the model ends the text).")
@TIMING("threads", threads={"help": "Intra-op threads [default: the thread count the compile timed at]."})
@OUTPUT("as_json", as_json={"help": "Print the text, its token ids and timings as JSON on stdout."})
def generate(out, prompt, max_new_tokens, timing, output):
    """Continue a prompt with the decoder in OUT (a `dlopt compile --task text-generation` output), greedily.

    Prints the generated text; the prompt is not repeated.

    \b
    Examples:
      dlopt generate smollm2-cpu --prompt "The GNU General Public License is" -n 32
      dlopt generate smollm2-cpu -p "Hello" --json
    """
    from dlopt.llm.generator import TextGenerator

    result = TextGenerator(out, threads=timing.threads).run(prompt, max_new_tokens)
    if output.as_json:
        click.echo(json.dumps({"text": result.text, "tokens": list(result.tokens), "prompt_tokens": result.prompt_tokens,
                               "ttft_ms": round(result.ttft_ms, 3),
                               "tokens_per_s": result.tokens_per_s and round(result.tokens_per_s, 2)}))
    else:
        click.echo(result.text)
