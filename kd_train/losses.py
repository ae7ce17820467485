"""Loss functions for offline LLaVA-KD style distillation (arXiv 2410.16236).

The teacher is never in memory: its targets come from a cache.  For every supervised logits row the cache holds

* `topk_ids`       (N, k) int64   -- the teacher's top-k token ids (distinct per row),
* `topk_logprobs`  (N, k) float32 -- teacher log-probs of those ids (log-softmax of the raw logits at
  temperature 1),
* `tail_logprob`   (N,)   float32 -- log of the teacher mass outside the top-k (`-inf` when the top-k hold all of
  it),
* `logsumexp`      (N,)   float32 -- logsumexp of the raw teacher logits, so raw top-k logits are
  `topk_logprobs + logsumexp`.  The losses below never need it: every quantity is invariant to a per-row shift
  of the teacher logits,

or, for sampled targets, the unique ids drawn per row with their counts (`sampled_kd_loss`).  The student provides
`student_logits` (N, V) at the same rows.

Here:

* `mdist_loss`        -- MDist: KL / reverse KL / generalised JSD between the teacher's and the student's
  distributions collapsed to k+1 buckets (top-k ids + one tail bucket).
* `sampled_kd_loss`   -- random-sampling KD: cross-entropy against the sampled teacher distribution.
* `rdist_loss`        -- RDist: `1 - cos(R_T, R_S)` of visual-token Gram matrices.
* `gram`, `gram_from_hidden` -- `R = Z Z^T` directly or as `H (W^T W) H^T`.
* `ce_loss`           -- token cross entropy, summed over supervised rows.
* `KDLossConfig`      -- weights and MDist options, validated.

Conventions: every loss is computed in at least float32 (`float64` inputs stay float64; `bfloat16`/`float16` are
upcast) and returned in that dtype; losses default to `reduction="sum"` so that the caller can normalise once, by
the row count of the whole optimizer step (`kd_train.objective.loss_scales`), and so that sums over row chunks add
up to the sum over all rows.  Invalid arguments raise `ValueError` whose message says what was received
("got ...").  Nothing is computed at import time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Real
from typing import Any

import torch
import torch.nn.functional as F

__all__ = [
    "KINDS",
    "TEACHER_LOGPROB_FLOOR",
    "KDLossConfig",
    "ce_loss",
    "gram",
    "gram_from_hidden",
    "mdist_loss",
    "rdist_loss",
    "sampled_kd_loss",
]

KINDS: tuple[str, ...] = ("forward_kl", "reverse_kl", "jsd")
"""Divergences accepted by `mdist_loss` (`kind=`)."""

TEACHER_LOGPROB_FLOOR: float = math.log(torch.finfo(torch.float32).tiny)
"""Lower bound applied to the teacher's bucket log-probs, `log` of the smallest normal float32 (about -87.34).

