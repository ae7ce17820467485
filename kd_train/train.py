"""`kd train`: one stage (DPT, SFT, DFT) or a recipe of stages, on accelerate, streaming the teacher cache.

No teacher is ever loaded here: KD targets come from the cache. Each optimizer step first collects its
micro-batches, all-reduces their target-row counts, and normalises every loss term by the step-wide count, so
the gradient is the per-row mean over the global batch whatever the accumulation and the number of ranks.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass
from typing import Any

import torch

from kd_train.losses import KDLossConfig
from kd_train.stages import PRESETS, RECIPES, STAGES, StagePreset, recipe_stages

log = logging.getLogger("kd_train")

CHECKPOINT_DIR = "checkpoints"
STATE_NAME = "trainer_state.json"


@dataclass
class TrainConfig:
    """Configuration of `kd train`. Unset (None) loss weights and lr take the stage's preset."""

    student: str
    out: str
    data: str | None = None
    images: str | None = None
    cache: str | None = None
    stage: str | None = None
    recipe: str | None = None
    # DPT reads caption data; a recipe uses these for its DPT stage (default: the same as data/cache/images)
    dpt_data: str | None = None
    dpt_images: str | None = None
    dpt_cache: str | None = None
    lr: float | None = None
    # override which parts a stage trains (None: the stage's preset); e.g. a teacher trained from scratch
    train_vision: bool | None = None
    train_projector: bool | None = None
    train_llm: bool | None = None
    epochs: int = 1
    max_steps: int | None = None
    batch_size: int = 4
    grad_accum: int = 1
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    ce_weight: float | None = None
    mdist_text_weight: float | None = None
    mdist_visual_weight: float | None = None
    rdist_weight: float | None = None
    kind: str = "forward_kl"
    temperature: float = 1.0
    use_tail: bool = True
    jsd_beta: float = 0.5
    max_length: int | None = 4096
    seed: int = 0
    shuffle_buffer: int = 256
    num_workers: int = 0
    checkpoint_every: int = 0
    keep_checkpoints: int = 2
    log_every: int = 1
    mixed_precision: str = "auto"
    trackers: str = "jsonl"
    skip_corrupt_shards: bool = False
    skip_missing_images: bool = False
    # reference mode: run this teacher every step instead of reading a cache (the paper's online way)
    online_teacher: str | None = None
    online_top_k: int = 64  # 0: the full vocabulary (exact dense KL)
    online_visual_top_k: int = 64
    progress: bool = True

    def __post_init__(self) -> None:
        if (self.stage is None) == (self.recipe is None):
            raise ValueError(f"give exactly one of stage ({', '.join(STAGES)}) or recipe ({', '.join(RECIPES)}), "
                             f"got stage={self.stage!r} recipe={self.recipe!r}")
        if self.stage is not None and self.stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {self.stage!r}")
        if self.recipe is not None and self.recipe not in RECIPES:
            raise ValueError(f"recipe must be one of {RECIPES}, got {self.recipe!r}")
        for name in ("epochs", "batch_size", "grad_accum", "log_every", "keep_checkpoints"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        for name in ("checkpoint_every", "num_workers", "shuffle_buffer"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {v!r}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1 or None, got {self.max_steps!r}")
        if self.lr is not None and not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr!r}")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio!r}")
        if self.mixed_precision not in ("auto", "no", "bf16", "fp16"):
            raise ValueError(f"mixed_precision must be auto, no, bf16 or fp16, got {self.mixed_precision!r}")
        unknown = set(self.tracker_list()) - {"jsonl", "tensorboard"}
        if unknown:
            raise ValueError(f"trackers must be a comma list of jsonl, tensorboard; got {sorted(unknown)}")
        if "tensorboard" in self.tracker_list():
            import importlib.util

            if importlib.util.find_spec("tensorboard") is None and importlib.util.find_spec("tensorboardX") is None:
                raise ValueError("trackers includes tensorboard, got neither tensorboard nor tensorboardX installed "
                                 "(pip install tensorboard)")
        if self.data is None and self.dpt_data is None:
            raise ValueError("data is required: the LLaVA-format file the cache was built from (or SFT data)")
        for name in ("online_top_k", "online_visual_top_k"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} must be an integer >= 0 (0: full vocabulary), got {v!r}")
        if self.online_teacher is not None:
            if self.cache is not None or self.dpt_cache is not None:
                raise ValueError("give either a cache or online_teacher (the online reference), got both")
        elif self.stage in ("dpt", "dft") and self.cache is None:
            raise ValueError(f"stage {self.stage} distils from a cache; pass cache (a folder or URL)")
        if self.recipe == "llava-kd" and self.cache is None and self.dpt_cache is None and self.online_teacher is None:
            raise ValueError("recipe llava-kd needs cache (and optionally dpt_cache for caption data)")
        self.loss_config(PRESETS[self.stage or "dft"])  # validates kind/temperature/weights early

    def tracker_list(self) -> list[str]:
        return [t.strip() for t in self.trackers.split(",") if t.strip()]

    def loss_config(self, preset: StagePreset) -> KDLossConfig:
        pick = lambda name: getattr(preset, name) if getattr(self, name) is None else getattr(self, name)  # noqa: E731
        return KDLossConfig(ce_weight=pick("ce_weight"), mdist_text_weight=pick("mdist_text_weight"),
                            mdist_visual_weight=pick("mdist_visual_weight"), rdist_weight=pick("rdist_weight"),
                            kind=self.kind, temperature=self.temperature, use_tail=self.use_tail,
                            jsd_beta=self.jsd_beta)


