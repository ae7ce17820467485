"""Per-sample features and batches for the student: model inputs plus the cached teacher targets.

The student re-encodes each record with its own processor through `kd_cache.data.Encoder` (the function the
cache builder used), which yields its pixels; the token ids must then equal the cached `input_ids` exactly,
so text rows align by construction and a mismatch is an error, never a silent shift.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from kd_cache.codec import LOGPROB_KEYS, ROWS, CachedSample, target_keys
from kd_cache.data import EncodedSample, Encoder, image_token_id_of
from kd_cache.hf import collate as collate_model_inputs, tokenizer_of


class CacheMismatchError(ValueError):
    """The student's encoding of a sample differs from what the cache recorded."""


def features(encoded: EncodedSample, cached: CachedSample | None = None) -> dict:
    """One training example: the encoded sample and (for KD stages) its cached targets, as numpy arrays."""
    out = {"encoded": encoded, "n_tokens": len(encoded.input_ids)}
    if cached is None:
        return out
    if not np.array_equal(encoded.input_ids, cached["input_ids"]):
        n = min(len(encoded.input_ids), len(cached["input_ids"]))
        neq = np.flatnonzero(encoded.input_ids[:n] != cached["input_ids"][:n])
        diff = int(neq[0]) if len(neq) else n
        raise CacheMismatchError(
            f"sample {cached['sample_id']!r}: the student's tokens differ from the cached input_ids at position {diff} "
            f"(student {len(encoded.input_ids)} tokens, cache {len(cached['input_ids'])}); the student's processor, "
            "chat template or max_length does not match the cache's"
        )
    for prefix in ROWS:
        if not np.array_equal(getattr(encoded, f"{prefix}_positions"), cached[f"{prefix}_positions"]):
            raise CacheMismatchError(f"sample {cached['sample_id']!r}: {prefix} positions differ from the cache's")
    for name in target_keys(cached):
        out[name] = cached[name]
    out["gram"] = cached["gram"]
    return out


@dataclass
class Batch:
    """A micro-batch. Row indices select logits rows: (batch index, position) pairs."""

    model_inputs: dict[str, torch.Tensor]
    text_rows: torch.Tensor  # (2, Nt) long: batch index, position of rows predicting supervised tokens
    text_labels: torch.Tensor  # (Nt,) long: the supervised next tokens
    visual_rows: torch.Tensor  # (2, Nv) long
    visual_splits: list[int]  # visual rows per sample (for per-sample Gram matrices)
    targets: dict[str, torch.Tensor] | None  # text_*/visual_* targets concatenated over the batch; grams list below
    grams: list[torch.Tensor] | None
    n_tokens: int

    def to(self, device) -> "Batch":
        mv = lambda t: t.to(device, non_blocking=True)  # noqa: E731
        return Batch(
            {k: mv(v) for k, v in self.model_inputs.items()}, mv(self.text_rows), mv(self.text_labels),
            mv(self.visual_rows), self.visual_splits,
            None if self.targets is None else {k: mv(v) for k, v in self.targets.items()},
            None if self.grams is None else [mv(g) for g in self.grams], self.n_tokens,
        )

    @property
    def n_text(self) -> int:
        return int(self.text_rows.shape[1])

    @property
    def n_visual(self) -> int:
        return int(self.visual_rows.shape[1])

    @property
    def n_gram(self) -> int:
        return sum(1 for n in self.visual_splits if n > 0)


def _rows(positions: list[np.ndarray]) -> torch.Tensor:
    b = np.concatenate([np.full(len(p), i, dtype=np.int64) for i, p in enumerate(positions)]) if positions else []
    p = np.concatenate(positions) if positions else []
    return torch.as_tensor(np.stack([np.asarray(b, np.int64), np.asarray(p, np.int64)]), dtype=torch.long)


def make_batch(items: list[dict], pad_id: int) -> Batch:
    """Collate `features` dicts into a Batch (runs in DataLoader workers)."""
    encs = [it["encoded"] for it in items]
    model_inputs = collate_model_inputs(encs, pad_id)
    text_rows = _rows([e.text_positions for e in encs])
    labels = torch.as_tensor(np.concatenate([e.input_ids[e.text_positions + 1] for e in encs]), dtype=torch.long)
    visual_rows = _rows([e.visual_positions for e in encs])
    targets = grams = None
    if "gram" in items[0]:
        targets = {}
        for name in target_keys(items[0]):
            arr = np.concatenate([it[name] for it in items])
            is_logprob = name.split("_", 1)[1] in LOGPROB_KEYS
            targets[name] = torch.as_tensor(arr, dtype=torch.float32 if is_logprob else torch.long)
        grams = [torch.as_tensor(it["gram"]) for it in items]
    return Batch(model_inputs, text_rows, labels, visual_rows, [len(e.visual_positions) for e in encs], targets,
                 grams, int(sum(it["n_tokens"] for it in items)))


def encoder_for(processor, model_config, *, image_root: str | None, max_length: int | None,
                max_images: int | None = None, append_eos: bool = True) -> Encoder:
    tok = tokenizer_of(processor)
    multimodal = tok is not processor
    return Encoder(processor, image_token_id_of(model_config, tok) if multimodal else None, image_root=image_root,
                   max_length=max_length, max_images=max_images, append_eos=append_eos)
