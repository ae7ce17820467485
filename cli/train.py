"""`kd train`."""

from __future__ import annotations

import logging
from typing import Optional

import typer

from kd_cli.config import resolve


def train(
    student: Optional[str] = typer.Option(None, help="Student: an HF multimodal model folder/id (e.g. from `kd student compose`)."),
    out: Optional[str] = typer.Option(None, help="Output folder; each stage writes <out>/final (a recipe: <out>/<stage>/final)."),
    stage: Optional[str] = typer.Option(None, help="One stage: dpt, sft or dft."),
    recipe: Optional[str] = typer.Option(None, help="llava-kd (DPT -> SFT -> DFT) or baseline (the same stages, CE only)."),
    cache: Optional[str] = typer.Option(None, help="Teacher cache folder or URL (DPT/DFT)."),
    data: Optional[str] = typer.Option(None, help="LLaVA-format data the cache was built from (SFT: the training data)."),
    images: Optional[str] = typer.Option(None, help="Image root folder of the data."),
    dpt_cache: Optional[str] = typer.Option(None, help="Recipe only: the caption-data cache for DPT [default: --cache]."),
    dpt_data: Optional[str] = typer.Option(None, help="Recipe only: caption data for DPT [default: --data]."),
    dpt_images: Optional[str] = typer.Option(None, help="Recipe only: image root of the DPT data [default: --images]."),
    lr: Optional[float] = typer.Option(None, help="Learning rate [default: 1e-3 DPT, 2e-5 SFT/DFT]."),
    train_vision: Optional[bool] = typer.Option(None, "--train-vision/--freeze-vision", help="Override the stage: train or freeze the vision tower."),
    train_projector: Optional[bool] = typer.Option(None, "--train-projector/--freeze-projector", help="Override the stage: train or freeze the projector."),
    train_llm: Optional[bool] = typer.Option(None, "--train-llm/--freeze-llm", help="Override the stage: train or freeze the LLM."),
    epochs: Optional[int] = typer.Option(None, help="Epochs per stage. [default: 1]"),
    max_steps: Optional[int] = typer.Option(None, help="Stop each stage after this many optimizer steps."),
    batch_size: Optional[int] = typer.Option(None, help="Micro-batch size per process. [default: 4]"),
    grad_accum: Optional[int] = typer.Option(None, help="Micro-batches per optimizer step. [default: 1]"),
    warmup_ratio: Optional[float] = typer.Option(None, help="Warmup fraction of the cosine schedule. [default: 0.03]"),
    weight_decay: Optional[float] = typer.Option(None, help="AdamW weight decay. [default: 0]"),
    ce_weight: Optional[float] = typer.Option(None, help="Weight of CE [default: 1]."),
    mdist_text_weight: Optional[float] = typer.Option(None, help="Weight of MDist on response rows [default: 1 in DPT/DFT]."),
    mdist_visual_weight: Optional[float] = typer.Option(None, help="Weight of MDist on visual rows [default: 1 in DPT/DFT]."),
    rdist_weight: Optional[float] = typer.Option(None, help="Weight of RDist [default: 1 in DPT/DFT]."),
    kind: Optional[str] = typer.Option(None, help="MDist divergence: forward_kl, reverse_kl, jsd. [default: forward_kl]"),
    temperature: Optional[float] = typer.Option(None, help="MDist temperature (loss x T^2). [default: 1]"),
    no_tail: Optional[bool] = typer.Option(None, "--no-tail", help="Drop the tail bucket and renormalise over the top-k."),
    jsd_beta: Optional[float] = typer.Option(None, help="JSD beta. [default: 0.5]"),
    max_length: Optional[int] = typer.Option(None, help="SFT truncation (KD stages use the cache's). [default: 4096]"),
    seed: Optional[int] = typer.Option(None, help="Seed for init, shuffling and order. [default: 0]"),
    shuffle_buffer: Optional[int] = typer.Option(None, help="Samples in the streaming shuffle buffer. [default: 256]"),
    num_workers: Optional[int] = typer.Option(None, help="DataLoader workers per process. [default: 0]"),
    checkpoint_every: Optional[int] = typer.Option(None, help="Checkpoint every N steps (0: none). Reruns resume. [default: 0]"),
    mixed_precision: Optional[str] = typer.Option(None, help="auto (bf16 on GPU), no, bf16, fp16."),
    trackers: Optional[str] = typer.Option(None, help="Comma list: jsonl, tensorboard. [default: jsonl]"),
    skip_corrupt_shards: Optional[bool] = typer.Option(None, "--skip-corrupt-shards", help="Skip (and count) unreadable shards instead of stopping."),
    skip_missing_images: Optional[bool] = typer.Option(None, "--skip-missing-images", help="Skip (and count) cached samples whose image is gone."),
    online_teacher: Optional[str] = typer.Option(None, help="Reference mode: run this teacher every step instead of reading a cache."),
    online_top_k: Optional[int] = typer.Option(None, help="Online mode: top-k per response row, 0 = full vocabulary. [default: 64]"),
    online_visual_top_k: Optional[int] = typer.Option(None, help="Online mode: top-k per visual row, 0 = full vocabulary. [default: 64]"),
    config: Optional[str] = typer.Option(None, "--config", help="YAML/JSON file of the same fields; flags override it."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar."),
) -> None:
    """Train a student from a teacher cache through LLaVA-KD's stages; no teacher is loaded. Run under
    `accelerate launch` for several processes/GPUs (DDP, FSDP or DeepSpeed through an accelerate config)."""
    from kd_train.stream import CorruptShardError, MissingImageError
    from kd_train.train import TrainConfig, run

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    flags = dict(student=student, out=out, stage=stage, recipe=recipe, cache=cache, data=data, images=images,
                 dpt_cache=dpt_cache, dpt_data=dpt_data, dpt_images=dpt_images, lr=lr, epochs=epochs,
                 train_vision=train_vision, train_projector=train_projector, train_llm=train_llm,
                 max_steps=max_steps, batch_size=batch_size, grad_accum=grad_accum, warmup_ratio=warmup_ratio,
                 weight_decay=weight_decay, ce_weight=ce_weight, mdist_text_weight=mdist_text_weight,
                 mdist_visual_weight=mdist_visual_weight, rdist_weight=rdist_weight, kind=kind,
                 temperature=temperature, use_tail=False if no_tail else None, jsd_beta=jsd_beta,
                 max_length=max_length, seed=seed, shuffle_buffer=shuffle_buffer, num_workers=num_workers,
                 checkpoint_every=checkpoint_every, mixed_precision=mixed_precision, trackers=trackers,
                 skip_corrupt_shards=skip_corrupt_shards, skip_missing_images=skip_missing_images,
                 online_teacher=online_teacher, online_top_k=online_top_k, online_visual_top_k=online_visual_top_k,
                 progress=False if quiet else None)
    try:
        cfg = resolve(TrainConfig, config, flags)
        outs = run(cfg)
    except (ValueError, FileNotFoundError, CorruptShardError, MissingImageError) as e:
        typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from None
    for o in outs:
        typer.echo(f"student written: {o}")