A teacher probability that is exactly zero (`tail_logprob = -inf`) or below float32 resolution is treated as this
tiny value.  For the forward KL and the JSD this changes the loss by < 1e-36 (the `0 * log 0 = 0` convention); for
the reverse KL, where `p_S * log(p_S / 0)` would be `+inf`, it gives a large but finite penalty (about
`p_S_tail * (log p_S_tail + 87.3)`) so values and gradients stay finite."""

_REDUCTIONS = ("sum", "none")


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """At least float32: promote the floating inputs with float32 (float64 stays float64)."""
    dtype = torch.float32
    for t in tensors:
        if t.is_floating_point():
            dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _check_real(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise ValueError(f"{name} must be a real number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return value


def _check_temperature(temperature: Any) -> float:
    t = _check_real("temperature", temperature)
    if t <= 0.0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    return t


def _check_jsd_beta(jsd_beta: Any) -> float:
    b = _check_real("jsd_beta", jsd_beta)
    if not 0.0 < b < 1.0:
        raise ValueError(
            "jsd_beta must be strictly between 0 and 1 (use kind='forward_kl' or "
            f"'reverse_kl' for the end points), got {jsd_beta!r}"
        )
    return b


def _check_kind(kind: Any) -> str:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    return kind


def _check_reduction(reduction: Any) -> str:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    return reduction


def _check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be a bool, got {value!r}")
    return value


def _check_tensor(name: str, value: Any) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def _reduce(per_row: torch.Tensor, reduction: str) -> torch.Tensor:
    return per_row.sum() if reduction == "sum" else per_row


# --------------------------------------------------------------------------------------
# MDist (response / visual distribution distillation)
# --------------------------------------------------------------------------------------


def _student_bucket_logprobs(
    s: torch.Tensor, topk_ids: torch.Tensor, use_tail: bool
) -> torch.Tensor:
    """Student log-probs collapsed to the buckets.

    Args:
        s: (N, V) student logits already divided by the temperature, compute dtype.
        topk_ids: (N, k) int64 bucket ids (distinct per row).
        use_tail: whether a tail bucket exists (the caller guarantees k < V when True).

    Returns:
        (N, k+1) log-probs `[log p_S(id_1..id_k), log p_S(outside the ids)]` when
        `use_tail`, else (N, k) log-probs renormalised over the top-k ids.
    """
    topk = s.gather(-1, topk_ids)  # (N, k)
    if not use_tail:
        return torch.log_softmax(topk, dim=-1)
    # log mass outside the ids, computed in log space with the ids masked out: no
    # cancellation even when the top-k hold all but 1e-12 of the mass (log(1 - sum) would
    # round to log(0)).  The full logsumexp is then logaddexp(tail, logsumexp(top-k)), so
    # log_softmax over the k+1 "bucket logits" is exactly the collapsed distribution and
    # only one (N, V) logsumexp is kept for backward.
    tail = torch.logsumexp(s.scatter(-1, topk_ids, float("-inf")), dim=-1)  # (N,)
    return torch.log_softmax(torch.cat([topk, tail.unsqueeze(-1)], dim=-1), dim=-1)


def _teacher_bucket_logprobs(
    topk_logprobs: torch.Tensor,
    tail_logprob: torch.Tensor,
    temperature: float,
    use_tail: bool,
    n_tail_ids: int,
) -> torch.Tensor:
    """Teacher log-probs collapsed to the buckets, tempered, renormalised, floored.

    Args:
        topk_logprobs: (N, k) teacher log-probs at temperature 1, compute dtype.
        tail_logprob: (N,) log teacher mass outside the top-k (may be -inf).
        temperature: T > 0.
        use_tail: keep the tail bucket (else renormalise over the top-k only).
        n_tail_ids: number of vocabulary ids outside the top-k (`V_teacher - k`).

    Returns:
        (N, k+1) or (N, k) log-probs, clamped below at `TEACHER_LOGPROB_FLOOR`.
    """
    # A per-row shift of the logits (the cached logsumexp) cancels in every softmax, so
    # log-probs stand in for the raw logits: raw / T = topk_logprobs / T + const.
    topk = topk_logprobs if temperature == 1.0 else topk_logprobs / temperature
    if not use_tail:
        out = torch.log_softmax(topk, dim=-1)
    else:
        if n_tail_ids == 0:
            tail = torch.full_like(tail_logprob, float("-inf"))
        elif temperature == 1.0:
            tail = tail_logprob
        else:
            # Uniform-tail approximation: the cache only knows the tail's total mass, so
            # each of the n tail ids is given log-prob (tail_logprob - log n).  Tempered,
            # the bucket's unnormalised log mass is log n + (tail_logprob - log n) / T.
            log_n = math.log(n_tail_ids)
            tail = log_n + (tail_logprob - log_n) / temperature
        out = torch.log_softmax(torch.cat([topk, tail.unsqueeze(-1)], dim=-1), dim=-1)
    return out.clamp(min=TEACHER_LOGPROB_FLOOR)


def _bucket_divergence(
    lt: torch.Tensor, ls: torch.Tensor, kind: str, jsd_beta: float
) -> torch.Tensor:
    """Per-row divergence between bucket distributions given as log-probs.

    Args:
        lt: (N, B) teacher log-probs, finite (floored).
        ls: (N, B) student log-probs, finite.

    Returns:
        (N,) divergence.  Tiny negative values (rounding, ~1e-7 in float32) are possible.
    """
    if kind == "forward_kl":
        return (lt.exp() * (lt - ls)).sum(-1)
    if kind == "reverse_kl":
        return (ls.exp() * (ls - lt)).sum(-1)
    # generalised JSD: M = beta p_T + (1 - beta) p_S,
    # JSD = beta KL(p_T || M) + (1 - beta) KL(p_S || M)
    lm = torch.logaddexp(lt + math.log(jsd_beta), ls + math.log1p(-jsd_beta))
    kl_t = (lt.exp() * (lt - lm)).sum(-1)
    kl_s = (ls.exp() * (ls - lm)).sum(-1)
    return jsd_beta * kl_t + (1.0 - jsd_beta) * kl_s


def mdist_loss(
    student_logits: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_logprobs: torch.Tensor,
    tail_logprob: torch.Tensor,
    *,
    kind: str = "forward_kl",
    temperature: float = 1.0,
    use_tail: bool = True,
    jsd_beta: float = 0.5,
    row_weight: torch.Tensor | None = None,
    reduction: str = "sum",
    teacher_vocab_size: int | None = None,
) -> torch.Tensor:
    """MDist loss between cached top-k teacher targets and the student's logits.

    Both distributions are collapsed to the same k+1 buckets: the k teacher top-k ids and
    one tail bucket with all the other ids.  Teacher buckets: `topk_logprobs` and
    `tail_logprob`.  Student buckets: `log_softmax(z/T)` at the ids, and the log mass
    outside the ids computed stably as `logsumexp` over the vocabulary with the ids masked
    to `-inf` minus the full `logsumexp` (never `log(1 - sum p)`).  Both bucket
    vectors are renormalised with `log_softmax` (a no-op up to rounding at T=1 when the
    cache is consistent).

    Divergences (`kind`), per row, over the buckets:

    * `"forward_kl"`: `KL(p_T || p_S) = sum p_T (log p_T - log p_S)`.
    * `"reverse_kl"`: `KL(p_S || p_T) = sum p_S (log p_S - log p_T)`.
    * `"jsd"`: generalised JSD as in GKD / TRL / Liger, with `M = beta p_T + (1-beta) p_S`:
      `beta KL(p_T || M) + (1 - beta) KL(p_S || M)`; `0 < jsd_beta < 1`.

    `use_tail=False` drops the tail bucket and renormalises both distributions over the
    top-k ids.  When k equals the student vocabulary size V there is no tail id: the tail
    bucket is dropped whatever `use_tail` says (the loss is then the exact dense
    divergence).

    Temperature `T`: both distributions come from `logits / T` and the per-row loss is
    multiplied by `T**2` (Hinton et al.).  Teacher raw top-k logits are
    `topk_logprobs + logsumexp`; the per-row constant cancels, so the tempered top-k
    bucket logits are `topk_logprobs / T`.  The tempered mass of the tail is not known
    exactly from the cache; it is approximated by spreading the tail mass uniformly over
    its `n = teacher_vocab_size - k` ids (each with raw logit
    `log(tail_mass / n) + logsumexp`), so the tempered tail bucket has unnormalised log
    mass `log n + (tail_logprob - log n) / T`.  This is exact at T = 1 and is the
    maximum-entropy choice given only the tail's total (it over-estimates the tempered tail
    mass for T > 1 and under-estimates it for T < 1 compared with a peaked real tail, by
    Jensen's inequality).  The student side is always exact.

    `tail_logprob = -inf` (top-k hold all the teacher's mass) is allowed: teacher bucket
    log-probs are clamped below at `TEACHER_LOGPROB_FLOOR`, which realises the
    `0 log 0 = 0` convention for the forward KL and the JSD and keeps the reverse KL
    (otherwise `+inf`) finite.  Values and gradients contain no NaN for finite student
    logits.

    Memory: one (N, V) copy of the student logits in the compute dtype (plus one for the
    upcast when the logits are bf16/fp16, and one for `/ T` when `T != 1`) is made and
    kept for backward; split very large N into row chunks in the caller if needed (the
    `"sum"` reduction adds up exactly).

    Args:
        student_logits: (N, V) raw student logits, any float dtype; computed in at least
            float32 (float64 stays float64).
        topk_ids: (N, k) integer teacher top-k ids, distinct within a row, `1 <= k <= V`,
            values in `[0, V)`.
        topk_logprobs: (N, k) teacher log-probs at temperature 1 for `topk_ids`.
        tail_logprob: (N,) log of the teacher's mass outside the top-k; may be `-inf`.
        kind: one of `KINDS`.
        temperature: T > 0.
        use_tail: keep the tail bucket (default) or renormalise over the top-k ids.
        jsd_beta: beta of the generalised JSD, `0 < beta < 1` (validated for every kind).
        row_weight: optional (N,) weights multiplying the per-row losses.
        reduction: `"sum"` (scalar, sum over rows) or `"none"` (per-row (N,) vector).
            Mean normalisation is the caller's job (`kd_train.objective.loss_scales`).
        teacher_vocab_size: number of ids in the teacher's vocabulary, used only for the
            T != 1 tail approximation (`n = teacher_vocab_size - k`); defaults to V.
            Set it when the student's logits are padded to a larger size than the teacher's.

    Returns:
        Scalar (`"sum"`) or (N,) (`"none"`) tensor in the compute dtype, differentiable
        w.r.t. `student_logits`.
    """
    student_logits = _check_tensor("student_logits", student_logits)
    topk_ids = _check_tensor("topk_ids", topk_ids)
    topk_logprobs = _check_tensor("topk_logprobs", topk_logprobs)
    tail_logprob = _check_tensor("tail_logprob", tail_logprob)
    kind = _check_kind(kind)
    temperature = _check_temperature(temperature)
    use_tail = _check_bool("use_tail", use_tail)
    jsd_beta = _check_jsd_beta(jsd_beta)
    reduction = _check_reduction(reduction)

    if student_logits.dim() != 2 or not student_logits.is_floating_point():
        raise ValueError(
            "student_logits must be a 2-D (N, V) floating tensor, got shape "
            f"{tuple(student_logits.shape)} dtype {student_logits.dtype}"
        )
    n_rows, vocab = student_logits.shape
    if topk_ids.dim() != 2 or topk_ids.shape[0] != n_rows:
        raise ValueError(
            f"topk_ids must have shape (N={n_rows}, k), got {tuple(topk_ids.shape)}"
        )
    if topk_ids.is_floating_point() or topk_ids.is_complex() or topk_ids.dtype == torch.bool:
        raise ValueError(f"topk_ids must be an integer tensor, got dtype {topk_ids.dtype}")
    k = topk_ids.shape[1]
    if not 1 <= k <= vocab:
        raise ValueError(f"k (topk_ids.shape[1]) must be in [1, V={vocab}], got {k}")
    if topk_logprobs.shape != topk_ids.shape or not topk_logprobs.is_floating_point():
        raise ValueError(
            "topk_logprobs must be a floating tensor shaped like topk_ids "
            f"{tuple(topk_ids.shape)}, got shape {tuple(topk_logprobs.shape)} "
            f"dtype {topk_logprobs.dtype}"
        )
    if tail_logprob.shape != (n_rows,) or not tail_logprob.is_floating_point():
        raise ValueError(
            f"tail_logprob must be a floating (N={n_rows},) tensor, got shape "
            f"{tuple(tail_logprob.shape)} dtype {tail_logprob.dtype}"
        )
    if row_weight is not None:
        row_weight = _check_tensor("row_weight", row_weight)
        if row_weight.shape != (n_rows,):
            raise ValueError(
                f"row_weight must have shape (N={n_rows},), got {tuple(row_weight.shape)}"
            )
    if teacher_vocab_size is None:
        teacher_vocab_size = vocab
    elif isinstance(teacher_vocab_size, bool) or not isinstance(teacher_vocab_size, int):
        raise ValueError(f"teacher_vocab_size must be an int, got {teacher_vocab_size!r}")
    if teacher_vocab_size < k:
        raise ValueError(
            f"teacher_vocab_size must be >= k={k}, got {teacher_vocab_size}"
        )

    cdtype = _compute_dtype(student_logits)
    tail_on = use_tail and k < vocab
    ids = topk_ids.to(device=student_logits.device, dtype=torch.long)

    s = student_logits.to(cdtype)
    if temperature != 1.0:
        s = s / temperature
    ls = _student_bucket_logprobs(s, ids, tail_on)
    lt = _teacher_bucket_logprobs(
        topk_logprobs.to(device=s.device, dtype=cdtype),
        tail_logprob.to(device=s.device, dtype=cdtype),
        temperature,
        tail_on,
        teacher_vocab_size - k,
    )
    per_row = _bucket_divergence(lt, ls, kind, jsd_beta)
    if temperature != 1.0:
        per_row = per_row * (temperature * temperature)
    if row_weight is not None:
        per_row = per_row * row_weight.to(device=per_row.device, dtype=cdtype)
    return _reduce(per_row, reduction)


# --------------------------------------------------------------------------------------
# RDist (relation distillation over visual tokens)
# --------------------------------------------------------------------------------------


def gram(z: torch.Tensor) -> torch.Tensor:
    """Gram matrix `R = Z Z^T` of a sample's visual-token logits.

    Args:
        z: (Nv, V) raw logits (any float dtype; computed in at least float32).

    Returns:
        (Nv, Nv) symmetric matrix in the compute dtype.  On CUDA, float32 matmuls follow
        `torch.backends.cuda.matmul.allow_tf32`; disable TF32 for full float32 accuracy.
    """
    z = _check_tensor("z", z)
    if z.dim() != 2 or not z.is_floating_point():
        raise ValueError(
            f"z must be a 2-D (Nv, V) floating tensor, got shape {tuple(z.shape)} "
            f"dtype {z.dtype}"
        )
    z = z.to(_compute_dtype(z))
    return z @ z.transpose(0, 1)


def gram_from_hidden(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    wtw: torch.Tensor | None = None,
) -> torch.Tensor:
    """Exact Gram of the logits `Z = H W^T` without forming Z: `R = H (W^T W) H^T`.

    Mathematically identical to `gram(hidden @ lm_head_weight.T)` (only rounding
    differs).  Cost with a precomputed `W^T W`: `Nv D^2 + Nv^2 D` instead of
    `Nv V D + Nv^2 V` (e.g. Nv=576, D=896, V=151936: ~8e8 vs ~1.3e11 multiply-adds).
    Computing `W^T W` costs `V D^2`; precompute it (`W.float().T @ W.float()` under
    `torch.no_grad()`) only while the LM head is frozen -- with a precomputed `wtw` no
    gradient reaches `lm_head_weight`.  Pass `wtw=None` to get gradients for both H and
    W.  Assumes a bias-free LM head (true for LLaMA/Qwen-family heads).

    Args:
        hidden: (Nv, D) final hidden states (after the final norm) at the visual rows.
        lm_head_weight: (V, D) LM head weight.  Only its shape is used when `wtw` is given.
        wtw: optional (D, D) precomputed `W^T W`.

    Returns:
        (Nv, Nv) Gram matrix in at least float32.
    """
    hidden = _check_tensor("hidden", hidden)
    lm_head_weight = _check_tensor("lm_head_weight", lm_head_weight)
    if hidden.dim() != 2 or not hidden.is_floating_point():
        raise ValueError(
            f"hidden must be a 2-D (Nv, D) floating tensor, got shape {tuple(hidden.shape)} "
            f"dtype {hidden.dtype}"
        )
    d = hidden.shape[1]
    if lm_head_weight.dim() != 2 or lm_head_weight.shape[1] != d:
        raise ValueError(
            f"lm_head_weight must have shape (V, D={d}), got {tuple(lm_head_weight.shape)}"
        )
    if wtw is None:
        cdtype = _compute_dtype(hidden, lm_head_weight)
        w = lm_head_weight.to(cdtype)
        wtw = w.transpose(0, 1) @ w
    else:
        wtw = _check_tensor("wtw", wtw)
        if wtw.shape != (d, d):
            raise ValueError(f"wtw must have shape (D={d}, D={d}), got {tuple(wtw.shape)}")
        cdtype = _compute_dtype(hidden, wtw)
        wtw = wtw.to(cdtype)
    h = hidden.to(cdtype)
    return (h @ wtw) @ h.transpose(0, 1)


def rdist_loss(
    student_visual_logits_or_gram: torch.Tensor,
    teacher_gram: torch.Tensor,
    *,
    eps: float = 1e-8,
    is_gram: bool | None = None,
) -> torch.Tensor:
    """RDist for one sample: `1 - cos(R_T, R_S)` over the flattened Gram matrices.

    `R_S = Z_S Z_S^T` with `Z_S` the student's raw logits at the sample's Nv visual rows
    (or a Gram computed beforehand, e.g. by `gram_from_hidden`); `R_T` is the
    cached teacher Gram.  `cos = <R_T / max(|R_T|, eps), R_S / max(|R_S|, eps)>` with
    Frobenius norms, computed in at least float32.  The loss is in [0, 2] and invariant
    to positive rescaling of either matrix.

    Samples have different Nv, so there is no batched variant: the caller loops over the
    samples of a batch (each call is cheap, Nv x Nv) and sums the per-sample losses (then
    normalises, e.g. by the number of samples with visual tokens in the optimizer step).

    Args:
        student_visual_logits_or_gram: (Nv, V) student logits at the visual rows, or the
            (Nv, Nv) student Gram.
        teacher_gram: (Nv, Nv) teacher Gram `R_T` (any float dtype).
        eps: floor on each Frobenius norm (> 0).
        is_gram: `True` if the first argument already is the Gram, `False` if it is
            logits; `None` (default) infers it: a tensor shaped exactly like
            `teacher_gram` is taken as a Gram.  Pass it explicitly if V could equal Nv.

    Returns:
        Scalar tensor, differentiable w.r.t. the student input.
    """
    x = _check_tensor("student_visual_logits_or_gram", student_visual_logits_or_gram)
    teacher_gram = _check_tensor("teacher_gram", teacher_gram)
    eps = _check_real("eps", eps)
    if eps <= 0.0:
        raise ValueError(f"eps must be > 0, got {eps!r}")
    if is_gram is not None and not isinstance(is_gram, bool):
        raise ValueError(f"is_gram must be None or a bool, got {is_gram!r}")
    if (
        teacher_gram.dim() != 2
        or teacher_gram.shape[0] != teacher_gram.shape[1]
        or not teacher_gram.is_floating_point()
    ):
        raise ValueError(
            "teacher_gram must be a square (Nv, Nv) floating tensor, got shape "
            f"{tuple(teacher_gram.shape)} dtype {teacher_gram.dtype}"
        )
    nv = teacher_gram.shape[0]
    if nv == 0:
        raise ValueError("teacher_gram must have at least one visual row, got Nv=0")
    if x.dim() != 2 or not x.is_floating_point():
        raise ValueError(
            "student_visual_logits_or_gram must be a 2-D floating tensor, got shape "
            f"{tuple(x.shape)} dtype {x.dtype}"
        )
    if is_gram is None:
        is_gram = tuple(x.shape) == tuple(teacher_gram.shape)
    if is_gram:
        if x.shape != teacher_gram.shape:
            raise ValueError(
                f"student Gram must have shape {tuple(teacher_gram.shape)}, got "
                f"{tuple(x.shape)}"
            )
        cdtype = _compute_dtype(x, teacher_gram)
        r_s = x.to(cdtype)
    else:
        if x.shape[0] != nv:
            raise ValueError(
                f"student logits must have Nv={nv} rows (teacher_gram is {nv}x{nv}), got "
                f"shape {tuple(x.shape)}"
            )
        cdtype = _compute_dtype(x, teacher_gram)
        r_s = gram(x.to(cdtype))
    a = r_s.reshape(-1)
    b = teacher_gram.to(device=a.device, dtype=cdtype).reshape(-1)
    a = a / torch.linalg.vector_norm(a).clamp(min=eps)
    b = b / torch.linalg.vector_norm(b).clamp(min=eps)
    return 1.0 - (a * b).sum()


# --------------------------------------------------------------------------------------
# CE
# --------------------------------------------------------------------------------------


def ce_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = -100,
    reduction: str = "sum",
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Token cross entropy, summed over supervised rows (labels != ignore_index).

    The causal shift is the caller's: row i of `logits` predicts `labels[i]`.

    Args:
        logits: (N, V) or (..., V) raw logits, any float dtype; computed in at least float32.
        labels: (N,) or (...) integer targets aligned with the logits rows.
        ignore_index: label value excluded from the loss (contributes 0).
        reduction: `"sum"` (scalar; 0 when every row is ignored) or `"none"` (per-row,
            shaped like `labels`, 0 at ignored rows).
        label_smoothing: eps in [0, 1): the target is (1 - eps) one-hot + eps uniform over the V
            logits (`torch.nn.functional.cross_entropy`'s definition), the classic regulariser
            KD is compared against.

    Returns:
        Loss tensor in the compute dtype.  Normalise by the row count of the optimizer step,
        `(labels != ignore_index).sum()` over all its micro-batches and ranks.
    """
    logits = _check_tensor("logits", logits)
    labels = _check_tensor("labels", labels)
    reduction = _check_reduction(reduction)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise ValueError(f"ignore_index must be an int, got {ignore_index!r}")
    if logits.dim() < 1 or not logits.is_floating_point():
        raise ValueError(
            f"logits must be a floating (..., V) tensor, got shape {tuple(logits.shape)} "
            f"dtype {logits.dtype}"
        )
    if tuple(labels.shape) != tuple(logits.shape[:-1]):
        raise ValueError(
            f"labels must have shape {tuple(logits.shape[:-1])} (logits without the vocab "
            f"dim), got {tuple(labels.shape)}"
        )
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f"labels must be an integer tensor, got dtype {labels.dtype}")
    label_smoothing = _check_real("label_smoothing", label_smoothing)
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing!r}")
    cdtype = _compute_dtype(logits)
    flat = logits.reshape(-1, logits.shape[-1]).to(cdtype)
    out = F.cross_entropy(
        flat,
        labels.reshape(-1).to(device=flat.device, dtype=torch.long),
        ignore_index=ignore_index,
        reduction=reduction,
        label_smoothing=label_smoothing,
    )
    if reduction == "none":
        out = out.reshape(labels.shape)
    return out


