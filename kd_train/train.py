"""`kd train`: one stage (DPT, SFT, DFT) or a recipe of stages, on accelerate, streaming the teacher cache.

No teacher is ever loaded here: KD targets come from the cache. Each optimizer step first collects its
micro-batches, all-reduces their target-row counts, and normalises every loss term by the step-wide count, so
the gradient is the per-row mean over the global batch whatever the accumulation and the number of ranks.
"""

from __future__ import annotations

import dataclasses
import logging
import os

from kd_cache.config import to_dict
from kd_cache.files import save_json
from kd_cache.paths import check_input_path, check_model_path, check_writable_folder
from kd_cache.remote import is_remote
from kd_train.config import TrainConfig
from kd_train.engine import StageRunner
from kd_train.stages import PRESETS, StagePreset, recipe_stages
from kd_train.stream import ensure_nonempty

__all__ = ["TrainConfig", "run", "preflight", "train_stage"]

log = logging.getLogger("kd_train")


def run(cfg: TrainConfig) -> list[str]:
    """Run the configured stage or recipe; returns the output folders (one per stage, in order)."""
    preflight(cfg)
    if cfg.stage is not None:
        return [train_stage(cfg, PRESETS[cfg.stage], cfg.student, cfg.out)]
    outs, student = [], cfg.student
    if int(os.environ.get("RANK", "0")) == 0:  # each stage saves its own; this is the command as resolved
        os.makedirs(cfg.out, exist_ok=True)
        save_json(os.path.join(cfg.out, "train_config.json"), {"recipe": cfg.recipe, "config": to_dict(cfg)})
    for preset in recipe_stages(cfg.recipe):
        out = os.path.join(cfg.out, preset.name)
        student = train_stage(_recipe_stage_config(cfg, preset, student, out), preset, student, out)
        outs.append(student)
    return outs


def preflight(cfg: TrainConfig) -> None:
    """Everything about a run that can be wrong without a model, checked before any model is loaded (and before
    anything is written): the student folder, the output folder is writable, and for every stage still to run its
    data file and image folder exist and the cache it reads exists, is complete (manifest written) and holds
    samples. Raises FileNotFoundError / ValueError naming the stage and the path."""
    check_writable_folder(cfg.out)
    if cfg.stage is not None:
        stages = [(PRESETS[cfg.stage], cfg, cfg.out)]
    else:
        stages = [(p, _recipe_stage_config(cfg, p, cfg.student, os.path.join(cfg.out, p.name)),
                   os.path.join(cfg.out, p.name)) for p in recipe_stages(cfg.recipe)]
    todo = [(p, c) for p, c, out in stages if not os.path.exists(os.path.join(out, "final", "config.json"))]
    if todo and todo[0][0] is stages[0][0]:  # later stages start from the previous stage's output
        check_model_path(cfg.student, "student")
    if todo and cfg.online_teacher is not None:
        check_model_path(cfg.online_teacher, "online teacher")
    for preset, c in todo:
        where = f" (stage {preset.name})" if cfg.recipe is not None else ""
        if c.data is not None:
            check_input_path(c.data, f"data file{where}")
        if c.images is not None:
            check_input_path(c.images, f"image folder{where}", folder=True)
        if c.val_data is not None:
            check_input_path(c.val_data, f"val data file{where}")
        if c.val_images is not None:
            check_input_path(c.val_images, f"val image folder{where}", folder=True)
        loss = c.loss_config(preset)
        reads_cache = preset.uses_cache and any((loss.mdist_text_weight, loss.mdist_visual_weight, loss.rdist_weight))
        if reads_cache and c.online_teacher is None and c.cache is not None:
            _check_cache(c.cache, where)


def _recipe_stage_config(cfg: TrainConfig, preset: StagePreset, student: str, out: str) -> TrainConfig:
    """The configuration of one stage of a recipe: DPT reads the caption data and cache (dpt_*, default the main
    ones), SFT and DFT the main ones. Validation data is instruction data: scored in SFT and DFT, not in DPT."""
    dpt = preset.name == "dpt"
    return dataclasses.replace(
        cfg, recipe=None, stage=preset.name, student=student, out=out,
        data=(cfg.dpt_data or cfg.data) if dpt else (cfg.data or cfg.dpt_data),
        images=(cfg.dpt_images or cfg.images) if dpt else cfg.images,
        cache=(cfg.dpt_cache or cfg.cache) if dpt else cfg.cache,
        val_data=None if dpt else cfg.val_data, keep_best=False if dpt else cfg.keep_best,
    )


def _check_cache(cache: str, where: str = "") -> None:
    """The cache exists, is complete and holds samples (its manifest is read; no shard is)."""
    if not is_remote(cache):
        if not os.path.exists(cache):
            raise FileNotFoundError(f"cache{where} {cache} does not exist; build it with `kd cache build`")
        if not os.path.isdir(cache):
            raise ValueError(f"cache{where} {cache} is a file; give the cache folder (or URL)")
    ensure_nonempty(cache)  # FileNotFoundError while the manifest is missing (incomplete), ValueError when empty


def train_stage(cfg: TrainConfig, preset: StagePreset, student: str, out: str) -> str:
    """Train one stage from `student`; writes the HF-loadable student to `out/final` and returns that path."""
    final = os.path.join(out, "final")
    if os.path.exists(os.path.join(final, "config.json")):
        log.info("stage %s already finished at %s", preset.name, final)
        return final
    runner = StageRunner(cfg, preset, student, out)
    runner.fit()
    return final
