"""Entry point of the `kd` command."""

from __future__ import annotations

from typing import Optional

import typer

from kd_cli import cache, data, student
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
def demo(out: str = typer.Option("kd-demo", help="Folder for everything the demo makes; rerun into it to reuse "
                                                 "finished steps."),
         quick: bool = typer.Option(False, "--quick", help="Smoke run (~2 min): tiny data and few steps; the "
                                                          "numbers are not meaningful."),
         seed: int = typer.Option(0, help="Seed of the data, the teacher and the students."),
         quiet: bool = typer.Option(False, "--quiet", help="No step messages or progress bars.")) -> None:
    """End to end on a built-in procedural dataset, on a CPU, no downloads: train a tiny teacher MLLM, cache it
    (`kd cache build`), train a smaller student with `--recipe baseline` and with `--recipe llava-kd` from the
    same init, evaluate all three (`kd eval`) and print the comparison; report in <out>/report/ (markdown,
    charts, results.json). Full run <= 10 min on a 2-core CPU."""
    import logging

    from kd_eval.demo import run_demo

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        result = run_demo(out, quick=quick, seed=seed, progress=not quiet)
    except ValueError as e:
        typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from None
    typer.echo(result.table)
    if result.gap_recovered is None:
        typer.echo("gap recovered: n/a (the teacher is not above the baseline)")
    else:
        typer.echo(f"gap recovered by llava-kd: {100 * result.gap_recovered:.0f} % of (teacher - baseline)")
    if result.settings.mode == "quick":
        typer.echo("(--quick is a smoke run: tiny data and few steps, the numbers are not meaningful)")
    typer.echo(f"wall time: {result.wall_seconds:.0f} s; report: {result.report}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