# --------------------------------------------------------------------------------------
# config
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KDLossConfig:
    """Weights of the LLaVA-KD loss terms and MDist options.

    Total loss (after per-row normalisation of each term)::

        ce_weight * CE + mdist_text_weight * MDist(response rows)
        + mdist_visual_weight * MDist(visual rows) + rdist_weight * RDist

    Attributes:
        ce_weight, mdist_text_weight, mdist_visual_weight, rdist_weight: finite, >= 0, not
            all zero.  Default 1.0 each.
        kind: MDist divergence, one of `KINDS`.
        temperature: MDist temperature T > 0 (loss scaled by T**2).
        use_tail: keep the teacher tail bucket in MDist.
        jsd_beta: generalised-JSD beta, 0 < beta < 1.
        visual_temperature: MDist temperature of the visual rows (None: `temperature`); their
            distributions are far flatter than the response rows', so they may want their own.
        label_smoothing: CE label smoothing eps in [0, 1) (the regularisation control KD is
            compared with).
    """

    ce_weight: float = 1.0
    mdist_text_weight: float = 1.0
    mdist_visual_weight: float = 1.0
    rdist_weight: float = 1.0
    kind: str = "forward_kl"
    temperature: float = 1.0
    use_tail: bool = True
    jsd_beta: float = 0.5
    visual_temperature: float | None = None
    label_smoothing: float = 0.0

    def __post_init__(self) -> None:
        names = ("ce_weight", "mdist_text_weight", "mdist_visual_weight", "rdist_weight")
        for name in names:
            w = _check_real(name, getattr(self, name))
            if w < 0.0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")
            object.__setattr__(self, name, w)
        if all(getattr(self, name) == 0.0 for name in names):
            raise ValueError(
                "at least one loss weight must be > 0, got all of "
                f"{', '.join(names)} equal to 0"
            )
        _check_kind(self.kind)
        object.__setattr__(self, "temperature", _check_temperature(self.temperature))
        _check_bool("use_tail", self.use_tail)
        object.__setattr__(self, "jsd_beta", _check_jsd_beta(self.jsd_beta))
        if self.visual_temperature is not None:
            object.__setattr__(self, "visual_temperature", _check_temperature(self.visual_temperature))
        eps = _check_real("label_smoothing", self.label_smoothing)
        if not 0.0 <= eps < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing!r}")
        object.__setattr__(self, "label_smoothing", eps)

    def mdist_kwargs(self, rows: str = "text") -> dict[str, Any]:
        """Keyword arguments for `mdist_loss` on the "text" or "visual" rows: kind, temperature, use_tail,
        jsd_beta (the visual rows take `visual_temperature` when it is set)."""
        t = self.visual_temperature if rows == "visual" and self.visual_temperature is not None else self.temperature
        return {
            "kind": self.kind,
            "temperature": t,
            "use_tail": self.use_tail,
            "jsd_beta": self.jsd_beta,
        }


