"""LoRA adapters on the student's LLM (peft), and their merge back into a plain transformers model.

Adapters go on the LLM's linear layers named in `--lora-targets` (never the LM head or the embeddings: the
row-chunked objective and the cache compatibility check need the plain head). The base LLM is frozen; the projector
(and the vision tower, when the stage trains it) train fully, as in the paper. Each stage's output is the merged
model (W + (alpha / r) B A), so later stages, `kd eval` and `AutoModelForImageTextToText` load it as any student.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from kd_train.student import parameter_part

log = logging.getLogger("kd_train")

ADAPTER = "default"


def lora_layer_names(model: torch.nn.Module, targets: list[str]) -> list[str]:
    """Full names of the LLM's nn.Linear layers whose last name segment is in `targets`."""
    names = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name.split(".")[-1] in targets and name.split(".")[-1] != "lm_head":
            if parameter_part(model, f"{name}.weight") == "llm":
                names.append(name)
    return names


def add_lora(model: torch.nn.Module, *, r: int, alpha: float, targets: list[str], dropout: float = 0.0,
             vision: bool, projector: bool) -> Any:
    """Inject LoRA adapters into `model` in place (its class and forward stay as they are) and set what trains:
    the adapters, plus the vision tower / projector when asked. Returns the peft tuner (for `merge_lora`)."""
    from peft import LoraConfig, LoraModel  # deferred: only LoRA runs need peft

    names = lora_layer_names(model, targets)
    if not names:
        raise ValueError(f"lora_targets {targets} match no linear layer of the student's LLM (got layer names like "
                         f"{_linear_examples(model)})")
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=names, bias="none")
    tuner = LoraModel(model, config, ADAPTER)
    for name, p in model.named_parameters():
        part = parameter_part(model, name)
        p.requires_grad_("lora_" in name or (part == "vision" and vision) or (part == "projector" and projector))
    log.info("LoRA r=%d alpha=%g on %d layers of the LLM (%s)", r, alpha, len(names), ", ".join(sorted(set(
        n.split(".")[-1] for n in names))))
    return tuner


def merge_lora(tuner: Any) -> torch.nn.Module:
    """Fold the adapters into the base weights and remove them: the plain model, in place."""
    return tuner.merge_and_unload()


def _linear_examples(model: torch.nn.Module, n: int = 6) -> list[str]:
    seen: list[str] = []
    for name, module in model.named_modules():
        last = name.split(".")[-1]
        if isinstance(module, torch.nn.Linear) and last not in seen:
            seen.append(last)
    return seen[:n]

