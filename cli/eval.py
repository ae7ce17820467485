"""`kd eval`: exact-match accuracy of one model on LLaVA-format QA data.

Each command imports its implementation when it runs, not at import: `kd --help` stays fast (no torch).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import typer

from kd_cache.config import to_dict
from kd_cli.config import config_command, reported
from kd_eval.config import EvalConfig


@config_command(EvalConfig)
def eval_command(cfg: EvalConfig) -> None:
    """Greedy-decode each record's answer and print accuracy per question type after answer normalisation.
    Evaluate several models into --out files and compare them with `kd_eval.evaluate.format_table`.
    `--backend vllm` generates with a vLLM engine on the folder (batched; the same prompts, greedy decoding and
    scoring)."""
    from kd_eval.evaluate import evaluate, format_table

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    with reported():
        result = evaluate(cfg.model, cfg.data, cfg.images, batch_size=cfg.batch_size,
                          max_new_tokens=cfg.max_new_tokens, device=cfg.device, limit=cfg.limit,
                          progress=cfg.progress, dtype=cfg.dtype, backend=cfg.backend)
    typer.echo(format_table([result]))
    if result["skipped"]["total"]:
        typer.echo(f"skipped by reason: {json.dumps(result['skipped']['by_reason'])}")
    if cfg.out is not None:
        path = Path(cfg.out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({**result, "config": to_dict(cfg)}, indent=1, ensure_ascii=False) + "\n",
                        encoding="utf-8")
        typer.echo(f"results written to {path}")
    if cfg.backend == "vllm":
        from kd_cache.backends import end_process

        end_process(cfg.backend)  # vLLM can leave a native thread that aborts the interpreter's teardown
