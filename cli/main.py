"""Entry point of the `kd` command.

Each command imports its implementation when it runs, not at import: `kd --help` stays fast (no torch).
"""

from __future__ import annotations

import sys

import click
import typer

from kd_cli import cache, data, student
from kd_cli.config import config_command, reported
from kd_eval.config import DemoConfig
from kd_cli.eval import eval_command
from kd_cli.train import train

app = typer.Typer(help="kd: offline LLaVA-KD distillation. Cache a multimodal teacher once, train small students "
                       "from the cache.", no_args_is_help=True, pretty_exceptions_enable=False)
app.add_typer(cache.app, name="cache")
app.add_typer(student.app, name="student")
app.add_typer(data.app, name="data")
app.command(name="train")(train)
app.command(name="eval")(eval_command)


@app.command()
@config_command(DemoConfig)
def demo(cfg: DemoConfig) -> None:
    """End to end on a built-in procedural dataset, on a CPU, no downloads: train a tiny teacher MLLM, cache it
    (`kd cache build`), train a smaller student with `--recipe baseline` and with `--recipe llava-kd` from the
    same init, evaluate all three (`kd eval`) and print the comparison; report in <out>/report/ (markdown,
    charts, results.json). Full run <= 10 min on a 2-core CPU."""
    import logging

    from kd_eval.demo import run_demo

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    with reported():
        result = run_demo(cfg.out, quick=cfg.quick, seed=cfg.seed, progress=cfg.progress)
    typer.echo(result.table)
    if result.gap_recovered is None:
        typer.echo("gap recovered: n/a (the teacher is not above the baseline)")
    else:
        typer.echo(f"gap recovered by llava-kd: {100 * result.gap_recovered:.0f} % of (teacher - baseline)")
    if result.nll_gap_recovered is not None:
        typer.echo(f"held-out answer NLL: llava-kd recovers {100 * result.nll_gap_recovered:.0f} % of "
                   "(baseline - teacher)")
    if result.settings.mode == "quick":
        typer.echo("(--quick is a smoke run: tiny data and few steps, the numbers are not meaningful)")
    else:
        typer.echo("(one seed: a difference of a few points is within the seed spread; docs/results.md has KD - CE "
                   "over 5 paired seeds with 95 % intervals)")
    typer.echo(f"wall time: {result.wall_seconds:.0f} s; report: {result.report}")


def _click_errors() -> tuple[tuple[type, ...], tuple[type, ...]]:
    """(NoArgsIsHelpError, UsageError) types of click and of the click that typer >= 0.20 vendors."""
    no_args, usage = [click.exceptions.NoArgsIsHelpError], [click.exceptions.UsageError]
    try:
        from typer._click import exceptions as vendored  # typer's own copy of click (not a public module)
    except ImportError:
        pass
    else:
        no_args.append(vendored.NoArgsIsHelpError)
        usage.append(vendored.UsageError)
    return tuple(no_args), tuple(usage)


def main() -> None:
    """`kd`: the app, with click's usage errors (an unknown option, an extra argument) printed as the one `error:`
    line every other refusal uses (exit 2), not click's boxed usage text."""
    no_args, usage = _click_errors()
    try:
        code = app(standalone_mode=False)
    except no_args as e:  # `kd` or `kd cache` alone: their help
        typer.echo(e.ctx.get_help() if e.ctx is not None else str(e))
        code = 2
    except usage as e:
        where = e.ctx.command_path if e.ctx is not None else "kd"
        typer.secho(f"error: {e.format_message()} (`{where} --help` lists the options)", fg=typer.colors.RED,
                    err=True)
        code = 2
    except click.exceptions.Abort:  # Ctrl-C outside a command that says more
        typer.secho("interrupted", fg=typer.colors.RED, err=True)
        code = 130
    sys.exit(code or 0)


if __name__ == "__main__":
    main()
