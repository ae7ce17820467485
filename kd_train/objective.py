"""The student forward at the rows the losses need, and the LLaVA-KD objective over one optimizer step."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kd_cache.hf import logit_transform
from kd_train.batch import Batch
from kd_train.chunked import chunked_row_loss, micro_batch_row_fn
from kd_train.losses import (KDLossConfig, ce_loss, gram, gram_from_hidden, mdist_loss, rdist_loss,
                             sampled_kd_loss)

TERMS = ("ce", "mdist_text", "mdist_visual", "rdist")


class RowLogits(torch.nn.Module):
    """Wraps a HF (multimodal) causal LM so that forward returns logits only at the requested rows.

    Materialising (B, L, V) logits is the largest activation of a step at V=152K; every loss here needs only the
    response rows and the visual rows. Being an nn.Module, it is what DDP/FSDP wrap, so gradient sync works.
    """

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model
        # the student's own soft-capping / logit scale (its config decides), as its forward would apply it
        self.transform = logit_transform(model.config)

    def forward(self, model_inputs: dict, text_rows: torch.Tensor, visual_rows: torch.Tensor, logits: bool = True):
        """-> (text-row logits (Nt, V), visual-row logits (Nv, V), visual-row final hidden states (Nv, D)); with
        `logits=False`, (text-row hidden states (Nt, D), None, visual-row hidden states (Nv, D)) for the row-chunked
        objective, which applies the head itself (`chunked_micro_batch_loss`)."""
        out = self.model.model(**model_inputs, use_cache=False, return_dict=True)
        hidden = out.last_hidden_state
        head = self.model.get_output_embeddings()
        hv = hidden[visual_rows[0], visual_rows[1]]
        if not logits:
            return hidden[text_rows[0], text_rows[1]], None, hv
        zt, zv = head(hidden[text_rows[0], text_rows[1]]), head(hv)
        if self.transform is not None:
            zt, zv = self.transform(zt), self.transform(zv)
        return zt, zv, hv


class StudentGram:
    """R_S = Z Zᵀ of the student's visual logits in the exact cheaper form H (WᵀW) Hᵀ (Z = H Wᵀ).

    Z Zᵀ costs Nv²·V per sample (~80 GFLOP at Nv=728, V=152K); H (WᵀW) Hᵀ costs Nv·D² + Nv²·D once WᵀW (V·D²)
    exists. WᵀW is formed once per micro-batch while the LM head trains (so gradients reach W), and once per run
    while it is frozen (DPT). Heads with a bias or a logit transform (soft-capping, scaling) fall back to Z Zᵀ.
    """

    def __init__(self, model: torch.nn.Module):
        head = model.get_output_embeddings()
        self.exact_form = getattr(head, "bias", None) is None and logit_transform(model.config) is None
        self.weight = head.weight
        self._frozen_wtw: torch.Tensor | None = None

    def wtw(self) -> torch.Tensor:
        w = self.weight
        if w.requires_grad:
            return w.float().T @ w.float()
        if self._frozen_wtw is None or self._frozen_wtw.device != w.device:
            with torch.no_grad():
                self._frozen_wtw = w.float().T @ w.float()
        return self._frozen_wtw

    def grams(self, zv: torch.Tensor, hv: torch.Tensor, splits: list[int]) -> list[torch.Tensor]:
        """One (Nv_i, Nv_i) Gram per sample with visual rows."""
        if not self.exact_form:
            return [gram(z) for z in torch.split(zv, splits) if z.shape[0]]
        wtw = self.wtw()
        return [gram_from_hidden(h, self.weight, wtw) for h in torch.split(hv, splits) if h.shape[0]]


@dataclass
class StepCounts:
    """Target rows of the whole optimizer step (all micro-batches, all ranks): the loss denominators."""

    text: int
    visual: int
    gram: int


def micro_batch_loss(zt: torch.Tensor, zv: torch.Tensor, batch: Batch, cfg: KDLossConfig, counts: StepCounts,
                     world_size: int, teacher_vocab: int | None = None, hv: torch.Tensor | None = None,
                     student_gram: StudentGram | None = None, n_draws: dict[str, int] | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """Weighted sum of the terms for one micro-batch, each normalised by its step-wide row count.

    Summing these over the step's micro-batches gives per-row means over the global batch; multiplying by
    `world_size` undoes DDP's gradient averaging. `n_draws`: draws per row of the "text" / "visual" rows that hold
    sampled targets. Returns (loss to backward, summed term values for logging).
    """
    sums: dict[str, torch.Tensor] = {}
    if cfg.ce_weight:
        sums["ce"] = ce_loss(zt, batch.text_labels, label_smoothing=cfg.label_smoothing)
    if batch.targets is not None:
        t = batch.targets

        def mdist(z: torch.Tensor, prefix: str) -> torch.Tensor:
            if f"{prefix}_sample_ids" in t:  # random-sampling KD targets (importance-weighted CE)
                return sampled_kd_loss(z, t[f"{prefix}_sample_ids"], t[f"{prefix}_sample_counts"],
                                       t[f"{prefix}_sample_row_lengths"], (n_draws or {}).get(prefix, 0))
            kw = cfg.mdist_kwargs(prefix) | {"teacher_vocab_size": teacher_vocab}
            return mdist_loss(z, t[f"{prefix}_topk_ids"], t[f"{prefix}_topk_logprobs"], t[f"{prefix}_tail_logprob"], **kw)

        if cfg.mdist_text_weight and batch.n_text:
            sums["mdist_text"] = mdist(zt, "text")
        if cfg.mdist_visual_weight and batch.n_visual:
            sums["mdist_visual"] = mdist(zv, "visual")
        if _uses_rdist(cfg, batch):
            sums["rdist"] = _rdist_sum(batch, hv, student_gram, lambda: zv)
    weights = {"ce": cfg.ce_weight, "mdist_text": cfg.mdist_text_weight, "mdist_visual": cfg.mdist_visual_weight,
               "rdist": cfg.rdist_weight}
    denom = {"ce": counts.text, "mdist_text": counts.text, "mdist_visual": counts.visual, "rdist": counts.gram}
    total = zt.sum() * 0.0 + zv.sum() * 0.0  # keeps every row in the graph even when a term is absent
    for name, value in sums.items():
        total = total + weights[name] * value * world_size / max(denom[name], 1)
    return total, {name: float(v.detach()) for name, v in sums.items()}


def chunked_micro_batch_loss(ht: torch.Tensor, hv: torch.Tensor, head: torch.nn.Module, transform, batch: Batch,
                             cfg: KDLossConfig, counts: StepCounts, world_size: int, *, chunk_size: int,
                             amp_dtype: torch.dtype | None, teacher_vocab: int | None = None,
                             student_gram: StudentGram | None = None,
                             n_draws: dict[str, int] | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """`micro_batch_loss` from the rows' hidden states (ht (Nt, D), hv (Nv, D)): CE and MDist over row chunks of
    `chunk_size` (kd_train/chunked.py: no more than one chunk of (rows, V) logits alive), RDist from the student's
    Gram as H (WᵀW) Hᵀ (the visual logits are formed only for heads with a bias or a logit transform). Same value
    and gradients up to float rounding; `amp_dtype`: the autocast dtype the head runs in (None: no autocast)."""
    fn = micro_batch_row_fn(batch, cfg, counts, world_size, teacher_vocab, n_draws)
    total, parts = chunked_row_loss(torch.cat([ht, hv]), head, fn, chunk_size=chunk_size, transform=transform,
                                    amp_dtype=amp_dtype)
    if _uses_rdist(cfg, batch):
        def visual_logits() -> torch.Tensor:  # only for heads with a bias / transform: formed here, once
            zv = head(hv)
            return (transform(zv) if transform is not None else zv).float()

        rdist = _rdist_sum(batch, hv, student_gram, visual_logits)
        total = total + cfg.rdist_weight * rdist * world_size / max(counts.gram, 1)
        parts["rdist"] = float(rdist.detach())
    return total, parts


def _uses_rdist(cfg: KDLossConfig, batch: Batch) -> bool:
    return bool(cfg.rdist_weight and batch.n_visual and batch.targets is not None
                and any(g.numel() for g in batch.grams))


def _rdist_sum(batch: Batch, hv: torch.Tensor | None, student_gram: StudentGram | None,
               visual_logits) -> torch.Tensor:
    """Sum over the micro-batch's samples of 1 − cos(R_S, R_T); R_S from the hidden states when the head allows
    it (StudentGram), else from `visual_logits()` (Nv, V)."""
    if student_gram is not None and hv is not None and student_gram.exact_form:
        grams_s = student_gram.grams(None, hv, batch.visual_splits)
    else:
        grams_s = [gram(z) for z in torch.split(visual_logits(), batch.visual_splits) if z.shape[0]]
    grams_t = [g for g, n in zip(batch.grams, batch.visual_splits) if n]
    return torch.stack([rdist_loss(rs, rt, is_gram=True) for rs, rt in zip(grams_s, grams_t)]).sum()
