"""The LLaVA-KD objective of one stage, and the student forward at the rows it needs.

One objective, two ways to apply the LM head. Per micro-batch, `Objective` builds one row function per row set
(`text_rows_fn`: CE and text MDist; `visual_rows_fn`: visual MDist), each a sum over rows, and both paths call
them: unchunked, the wrapped forward (`RowLogits`) applies the head and the logit transform to all rows with plain
autograd (any head, any wrapper) and each row function runs once over its rows 0:N; chunked (`chunk_size > 0`),
`kd_train.chunked.chunked_row_loss` applies a linear head to one chunk of rows at a time and calls the same
functions per chunk, never holding more than one chunk of (rows, V) logits. RDist is added from the student's Gram
(`StudentGram`: H (WᵀW) Hᵀ, no logits). `TERM_TABLE` is the one table of the terms (the rows that normalise each,
its weight, what it reads) that the loss and the logged metrics both read.

Logged values are divergences whatever the target kind (docs/training.md, "Trackers and logged metrics"): top-k
MDist is a KL already; sampled MDist is a Monte-Carlo cross-entropy H(p_T) + KL(p_T‖q_S), so where the cache stores
the teacher's entropy per row (format v4) it is subtracted from the logged term sums and from the value returned,
a constant for the student (gradients unchanged). Older caches log the cross-entropy, with one warning.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from kd_cache.codec import SampledRows, Targets, TopKRows
from kd_cache.hf import logit_transform
from kd_train.batch import Batch
from kd_train.chunked import RowTerms, chunked_row_loss, concat_row_fns
from kd_train.cross import CrossRows, cross_loss
from kd_train.losses import (KDLossConfig, ce_loss, gram, gram_from_hidden, mdist_loss, rdist_loss,
                             sampled_kd_loss)

log = logging.getLogger("kd_train")


@dataclass(frozen=True)
class Term:
    """One term of the objective."""

    name: str  # its key in the term sums and the logged metrics
    rows: str  # the `StepCounts` field that normalises it: "text", "visual" or "gram" (samples with visual rows)
    weight: str  # the `KDLossConfig` field that weighs it
    reads: str  # what the student is compared with: "labels", "text targets", "visual targets" or "teacher Gram"


TERM_TABLE = (
    Term("ce", rows="text", weight="ce_weight", reads="labels"),
    Term("mdist_text", rows="text", weight="mdist_text_weight", reads="text targets"),
    Term("mdist_visual", rows="visual", weight="mdist_visual_weight", reads="visual targets"),
    Term("rdist", rows="gram", weight="rdist_weight", reads="teacher Gram"),
)
TERMS = tuple(t.name for t in TERM_TABLE)
"""The terms' names, in the order they are logged."""
_READS = {t.reads: t for t in TERM_TABLE}


@dataclass
class StepCounts:
    """Target rows of the whole optimizer step (all micro-batches, all ranks): the loss denominators."""

    text: int
    visual: int
    gram: int


def loss_scales(cfg: KDLossConfig, counts: StepCounts, world_size: int) -> dict[str, float]:
    """Each term's factor `weight * world_size / max(step rows, 1)`.

    Every micro-batch's term sum is divided by the rows of the whole step (`counts`: all micro-batches, all ranks),
    so the accumulated gradient is that of the per-row mean over one combined batch, whatever the micro-batches'
    sizes; `world_size` (the data-parallel ranks whose gradients DDP averages, >= 1) undoes that averaging.
    """
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be an int >= 1, got {world_size!r}")
    return {t.name: getattr(cfg, t.weight) * world_size / max(int(getattr(counts, t.rows)), 1) for t in TERM_TABLE}


def term_means(sums: dict[str, float], counts: StepCounts) -> dict[str, float]:
    """The logged metrics: each term's sum over the step divided by its rows; CE always, the others when not 0."""
    return {t.name: float(sums.get(t.name, 0.0)) / max(int(getattr(counts, t.rows)), 1) for t in TERM_TABLE
            if sums.get(t.name, 0.0) != 0 or t.name == "ce"}


# --------------------------------------------------------------------------------------------- row functions


