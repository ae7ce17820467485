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
    (`kd cache build`), train a smaller student with `--recipe baseline` and with `--recipe llava-kd` on paired
    seeds (same init and data per seed; single-thread processes side by side), evaluate them all (`kd eval`) and
    print the table and llava-kd - baseline with its 95 % interval for the task score and the held-out answer NLL;
    report in <out>/report/ (markdown, charts, results.json). Full run (5 seeds) <= 10 min on a 2-core CPU."""
    import logging

    from kd_eval.demo import StudentRunError, run_demo

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        with reported():
            result = run_demo(cfg.out, quick=cfg.quick, seed=cfg.seed, seeds=cfg.seeds, jobs=cfg.jobs,
                              progress=cfg.progress)
    except StudentRunError as e:
        typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
        raise typer.Exit(1) from None
    typer.echo(result.table)
    typer.echo("")
    for line in result.headline:
        typer.echo(line)
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
