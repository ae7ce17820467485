"""Teacher targets from logits, computed on the teacher's device before anything is copied to the host."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from kd_cache.build_config import BuildConfig
from kd_cache.codec import quantize_eigvecs

# the defaults of the settings a caller may leave out are `kd cache build`'s, so the two cannot disagree
_BUILD_DEFAULTS = {f.name: f.default for f in dataclasses.fields(BuildConfig)}


@dataclass(frozen=True, kw_only=True)
class TargetOptions:
    """What the teacher computes per sample; both teacher backends take the same object.

    kind: "topk" (k ids per row) or "sampled" (`samples` draws per row), chosen per row type with nothing assumed:
    the row kinds and widths are always given. `text_k` and `visual_k` are clamped here to `vocab_size` (the
    teacher's logit width), the one place where a requested top-k meets the vocabulary.
    """

    text_kind: str
    text_k: int
    visual_kind: str
    visual_k: int
    vocab_size: int
    samples: int = _BUILD_DEFAULTS["samples"]
    gram: bool = _BUILD_DEFAULTS["gram"]
    gram_lowrank: bool = _BUILD_DEFAULTS["gram_encoding"] == "lowrank"
    gram_tolerance: float = _BUILD_DEFAULTS["gram_tolerance"]
    seed: int = _BUILD_DEFAULTS["seed"]

    def __post_init__(self) -> None:
        object.__setattr__(self, "text_k", min(self.text_k, self.vocab_size))
        object.__setattr__(self, "visual_k", min(self.visual_k, self.vocab_size))

    @classmethod
    def from_config(cls, cfg: BuildConfig, vocab_size: int) -> "TargetOptions":
        """The options of a `kd cache build` configuration for a teacher with `vocab_size` logits per row."""
        return cls(text_kind=cfg.targets, text_k=cfg.top_k, visual_kind=cfg.visual_targets, visual_k=cfg.visual_top_k,
                   vocab_size=vocab_size, samples=cfg.samples, gram=cfg.gram,
                   gram_lowrank=cfg.gram_encoding == "lowrank", gram_tolerance=cfg.gram_tolerance, seed=cfg.seed)


@dataclass
class RowTargets:
    """Sparse targets for N logits rows (all on one device until `.cpu()` is called)."""

    topk_ids: torch.Tensor  # (N, k) int64, in descending probability order
    topk_logprobs: torch.Tensor  # (N, k) float32, log-softmax of the raw logits at those ids
    tail_logprob: torch.Tensor  # (N,) float32, log of the probability mass outside the top-k (-inf if none)
    logsumexp: torch.Tensor  # (N,) float32, logsumexp of the raw logits over the full vocabulary


def topk_targets(logits: torch.Tensor, k: int, *, chunk_rows: int = 256) -> RowTargets:
    """Top-k log-probs, tail mass and logsumexp of raw logits.

    Args:
        logits: (N, V) raw logits, any float dtype; math runs in float32.
        k: number of ids kept per row, at most V (`TargetOptions` clamps a requested k to the vocabulary).
    The tail is a logsumexp over the vocabulary with the top-k ids masked out, not log(1 - sum p), which
    would cancel catastrophically when the top-k hold nearly all the mass.
    """
    n, v = logits.shape
    if k > v:
        raise ValueError(f"top-k of {k} ids from {v} logits per row; clamp k to the vocabulary (TargetOptions does)")
    ids, lps, tails, lses = [], [], [], []
    for start in range(0, max(n, 1), chunk_rows):
        z = logits[start : start + chunk_rows].float()
        if z.shape[0] == 0:
            break
        lse = torch.logsumexp(z, dim=-1)
        vals, idx = torch.topk(z, k, dim=-1, sorted=True)
        tail = torch.logsumexp(z.scatter(-1, idx, float("-inf")), dim=-1) - lse
        ids.append(idx)
        lps.append(vals - lse[:, None])
        tails.append(tail)
        lses.append(lse)
    if not ids:
        dev = logits.device
        return RowTargets(
            torch.zeros((0, k), dtype=torch.int64, device=dev),
            torch.zeros((0, k), dtype=torch.float32, device=dev),
            torch.zeros((0,), dtype=torch.float32, device=dev),
            torch.zeros((0,), dtype=torch.float32, device=dev),
        )
    return RowTargets(torch.cat(ids), torch.cat(lps), torch.cat(tails), torch.cat(lses))


def observed_logprobs(logits: torch.Tensor, labels: torch.Tensor, *, chunk_rows: int = 256) -> torch.Tensor:
    """(N,) float32 log-probs of `labels` (N,) under softmax(logits (N, V)): the teacher's probability of the token
    actually observed next, which may fall outside the top-k (cross-tokenizer losses merge them over a group)."""
    out = []
    for start in range(0, logits.shape[0], chunk_rows):
        z = logits[start: start + chunk_rows].float()
        lab = labels[start: start + chunk_rows].to(z.device, torch.long)
        out.append(z.gather(1, lab[:, None])[:, 0] - torch.logsumexp(z, dim=-1))
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.float32, device=logits.device)


def row_targets(logits: torch.Tensor, kind: str, k: int, samples: int, generator: torch.Generator | None):
    """Targets of one kind for (N, V) logits rows."""
    if kind == "topk":
        return topk_targets(logits, k)
    return sampled_targets(logits, samples, generator=generator)


def to_host(t) -> dict:
    """Device targets -> numpy arrays keyed like the cache columns (without the row prefix)."""
    if isinstance(t, RowTargets):
        return {"topk_ids": t.topk_ids.cpu().numpy(), "topk_logprobs": t.topk_logprobs.cpu().numpy(),
                "tail_logprob": t.tail_logprob.cpu().numpy(), "logsumexp": t.logsumexp.cpu().numpy()}
    if isinstance(t, SampledTargets):
        return {"sample_ids": t.ids.cpu().numpy(), "sample_counts": t.counts.cpu().numpy(),
                "sample_row_lengths": t.row_lengths.cpu().numpy(), "logsumexp": t.logsumexp.cpu().numpy(),
                "entropy": t.entropy.cpu().numpy()}
    if isinstance(t, GramFactors):
        if t.dense is not None:
            return {"dense": t.dense.float().cpu().numpy()}
        return {"mean": t.mean.float().cpu().numpy(), "eigvals": t.eigvals.cpu().numpy(),
                "scales": t.scales.cpu().numpy(), "eigvecs": t.eigvecs.cpu().numpy()}
    raise TypeError(f"unknown targets type {type(t).__name__}")


@dataclass
class SampledTargets:
    """Random-sampling KD targets (Anshumann et al. 2025) for N rows: `n_draws` ids drawn from the teacher
    distribution per row, stored as the unique ids with their counts. counts / n_draws is an unbiased estimate
    of the teacher distribution, so a cross-entropy against it has the full forward-KL gradient in expectation."""

    ids: torch.Tensor  # (M,) int64: unique sampled ids, rows concatenated, ascending within a row
    counts: torch.Tensor  # (M,) int64: how often each id was drawn (sums to n_draws per row)
    row_lengths: torch.Tensor  # (N,) int64: unique ids per row
    logsumexp: torch.Tensor  # (N,) float32
    # (N,) float32: the teacher's exact entropy H(p_T) per row, from the full logits (format v4): the sampled
    # cross-entropy minus it estimates KL(p_T || q_S), what the trainer logs
    entropy: torch.Tensor


def sampled_targets(logits: torch.Tensor, n_draws: int, *, generator: torch.Generator | None = None,
                    chunk_rows: int = 256) -> SampledTargets:
    """Draw `n_draws` ids per row from softmax(logits) (with replacement) and count the unique ones.

    Args:
        logits: (N, V) raw logits; math in float32.
        generator: a seeded generator on the logits' device makes the cache reproducible.
    """
    ids, counts, lengths, lses, ents = [], [], [], [], []
    for start in range(0, logits.shape[0], chunk_rows):
        z = logits[start: start + chunk_rows].float()
        lse = torch.logsumexp(z, dim=-1)
        p = torch.softmax(z, dim=-1)
        # H = lse - sum p z (a -inf logit has p = 0: its term is 0, not nan)
        ents.append((lse - torch.where(p > 0, p * z, torch.zeros_like(z)).sum(-1)).clamp_min(0))
        draws = torch.multinomial(p, n_draws, replacement=True, generator=generator)
        draws, _ = torch.sort(draws, dim=-1)
        new = torch.ones_like(draws, dtype=torch.bool)
        new[:, 1:] = draws[:, 1:] != draws[:, :-1]
        # run-length encode every row at once: run starts -> ids, gaps between starts -> counts; run_row: the row of
        # each run
        run_row = torch.arange(draws.shape[0], device=z.device)[:, None].expand_as(draws)[new]
        flat_pos = torch.nonzero(new.flatten()).flatten()
        ends = torch.cat([flat_pos[1:], flat_pos.new_tensor([draws.numel()])])
        ids.append(draws.flatten()[flat_pos])
        counts.append(ends - flat_pos)
        lengths.append(torch.bincount(run_row, minlength=draws.shape[0]))
        lses.append(lse)
    dev = logits.device
    if not ids:
        empty = torch.zeros(0, dtype=torch.int64, device=dev)
        none = torch.zeros(0, dtype=torch.float32, device=dev)
        return SampledTargets(empty, empty, empty, none, none)
    return SampledTargets(torch.cat(ids), torch.cat(counts), torch.cat(lengths), torch.cat(lses), torch.cat(ents))


@dataclass
class GramFactors:
    """A Gram matrix R = Z Zᵀ as stored by format v2 (see `kd_cache.codec.gram_from_lowrank`).

    Either `dense` (the (Nv, Nv) matrix) or the low-rank parts: `mean` (Nv,) per-row mean logits, the top-r
    eigenpairs of the row-centred R_c with eigenvectors quantized per column (`eigvecs` (Nv, r) int16 codes:
    int16 range for the first two, int8 range for the rest; `scales` (r,)), `eigvals` (r,)."""

    dense: torch.Tensor | None = None
    mean: torch.Tensor | None = None
    eigvals: torch.Tensor | None = None
    scales: torch.Tensor | None = None
    eigvecs: torch.Tensor | None = None

    @property
    def rank(self) -> int:
        return 0 if self.eigvals is None else int(self.eigvals.shape[0])


def _passing_ranks(u: torch.Tensor, lam: torch.Tensor, rc: torch.Tensor, m: torch.Tensor, vocab: int,
                   tolerance: float) -> torch.Tensor:
    """For every rank r = 1..t at once: whether R̂_c(r) = Σ_{i<r} λ_i u_i u_iᵀ (u: the dequantized eigenvectors,
    (Nv, t) float64; `lam`: the eigenvalues λ (t,)) has 1 − cos ≤ `tolerance` against R_c and, with the exact mean
    part V m mᵀ added, against R. (t,) bool on the device.

    Prefix sums instead of forming R̂_c(r) per rank: ⟨R̂_c(r), A⟩ = Σ_{i<r} λ_i u_iᵀ A u_i, and
    ‖R̂_c(r)‖² = Σ_{i,j<r} λ_i λ_j (u_iᵀ u_j)² (the quantized vectors are not exactly orthogonal)."""
    c_rc = (lam * ((u.T @ rc) * u.T).sum(1)).cumsum(0)  # ⟨R̂_c(r), R_c⟩
    c_mm = (lam * vocab * (u.T @ m) ** 2).cumsum(0)  # ⟨R̂_c(r), V m mᵀ⟩
    g = (lam[:, None] * lam[None, :]) * (u.T @ u) ** 2
    nn_hat = g.cumsum(0).cumsum(1).diagonal()  # ‖R̂_c(r)‖²
    nn_rc = (rc * rc).sum()
    rc_mm = vocab * (m @ rc @ m)  # ⟨R_c, V m mᵀ⟩
    nn_mm = (vocab * (m @ m)) ** 2
    gap_c = 1.0 - c_rc / (nn_hat * nn_rc).sqrt().clamp_min(1e-300)
    gap_r = 1.0 - (c_rc + c_mm + rc_mm + nn_mm) / ((nn_hat + 2 * c_mm + nn_mm) * (nn_rc + 2 * rc_mm + nn_mm)
                                                   ).sqrt().clamp_min(1e-300)
    return (gap_c <= tolerance) & (gap_r <= tolerance)


def gram_factors(logits: torch.Tensor, *, tolerance: float = 1e-4, lowrank: bool = True) -> GramFactors:
    """R = Z Zᵀ of raw logits Z (Nv, V), compressed: the exact row-mean part V m mᵀ plus the smallest-rank
    int8 eigendecomposition of R_c = Z_c Z_cᵀ (Z_c: rows centred) with 1 − cos ≤ `tolerance` on both R and R_c.

    92–97 % of ‖R‖² is the row-mean part, so 1 − cos on R alone says little; requiring it on R_c too keeps the
    structure RDist compares. Falls back to the dense matrix when no rank beats it in bytes (e.g. tiny or
    random-weight teachers, whose R_c is full-rank). All math on the logits' device, eigh in float64; every rank's
    test is computed at once (`_passing_ranks`) and read with one host sync.
    """
    z = logits.float()
    n, vocab = z.shape
    r_full = z @ z.T
    if not lowrank or n < 4:
        return GramFactors(dense=r_full)
    m = z.mean(dim=-1)
    zc = z - m[:, None]
    rc = (zc @ zc.T).double()
    evals, evecs = torch.linalg.eigh(rc)
    evals, evecs = evals.flip(0).clamp_min(0), evecs.flip(1)
    max_rank = int((2 * n * (n + 1) - 4 * n) // (n + 8))  # beyond this the dense upper triangle is smaller
    top = min(max_rank, n)
    # quantized per column, so rank r's codes and scales are the first r columns of these
    q, scales = quantize_eigvecs(evecs[:, :top])
    ok = _passing_ranks(q * scales, evals[:top], rc, m.double(), vocab, tolerance).tolist()
    lo, hi, rank = 1, top, None
    while lo <= hi:  # smallest passing rank (quantization noise makes the test nearly, not strictly, monotone)
        mid = (lo + hi) // 2
        if ok[mid - 1]:
            rank, hi = mid, mid - 1
        else:
            lo = mid + 1
    if rank is None:
        return GramFactors(dense=r_full)
    return GramFactors(mean=m, eigvals=evals[:rank].float(), scales=scales[:rank].float(),
                       eigvecs=q[:, :rank].to(torch.int16))


