"""`kd student compose`."""

from __future__ import annotations

from typing import Optional

import typer

app = typer.Typer(help="Build students.", no_args_is_help=True)


@app.command()
def compose(
    out: str = typer.Option(..., help="Output folder (an HF LLaVA model + processor)."),
    vision: str = typer.Option(..., help="Vision tower source: the teacher (its tower is copied) or a SigLIP/CLIP checkpoint."),
    llm: str = typer.Option(..., help="Base causal LLM (Qwen2, Llama/SmolLM, ...): folder or hub id."),
    processor_from: Optional[str] = typer.Option(None, help="Take tokenizer + chat template from here (the teacher, so the student reads the cache's token ids)."),
    vision_feature_layer: int = typer.Option(-1, help="Vision layer fed to the projector (LLaVA-1.5 CLIP: -2)."),
    vision_feature_select_strategy: str = typer.Option("full", help="full (SigLIP) or default (drop CLIP's CLS)."),
    seed: int = typer.Option(0, help="Seed of the fresh projector."),
    dtype: str = typer.Option("float32", help="Weights dtype of the saved student."),
) -> None:
    """LLaVA-KD's student: vision encoder + fresh 2-layer GELU MLP projector + base LLM, saved as a
    transformers-native LlavaForConditionalGeneration that `kd train` and plain transformers load."""
    from kd_train.student import compose_student

    try:
        path = compose_student(out, vision=vision, llm=llm, processor_from=processor_from,
                               vision_feature_layer=vision_feature_layer,
                               vision_feature_select_strategy=vision_feature_select_strategy, seed=seed, dtype=dtype)
    except (ValueError, FileNotFoundError, OSError) as e:
        typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from None
    typer.echo(f"student written: {path}")
