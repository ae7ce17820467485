"""`kd data synth`.

Each command imports its implementation when it runs, not at import: `kd --help` stays fast (no torch).
"""

from __future__ import annotations

import typer

from kd_cli.config import config_command, reported
from kd_eval.config import SynthConfig

app = typer.Typer(help="Datasets.", no_args_is_help=True)


@app.command()
@config_command(SynthConfig)
def synth(cfg: SynthConfig) -> None:
    """Procedural shapes dataset (counting, colour, spatial, POPE-style existence, multiple choice, description),
    written in the same LLaVA JSON + image-folder layout as real data."""
    from kd_eval.synth import generate

    with reported():
        paths = generate(cfg.out, n_caption=cfg.n_caption, n_train=cfg.n_train, n_val=cfg.n_val, n_test=cfg.n_test,
                         seed=cfg.seed, image_size=cfg.image_size, question_types=cfg.question_type_list(),
                         multi_turn=cfg.multi_turn, lmms_task=cfg.lmms_task)
    for name in ("caption_train", "instruct_train", "instruct_val", "instruct_test"):
        typer.echo(f"{name:<15} {getattr(paths, name)}")
    typer.echo(f"{'images':<15} {paths.image_root}")
    if paths.lmms_task is not None:
        typer.echo(f"{'lmms_task':<15} {paths.lmms_task} (lmms-eval --tasks kd_synth --include_path {paths.lmms_task})")
