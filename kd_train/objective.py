"""The student forward at the rows the losses need, and the LLaVA-KD objective over one optimizer step."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kd_train.batch import Batch
from kd_train.losses import KDLossConfig, ce_loss, gram, mdist_loss, rdist_loss

TERMS = ("ce", "mdist_text", "mdist_visual", "rdist")


class RowLogits(torch.nn.Module):
    """Wraps a HF (multimodal) causal LM so that forward returns logits only at the requested rows.

    Materialising (B, L, V) logits is the largest activation of a step at V=152K; every loss here needs only the
    response rows and the visual rows. Being an nn.Module, it is what DDP/FSDP wrap, so gradient sync works.
    """

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, model_inputs: dict, text_rows: torch.Tensor, visual_rows: torch.Tensor):
        out = self.model.model(**model_inputs, use_cache=False, return_dict=True)
        hidden = out.last_hidden_state
        head = self.model.get_output_embeddings()
        zt = head(hidden[text_rows[0], text_rows[1]])
        zv = head(hidden[visual_rows[0], visual_rows[1]])
        return zt, zv


@dataclass
class StepCounts:
    """Target rows of the whole optimizer step (all micro-batches, all ranks): the loss denominators."""

    text: int
    visual: int
    gram: int


def micro_batch_loss(zt: torch.Tensor, zv: torch.Tensor, batch: Batch, cfg: KDLossConfig, counts: StepCounts,
                     world_size: int, teacher_vocab: int | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """Weighted sum of the terms for one micro-batch, each normalised by its step-wide row count.

    Summing these over the step's micro-batches gives per-row means over the global batch; multiplying by
    `world_size` undoes DDP's gradient averaging. Returns (loss to backward, summed term values for logging).
    """
    sums: dict[str, torch.Tensor] = {}
    if cfg.ce_weight:
        sums["ce"] = ce_loss(zt, batch.text_labels)
    if batch.targets is not None:
        t = batch.targets
        kw = cfg.mdist_kwargs() | {"teacher_vocab_size": teacher_vocab}
        if cfg.mdist_text_weight and batch.n_text:
            sums["mdist_text"] = mdist_loss(zt, t["text_topk_ids"], t["text_topk_logprobs"], t["text_tail_logprob"], **kw)
        if cfg.mdist_visual_weight and batch.n_visual:
            sums["mdist_visual"] = mdist_loss(zv, t["visual_topk_ids"], t["visual_topk_logprobs"],
                                              t["visual_tail_logprob"], **kw)
        if cfg.rdist_weight and batch.n_visual:
            terms = [rdist_loss(gram(z), g) for z, g in zip(torch.split(zv, batch.visual_splits), batch.grams)
                     if z.shape[0] > 0]
            sums["rdist"] = torch.stack(terms).sum()
    weights = {"ce": cfg.ce_weight, "mdist_text": cfg.mdist_text_weight, "mdist_visual": cfg.mdist_visual_weight,
               "rdist": cfg.rdist_weight}
    denom = {"ce": counts.text, "mdist_text": counts.text, "mdist_visual": counts.visual, "rdist": counts.gram}
    total = zt.sum() * 0.0 + zv.sum() * 0.0  # keeps every row in the graph even when a term is absent
    for name, value in sums.items():
        total = total + weights[name] * value * world_size / max(denom[name], 1)
    return total, {name: float(v.detach()) for name, v in sums.items()}