def sampled_kd_loss(
    student_logits: torch.Tensor,
    sample_ids: torch.Tensor,
    sample_counts: torch.Tensor,
    row_lengths: torch.Tensor,
    n_draws: int,
    *,
    reduction: str = "sum",
) -> torch.Tensor:
    """Random-sampling KD (Anshumann et al. 2025): cross-entropy against the sampled teacher distribution.

    Each row holds `n_draws` ids drawn from the teacher distribution p_T, stored as unique ids with counts; the
    importance weight of a drawn id is count / n_draws (proposal = p_T itself), so q = counts / n_draws is an
    unbiased estimate of p_T and the gradient -(q - softmax(z_S)) equals the forward-KL gradient in expectation.
    The value is a cross-entropy (KL plus the teacher's entropy estimate), not a KL.

    Args:
        student_logits: (N, V) raw student logits.
        sample_ids: (M,) int64 unique sampled ids, rows concatenated.
        sample_counts: (M,) counts of those ids (each row sums to n_draws).
        row_lengths: (N,) unique ids per row.
        n_draws: draws per row.
    Returns:
        Sum over rows (reduction="sum") or (N,) per-row values ("none").
    """
    reduction = _check_reduction(reduction)
    if not isinstance(n_draws, int) or n_draws < 1:
        raise ValueError(f"n_draws must be a positive integer, got {n_draws!r}")
    if student_logits.dim() != 2:
        raise ValueError(f"student_logits must be (N, V), got shape {tuple(student_logits.shape)}")
    n = student_logits.shape[0]
    if row_lengths.shape != (n,) or int(row_lengths.sum()) != sample_ids.shape[0] or sample_ids.shape != sample_counts.shape:
        raise ValueError(f"row_lengths (N={n},) must sum to len(sample_ids) == len(sample_counts), got "
                         f"{tuple(row_lengths.shape)}, {tuple(sample_ids.shape)}, {tuple(sample_counts.shape)}")
    dtype = _compute_dtype(student_logits)
    logp = torch.log_softmax(student_logits.to(dtype), dim=-1)
    rows = torch.repeat_interleave(torch.arange(n, device=student_logits.device), row_lengths.to(torch.long))
    weights = sample_counts.to(dtype) / n_draws
    per_row = torch.zeros(n, dtype=dtype, device=student_logits.device).index_add(
        0, rows, -weights * logp[rows, sample_ids.to(torch.long)])
    return _reduce(per_row, reduction)
