"""The stage plan: every setting of a stage worked out once, before any model loads.

`plan_stage(config, preset, manifest)` is a pure function of the stage's configuration, its preset and the manifest
of the cache it reads: the loss fitted to that cache, what trains, the learning rate, where the data comes from,
how the student must encode conversations (`max_length`, `append_eos`). `kd train`'s preflight plans every stage
of a recipe before the first one starts, so a flag that a later stage's cache cannot serve is refused up front, not
after hours of the earlier stages; `StageRunner` (kd_train/engine.py) consumes the plan and re-derives nothing.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from kd_cache.format import Manifest
from kd_train.config import TrainConfig, loss_chunk_size_for
from kd_train.stages import PRESETS, StagePreset, recipe_stages

if TYPE_CHECKING:
    from kd_train.losses import KDLossConfig

SOURCES = ("cache", "online", "records")


@dataclass(frozen=True)
class StagePlan:
    """One stage, fully resolved."""

    preset: StagePreset
    config: TrainConfig  # the stage's own configuration (a recipe's stage: its data, images, cache, student, out)
    loss: "KDLossConfig"  # fitted to the cache (kd_train.compat.fit_loss_to_cache)
    notes: tuple[str, ...]  # what fitting turned off or does not apply, logged once when the stage starts
    train_vision: bool
    train_projector: bool
    train_llm: bool
    lr: float
    source: str  # "cache": distils from the cache; "online": from a teacher run every step; "records": CE only
    max_length: int | None  # how the student encodes: the cache's rule when it reads one
    append_eos: bool
    manifest: Manifest | None  # the cache's, when source == "cache"
    cross_tokenizer: str = "off"  # "uld" / "hybrid": the student's tokenizer differs from the teacher's
    chunk_size: int = 0  # rows per chunk of the loss (0: none; off across tokenizers: a group spans rows)

    @property
    def name(self) -> str:
        return self.preset.name

    @property
    def student(self) -> str:
        return self.config.student

    @property
    def out(self) -> str:
        return self.config.out

    @property
    def final(self) -> str:
        """Where the stage writes its student."""
        return os.path.join(self.config.out, "final")

    @property
    def done(self) -> bool:
        return os.path.exists(os.path.join(self.final, "config.json"))


def distils(config: TrainConfig, preset: StagePreset) -> bool:
    """Whether the stage has a KD term at all (a stage that distils reads a cache or runs the online teacher)."""
    loss = config.loss_config(preset)
    return preset.uses_cache and any((loss.mdist_text_weight, loss.mdist_visual_weight, loss.rdist_weight))


def cache_append_eos(manifest: Manifest, asked: bool | None) -> bool:
    """The EOS rule the cache was built with; the student must re-encode with it, or its ids stop matching the
    cached input_ids."""
    if asked is not None and asked != manifest.append_eos:
        raise ValueError(f"append_eos={asked} but the cache was built with append_eos={manifest.append_eos}; the "
                         "student must encode conversations as the cache did (leave append_eos unset to follow "
                         "the cache)")
    return manifest.append_eos


def plan_stage(config: TrainConfig, preset: StagePreset, manifest: Manifest | None) -> StagePlan:
    """The plan of one stage. `manifest`: the manifest of `config.cache` when the stage distils from it (else None).
    Raises ValueError when the flags ask for something the cache cannot serve."""
    from kd_train.compat import fit_loss_to_cache  # deferred: compat imports PIL and the student module

    loss = config.loss_config(preset)
    notes: list[str] = []
    if not distils(config, preset):
        source = "records"
    elif config.online_teacher is not None:
        source = "online"
    else:
        source = "cache"
    max_length = config.max_length
    append_eos = config.append_eos if config.append_eos is not None else True
    if source == "cache":
        if manifest is None:
            raise ValueError(f"stage {preset.name} distils from a cache; pass cache (a folder or URL)")
        loss, fitted = fit_loss_to_cache(loss, config, manifest)
        notes += fitted
        if config.cross_tokenizer != "off":
            loss, max_length, append_eos = _fit_cross_tokenizer(config, manifest, loss, notes)
        else:
            max_length = manifest.max_length
            append_eos = cache_append_eos(manifest, config.append_eos)
    else:
        manifest = None
    return StagePlan(
        preset=preset, config=config, loss=loss, notes=tuple(notes),
        train_vision=config.setting(preset, "train_vision"),
        train_projector=config.setting(preset, "train_projector"),
        train_llm=config.setting(preset, "train_llm"), lr=config.setting(preset, "lr"),
        source=source, max_length=max_length, append_eos=append_eos, manifest=manifest,
        cross_tokenizer=config.cross_tokenizer if source == "cache" else "off",
        chunk_size=0 if source == "cache" and config.cross_tokenizer != "off"
        else loss_chunk_size_for(config.loss_chunk_size, _cuda()),
    )


def _cuda() -> bool:
    """Whether the stage trains on a GPU (the engine's accelerator takes one whenever torch sees one)."""
    import torch

    return torch.cuda.is_available()


def _fit_cross_tokenizer(config: TrainConfig, manifest: Manifest, loss, notes: list[str]):
    """(loss, max_length, append_eos) of a stage whose student has another tokenizer than the cache's teacher; the
    student encodes with its own rules (the cache's max_length counts teacher tokens)."""
    if manifest.text.kind != "topk":
        raise ValueError(f"cross_tokenizer={config.cross_tokenizer} reads top-k response rows; this cache's hold "
                         f"{manifest.text.kind} targets (rebuild it with --targets topk)")
    if not manifest.self_contained and config.teacher_tokenizer is None:
        raise ValueError(f"cross_tokenizer={config.cross_tokenizer} needs the teacher's tokenizer, which this cache "
                         f"(format v{manifest.version}) does not carry: pass teacher_tokenizer (its folder)")
    if config.temperature != 1.0:
        raise ValueError(f"temperature={config.temperature}: the cross-tokenizer losses compare the teacher's cached "
                         "distribution at T = 1 (leave it at 1)")
    if loss.mdist_visual_weight:
        notes.append("the visual rows' MDist is off across tokenizers (the cached visual-row targets are "
                     "distributions over the teacher's vocabulary); RDist (Gram matrices) still applies")
        loss = dataclasses.replace(loss, mdist_visual_weight=0.0)
    if config.loss_chunk_size != 0:
        notes.append("the loss is not row-chunked across tokenizers (a group of tokens spans several rows)")
    return loss, config.max_length, config.append_eos if config.append_eos is not None else True


def stage_configs(config: TrainConfig) -> list[tuple[StagePreset, TrainConfig]]:
    """(preset, the stage's configuration) for every stage the command runs, in order. A recipe's stages write
    <out>/<stage>; each later stage starts from the previous stage's <out>/<stage>/final. DPT reads the caption data
    and cache (dpt_*, default the main ones), SFT and DFT the main ones. Validation data is instruction data:
    scored in SFT and DFT, not in DPT."""
    if config.stage is not None:
        return [(PRESETS[config.stage], config)]
    out, student = [], config.student
    for preset in recipe_stages(config.recipe):
        dpt = preset.name == "dpt"
        stage_out = os.path.join(config.out, preset.name)
        out.append((preset, _derived(
            config, recipe=None, stage=preset.name, student=student, out=stage_out,
            data=(config.dpt_data or config.data) if dpt else (config.data or config.dpt_data),
            images=(config.dpt_images or config.images) if dpt else config.images,
            cache=(config.dpt_cache or config.cache) if dpt else config.cache,
            val_data=None if dpt else config.val_data, keep_best=False if dpt else config.keep_best,
        )))
        student = os.path.join(stage_out, "final")
    return out


def _derived(config: TrainConfig, **changes) -> TrainConfig:
    """A recipe stage's configuration: the validated recipe configuration with the stage's fields. Not validated
    again as if the user had typed it: the baseline's DPT reads no cache, although a user's `--stage dpt` must."""
    stage = copy.copy(config)
    for name, value in changes.items():
        setattr(stage, name, value)
    return stage
