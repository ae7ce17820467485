"""`kd train`.

Each command imports its implementation when it runs, not at import: `kd --help` stays fast (no torch).
"""

from __future__ import annotations

import logging

import typer

from kd_cli.config import config_command, flags_named, reported
from kd_train.config import TrainConfig


@config_command(TrainConfig)
def train(cfg: TrainConfig) -> None:
    """Train a student from a teacher cache through LLaVA-KD's stages; no teacher is loaded. Run under
    `accelerate launch` for several processes/GPUs (DDP, FSDP or DeepSpeed through an accelerate config)."""
    from kd_train.train import run

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("accelerate").setLevel(logging.WARNING)  # five INFO lines per checkpoint say nothing new

    def report(stage: str, path: str, trained: bool) -> None:
        typer.echo(f"student written: {path}" if trained else f"stage {stage} already finished: {path}")

    try:
        with reported(), flags_named(TrainConfig):
            run(cfg, report=report)
    except KeyboardInterrupt:
        typer.secho("interrupted; rerun the same command to resume from the last checkpoint "
                    f"(--checkpoint-every {cfg.checkpoint_every})" if cfg.checkpoint_every else
                    "interrupted; no checkpoint was being written (--checkpoint-every 0): a rerun starts the "
                    "unfinished stage over", fg=typer.colors.RED, err=True)
        raise typer.Exit(130) from None
