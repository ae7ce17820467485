"""`kd student compose`.

Each command imports its implementation when it runs, not at import: `kd --help` stays fast (no torch).
"""

from __future__ import annotations

import typer

from kd_cli.config import config_command, reported
from kd_train.config import ComposeConfig

app = typer.Typer(help="Build students.", no_args_is_help=True)


@app.command()
@config_command(ComposeConfig)
def compose(cfg: ComposeConfig) -> None:
    """LLaVA-KD's student: vision encoder + fresh 2-layer GELU MLP projector + base LLM, saved as a
    transformers-native LlavaForConditionalGeneration that `kd train` and plain transformers load."""
    from kd_train.student import compose as run_compose

    with reported():
        path = run_compose(cfg)
    typer.echo(f"student written: {path}")
