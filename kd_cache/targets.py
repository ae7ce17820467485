"""Teacher targets from logits, computed on the teacher's device before anything is copied to the host."""

from __future__ import annotations

from dataclasses import dataclass

import torch


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
        k: number of ids kept per row (clamped to V).
    The tail is a logsumexp over the vocabulary with the top-k ids masked out, not log(1 - sum p), which
    would cancel catastrophically when the top-k hold nearly all the mass.
    """
    n, v = logits.shape
    k = min(k, v)
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


def gram(logits: torch.Tensor) -> torch.Tensor:
    """R = Z Zᵀ of raw logits Z (Nv, V), accumulated in float32. Returns (Nv, Nv) float32."""
    z = logits.float()
    return z @ z.T


@dataclass
class SampledTargets:
    """Random-sampling KD targets (Anshumann et al. 2025) for N rows: `n_draws` ids drawn from the teacher
    distribution per row, stored as the unique ids with their counts. counts / n_draws is an unbiased estimate
    of the teacher distribution, so a cross-entropy against it has the full forward-KL gradient in expectation."""

    ids: torch.Tensor  # (M,) int64: unique sampled ids, rows concatenated, ascending within a row
    counts: torch.Tensor  # (M,) int64: how often each id was drawn (sums to n_draws per row)
    row_lengths: torch.Tensor  # (N,) int64: unique ids per row
    logsumexp: torch.Tensor  # (N,) float32


def sampled_targets(logits: torch.Tensor, n_draws: int, *, generator: torch.Generator | None = None,
                    chunk_rows: int = 256) -> SampledTargets:
    """Draw `n_draws` ids per row from softmax(logits) (with replacement) and count the unique ones.

    Args:
        logits: (N, V) raw logits; math in float32.
        generator: a seeded generator on the logits' device makes the cache reproducible.
    """
    ids, counts, lengths, lses = [], [], [], []
    for start in range(0, logits.shape[0], chunk_rows):
        z = logits[start: start + chunk_rows].float()
        lse = torch.logsumexp(z, dim=-1)
        draws = torch.multinomial(torch.softmax(z, dim=-1), n_draws, replacement=True, generator=generator)
        draws, _ = torch.sort(draws, dim=-1)
        new = torch.ones_like(draws, dtype=torch.bool)
        new[:, 1:] = draws[:, 1:] != draws[:, :-1]
        # run-length encode every row at once: run starts -> ids, gaps between starts -> counts
        row_of = torch.arange(draws.shape[0], device=z.device)[:, None].expand_as(draws)[new]
        flat_pos = torch.nonzero(new.flatten()).flatten()
        ends = torch.cat([flat_pos[1:], flat_pos.new_tensor([draws.numel()])])
        ids.append(draws.flatten()[flat_pos])
        counts.append(ends - flat_pos)
        lengths.append(torch.bincount(row_of, minlength=draws.shape[0]))
        lses.append(lse)
    dev = logits.device
    if not ids:
        empty = torch.zeros(0, dtype=torch.int64, device=dev)
        return SampledTargets(empty, empty, empty, torch.zeros(0, dtype=torch.float32, device=dev))
    return SampledTargets(torch.cat(ids), torch.cat(counts), torch.cat(lengths), torch.cat(lses))
