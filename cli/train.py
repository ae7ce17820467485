"""`kd train`.

Each command imports its implementation when it runs, not at import: `kd --help` stays fast (no torch).
"""

from __future__ import annotations

import logging

import typer

from kd_cli.config import config_command, reported
from kd_train.config import TrainConfig


@config_command(TrainConfig)
def train(cfg: TrainConfig) -> None:
    """Train a student from a teacher cache through LLaVA-KD's stages; no teacher is loaded. Run under
    `accelerate launch` for several processes/GPUs (DDP, FSDP or DeepSpeed through an accelerate config)."""
    from kd_train.train import run

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    with reported():
        outs = run(cfg)
    for o in outs:
        typer.echo(f"student written: {o}")
