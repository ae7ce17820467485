"""`kd cache build|info|verify|check|publish`."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
from collections.abc import Iterator
from typing import Optional

import typer

from kd_cli.config import resolve

app = typer.Typer(help="Build, describe, verify and publish teacher caches.", no_args_is_help=True)


@contextlib.contextmanager
def reported() -> Iterator[None]:
    """One `error: ...` line instead of a traceback: exit 2 for what the arguments ask (ValueError), exit 1 when
    the storage says no (kd_cache.errors.storage_errors: permissions, missing files, credentials, the hub...)."""
    from kd_cache.errors import describe, storage_errors

    try:
        yield
    except ValueError as e:
        typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from None
    except storage_errors() as e:
        typer.secho(f"error: {describe(e)}", fg=typer.colors.RED, err=True)
        raise typer.Exit(1) from None


@app.command()
def build(
    teacher: Optional[str] = typer.Option(None, help="Teacher model: local folder or hub id."),
    data: Optional[str] = typer.Option(None, help="LLaVA-format .json/.jsonl/.parquet file or a saved `datasets` folder."),
    images: Optional[str] = typer.Option(None, help="Root folder that image paths in the data are relative to."),
    out: Optional[str] = typer.Option(None, help="Output cache folder or URL (s3://, gs://, hf://...): new, or a partial build of the same config to resume."),
    staging: Optional[str] = typer.Option(None, help="With a URL --out: local folder the build is staged in before each shard is uploaded. [default: ~/.cache/kd/staging/<from the URL>]"),
    top_k: Optional[int] = typer.Option(None, "--top-k", help="Top-k ids kept per response row. [default: 64]"),
    visual_top_k: Optional[int] = typer.Option(None, "--visual-top-k", help="Top-k ids kept per visual row. [default: 64]"),
    batch_size: Optional[int] = typer.Option(None, help="Samples per teacher forward. [default: 8]"),
    max_length: Optional[int] = typer.Option(None, help="Max tokens per sample; responses are truncated, visual tokens never. [default: 4096]"),
    max_images: Optional[int] = typer.Option(None, help="Max images per sample (default: 1 for LLaVA-1.5, else unlimited)."),
    shard_size: Optional[int] = typer.Option(None, help="Samples per Parquet shard. [default: 1024]"),
    device: Optional[str] = typer.Option(None, help="cpu, cuda, cuda:N. [default: this rank's GPU, else CPU]"),
    dtype: Optional[str] = typer.Option(None, help="auto (bf16/fp16 on GPU, fp32 on CPU), float32, bfloat16, float16."),
    num_workers: Optional[int] = typer.Option(None, help="DataLoader workers preparing samples. [default: 0]"),
    targets: Optional[str] = typer.Option(None, help="topk (k ids per row) or sampled (random-sampling KD). [default: topk]"),
    samples: Optional[int] = typer.Option(None, help="sampled targets: draws per row (<= 255). [default: 50]"),
    no_gram: Optional[bool] = typer.Option(None, "--no-gram", help="Do not store the visual Gram matrix (RDist target)."),
    gram_encoding: Optional[str] = typer.Option(None, help="lowrank (int8 eigenpairs, rank per sample) or dense. [default: lowrank]"),
    gram_tolerance: Optional[float] = typer.Option(None, help="Max 1 - cos of the stored Gram, raw and row-centred. [default: 1e-4]"),
    seed: Optional[int] = typer.Option(None, help="Seed of sampled targets. [default: 0]"),
    revision: Optional[str] = typer.Option(None, help="Hub revision of the teacher."),
    trust_remote_code: Optional[bool] = typer.Option(None, "--trust-remote-code", help="Allow the teacher's own code from the hub."),
    backend: Optional[str] = typer.Option(None, "--backend", help="Teacher runtime: transformers, or vllm (the vllm extra; see docs/scaling.md). [default: transformers]"),
    config: Optional[str] = typer.Option(None, "--config", help="YAML/JSON file of the same fields; flags override it."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar."),
) -> None:
    """Run the teacher once over a dataset and write a cache. Rerun the same command to resume after a crash;
    run it under `torchrun`/`accelerate launch` to split the work across processes."""
    from kd_cache.build import BuildConfig, build as run_build

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    flags = dict(teacher=teacher, data=data, images=images, out=out, top_k=top_k, visual_top_k=visual_top_k,
                 batch_size=batch_size, max_length=max_length, max_images=max_images, shard_size=shard_size,
                 device=device, dtype=dtype, num_workers=num_workers, revision=revision,
                 trust_remote_code=trust_remote_code, backend=backend, gram=False if no_gram else None, staging=staging,
                 progress=False if quiet else None)
    with reported():
        cfg = resolve(BuildConfig, config, flags)
        manifest = run_build(cfg)
    if manifest is not None:
        sk = manifest["skipped"]
        typer.echo(f"cache complete: {manifest['num_samples']} samples in {len(manifest['shards'])} shards at {cfg.out}"
                   f" ({sk['total']} skipped{': ' + json.dumps(sk['by_reason']) if sk['total'] else ''})")
    if cfg.backend == "vllm":
        # Everything is written and the engine is shut down (build() closes it). Skip interpreter teardown, where a
        # native thread vLLM left behind can abort the process, so the exit status says what happened to the cache.
        sys.stdout.flush()
        sys.stderr.flush()
        logging.shutdown()
        os._exit(0)


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
    from kd_cache.teacher import load_processor_and_config
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
