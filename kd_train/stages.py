"""LLaVA-KD's three stages and the recipes that chain them.

DPT (distilled pre-training): vision and LLM frozen, projector trained, CE + MDist + RDist on caption data.
SFT (supervised fine-tuning): vision frozen, projector + LLM trained, CE only (no cache needed).
DFT (distilled fine-tuning): as SFT plus MDist + RDist.
Defaults follow the paper's recipe: lr 1e-3 (DPT) / 2e-5, cosine schedule, 3 % warmup, no weight decay, 1 epoch.
"""

from __future__ import annotations

from dataclasses import dataclass

STAGES = ("dpt", "sft", "dft")
RECIPES = ("llava-kd", "baseline")


@dataclass(frozen=True)
class StagePreset:
    name: str
    train_vision: bool
    train_projector: bool
    train_llm: bool
    lr: float
    uses_cache: bool
    ce_weight: float = 1.0
    mdist_text_weight: float = 1.0
    mdist_visual_weight: float = 1.0
    rdist_weight: float = 1.0


PRESETS = {
    "dpt": StagePreset("dpt", train_vision=False, train_projector=True, train_llm=False, lr=1e-3, uses_cache=True),
    "sft": StagePreset("sft", train_vision=False, train_projector=True, train_llm=True, lr=2e-5, uses_cache=False,
                       mdist_text_weight=0.0, mdist_visual_weight=0.0, rdist_weight=0.0),
    "dft": StagePreset("dft", train_vision=False, train_projector=True, train_llm=True, lr=2e-5, uses_cache=True),
}


def ce_only(p: StagePreset) -> StagePreset:
    """The baseline's version of a stage: same parts and schedule, CE only, no cache."""
    return StagePreset(p.name, p.train_vision, p.train_projector, p.train_llm, p.lr, uses_cache=False,
                       mdist_text_weight=0.0, mdist_visual_weight=0.0, rdist_weight=0.0)


def recipe_stages(recipe: str) -> list[StagePreset]:
    """Stages of a recipe in order. `baseline` is the paper's comparison: the same stages with CE only."""
    if recipe not in RECIPES:
        raise ValueError(f"recipe must be one of {RECIPES}, got {recipe!r}")
    stages = [PRESETS[s] for s in STAGES]
    return stages if recipe == "llava-kd" else [ce_only(p) for p in stages]
