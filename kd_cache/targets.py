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