def run(cfg: TrainConfig) -> list[str]:
    """Run the configured stage or recipe; returns the output folders (one per stage, in order)."""
    preflight(cfg)
    if cfg.stage is not None:
        return [train_stage(cfg, PRESETS[cfg.stage], cfg.student, cfg.out)]
    outs, student = [], cfg.student
    for preset in recipe_stages(cfg.recipe):
        out = os.path.join(cfg.out, preset.name)
        dpt = preset.name == "dpt"
        stage_cfg = dataclasses.replace(
            cfg, recipe=None, stage=preset.name, student=student, out=out,
            data=(cfg.dpt_data or cfg.data) if dpt else (cfg.data or cfg.dpt_data),
            images=(cfg.dpt_images or cfg.images) if dpt else cfg.images,
            cache=(cfg.dpt_cache or cfg.cache) if dpt else cfg.cache,
        )
        student = train_stage(stage_cfg, preset, student, out)
        outs.append(student)
    return outs


def preflight(cfg: TrainConfig) -> None:
    """Everything about a run that can be wrong without a model, checked before any model is loaded (and before
    anything is written): the student folder, the output folder is writable, and for every stage still to run its
    data file and image folder exist and the cache it reads exists, is complete (manifest written) and holds
    samples. Raises FileNotFoundError / ValueError naming the stage and the path."""
    from kd_cache.paths import check_input_path, check_model_path, check_writable_folder

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
        loss = c.loss_config(preset)
        reads_cache = preset.uses_cache and any((loss.mdist_text_weight, loss.mdist_visual_weight, loss.rdist_weight))
        if reads_cache and c.online_teacher is None and c.cache is not None:
            _check_cache(c.cache, where)


def _recipe_stage_config(cfg: TrainConfig, preset: StagePreset, student: str, out: str) -> TrainConfig:
    """The configuration of one stage of a recipe: DPT reads the caption data and cache (dpt_*, default the main
    ones), SFT and DFT the main ones."""
    dpt = preset.name == "dpt"
    return dataclasses.replace(
        cfg, recipe=None, stage=preset.name, student=student, out=out,
        data=(cfg.dpt_data or cfg.data) if dpt else (cfg.data or cfg.dpt_data),
        images=(cfg.dpt_images or cfg.images) if dpt else cfg.images,
        cache=(cfg.dpt_cache or cfg.cache) if dpt else cfg.cache,
    )


def _check_cache(cache: str, where: str = "") -> None:
    """The cache exists, is complete and holds samples (its manifest is read; no shard is)."""
    from kd_cache.remote import is_remote
    from kd_train.stream import ensure_nonempty

    if not is_remote(cache):
        if not os.path.exists(cache):
            raise FileNotFoundError(f"cache{where} {cache} does not exist; build it with `kd cache build`")
        if not os.path.isdir(cache):
            raise ValueError(f"cache{where} {cache} is a file; give the cache folder (or URL)")
    ensure_nonempty(cache)  # FileNotFoundError while the manifest is missing (incomplete), ValueError when empty


def train_stage(cfg: TrainConfig, preset: StagePreset, student: str, out: str) -> str:
    """Train one stage from `student`; writes the HF-loadable student to `out/final` and returns that path."""
    from kd_train.engine import StageRunner

    final = os.path.join(out, "final")
    if os.path.exists(os.path.join(final, "config.json")):
        log.info("stage %s already finished at %s", preset.name, final)
        return final
    runner = StageRunner(cfg, preset, student, out)
    runner.fit()
    return final


def save_json(path: str, obj: Any) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True, default=str)
    os.replace(tmp, path)


def latest_checkpoint(out: str) -> str | None:
    """The newest complete checkpoint folder (complete = its trainer_state.json exists)."""
    root = os.path.join(out, CHECKPOINT_DIR)
    if not os.path.isdir(root):
        return None
    steps = []
    for name in os.listdir(root):
        if name.startswith("step-") and os.path.exists(os.path.join(root, name, STATE_NAME)):
            steps.append((int(name.split("-")[1]), name))
    return os.path.join(root, max(steps)[1]) if steps else None


def prune_checkpoints(out: str, keep: int) -> None:
    root = os.path.join(out, CHECKPOINT_DIR)
    names = sorted((n for n in os.listdir(root) if n.startswith("step-") and "." not in n),
                   key=lambda n: int(n.split("-")[1]))
    for name in names[:-keep]:
        shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def cosine_with_warmup(step: int, total: int, warmup: int) -> float:
    if warmup and step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def now() -> float:
    return time.perf_counter()
