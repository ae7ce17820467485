"""`kd eval`: exact-match accuracy of one model on LLaVA-format QA data."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional

import typer


def eval_command(
    model: str = typer.Option(..., help="Model to evaluate: an HF folder/id (teacher, baseline or distilled student)."),
    data: str = typer.Option(..., help="LLaVA-format .json/.jsonl/.parquet file or a saved `datasets` folder; "
                                       "the last gpt turn of each record is the reference answer."),
    images: Optional[str] = typer.Option(None, help="Root folder that image paths in the data are relative to."),
    out: Optional[str] = typer.Option(None, help="write JSON results here"),
    batch_size: int = typer.Option(8, help="Prompts per generate call (left-padded)."),
    max_new_tokens: int = typer.Option(32, help="Longest answer generated."),
    limit: Optional[int] = typer.Option(None, help="Evaluate only the first N records."),
    device: Optional[str] = typer.Option(None, help="cpu, cuda, cuda:N. [default: GPU if available, else CPU]"),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar."),
) -> None:
    """Greedy-decode each record's answer and print accuracy per question type after answer normalisation.
    Evaluate several models into --out files and compare them with `kd_eval.evaluate.format_table`."""
    from kd_eval.evaluate import evaluate, format_table

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        result = evaluate(model, data, images, batch_size=batch_size, max_new_tokens=max_new_tokens, device=device,
                          limit=limit, progress=not quiet)
    except (ValueError, FileNotFoundError) as e:
        typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from None
    typer.echo(format_table([result]))
    if result["skipped"]["total"]:
        typer.echo(f"skipped by reason: {json.dumps(result['skipped']['by_reason'])}")
    if out is not None:
        path = Path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        typer.echo(f"results written to {path}")
