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
def demo(out: str = typer.Option("kd-demo", help="Folder for the demo's teacher, data and cache."),
         n: int = typer.Option(32, help="Number of samples in the built-in example dataset."),
         family: str = typer.Option("llava", help="Teacher family: llava, llava-onevision, qwen2-vl.")) -> None:
    """End-to-end on a built-in tiny example: make a tiny LLaVA teacher and dataset, build its cache,
    verify it and print `kd cache info`. Needs no downloads and no GPU."""
    import logging

    from kd_cache.demo import run_demo

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    typer.echo(run_demo(out, n=n, family=family))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
