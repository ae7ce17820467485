"""`kd data synth`."""

from __future__ import annotations

import typer

app = typer.Typer(help="Datasets.", no_args_is_help=True)


@app.command()
def synth(
    out: str = typer.Option(..., help="Output folder (LLaVA JSON files + images/)."),
    n_caption: int = typer.Option(1000, help="Caption records (DPT)."),
    n_train: int = typer.Option(2000, help="Instruction records, train split."),
    n_val: int = typer.Option(200, help="Instruction records, val split."),
    n_test: int = typer.Option(500, help="Instruction records, test split."),
    image_size: int = typer.Option(64, help="Image side in pixels."),
    seed: int = typer.Option(0, help="Seed: the same seed gives byte-identical files."),
) -> None:
    """Procedural shapes dataset (counting, colour, spatial, POPE-style existence, multiple choice, description),
    written in the same LLaVA JSON + image-folder layout as real data."""
    from kd_eval.synth import generate

    try:
        paths = generate(out, n_caption=n_caption, n_train=n_train, n_val=n_val, n_test=n_test, seed=seed,
                         image_size=image_size)
    except ValueError as e:
        typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from None
    for name in ("caption_train", "instruct_train", "instruct_val", "instruct_test"):
        typer.echo(f"{name:<15} {getattr(paths, name)}")
    typer.echo(f"{'images':<15} {paths.image_root}")
