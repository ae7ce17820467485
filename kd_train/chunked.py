"""Row-chunked LM head + loss: the KD objective without ever holding (N, V) logits (issue 13, item 1).

The unchunked path (:class:`kd_train.objective.RowLogits` then :func:`kd_train.objective.micro_batch_loss`)
materialises the student's logits at every supervised row in fp32, plus their log-softmax and gradients: at
LLaVA scale (576 visual + 150 response rows, V = 152K) several GB.  Here the head is applied to one chunk of
rows at a time and the chunk's gradients w.r.t. the hidden states, the head weight and bias are taken right away
(inside the forward, Liger / TRL style), so at most one chunk of (rows, V) logits and their gradients is alive.
Backward only scales the stored gradients by the incoming gradient.

Public API
----------
* :func:`chunked_row_loss` -- ``(hidden (N, D), head, fn) -> (loss, term sums)``; the loss is differentiable
  w.r.t. ``hidden`` and the head's weight / bias.
* :class:`RowTerms` and its builders, mirroring ``micro_batch_loss`` term by term:
  :func:`text_rows_fn` (CE + text MDist), :func:`visual_rows_fn` (visual MDist), :func:`concat_row_fns`
  (several row sets in one pass), :func:`micro_batch_row_fn` (a micro-batch's text then visual rows) and
  :func:`loss_scales` (the per-term factor ``weight * world_size / max(step rows, 1)``).

The loss math is not re-implemented: every chunk calls :func:`kd_train.losses.ce_loss`,
:func:`~kd_train.losses.mdist_loss` and :func:`~kd_train.losses.sampled_kd_loss` with ``reduction="sum"``, whose
sums over row chunks add up to the sums over all rows.  Values and gradients equal the unchunked path's up to
float rounding.

RDist is not chunked here: :class:`kd_train.objective.StudentGram` computes the student's Gram from the visual
hidden states as ``H (WᵀW) Hᵀ`` without logits.  Only when the head has a bias or the model a logit transform does
it fall back to ``Z Zᵀ``; that path still needs the (Nv, V) visual logits.

Memory: O(chunk_size · V) for the chunk's logits, the losses' intermediates and their gradients, plus gradient
buffers the size of ``hidden`` and of the weight (fp32 when the weight is bf16/fp16) that are handed to autograd
in backward (they become ``weight.grad``, no copy when it was None).  Nothing is computed at import time.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Union

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from kd_train.config import DEFAULT_LOSS_CHUNK_SIZE
from kd_train.losses import KDLossConfig, ce_loss, mdist_loss, sampled_kd_loss

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "RowLossFn",
    "RowTerms",
    "chunked_row_loss",
    "concat_row_fns",
    "loss_scales",
    "micro_batch_row_fn",
    "text_rows_fn",
    "visual_rows_fn",
]

#: Rows per chunk by default, from benchmarks/chunked_loss.py (docs/benchmarks.md, "Chunked KD loss"): at
#: Nv = 576, Nt = 150, V = 152K, D = 896 (fp32, CPU) 96 rows is the largest measured size whose loss activation
#: memory is <= 1/4 of the unchunked path's (0.23x; 128 rows: 0.31x) at no step-time cost (0.89-0.98x).  The
#: activation memory is about 6 (rows, V) fp32 buffers per chunk row, so it scales linearly with the chunk.
DEFAULT_CHUNK_SIZE: int = DEFAULT_LOSS_CHUNK_SIZE  # one definition: kd_train/config.py (why 96)

#: ``fn(logits (n, V) float32, start, end) -> (scalar loss of rows start:end, {term: sum over those rows})``.
#: The term values may be floats or 0-dim tensors (tensors avoid a device sync per chunk).
RowLossFn = Callable[[torch.Tensor, int, int], tuple[torch.Tensor, Mapping[str, Union[float, torch.Tensor]]]]


# --------------------------------------------------------------------------------------
# the autograd function
# --------------------------------------------------------------------------------------


def _amp_context(device_type: str, amp_dtype: torch.dtype | None):
    """The autocast state under which the unchunked path applies the head and the logit transform."""
    if amp_dtype is None:
        return torch.autocast(device_type, enabled=False)
    return torch.autocast(device_type, dtype=amp_dtype)


class _ChunkedHeadLoss(torch.autograd.Function):
    """sum over row chunks of fn(transform(hidden[s:e] @ Wᵀ + b).float(), s, e); gradients computed in forward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, fn, chunk_size, transform, amp_dtype, terms_out):
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        n = hidden.shape[0]
        dev = hidden.device.type
        # the head's matmul dtype: autocast's (bf16/fp16) or the inputs' own, as nn.Linear would run it
        cdtype = amp_dtype if amp_dtype is not None else hidden.dtype
        h_all = hidden.detach()
        w = weight.detach().to(cdtype)  # one cast for all chunks (autocast would cast once per region too)
        b = None if bias is None else bias.detach().to(cdtype)
        # Weight/bias gradients are sums over chunks: accumulate them in at least fp32 (a bf16 running sum would
        # round at every chunk; the unchunked path rounds its bf16 GEMM once).
        acc_w = torch.promote_types(weight.dtype, torch.float32)
        grad_h = torch.zeros(h_all.shape, dtype=h_all.dtype, device=h_all.device) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=acc_w, device=weight.device) if need_w else None
        grad_b = None
        if need_b:
            grad_b = torch.zeros(bias.shape, dtype=torch.promote_types(bias.dtype, torch.float32),
                                 device=bias.device)
        total = None
        # N = 0 still calls fn once, on an empty chunk, so that it reports its terms (as zeros)
        starts = range(0, n, chunk_size) if n else (0,)
        with torch.autocast(dev, enabled=False):
            for s in starts:
                e = min(s + chunk_size, n)
                h = h_all[s:e].to(cdtype)
                # logits as a leaf of the chunk's own small graph: autograd only runs transform + loss, and the
                # head's two matmuls are done by hand below, in place into the buffers
                z_lin = F.linear(h, w, b).requires_grad_(True)
                with torch.enable_grad():
                    with _amp_context(dev, amp_dtype):
                        z = transform(z_lin) if transform is not None else z_lin
                    # the unchunked path upcasts with zt.float() before the losses (float64 stays float64)
                    zf = z if z.dtype == torch.float64 else z.float()
                    out = fn(zf, s, e)
                    loss, terms = _check_fn_output(out)
                g_z = None
                if loss.requires_grad:
                    (g_z,) = torch.autograd.grad(loss, z_lin, allow_unused=True)
                if g_z is not None:
                    if grad_h is not None:
                        if grad_h.dtype == g_z.dtype:
                            torch.mm(g_z, w, out=grad_h[s:e])
                        else:
                            grad_h[s:e] = g_z @ w  # cast back to hidden's dtype, as autocast's backward does
                    if grad_w is not None:
                        if grad_w.dtype == g_z.dtype:
                            grad_w.addmm_(g_z.t(), h)
                        else:  # bf16 product (as the unchunked GEMM), summed in fp32
                            grad_w.add_(g_z.t() @ h)
                    if grad_b is not None:
                        grad_b.add_(g_z.sum(0))
                part = loss.detach()
                total = part if total is None else total + part
                for name, value in terms.items():
                    v = value.detach() if isinstance(value, torch.Tensor) else float(value)
                    terms_out[name] = terms_out[name] + v if name in terms_out else v
                # free this chunk before the next one is built
                del z_lin, z, zf, out, loss, g_z, h
        # buffers are intermediates, not inputs/outputs: kept on ctx (not save_for_backward) so that backward
        # can drop its reference and autograd can adopt the buffer as .grad without a copy
        ctx.grads = (grad_h, grad_w, grad_b)
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        return total

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        if ctx.grads is None:
            raise RuntimeError("chunked_row_loss supports one backward per forward (its gradients are computed "
                               "in forward and handed over once), got a second backward (retain_graph=True?)")
        grads, ctx.grads = ctx.grads, None
        scale = None if bool(grad_out == 1) else grad_out
        out = []
        for g, dtype in zip(grads, ctx.dtypes):
            if g is not None:
                if scale is not None:
                    g.mul_(scale.to(g.dtype))  # in place: the buffer is ours and no longer referenced by ctx
                if g.dtype != dtype:
                    g = g.to(dtype)
            out.append(g)
        return (*out, None, None, None, None, None)


