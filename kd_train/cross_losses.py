"""Cross-tokenizer distillation losses from a cached teacher: ULD and a GOLD-style hybrid (issue 20, item 3).

The teacher and the student have different vocabularies, so their distributions cannot be compared id by id. The
cache holds, per teacher row, the teacher's top-k log-probs (`topk_ids` / `topk_logprobs`, (N_t, k)), the log of the
mass outside them (`tail_logprob`, (N_t,)) and, from format v3, the log-prob of the token actually observed next
(`observed_logprob`, (N_t,)). The student gives raw logits (N_s, V_s). The alignment (`kd_train/align.py`) groups
teacher rows and student rows that cover the same bytes of an answer; each group is one compared row.

Here:

* `uld_loss`    -- Universal Logit Distillation (Boizard et al. 2024): the L1 distance between the two
  distributions' probabilities, each sorted in descending order, the shorter padded with zeros (the Wasserstein-1
  distance under a uniform cost), from the cached top-k + tail.
* `hybrid_loss` -- the hybrid of TRL's GOLD trainer (`trl/experimental/gold/gold_trainer.py`,
  `ULDLoss._compute_hybrid_uld_loss`): a KL (or reverse KL / generalised JSD) over the teacher's top-k tokens that
  have a student token with the same bytes, plus ULD over everything else, weighted as GOLD does.
* `merge_group_logprobs`, `MergeGroups` -- groups of several rows (one token of one side covered by several tokens
  of the other) merged by the chain rule over the group's actual tokens, GOLD's "bayesian" merge.
* `vocab_map`, `token_bytes` -- teacher id -> student id of the token with the same bytes (-1 when none).

How the tail is treated (both losses): the cache knows the teacher's k largest probabilities and the total mass
of the other `V_t - k`, not how that mass is split. The losses compare the first `top` sorted positions
(`top <= k`) entry by entry and then the rest of each side as **one bucket**: `|Q_rest - P_rest|`, where `P_rest`
is the teacher's tail (plus its cached entries after `top`) and `Q_rest` is the student's mass after its `top`
largest probabilities. Why one bucket and not a spread:

* it is exact when the top-k hold all the teacher's mass (`tail_logprob = -inf`; then `Q_rest` is compared with
  zeros, as ULD's zero padding does), so the tests can compare with TRL's dense code;
* otherwise it is a lower bound of the exact ULD for *every* teacher tail the cache is consistent with (the
  triangle inequality, `sum |q_i - p_i| >= |sum q_i - sum p_i|`), i.e. it charges the student only for what the
  cache knows: its tail must carry the teacher's tail mass;
* spreading the tail uniformly over the `V_t - k` ids (the maximum-entropy guess `kd_train.losses.mdist_loss`
  uses for a tempered tail) would add `sum |q_i - u|` over the tail positions, which penalises a student whose
  tail is peaked -- real tails are (Zipf-like), so that term pushes the student towards a flat tail no teacher
  has. The bucket makes no such assumption and is also what `mdist_loss`'s k+1 buckets do at temperature 1.

Temperatures are not applied here (GOLD's defaults are 1): a student temperature is `student_logits / T` by the
caller; a teacher temperature would need the tail's shape, which the cache does not have.

Conventions as in `kd_train.losses`: computed in at least float32 (float64 stays float64), `reduction="sum"` by
default (`"mean"` divides by the number of compared rows, `"none"` gives them), `ValueError` with "got ..." on
invalid arguments, differentiable w.r.t. `student_logits`, nothing computed at import time.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from kd_train.align import token_bytes as align_token_bytes
from kd_train.losses import (
    TEACHER_LOGPROB_FLOOR,
    _check_bool,
    _check_jsd_beta,
    _check_kind,
    _check_real,
    _check_tensor,
    _compute_dtype,
)

__all__ = [
    "REDUCTIONS",
    "MergeGroups",
    "hybrid_loss",
    "merge_group_logprobs",
    "token_bytes",
    "uld_loss",
    "vocab_map",
]

REDUCTIONS: tuple[str, ...] = ("sum", "mean", "none")
"""Reductions accepted by the losses here: sum over the compared rows, their mean, or the (G,) rows."""

_NEG_INF = float("-inf")


# --------------------------------------------------------------------------------------
# checks
# --------------------------------------------------------------------------------------


def _check_reduction(reduction: Any) -> str:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    return reduction


def _check_int_tensor(name: str, value: Any, shape: tuple[int, ...] | None = None) -> torch.Tensor:
    value = _check_tensor(name, value)
    if value.is_floating_point() or value.is_complex() or value.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer tensor, got dtype {value.dtype}")
    if shape is not None and tuple(value.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(value.shape)}")
    return value


def _check_float_tensor(name: str, value: Any, shape: tuple[int, ...]) -> torch.Tensor:
    value = _check_tensor(name, value)
    if not value.is_floating_point() or tuple(value.shape) != shape:
        raise ValueError(
            f"{name} must be a floating tensor of shape {shape}, got shape {tuple(value.shape)} dtype {value.dtype}"
        )
    return value


def _check_top(top: Any) -> int | None:
    if top is None:
        return None
    if isinstance(top, bool) or not isinstance(top, int) or top < 1:
        raise ValueError(f"top must be None or an int >= 1, got {top!r}")
    return top


def _reduce(per_row: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "sum":
        return per_row.sum()
    if reduction == "mean":
        return per_row.sum() / max(per_row.shape[0], 1)
    return per_row


# --------------------------------------------------------------------------------------
# merged groups (chain rule)
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MergeGroups:
    """How the rows of each side form the G compared rows (groups), in order.

    Group g takes the next `student_sizes[g]` student rows and the next `teacher_sizes[g]` teacher rows; the rows
    of a group are consecutive and the groups cover every row once (`sum(student_sizes) == N_s`,
    `sum(teacher_sizes) == N_t`; select the rows first to leave some out). Sizes are >= 1: GOLD drops a group
    with an empty side (a zero-width end marker), and so must the caller. One-to-one: both sizes 1;
    one-to-many: a teacher size 1 with a student size > 1; many-to-one: the reverse; many-to-many: both > 1.

    Row convention: row r of either side holds the distribution that predicts its token r (the causal shift is
    the caller's), so a group's rows predict its tokens one after the other.

    Attributes:
        student_sizes: (G,) int, >= 1.
        teacher_sizes: (G,) int, >= 1.
        student_token_ids: (N_s,) int student tokens (the ones the rows predict); needed only when some
            `student_sizes` > 1 (may be None otherwise).
        teacher_observed_logprob: (N_t,) float, the teacher's log-prob of the token each row predicts (the cache's
            `observed_logprob`, format v3); needed only when some `teacher_sizes` > 1 (older caches: None, and
            teacher groups of one row).
    """

    student_sizes: torch.Tensor
    teacher_sizes: torch.Tensor
    student_token_ids: torch.Tensor | None = None
    teacher_observed_logprob: torch.Tensor | None = None


def _check_sizes(name: str, sizes: Any, n_rows: int) -> torch.Tensor:
    sizes = _check_int_tensor(name, sizes)
    if sizes.dim() != 1:
        raise ValueError(f"{name} must be 1-D (G,), got shape {tuple(sizes.shape)}")
    if sizes.numel() and int(sizes.min()) < 1:
        raise ValueError(f"{name} must all be >= 1 (drop groups with an empty side), got min {int(sizes.min())}")
    if int(sizes.sum()) != n_rows:
        raise ValueError(f"{name} must sum to the number of rows {n_rows}, got {int(sizes.sum())}")
    return sizes


def _group_prefix(observed: torch.Tensor | None, sizes: torch.Tensor, n_rows: int, what: str):
    """(ends (G,) int64 row of each group's last token, prefix (G,) sum of the other rows' observed log-probs).

    `observed` (N,) may be None when every group has one row (the prefix is then 0)."""
    device = sizes.device if observed is None else observed.device
    sizes = sizes.to(device=device, dtype=torch.long)
    ends = torch.cumsum(sizes, 0) - 1
    n_groups = sizes.shape[0]
    if n_groups == n_rows:  # every group one row: nothing to merge
        dtype = observed.dtype if observed is not None else torch.float32
        return ends, torch.zeros(n_groups, dtype=dtype, device=device)
    if observed is None:
        raise ValueError(
            f"{what} is needed to merge groups of several rows (some sizes > 1), got None"
        )
    group = torch.repeat_interleave(torch.arange(n_groups, device=device), sizes)
    last = torch.zeros(n_rows, dtype=torch.bool, device=device)
    last[ends] = True
    contrib = torch.where(last, torch.zeros_like(observed), observed)
    prefix = torch.zeros(n_groups, dtype=observed.dtype, device=device).index_add(0, group, contrib)
    return ends, prefix


def merge_group_logprobs(
    logprobs: torch.Tensor, observed_logprob: torch.Tensor, group_sizes: torch.Tensor
) -> torch.Tensor:
    """Merge consecutive rows into groups by the chain rule over the group's actual tokens (GOLD's "bayesian").

    For a group of rows r_1..r_m predicting tokens t_1..t_m, the merged row is the joint log-prob of the group's
    observed prefix followed by each candidate last token v:

        merged[g, v] = log p_{r_1}(t_1) + ... + log p_{r_{m-1}}(t_{m-1}) + logprobs[r_m, v]

    i.e. the last row's distribution (conditioned on the actual earlier tokens) shifted by the probability of the
    prefix. It is unnormalised (its total is the prefix's probability); a group of one row is that row. This is
    TRL's `ULDLoss._merge_probabilities_with_alignment_groups` with `uld_token_merge_strategy="bayesian"`, in log
    space (TRL multiplies probabilities, clamping each factor at 1e-8; here no clamp). TRL's default "observed"
    strategy scales the first row instead, whose logits predict the token after the group's first one, so it is
    not offered.

    Works on any per-row vector: a student's full log-softmax (N, V), or a teacher's cached buckets
    `cat([topk_logprobs, tail_logprob[:, None]], 1)` (N, k+1) (a merged tail is the prefix times the tail).

    Args:
        logprobs: (N, X) float log-probs of N rows.
        observed_logprob: (N,) float log-prob of the token each row predicts (the value at rows that end a group is
            not used).
        group_sizes: (G,) int >= 1, summing to N: rows per group, in order.

    Returns:
        (G, X) merged log-probs in the compute dtype (at least float32), differentiable w.r.t. both inputs.
    """
    logprobs = _check_tensor("logprobs", logprobs)
    if logprobs.dim() != 2 or not logprobs.is_floating_point():
        raise ValueError(
            f"logprobs must be a 2-D (N, X) floating tensor, got shape {tuple(logprobs.shape)} dtype {logprobs.dtype}"
        )
    n_rows = logprobs.shape[0]
    observed_logprob = _check_float_tensor("observed_logprob", observed_logprob, (n_rows,))
    group_sizes = _check_sizes("group_sizes", group_sizes, n_rows)
    cdtype = _compute_dtype(logprobs, observed_logprob)
    lp = logprobs.to(cdtype)
    ends, prefix = _group_prefix(observed_logprob.to(device=lp.device, dtype=cdtype), group_sizes, n_rows,
                                 "observed_logprob")
    return lp[ends] + prefix[:, None]


# --------------------------------------------------------------------------------------
# shared core
# --------------------------------------------------------------------------------------


def _prepare(
    student_logits: Any,
    teacher_topk_logprobs: Any,
    teacher_tail_logprob: Any,
    groups: MergeGroups | None,
    row_weight: Any,
    top: Any,
    reduction: Any,
):
    """Checks the common inputs; returns the student's and the teacher's merged rows.

    Returns (s_last (G, V_s) normalised student log-probs of each group's last row, s_prefix (G,), t_topk (G, k),
    t_tail (G,), t_prefix (G,), t_ends (G,) teacher rows ending the groups, row_weight, top, reduction, cdtype)."""
    student_logits = _check_tensor("student_logits", student_logits)
    if student_logits.dim() != 2 or not student_logits.is_floating_point() or student_logits.shape[1] < 1:
        raise ValueError(
            "student_logits must be a 2-D (N_s, V_s) floating tensor, got shape "
            f"{tuple(student_logits.shape)} dtype {student_logits.dtype}"
        )
    teacher_topk_logprobs = _check_tensor("teacher_topk_logprobs", teacher_topk_logprobs)
    if teacher_topk_logprobs.dim() != 2 or not teacher_topk_logprobs.is_floating_point() \
            or teacher_topk_logprobs.shape[1] < 1:
        raise ValueError(
            "teacher_topk_logprobs must be a 2-D (N_t, k) floating tensor with k >= 1, got shape "
            f"{tuple(teacher_topk_logprobs.shape)} dtype {teacher_topk_logprobs.dtype}"
        )
    n_s = student_logits.shape[0]
    n_t = teacher_topk_logprobs.shape[0]
    teacher_tail_logprob = _check_float_tensor("teacher_tail_logprob", teacher_tail_logprob, (n_t,))
    top = _check_top(top)
    reduction = _check_reduction(reduction)
    device = student_logits.device
    cdtype = _compute_dtype(student_logits)
    ls = torch.log_softmax(student_logits.to(cdtype), dim=-1)  # (N_s, V_s)
    t_topk = teacher_topk_logprobs.to(device=device, dtype=cdtype).clamp(min=TEACHER_LOGPROB_FLOOR)
    t_tail = teacher_tail_logprob.to(device=device, dtype=cdtype)

    if groups is None:
        if n_s != n_t:
            raise ValueError(
                f"without groups the student and the teacher must have the same rows, got N_s={n_s} and N_t={n_t}"
            )
        zeros = torch.zeros(n_s, dtype=cdtype, device=device)
        s_last, s_prefix, t_prefix = ls, zeros, zeros
        t_ends = torch.arange(n_t, device=device)
    else:
        if not isinstance(groups, MergeGroups):
            raise ValueError(f"groups must be a MergeGroups or None, got {type(groups).__name__}")
        s_sizes = _check_sizes("groups.student_sizes", groups.student_sizes, n_s)
        t_sizes = _check_sizes("groups.teacher_sizes", groups.teacher_sizes, n_t)
        if s_sizes.shape != t_sizes.shape:
            raise ValueError(
                "groups.student_sizes and groups.teacher_sizes must have the same length G, got "
                f"{s_sizes.shape[0]} and {t_sizes.shape[0]}"
            )
        s_obs = None
        if groups.student_token_ids is not None:
            ids = _check_int_tensor("groups.student_token_ids", groups.student_token_ids, (n_s,))
            ids = ids.to(device=device, dtype=torch.long)
            if n_s and (int(ids.min()) < 0 or int(ids.max()) >= ls.shape[1]):
                raise ValueError(
                    f"groups.student_token_ids must be in [0, V_s={ls.shape[1]}), got "
                    f"[{int(ids.min())}, {int(ids.max())}]"
                )
            s_obs = ls.gather(1, ids[:, None])[:, 0]
        s_ends, s_prefix = _group_prefix(s_obs, s_sizes.to(device), n_s, "groups.student_token_ids")
        s_prefix = s_prefix.to(cdtype)
        t_obs = None
        if groups.teacher_observed_logprob is not None:
            t_obs = _check_float_tensor("groups.teacher_observed_logprob", groups.teacher_observed_logprob, (n_t,))
            t_obs = t_obs.to(device=device, dtype=cdtype).clamp(min=TEACHER_LOGPROB_FLOOR)
        t_ends, t_prefix = _group_prefix(t_obs, t_sizes.to(device), n_t, "groups.teacher_observed_logprob")
        t_prefix = t_prefix.to(cdtype)
        s_last = ls if s_ends.shape[0] == n_s else ls[s_ends]
        t_topk, t_tail = t_topk[t_ends], t_tail[t_ends]

    n_groups = s_last.shape[0]
    if row_weight is not None:
        row_weight = _check_float_tensor("row_weight", row_weight, (n_groups,)).to(device=device, dtype=cdtype)
    return s_last, s_prefix, t_topk, t_tail, t_prefix, t_ends, row_weight, top, reduction, cdtype


def _sorted_l1(
    s_last: torch.Tensor,
    s_prefix: torch.Tensor,
    s_covered: torch.Tensor | None,
    s_covered_mass: torch.Tensor | None,
    t_known: torch.Tensor,
    t_tail: torch.Tensor,
    t_prefix: torch.Tensor,
    top: int | None,
) -> torch.Tensor:
    """Per-row sorted-probability L1 (ULD) between the parts of two distributions left to it, tail as one bucket.

    Args:
        s_last: (G, V_s) student log-probs (normalised) of the groups' last rows.
        s_prefix: (G,) log-prob of the student groups' prefixes (merged row = s_last + s_prefix).
        s_covered: (G, V_s) bool, student ids left out (matched ids in the hybrid), or None.
        s_covered_mass: (G,) their total probability in `s_last` (None when `s_covered` is None).
        t_known: (G, k) teacher log-probs of the entries taking part; -inf marks entries left out.
        t_tail: (G,) log teacher tail mass (outside the top-k), may be -inf.
        t_prefix: (G,) log-prob of the teacher groups' prefixes.
        top: sorted positions compared entry by entry (None: k).

    Returns:
        (G,) `sum_{j < m} |q_(j) - p_(j)| + |Q_rest - P_rest|` where m = min(top, number of known teacher entries)
        per row, p_(j) the known teacher entries sorted, q_(j) the student's, P_rest / Q_rest the rest of each side.
    """
    n_groups, k = t_known.shape
    t = k if top is None else min(top, k)
    t_sorted = t_known.sort(dim=-1, descending=True).values  # -inf (left out) last
    n_known = (t_sorted > _NEG_INF).sum(-1)  # (G,)
    t_head = t_sorted[:, :t]
    t_rest = t_sorted[:, t:]
    p_rest_log = t_tail if t_rest.shape[1] == 0 else torch.logaddexp(t_tail, torch.logsumexp(t_rest, dim=-1))

    s_masked = s_last if s_covered is None else s_last.masked_fill(s_covered, _NEG_INF)
    ts = min(t, s_last.shape[1])
    s_head = s_masked.topk(ts, dim=-1).values  # (G, ts), descending
    if ts < t:  # the student has fewer ids: pad with zero probabilities, as ULD does
        s_head = torch.cat([s_head, s_head.new_full((n_groups, t - ts), _NEG_INF)], dim=-1)

    pos = torch.arange(t, device=t_head.device)[None, :] < n_known[:, None]  # (G, t) compared entry by entry
    q = torch.exp(s_head + s_prefix[:, None])
    p = torch.exp(t_head + t_prefix[:, None])
    zero = torch.zeros((), dtype=q.dtype, device=q.device)
    head = torch.where(pos, (q - p).abs(), zero).sum(-1)
    s_left = 1.0 if s_covered_mass is None else (1.0 - s_covered_mass)
    q_rest = (torch.exp(s_prefix) * s_left - torch.where(pos, q, zero).sum(-1)).clamp(min=0.0)
    p_rest = torch.exp(p_rest_log + t_prefix)
    return head + (q_rest - p_rest).abs()


# --------------------------------------------------------------------------------------
# ULD
# --------------------------------------------------------------------------------------


def uld_loss(
    student_logits: torch.Tensor,
    teacher_topk_logprobs: torch.Tensor,
    teacher_tail_logprob: torch.Tensor,
    *,
    top: int | None = None,
    groups: MergeGroups | None = None,
    row_weight: torch.Tensor | None = None,
    reduction: str = "sum",
) -> torch.Tensor:
    """ULD (Boizard et al. 2024) from the cached top-k + tail: sorted-probability L1, the tail as one bucket.

    Per compared row (group), with the teacher's cached probabilities sorted descending p_(1) >= ... >= p_(k), its
    tail mass tau, and the student's probabilities sorted descending q_(1) >= ... >= q_(V_s):

        loss = sum_{j <= m} |q_(j) - p_(j)|  +  |(1 - sum_{j <= m} q_(j)) - (tau + sum_{m < j <= k} p_(j))|

    with m = min(top, k) (positions past V_s count as q = 0, ULD's zero padding). When the top-k hold all the
    teacher's mass (tail -inf) and top = k, this is exactly ULD's `sum_j |q_(j) - p_(j)|` over all
    max(V_s, V_t) positions (TRL's `ULDLoss` with `use_hybrid_loss=False`, per row). Otherwise the last term,
    the tail as one bucket, is a lower bound of the unknown exact tail distance (module docstring: why not spread
    the tail). Only the student's `m` largest probabilities are needed (`topk`, no full sort).

    Merged groups (`groups`): both sides' rows are merged by the chain rule (`merge_group_logprobs`): the merged
    distributions are unnormalised (total = the prefix's probability), and the formula applies with `1` replaced
    by the student prefix's probability and every teacher term scaled by the teacher prefix's.

    Args:
        student_logits: (N_s, V_s) raw student logits at the student rows (any float dtype; computed in at least
            float32).
        teacher_topk_logprobs: (N_t, k) cached teacher top-k log-probs (any order; ids are not needed: ULD
            compares sorted values).
        teacher_tail_logprob: (N_t,) log of the teacher's mass outside the top-k (-inf when none).
        top: sorted positions compared one by one, >= 1 (None: k; values above k act as k). A smaller `top` puts
            the teacher's cached entries after it into the bucket and costs less (`topk(top)` of the student).
        groups: how rows form the G compared rows (`MergeGroups`); None: one-to-one, N_s == N_t == G.
        row_weight: optional (G,) weights of the compared rows.
        reduction: "sum" (scalar), "mean" (scalar, divided by G; TRL's per-sample normalisation) or "none" ((G,)).

    Returns:
        Scalar or (G,) tensor in the compute dtype, in [0, 2] per row before weights, differentiable w.r.t.
        `student_logits`.
    """
    (s_last, s_prefix, t_topk, t_tail, t_prefix, _, row_weight, top, reduction, _) = _prepare(
        student_logits, teacher_topk_logprobs, teacher_tail_logprob, groups, row_weight, top, reduction
    )
    per_row = _sorted_l1(s_last, s_prefix, None, None, t_topk, t_tail, t_prefix, top)
    if row_weight is not None:
        per_row = per_row * row_weight
    return _reduce(per_row, reduction)


# --------------------------------------------------------------------------------------
# hybrid (GOLD)
# --------------------------------------------------------------------------------------


def _matched_divergence(
    lt: torch.Tensor, ls: torch.Tensor, matched: torch.Tensor, kind: str, jsd_beta: float, generalized: bool
) -> torch.Tensor:
    """Per-row divergence over the matched entries of unnormalised sub-distributions (GOLD's formulas).

    Args:
        lt: (G, k) teacher log-probs (finite), ls: (G, k) student log-probs at the mapped ids (finite where
            `matched`), matched: (G, k) bool.

    Returns:
        (G,): forward `sum p (log p - log q)`, reverse `sum q (log q - log p)`, or with M = beta p + (1 - beta) q,
        `beta KL(p || M) + (1 - beta) KL(q || M)`, summed over the matched entries only. `generalized` adds the
        mass terms `sum (q - p)` (forward) / `sum (p - q)` (reverse) that make a KL between unnormalised
        vectors >= 0 with its minimum at q = p (the JSD needs none: its mass terms cancel).
    """
    zero = torch.zeros((), dtype=lt.dtype, device=lt.device)
    lt = torch.where(matched, lt, zero)
    ls = torch.where(matched, ls, zero)
    pt, ps = lt.exp(), ls.exp()
    if kind == "forward_kl":
        terms = pt * (lt - ls) + ((ps - pt) if generalized else 0.0)
    elif kind == "reverse_kl":
        terms = ps * (ls - lt) + ((pt - ps) if generalized else 0.0)
    else:
        lm = torch.logaddexp(lt + math.log(jsd_beta), ls + math.log1p(-jsd_beta))
        terms = jsd_beta * pt * (lt - lm) + (1.0 - jsd_beta) * ps * (ls - lm)
    return torch.where(matched, terms, zero).sum(-1)


def hybrid_loss(
    student_logits: torch.Tensor,
    teacher_topk_ids: torch.Tensor,
    teacher_topk_logprobs: torch.Tensor,
    teacher_tail_logprob: torch.Tensor,
    mapping: torch.Tensor,
    *,
    kind: str = "forward_kl",
    jsd_beta: float = 0.5,
    generalized: bool = False,
    matched_weight: float | None = None,
    unmatched_weight: float | None = None,
    top: int | None = None,
    groups: MergeGroups | None = None,
    row_weight: torch.Tensor | None = None,
    reduction: str = "sum",
) -> torch.Tensor:
    """GOLD's hybrid from the cached top-k + tail: a KL over the matched tokens, ULD over the rest.

    Per compared row, the teacher's top-k ids i with `mapping[i] >= 0` (a student token with the same bytes) are
    *matched*: their teacher probabilities p_i and the student's q_{mapping[i]} are compared by `kind`, as
    sub-distributions (not renormalised, as GOLD does). Everything else -- the teacher's unmatched top-k entries
    and its tail, the student's ids other than this row's matched images -- is compared by ULD (`uld_loss`'s
    sorted L1, the tail as one bucket). So the two parts cover complementary sets on both sides and the masses
    balance. Total per row: `matched_weight * matched + unmatched_weight * unmatched`.

    Against TRL (`ULDLoss._compute_hybrid_uld_loss`, `uld_use_hybrid_loss=True`): GOLD matches over the whole
    vocabulary (every teacher id with a student string); with the full vocabulary in the top-k (tail -inf,
    k = V_t) the row's matched ids are exactly those and the two agree. With k < V_t the teacher's matched ids
    in the tail have unknown probabilities: they stay in the tail, compared by ULD with the student's mass at
    their images. GOLD's `kind` is its `beta`: 0 = "forward_kl", 1 = "reverse_kl", in between "jsd" with
    `jsd_beta = beta` (`kd_train.losses`' convention, M = beta p_T + (1 - beta) p_S); GOLD's config default is
    beta = 0.5, the issue's "KL" is the default here. GOLD logs with probabilities clamped at 1e-8; here exact
    log-probs. Where one side has nothing unmatched, GOLD's unmatched term is 0 and this one is the other side's
    unmatched mass (it is 0 when both are empty).

    Weights (GOLD's): both None: `matched_weight = (mapping >= 0).sum() / len(mapping)` (the share of the
    teacher's vocabulary with a student token) and `unmatched_weight = 1 - matched_weight`; otherwise both floats.

    The matched KL of sub-distributions can be negative and its minimum over the student is not at q = p (it
    rewards moving mass onto matched ids; the ULD part pulls back). `generalized=True` adds the mass terms
    (`sum (q - p)` forward, `sum (p - q)` reverse) that make it a divergence between positive measures, >= 0 and
    0 only at q = p on the matched ids; False reproduces GOLD.

    Args:
        student_logits: (N_s, V_s) raw student logits.
        teacher_topk_ids: (N_t, k) int cached teacher top-k ids, in [0, len(mapping)).
        teacher_topk_logprobs: (N_t, k) their log-probs.
        teacher_tail_logprob: (N_t,) log teacher mass outside the top-k (-inf when none).
        mapping: (V_t,) int teacher id -> student id with the same bytes, -1 when none (`vocab_map`); the images
            of one row's matched ids must be distinct (`vocab_map` is injective), values < V_s.
        kind: one of `kd_train.losses.KINDS` for the matched part.
        jsd_beta: 0 < beta < 1, for kind="jsd".
        generalized: add the mass terms to the forward / reverse KL (see above).
        matched_weight, unmatched_weight: both None (GOLD's adaptive weights) or both finite floats >= 0.
        top: sorted positions of the unmatched parts compared one by one (None: k).
        groups: how rows form the G compared rows (`MergeGroups`); the merged teacher row is the last row's
            top-k with its own ids (their probabilities scaled by the prefix).
        row_weight: optional (G,) weights of the compared rows.
        reduction: "sum", "mean" (over the G rows) or "none" ((G,)).

    Returns:
        Scalar or (G,) tensor in the compute dtype, differentiable w.r.t. `student_logits`.
    """
    kind = _check_kind(kind)
    jsd_beta = _check_jsd_beta(jsd_beta)
    generalized = _check_bool("generalized", generalized)
    mapping = _check_int_tensor("mapping", mapping)
    if mapping.dim() != 1 or mapping.shape[0] < 1:
        raise ValueError(f"mapping must be a non-empty 1-D (V_t,) tensor, got shape {tuple(mapping.shape)}")
    if (matched_weight is None) != (unmatched_weight is None):
        raise ValueError(
            "matched_weight and unmatched_weight must be both None (GOLD's adaptive weights) or both set, got "
            f"{matched_weight!r} and {unmatched_weight!r}"
        )
    if matched_weight is not None:
        matched_weight = _check_real("matched_weight", matched_weight)
        unmatched_weight = _check_real("unmatched_weight", unmatched_weight)
        if matched_weight < 0.0 or unmatched_weight < 0.0:
            raise ValueError(f"weights must be >= 0, got {matched_weight!r} and {unmatched_weight!r}")
    teacher_topk_ids = _check_int_tensor("teacher_topk_ids", teacher_topk_ids)
    if tuple(teacher_topk_ids.shape) != tuple(getattr(teacher_topk_logprobs, "shape", ())):
        raise ValueError(
            "teacher_topk_ids must have the shape of teacher_topk_logprobs "
            f"{tuple(getattr(teacher_topk_logprobs, 'shape', ()))}, got {tuple(teacher_topk_ids.shape)}"
        )

    (s_last, s_prefix, t_topk, t_tail, t_prefix, t_ends, row_weight, top, reduction, cdtype) = _prepare(
        student_logits, teacher_topk_logprobs, teacher_tail_logprob, groups, row_weight, top, reduction
    )
    device = s_last.device
    v_t, v_s = mapping.shape[0], s_last.shape[1]
    mapping = mapping.to(device=device, dtype=torch.long)
    if int(mapping.min()) < -1 or int(mapping.max()) >= v_s:
        raise ValueError(
            f"mapping values must be -1 or student ids in [0, V_s={v_s}), got [{int(mapping.min())}, "
            f"{int(mapping.max())}]"
        )
    ids = teacher_topk_ids.to(device=device, dtype=torch.long)[t_ends]  # (G, k)
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= v_t):
        raise ValueError(
            f"teacher_topk_ids must be in [0, len(mapping)={v_t}), got [{int(ids.min())}, {int(ids.max())}]"
        )
    sid = mapping[ids]  # (G, k)
    matched = sid >= 0
    if sid.shape[1] > 1:
        srt = torch.where(matched, sid, -torch.arange(1, sid.shape[1] + 1, device=device)).sort(-1).values
        if bool((srt[:, 1:] == srt[:, :-1]).any()):
            raise ValueError(
                "mapping sends two of a row's top-k teacher ids to the same student id; it must be injective "
                "(vocab_map is), got a duplicate"
            )
    sid0 = sid.clamp(min=0)

    ls_matched = s_last.gather(1, sid0)  # (G, k) normalised student log-probs at the images
    lt_m = t_topk + t_prefix[:, None]
    ls_m = ls_matched + s_prefix[:, None]
    matched_part = _matched_divergence(lt_m, ls_m, matched, kind, jsd_beta, generalized)

    # student ids this row's matched teacher ids map to (distinct per row); unmatched entries write a spare column
    covered = torch.zeros(s_last.shape[0], v_s + 1, dtype=torch.bool, device=device).scatter_(
        1, torch.where(matched, sid, v_s), True
    )[:, :v_s]
    covered_mass = torch.where(matched, ls_matched.exp(), torch.zeros((), dtype=cdtype, device=device)).sum(-1)
    t_known = t_topk.masked_fill(matched, _NEG_INF)
    unmatched_part = _sorted_l1(s_last, s_prefix, covered, covered_mass, t_known, t_tail, t_prefix, top)

    if matched_weight is None:
        matched_weight = float((mapping >= 0).sum()) / v_t
        unmatched_weight = 1.0 - matched_weight
    per_row = matched_weight * matched_part + unmatched_weight * unmatched_part
    if row_weight is not None:
        per_row = per_row * row_weight
    return _reduce(per_row, reduction)


# --------------------------------------------------------------------------------------
# vocabulary map
# --------------------------------------------------------------------------------------

_BYTE_FALLBACK = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


def token_bytes(tokenizer: Any) -> list[bytes | None]:
    """The bytes each token id covers in text (`kd_train.align.token_bytes`, the one definition the byte alignment
    uses too); None for special tokens, which match only a special token with the same content in `vocab_map`."""
    tb = align_token_bytes(tokenizer)
    return [None if tb.is_special(i) else tb[i] for i in range(len(tb))]


def _keys(tokenizer: Any) -> list[tuple[Any, int] | None]:
    """Per id: (match key, preference rank: lower wins among ids with the same key) or None."""
    data = token_bytes(tokenizer)
    added = dict(getattr(tokenizer, "added_tokens_decoder", {}) or {})
    vocab = tokenizer.backend_tokenizer.get_vocab(with_added_tokens=False)
    names = {i: t for t, i in vocab.items()}
    out: list[tuple[Any, int] | None] = [None] * len(data)
    for i, b in enumerate(data):
        if b is not None:
            # a byte-fallback token loses to the plain token with the same bytes
            rank = 1 if _BYTE_FALLBACK.match(names.get(i, "")) else 0
            out[i] = (("bytes", b), rank)
        elif i in added and getattr(added[i], "special", False):
            out[i] = (("special", str(added[i].content)), 0)
    return out


def vocab_map(
    teacher_tokenizer: Any,
    student_tokenizer: Any,
    *,
    teacher_size: int | None = None,
    extra_pairs: Mapping[int, int] | None = None,
) -> torch.Tensor:
    """Teacher id -> student id of the token that covers the same bytes (`token_bytes`), -1 when none.

    GOLD (`ULDLoss._initialize_vocabulary_mapping`) matches raw token strings, so `Ġthe` (byte-level) never meets
    `▁the` (sentencepiece); here both are b" the" and match. Special tokens match only a special token with the
    same content; `extra_pairs` adds pairs such as the end-of-answer markers (`</s>` -> `<|im_end|>`), which win
    over byte matches. The map is injective: when several ids of one tokenizer cover the same bytes (a
    byte-fallback `<0x41>` and `A`), the plain token wins over the byte-fallback one, then the lower id; the
    teacher ids that lose map to -1 (their probability goes to the ULD part of `hybrid_loss`).

    Args:
        teacher_tokenizer, student_tokenizer: transformers tokenizers backed by `tokenizers`.
        teacher_size: length of the map, at least the teacher tokenizer's; set it to the teacher's head size
            (the cache's vocabulary) when that is larger (padding ids map to -1).
        extra_pairs: teacher id -> student id pairs added last.

    Returns:
        (V_t,) int64 tensor.
    """
    t_keys = _keys(teacher_tokenizer)
    s_keys = _keys(student_tokenizer)
    size = len(t_keys)
    if teacher_size is not None:
        if isinstance(teacher_size, bool) or not isinstance(teacher_size, int) or teacher_size < size:
            raise ValueError(
                f"teacher_size must be an int >= the teacher tokenizer's {size} ids, got {teacher_size!r}"
            )
        size = teacher_size
    best_student: dict[Any, tuple[int, int]] = {}
    for sid, entry in enumerate(s_keys):
        if entry is not None:
            key, rank = entry
            if key not in best_student or (rank, sid) < best_student[key]:
                best_student[key] = (rank, sid)
    best_teacher: dict[Any, tuple[int, int]] = {}
    for tid, entry in enumerate(t_keys):
        if entry is not None and entry[0] in best_student:
            key, rank = entry
            if key not in best_teacher or (rank, tid) < best_teacher[key]:
                best_teacher[key] = (rank, tid)
    out = torch.full((size,), -1, dtype=torch.long)
    for key, (_, tid) in best_teacher.items():
        out[tid] = best_student[key][1]
    for tid, sid in (extra_pairs or {}).items():
        if not (0 <= int(tid) < size) or not (0 <= int(sid) < len(s_keys)):
            raise ValueError(
                f"extra_pairs must map teacher ids in [0, {size}) to student ids in [0, {len(s_keys)}), "
                f"got {tid!r}: {sid!r}"
            )
        out[out == int(sid)] = -1
        out[int(tid)] = int(sid)
    return out