def _mdist_rows(targets: Targets, rows: str, cfg: KDLossConfig, n_rows: int,
                cross: tuple[str, torch.Tensor | None] | None = None) -> Callable[[torch.Tensor, int, int], torch.Tensor]:
    """The MDist term of one row set restricted to rows start:end: sampled-target KD for sampled targets, the
    cross-tokenizer divergence for targets aligned to another tokenizer (`cross`: its mode and vocabulary map;
    over all rows at once), else top-k + tail MDist with `cfg.mdist_kwargs(rows)` and the teacher's vocabulary."""
    if isinstance(targets, CrossRows):
        if cross is None:
            raise ValueError("cross-tokenizer targets need the objective's cross-tokenizer mode, got none")
        mode, mapping = cross
        kind, jsd_beta = cfg.kind, cfg.jsd_beta

        def across(z: torch.Tensor, s: int, e: int) -> torch.Tensor:
            if (s, e) != (0, n_rows):  # a group's rows may straddle chunks: the plan turns chunking off
                raise ValueError(f"cross-tokenizer targets are read over all {n_rows} rows at once, got rows {s}:{e}")
            return cross_loss(z, targets, mode, mapping, kind=kind, jsd_beta=jsd_beta)

        return across
    if isinstance(targets, SampledRows):
        ids, counts, lengths, draws = targets.ids, targets.counts, targets.row_lengths, targets.draws
        if tuple(lengths.shape) != (n_rows,) or ids.shape != counts.shape or ids.dim() != 1:
            raise ValueError(f"{rows} sampled targets must hold row_lengths ({n_rows},) and equal-length 1-D ids "
                             f"and counts, got {tuple(lengths.shape)}, {tuple(ids.shape)}, {tuple(counts.shape)}")
        if isinstance(draws, bool) or not isinstance(draws, int) or draws < 1:
            raise ValueError(f"draws must be an int >= 1 for sampled {rows} targets, got {draws!r}")
        # ids are stored flattened, row after row: rows s:e are ids[offsets[s]:offsets[e]] (one host sync here,
        # none per chunk)
        offsets = [0] + lengths.to(torch.long).cumsum(0).tolist()
        if offsets[-1] != ids.shape[0]:
            raise ValueError(f"{rows} sampled row_lengths must sum to the {ids.shape[0]} ids, got {offsets[-1]}")

        def sampled(z: torch.Tensor, s: int, e: int) -> torch.Tensor:
            a, b = offsets[s], offsets[e]
            return sampled_kd_loss(z, ids[a:b], counts[a:b], lengths[s:e], draws)

        return sampled
    if not isinstance(targets, TopKRows):
        raise ValueError(f"{rows} targets must be TopKRows or SampledRows, got {type(targets).__name__}")
    ids, lps, tail = targets.ids, targets.logprobs, targets.tail
    if ids.dim() != 2 or ids.shape[0] != n_rows or lps.shape != ids.shape or tuple(tail.shape) != (n_rows,):
        raise ValueError(f"{rows} top-k targets must be (N={n_rows}, k), (N, k), (N,), got {tuple(ids.shape)}, "
                         f"{tuple(lps.shape)}, {tuple(tail.shape)}")
    kw = cfg.mdist_kwargs(rows) | {"teacher_vocab_size": targets.vocab_size}

    def topk(z: torch.Tensor, s: int, e: int) -> torch.Tensor:
        return mdist_loss(z, ids[s:e], lps[s:e], tail[s:e], **kw)

    return topk


def _weighs(cfg: KDLossConfig, term: Term) -> bool:
    return bool(getattr(cfg, term.weight))


def _mdist_term(targets: Targets | None, rows: str, cfg: KDLossConfig, n_rows: int,
                scales: dict[str, float], cross: tuple | None = None) -> list[tuple]:
    """The term that reads the `rows` targets as (name, scale, per-chunk function), when there are targets, rows
    and a weight (checking that the targets cover the rows); else nothing."""
    term = _READS[f"{rows} targets"]
    if targets is None or not n_rows or not _weighs(cfg, term):
        return []
    if targets.n_rows != n_rows:
        what = "labelled" if rows == "text" else "visual"
        raise ValueError(f"{rows} targets must cover the N{rows[0]}={n_rows} {what} rows, got {targets.n_rows}")
    return [(term.name, scales[term.name], _mdist_rows(targets, rows, cfg, n_rows, cross))]


def text_rows_fn(labels: torch.Tensor, targets: Targets | None, cfg: KDLossConfig,
                 scales: dict[str, float], cross: tuple | None = None) -> RowTerms:
    """CE and text MDist over the Nt response rows.

    `labels`: (Nt,) supervised next tokens (-100 rows count 0); `targets`: the rows' teacher targets, or None;
    `scales`: `loss_scales`. Terms: "ce" when `cfg.ce_weight` (with `cfg.label_smoothing`; reported even with no
    rows), "mdist_text" when there are targets, rows and `cfg.mdist_text_weight`.
    """
    if not isinstance(labels, torch.Tensor) or labels.dim() != 1:
        shape = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise ValueError(f"labels must be a 1-D (Nt,) tensor, got {shape}")
    n = int(labels.shape[0])
    terms = []
    ce = _READS["labels"]
    if _weighs(cfg, ce):
        eps = cfg.label_smoothing
        terms.append((ce.name, scales[ce.name], lambda z, s, e: ce_loss(z, labels[s:e], label_smoothing=eps)))
    return RowTerms(n, terms + _mdist_term(targets, "text", cfg, n, scales, cross))