def _check_fn_output(out: Any) -> tuple[torch.Tensor, Mapping[str, Any]]:
    if not (isinstance(out, tuple) and len(out) == 2):
        raise ValueError(f"fn must return a (scalar loss tensor, dict of term sums) pair, got {type(out).__name__}")
    loss, terms = out
    if not isinstance(loss, torch.Tensor) or loss.dim() != 0 or not loss.is_floating_point():
        shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise ValueError(f"fn's loss must be a 0-dim floating tensor, got {shape}")
    if not isinstance(terms, Mapping):
        raise ValueError(f"fn's term sums must be a mapping, got {type(terms).__name__}")
    return loss, terms


def chunked_row_loss(
    hidden: torch.Tensor,
    head: torch.nn.Module,
    fn: RowLossFn,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    amp_dtype: torch.dtype | str | None = "auto",
) -> tuple[torch.Tensor, dict[str, float]]:
    """Loss of the head's logits at N rows, computed chunk by chunk: never more than ``chunk_size`` rows of logits.

    Equals, in value and in gradients w.r.t. ``hidden``, ``head.weight`` and ``head.bias`` (up to rounding)::

        z = head(hidden)                      # under autocast when amp_dtype is set
        z = transform(z) if transform else z  # same autocast state
        loss, terms = fn(z.float(), 0, N)     # autocast off, as the losses run in the engine

    because ``fn`` is additive over rows (sums): it is called on consecutive chunks ``fn(z[s:e], s, e)`` and the
    chunk losses and term sums are added.  Each chunk's gradients are taken immediately
    (``torch.autograd.grad``) and accumulated; backward hands them to autograd scaled by the incoming gradient.
    A head parameter with ``requires_grad=False`` (frozen head) gets no buffer and no gradient.

    Args:
        hidden: (N, D) final hidden states at the rows (after the final norm), usually requiring grad.  N = 0 is
            allowed (``fn`` is then called once on a (0, V) chunk so it reports its terms).
        head: the LM head, applied as ``F.linear(h, head.weight, head.bias)``: an ``nn.Linear`` (V, D) weight and
            optional (V,) bias.  Heads whose forward does more (LoRA on the head, quantised linears, hooks that
            change the output) are not reproduced.
        fn: per-chunk loss, ``fn(logits (n, V) float32, start, end) -> (scalar sum over the rows, {term: sum})``;
            it must be a sum over rows (any ``reduction="sum"`` loss of :mod:`kd_train.losses`).  Build it with
            :func:`micro_batch_row_fn` / :func:`text_rows_fn` / :func:`visual_rows_fn`.  An ``n_rows`` attribute,
            when present, is checked against N.
        chunk_size: rows per chunk (>= 1); :data:`DEFAULT_CHUNK_SIZE` by default.
        transform: the model's logit transform (:func:`kd_cache.hf.logit_transform`), applied to the head's
            output before the loss.
        amp_dtype: dtype of the head's matmul and the transform.  ``"auto"`` (default) takes the autocast dtype
            when autocast is enabled for ``hidden``'s device at the call, as the unchunked ``head(h)`` would run;
            ``None`` runs in the inputs' dtype; a dtype (e.g. ``torch.bfloat16``) forces that autocast, which lets
            the caller compute the loss outside the autocast region and still match a head run inside it.

    Returns:
        ``(loss, terms)``: a 0-dim tensor (float32 for float32/bf16 logits) differentiable w.r.t. ``hidden`` and
        the head's parameters, and the per-term sums over all rows as floats.  The graph supports one backward.
    """
    if not isinstance(hidden, torch.Tensor) or hidden.dim() != 2 or not hidden.is_floating_point():
        shape = tuple(hidden.shape) if isinstance(hidden, torch.Tensor) else type(hidden).__name__
        raise ValueError(f"hidden must be a 2-D (N, D) floating tensor, got {shape}")
    weight = getattr(head, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.shape[1] != hidden.shape[1]:
        got = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise ValueError(f"head.weight must be a (V, D={hidden.shape[1]}) tensor, got {got}")
    bias = getattr(head, "bias", None)
    if bias is not None and (not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (weight.shape[0],)):
        got = tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__
        raise ValueError(f"head.bias must be None or a (V={weight.shape[0]},) tensor, got {got}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an int >= 1, got {chunk_size!r}")
    if not callable(fn):
        raise ValueError(f"fn must be callable, got {type(fn).__name__}")
    if transform is not None and not callable(transform):
        raise ValueError(f"transform must be None or callable, got {type(transform).__name__}")
    expected = getattr(fn, "n_rows", None)
    if expected is not None and expected != hidden.shape[0]:
        raise ValueError(f"fn covers {expected} rows but hidden has N={hidden.shape[0]} rows, got mismatched inputs")
    dev = hidden.device.type
    if isinstance(amp_dtype, str):
        if amp_dtype != "auto":
            raise ValueError(f"amp_dtype must be 'auto', None or a torch.dtype, got {amp_dtype!r}")
        amp_dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None
    elif amp_dtype is not None and (not isinstance(amp_dtype, torch.dtype) or not amp_dtype.is_floating_point):
        raise ValueError(f"amp_dtype must be 'auto', None or a floating torch.dtype, got {amp_dtype!r}")
    if amp_dtype is None and weight.dtype != hidden.dtype:
        raise ValueError(f"outside autocast hidden and head.weight must share a dtype, got {hidden.dtype} and "
                         f"{weight.dtype}")
    terms: dict[str, Any] = {}
    loss = _ChunkedHeadLoss.apply(hidden, weight, bias, fn, chunk_size, transform, amp_dtype, terms)
    return loss, {name: float(v) for name, v in terms.items()}


# --------------------------------------------------------------------------------------
# per-chunk loss functions mirroring micro_batch_loss
# --------------------------------------------------------------------------------------


def loss_scales(cfg: KDLossConfig, counts: Any, world_size: int) -> dict[str, float]:
    """Per-term factor ``weight * world_size / max(step rows, 1)``, exactly as ``micro_batch_loss`` applies them.

    Args:
        cfg: the loss weights.
        counts: the step's target rows over all micro-batches and ranks, with ``.text``, ``.visual``, ``.gram``
            (``kd_train.objective.StepCounts``).
        world_size: data-parallel ranks whose gradients are averaged (>= 1).
    """
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be an int >= 1, got {world_size!r}")
    denom = {"ce": counts.text, "mdist_text": counts.text, "mdist_visual": counts.visual, "rdist": counts.gram}
    weights = {"ce": cfg.ce_weight, "mdist_text": cfg.mdist_text_weight, "mdist_visual": cfg.mdist_visual_weight,
               "rdist": cfg.rdist_weight}
    return {name: weights[name] * world_size / max(int(denom[name]), 1) for name in weights}


class RowTerms:
    """A :data:`RowLossFn` made of named sum-over-rows terms, ``loss = sum_t scale_t * term_t(z, s, e)``.

    Attributes:
        n_rows: rows the terms cover (checked by :func:`chunked_row_loss`).
        names: the terms it reports, in order (the keys of ``micro_batch_loss``'s logged parts).
    """

    def __init__(self, n_rows: int,
                 terms: Sequence[tuple[str, float, Callable[[torch.Tensor, int, int], torch.Tensor]]]):
        self.n_rows = int(n_rows)
        self._terms = list(terms)
        self.names = tuple(name for name, _, _ in self._terms)

    def __call__(self, z: torch.Tensor, start: int, end: int):
        loss = None
        sums: dict[str, torch.Tensor] = {}
        for name, scale, term in self._terms:
            value = term(z, start, end)
            sums[name] = value.detach()
            loss = scale * value if loss is None else loss + scale * value
        if loss is None:  # no term on these rows: a zero that keeps the caller's types
            loss = z.new_zeros(())
        return loss, sums


def _n_target_rows(targets: Mapping[str, torch.Tensor], prefix: str) -> int | None:
    for key in (f"{prefix}_topk_ids", f"{prefix}_sample_row_lengths"):
        if key in targets:
            return int(targets[key].shape[0])
    return None


def _mdist_term(targets: Mapping[str, torch.Tensor], prefix: str, cfg: KDLossConfig, n_rows: int,
                teacher_vocab_size: int | None, n_draws: int) -> Callable[[torch.Tensor, int, int], torch.Tensor]:
    """MDist of one row set (``prefix`` "text" / "visual") restricted to rows start:end, as micro_batch_loss
    computes it over all rows: sampled-target KD when the targets are sampled, else top-k + tail MDist."""
    if f"{prefix}_sample_ids" in targets:
        ids, counts = targets[f"{prefix}_sample_ids"], targets[f"{prefix}_sample_counts"]
        lengths = targets[f"{prefix}_sample_row_lengths"]
        if tuple(lengths.shape) != (n_rows,) or ids.shape != counts.shape or ids.dim() != 1:
            raise ValueError(f"{prefix} sampled targets must hold row_lengths ({n_rows},) and equal-length 1-D ids "
                             f"and counts, got {tuple(lengths.shape)}, {tuple(ids.shape)}, {tuple(counts.shape)}")
        if isinstance(n_draws, bool) or not isinstance(n_draws, int) or n_draws < 1:
            raise ValueError(f"n_draws must be an int >= 1 for sampled {prefix} targets, got {n_draws!r}")
        # ids are stored flattened, row after row: rows s:e are ids[offsets[s]:offsets[e]] (one host sync here,
        # none per chunk)
        offsets = [0] + lengths.to(torch.long).cumsum(0).tolist()
        if offsets[-1] != ids.shape[0]:
            raise ValueError(f"{prefix}_sample_row_lengths must sum to len({prefix}_sample_ids)="
                             f"{ids.shape[0]}, got {offsets[-1]}")

        def sampled(z: torch.Tensor, s: int, e: int) -> torch.Tensor:
            a, b = offsets[s], offsets[e]
            return sampled_kd_loss(z, ids[a:b], counts[a:b], lengths[s:e], n_draws)

        return sampled

    ids, lps, tail = (targets[f"{prefix}_{k}"] for k in ("topk_ids", "topk_logprobs", "tail_logprob"))
    if ids.dim() != 2 or ids.shape[0] != n_rows or lps.shape != ids.shape or tuple(tail.shape) != (n_rows,):
        raise ValueError(f"{prefix} top-k targets must be (N={n_rows}, k), (N, k), (N,), got {tuple(ids.shape)}, "
                         f"{tuple(lps.shape)}, {tuple(tail.shape)}")
    kw = cfg.mdist_kwargs(prefix) | {"teacher_vocab_size": teacher_vocab_size}

    def topk(z: torch.Tensor, s: int, e: int) -> torch.Tensor:
        return mdist_loss(z, ids[s:e], lps[s:e], tail[s:e], **kw)

    return topk


def text_rows_fn(labels: torch.Tensor, targets: Mapping[str, torch.Tensor] | None, cfg: KDLossConfig,
                 scales: Mapping[str, float], *, teacher_vocab_size: int | None = None, n_draws: int = 0) -> RowTerms:
    """CE + text MDist over the Nt response rows, term for term as ``micro_batch_loss`` computes them on ``zt``.

    Terms: ``"ce"`` when ``cfg.ce_weight`` (``ce_loss(z, labels, label_smoothing=cfg.label_smoothing)``, even
    with no rows), ``"mdist_text"`` when there are targets, rows and ``cfg.mdist_text_weight``: top-k + tail
    MDist with ``cfg.mdist_kwargs("text")`` and ``teacher_vocab_size``, or sampled-target KD with ``n_draws``.

    Args:
        labels: (Nt,) supervised next tokens (``batch.text_labels``; ignore_index -100 rows count 0).
        targets: ``batch.targets`` (``text_topk_ids`` / ``text_topk_logprobs`` / ``text_tail_logprob`` or
            ``text_sample_ids`` / ``text_sample_counts`` / ``text_sample_row_lengths``), or None.
        cfg: loss weights and MDist options.
        scales: :func:`loss_scales` (``"ce"`` and ``"mdist_text"`` are used).
        teacher_vocab_size: the teacher's vocabulary size (MDist's T != 1 tail approximation).
        n_draws: draws per row of sampled text targets.
    """
    if not isinstance(labels, torch.Tensor) or labels.dim() != 1:
        shape = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise ValueError(f"labels must be a 1-D (Nt,) tensor, got {shape}")
    n = int(labels.shape[0])
    terms = []
    if cfg.ce_weight:
        eps = cfg.label_smoothing
        terms.append(("ce", scales["ce"], lambda z, s, e: ce_loss(z, labels[s:e], label_smoothing=eps)))
    if targets is not None and cfg.mdist_text_weight and n:
        terms.append(_checked_mdist_term(targets, "text", cfg, n, scales, teacher_vocab_size, n_draws))
    return RowTerms(n, terms)


def _checked_mdist_term(targets: Mapping[str, torch.Tensor], prefix: str, cfg: KDLossConfig, n: int,
                        scales: Mapping[str, float], teacher_vocab_size: int | None, n_draws: int) -> tuple:
    """("mdist_<prefix>", its scale, its per-chunk fn), after checking the targets cover the n rows."""
    rows = _n_target_rows(targets, prefix)
    if rows != n:
        what = "labelled" if prefix == "text" else "visual"
        raise ValueError(f"{prefix} targets must cover the N{prefix[0]}={n} {what} rows, got {rows}")
    return (f"mdist_{prefix}", scales[f"mdist_{prefix}"], _mdist_term(targets, prefix, cfg, n, teacher_vocab_size,
                                                                       n_draws))


def visual_rows_fn(n_rows: int, targets: Mapping[str, torch.Tensor] | None, cfg: KDLossConfig,
                   scales: Mapping[str, float], *, teacher_vocab_size: int | None = None,
                   n_draws: int = 0) -> RowTerms:
    """Visual MDist over the Nv visual rows, as ``micro_batch_loss`` computes it on ``zv``.

    Term ``"mdist_visual"`` when there are targets, rows and ``cfg.mdist_visual_weight``: top-k + tail MDist with
    ``cfg.mdist_kwargs("visual")`` (its ``visual_temperature``) or sampled-target KD.  RDist is not here (see the
    module docstring).

    Args:
        n_rows: Nv (``batch.n_visual``).
        targets, teacher_vocab_size: as in :func:`text_rows_fn`, with ``visual_*`` keys.
        scales: :func:`loss_scales` (``"mdist_visual"`` is used).
        n_draws: draws per row of sampled visual targets.
    """
    if isinstance(n_rows, bool) or not isinstance(n_rows, int) or n_rows < 0:
        raise ValueError(f"n_rows must be an int >= 0, got {n_rows!r}")
    terms = []
    if targets is not None and cfg.mdist_visual_weight and n_rows:
        terms.append(_checked_mdist_term(targets, "visual", cfg, n_rows, scales, teacher_vocab_size, n_draws))
    return RowTerms(n_rows, terms)


def concat_row_fns(*parts: RowTerms | tuple[int, RowLossFn]) -> RowTerms:
    """One :data:`RowLossFn` over row sets stacked one after the other (``torch.cat`` of their hidden states).

    One pass over the concatenation shares one weight-gradient buffer (one call per row set would hold one each
    until backward) and fills every chunk.  A chunk that straddles two row sets calls each on its part, with
    row indices local to that set; a row set with no rows is called once, on an empty slice of the first chunk,
    so that its terms are reported as ``micro_batch_loss`` reports them.

    Args:
        parts: :class:`RowTerms` (their ``n_rows`` is used) or ``(n_rows, fn)`` pairs, in row order.
    """
    spans = []
    start = 0
    for p in parts:
        n, f = (p.n_rows, p) if isinstance(p, RowTerms) else p
        if isinstance(n, bool) or not isinstance(n, int) or n < 0 or not callable(f):
            raise ValueError(f"parts must be RowTerms or (n_rows >= 0, fn) pairs, got {p!r}")
        spans.append((start, start + n, f))
        start += n

    def fn(z: torch.Tensor, s: int, e: int):
        loss = None
        sums: dict[str, Any] = {}
        for a, b, f in spans:
            if a == b:  # no rows: report its terms once, on the first chunk
                if s != 0:
                    continue
                out = f(z[:0], 0, 0)
            else:
                lo, hi = max(a, s), min(b, e)
                if lo >= hi:
                    continue
                out = f(z[lo - s:hi - s], lo - a, hi - a)
            part_loss, part_sums = _check_fn_output(out)
            loss = part_loss if loss is None else loss + part_loss
            for name, v in part_sums.items():
                sums[name] = sums[name] + v if name in sums else v
        return (z.new_zeros(()) if loss is None else loss), sums

    names = tuple(n for p in parts if isinstance(p, RowTerms) for n in p.names)
    return _Concat(start, fn, names)


class _Concat(RowTerms):
    def __init__(self, n_rows: int, fn: RowLossFn, names: tuple[str, ...]):
        super().__init__(n_rows, [])
        self._fn = fn
        self.names = names

    def __call__(self, z: torch.Tensor, start: int, end: int):
        return self._fn(z, start, end)


def micro_batch_row_fn(batch: Any, cfg: KDLossConfig, counts: Any, world_size: int,
                       teacher_vocab: int | None = None, n_draws: Mapping[str, int] | None = None) -> RowTerms:
    """The CE + MDist part of ``micro_batch_loss`` for a micro-batch, over its text rows then its visual rows.

    Use with ``hidden = torch.cat([h_text (Nt, D), h_visual (Nv, D)])`` (the final hidden states at
    ``batch.text_rows`` and ``batch.visual_rows``): ``chunked_row_loss(hidden, head, fn, transform=...)`` then
    returns the sum of ``micro_batch_loss``'s weighted CE, text-MDist and visual-MDist terms and their raw sums
    (its logged parts), to which the caller adds RDist.

    Args:
        batch: a ``kd_train.batch.Batch`` (``text_labels``, ``targets``, ``n_visual`` are read).
        cfg, counts, world_size, teacher_vocab, n_draws: as ``micro_batch_loss`` takes them.
    """
    scales = loss_scales(cfg, counts, world_size)
    draws = n_draws or {}
    text = text_rows_fn(batch.text_labels, batch.targets, cfg, scales, teacher_vocab_size=teacher_vocab,
                        n_draws=draws.get("text", 0))
    visual = visual_rows_fn(int(batch.n_visual), batch.targets, cfg, scales, teacher_vocab_size=teacher_vocab,
                            n_draws=draws.get("visual", 0))
    return concat_row_fns(text, visual)
