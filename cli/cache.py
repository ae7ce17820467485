"""`kd cache build|info|verify|check|publish`.

Each command imports its implementation when it runs, not at import: `kd --help` stays fast (no torch).
"""

from __future__ import annotations

import json
import logging
from typing import Optional

import typer

from kd_cache.build_config import BuildConfig
from kd_cli.config import config_command, reported

app = typer.Typer(help="Build, describe, verify and publish teacher caches.", no_args_is_help=True)


@app.command()
@config_command(BuildConfig)
def build(cfg: BuildConfig) -> None:
    """Run the teacher once over a dataset and write a cache. Rerun the same command to resume after a crash;
    run it under `torchrun`/`accelerate launch` to split the work across processes."""
    from kd_cache.backends import end_process
    from kd_cache.build import build as run_build
    from kd_cache.format import Manifest

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    with reported():
        manifest = run_build(cfg)
    if manifest is not None:
        m = Manifest.parse(manifest, cfg.out)
        skipped = f": {json.dumps(m.skipped_by_reason)}" if m.skipped_total else ""
        typer.echo(f"cache complete: {m.num_samples} samples in {len(m.shards)} shards at {cfg.out} "
                   f"({m.skipped_total} skipped{skipped})")
    end_process(cfg.backend)  # the backend's own exit rule (vLLM: skip the interpreter teardown)


@app.command()
def info(path: str = typer.Argument(..., help="Cache folder or URL."),
         as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """Samples, rows, bytes per text row / visual row / Gram, shards and skipped samples by reason."""
    from kd_cache.verify import format_info, info as cache_info

    with reported():
        d = cache_info(path)
    typer.echo(json.dumps(d, indent=1) if as_json else format_info(d))


@app.command()
def verify(path: str = typer.Argument(..., help="Cache folder or URL."),
           no_checksums: bool = typer.Option(False, "--no-checksums", help="Skip sha256 (faster on remote caches).")) -> None:
    """Check checksums, schema, row counts and versions. Exits 1 naming every problem found."""
    from kd_cache.verify import verify as cache_verify

    with reported():
        problems = cache_verify(path, checksums=not no_checksums)
    if problems:
        for p in problems:
            typer.secho(f"FAIL {p}", fg=typer.colors.RED, err=True)
        raise typer.Exit(1)
    typer.echo(f"OK {path}")


@app.command()
def check(path: str = typer.Argument(..., help="Cache folder or URL."),
          student: str = typer.Option(..., help="Student model folder or hub id.")) -> None:
    """Whether a student can train on a cache (tokenizer, vocabulary, chat template, visual tokens per image),
    without training. Exits 1 naming every difference."""
    from transformers import AutoConfig

    from kd_cache import open_cache
    from kd_cache.hf import load_processor_and_config
    from kd_train.compat import check_compatibility

    with reported():
        cache = open_cache(path)
        _, processor, _ = load_processor_and_config(student)
        problems = check_compatibility(cache, processor, AutoConfig.from_pretrained(student))
    if problems:
        for p in problems:
            typer.secho(f"INCOMPATIBLE {p}", fg=typer.colors.RED, err=True)
        raise typer.Exit(1)
    typer.echo(f"OK {student} can train on {path}")


@app.command()
def publish(path: str = typer.Argument(..., help="Complete cache folder."),
            repo: str = typer.Option(..., help="Hugging Face dataset repo, ORG/NAME (created if missing)."),
            revision: Optional[str] = typer.Option(None, help="Branch to commit to (created if missing). [default: main]"),
            private: bool = typer.Option(False, "--private", help="Create the repo private."),
            token: Optional[str] = typer.Option(None, help="Hub token. [default: HF_TOKEN or `hf auth login`]"),
            no_checksums: bool = typer.Option(False, "--no-checksums", help="Verify without sha256 first (faster).")) -> None:
    """Verify a cache, then upload it with its dataset card to a Hugging Face dataset repo in one commit.
    Refuses (exit 1, naming every problem) an incomplete or damaged cache."""
    from kd_cache.publish import NotPublishable, publish as run_publish

    with reported():
        try:
            done = run_publish(path, repo, revision=revision, private=private, token=token,
                               checksums=not no_checksums)
        except NotPublishable as e:  # a ValueError: reported here, with every problem
            typer.secho(f"error: refusing to publish {path}:", fg=typer.colors.RED, err=True)
            for p in e.problems:
                typer.secho(f"FAIL {p}", fg=typer.colors.RED, err=True)
            raise typer.Exit(1) from None
    where = f"{done.repo}@{done.revision}" if done.revision else done.repo
    typer.echo(f"published {done.shards} shards to hf://datasets/{where}" + (f" ({done.commit_url})" if done.commit_url else ""))