def visual_rows_fn(n_rows: int, targets: Targets | None, cfg: KDLossConfig, scales: dict[str, float]) -> RowTerms:
    """Visual MDist over the Nv visual rows (with `cfg.visual_temperature` when set): term "mdist_visual" when
    there are targets, rows and `cfg.mdist_visual_weight`. RDist needs no logits rows: `Objective` adds it."""
    if isinstance(n_rows, bool) or not isinstance(n_rows, int) or n_rows < 0:
        raise ValueError(f"n_rows must be an int >= 0, got {n_rows!r}")
    return RowTerms(n_rows, _mdist_term(targets, "visual", cfg, n_rows, scales))


# --------------------------------------------------------------------------------------------- the student side


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
        objective, which applies the head itself (`Objective` with a chunk size)."""
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


def zero_loss(module: torch.nn.Module) -> torch.Tensor:
    """0 that depends on every trainable parameter of `module` (their gradients: exact zeros), so that every rank's
    backward covers the same parameters (DDP's all-reduce, FSDP's reduce-scatter) even when a micro-batch leaves
    some unused (a text-only micro-batch and the projector). FSDP2 keeps the layers it wrapped as sharded DTensors
    outside their forward: a shard joins through its local tensor (its zero gradient is added to the reduced one)."""
    from torch.distributed.tensor import DTensor

    return sum((p.to_local() if isinstance(p, DTensor) else p).sum() * 0.0
               for p in module.parameters() if p.requires_grad)


class StudentGram:
    """R_S = Z Zᵀ of the student's visual logits in the exact cheaper form H (WᵀW) Hᵀ (Z = H Wᵀ).

    Z Zᵀ costs Nv²·V per sample (~80 GFLOP at Nv=728, V=152K); H (WᵀW) Hᵀ costs Nv·D² + Nv²·D once WᵀW (V·D²)
    exists. WᵀW is formed once per micro-batch while the LM head trains (so gradients reach W), and once per run
    while it is frozen (DPT). Heads with a bias or a logit transform (soft-capping, scaling) fall back to Z Zᵀ.
    """

    def __init__(self, model: torch.nn.Module):
        head = model.get_output_embeddings()
        self.exact_form = getattr(head, "bias", None) is None and logit_transform(model.config) is None
        # the head, not its weight: FSDP2 swaps the module's parameters between sharded DTensors and unsharded
        # tensors around each forward, so a weight captured here would be a shard by the time the loss runs
        self.head = head
        self._frozen_wtw: torch.Tensor | None = None

    @property
    def weight(self) -> torch.Tensor:
        return self.head.weight

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


# --------------------------------------------------------------------------------------------- the objective


def _upcast(z: torch.Tensor) -> torch.Tensor:
    """Logits as the losses take them: float32 (bf16/fp16 upcast), float64 kept, as `chunked_row_loss` does."""
    return z if z.dtype == torch.float64 else z.float()


class Objective:
    """The loss of one stage's optimizer steps: the weighted terms of `TERM_TABLE`, each normalised by its rows of
    the whole step.

    Built once per stage. `chunk_size` 0: the wrapped forward returns logits (`RowLogits(..., logits=True)`) and the
    row functions run over all rows at once; `chunk_size > 0`: it returns hidden states and the head (a plain
    `nn.Linear`) runs chunk by chunk (`kd_train.chunked`), in `amp_dtype` (autocast's dtype, None: none). Both give
    the same values and gradients up to float rounding. `head` and `transform` are the student's LM head and logit
    transform (the unchunked path needs them only for RDist with a head `student_gram` cannot shortcut).
    """

    def __init__(self, cfg: KDLossConfig, head: torch.nn.Module | None, transform=None, *, chunk_size: int = 0,
                 amp_dtype: torch.dtype | None = None, student_gram: StudentGram | None = None):
        if chunk_size and not isinstance(head, torch.nn.Linear):
            raise ValueError(f"the row-chunked objective needs a plain linear LM head, got {type(head).__name__}; "
                             "set loss_chunk_size 0")
        self.cfg, self.head, self.transform = cfg, head, transform
        self.chunk_size, self.amp_dtype, self.student_gram = chunk_size, amp_dtype, student_gram
        self.cross: tuple[str, torch.Tensor | None] | None = None  # (mode, vocab map): a student of another tokenizer
        self._warned_entropy: set[str] = set()  # terms already warned about logging a cross-entropy

    @classmethod
    def for_student(cls, cfg: KDLossConfig, model: torch.nn.Module, *, chunk_size: int = 0,
                    amp_dtype: torch.dtype | None = None) -> "Objective":
        """The objective of a student: its LM head, its own logit transform, its Gram as H (WᵀW) Hᵀ."""
        return cls(cfg, model.get_output_embeddings(), logit_transform(model.config), chunk_size=chunk_size,
                   amp_dtype=amp_dtype, student_gram=StudentGram(model))

    @property
    def chunked(self) -> bool:
        return self.chunk_size > 0

    def __call__(self, text: torch.Tensor, visual: torch.Tensor | None, visual_hidden: torch.Tensor | None,
                 batch: Batch, counts: StepCounts, world_size: int) -> tuple[torch.Tensor, dict[str, float]]:
        """(loss to backward, raw term sums for logging) of one micro-batch, from what `RowLogits` returned: the
        text and visual rows' logits (unchunked) or the text rows' hidden states and None (chunked), and the visual
        rows' hidden states. Summed over the step's micro-batches the loss is the per-row mean of the global batch."""
        scales = loss_scales(self.cfg, counts, world_size)
        text_fn = text_rows_fn(batch.text_labels, batch.text_targets, self.cfg, scales, self.cross)
        visual_fn = visual_rows_fn(batch.n_visual, batch.visual_targets, self.cfg, scales)
        if self.chunked:
            total, sums = chunked_row_loss(torch.cat([text, visual_hidden]), self.head,
                                           concat_row_fns(text_fn, visual_fn), chunk_size=self.chunk_size,
                                           transform=self.transform, amp_dtype=self.amp_dtype)
            visual_logits = lambda: self._visual_logits(visual_hidden)  # noqa: E731
        else:
            zt, zv = _upcast(text), _upcast(visual)
            total = zt.sum() * 0.0 + zv.sum() * 0.0  # keeps every row in the graph even when a term is absent
            sums = {}
            for fn, z in ((text_fn, zt), (visual_fn, zv)):
                part, part_sums = fn(z, 0, z.shape[0])
                total = total + part
                sums.update({name: float(v) for name, v in part_sums.items()})
            visual_logits = lambda: zv  # noqa: E731
        rdist = _READS["teacher Gram"]
        if _weighs(self.cfg, rdist) and batch.n_visual and batch.has_targets and any(g.numel() for g in batch.grams):
            value = self._rdist_sum(batch, visual_hidden, visual_logits)
            total = total + scales[rdist.name] * value
            sums[rdist.name] = float(value.detach())
        total = self._as_divergence(total, sums, scales, batch)
        return total, sums

    def _as_divergence(self, total: torch.Tensor, sums: dict[str, float], scales: dict[str, float],
                       batch: Batch) -> torch.Tensor:
        """Sampled MDist terms as divergences: the teacher's entropy of their rows (format v4) subtracted from the
        term sums (for logging) and from `total` (a constant for the student: the same gradients), so that the
        logged terms and loss read as KL whatever the target kind. Without the entropy (caches of format < 4) the
        cross-entropy is kept and logged, with one warning per term."""
        for targets, rows in ((batch.text_targets, "text"), (batch.visual_targets, "visual")):
            name = _READS[f"{rows} targets"].name
            if name not in sums or not isinstance(targets, SampledRows):
                continue
            if targets.entropy is None:
                if name not in self._warned_entropy:
                    self._warned_entropy.add(name)
                    log.warning("%s is a cross-entropy (the cache has no teacher entropy: format < 4)", name)
                continue
            h = float(targets.entropy.sum())
            sums[name] -= h
            total = total - scales[name] * h
        return total

    def metrics(self, sums: dict[str, float], counts: StepCounts) -> dict[str, float]:
        """The step's term means for logging, from the term sums over all its micro-batches and ranks."""
        return term_means(sums, counts)

    def _visual_logits(self, hv: torch.Tensor) -> torch.Tensor:
        """The visual rows' logits (Nv, V), formed only for heads the Gram's exact form does not cover."""
        zv = self.head(hv)
        return (self.transform(zv) if self.transform is not None else zv).float()

    def _rdist_sum(self, batch: Batch, hv: torch.Tensor | None, visual_logits) -> torch.Tensor:
        """Sum over the micro-batch's samples of 1 − cos(R_S, R_T); R_S from the hidden states when the head allows
        it (`StudentGram`), else from `visual_logits()` (Nv, V)."""
        sg = self.student_gram
        if sg is not None and hv is not None and sg.exact_form:
            grams_s = sg.grams(None, hv, batch.visual_splits)
        else:
            grams_s = [gram(z) for z in torch.split(visual_logits(), batch.visual_splits) if z.shape[0]]
        grams_t = [g for g, n in zip(batch.grams, batch.visual_splits) if n]
        return torch.stack([rdist_loss(rs, rt, is_gram=True) for rs, rt in zip(grams_s, grams_t)]).sum()
