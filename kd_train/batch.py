"""Training examples and micro-batches for the student: model inputs plus the cached teacher targets.

The student re-encodes each record with its own processor through `kd_cache.data.Encoder` (the function the
cache builder used), which yields its pixels; the token ids must then equal the cached `input_ids` exactly,
so text rows align by construction and a mismatch is an error, never a silent shift.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from kd_cache.codec import CachedSample, TargetLayout, Targets, concat_targets
from kd_cache.data import EncodedSample, Encoder, image_token_id_of
from kd_cache.hf import collate as collate_model_inputs, tokenizer_of
from kd_train.cross import CrossRows, CrossTokenizer


class CacheMismatchError(ValueError):
    """The student's encoding of a sample differs from what the cache recorded."""


def training_example(encoded: EncodedSample, cached: CachedSample | None = None,
                     layout: TargetLayout | None = None) -> dict:
    """One training example: the encoded sample and, for KD stages, its cached targets typed by `layout` (numpy).

    Keys: "encoded", "n_tokens", and with `cached` "text_targets", "visual_targets" (`kd_cache.codec.Targets`) and
    "gram" (the teacher's (Nv, Nv) Gram).
    """
    out = {"encoded": encoded, "n_tokens": len(encoded.input_ids)}
    if cached is None:
        return out
    if layout is None:
        raise ValueError("training_example needs the cache's TargetLayout to read cached targets, got None")
    if not np.array_equal(encoded.input_ids, cached["input_ids"]):
        n = min(len(encoded.input_ids), len(cached["input_ids"]))
        neq = np.flatnonzero(encoded.input_ids[:n] != cached["input_ids"][:n])
        diff = int(neq[0]) if len(neq) else n
        raise CacheMismatchError(
            f"sample {cached['sample_id']!r}: the student's tokens differ from the cached input_ids at position {diff} "
            f"(student {len(encoded.input_ids)} tokens, cache {len(cached['input_ids'])}); the student's processor, "
            "chat template or max_length does not match the cache's"
        )
    for rows, mine, theirs in (("text", encoded.text_positions, cached["text_positions"]),
                               ("visual", encoded.visual_positions, cached["visual_positions"])):
        if not np.array_equal(mine, theirs):
            raise CacheMismatchError(f"sample {cached['sample_id']!r}: {rows} positions differ from the cache's")
    out["text_targets"] = layout.targets(cached, "text")
    out["visual_targets"] = layout.targets(cached, "visual")
    out["gram"] = cached["gram"]
    return out


def cross_training_example(encoded: EncodedSample, cached: CachedSample, layout: TargetLayout,
                           xtok: CrossTokenizer) -> dict:
    """`training_example` for a student of another tokenizer: its own tokens, the cached response-row targets
    regrouped by bytes (`CrossTokenizer.targets`), the visual rows' targets and Gram as cached (same vision tower:
    the visual rows must be as many)."""
    if len(encoded.visual_positions) != len(cached["visual_positions"]):
        raise CacheMismatchError(f"sample {cached['sample_id']!r}: the student has {len(encoded.visual_positions)} "
                                 f"visual rows, the cache {len(cached['visual_positions'])}; the student's vision "
                                 "tower or image processor differs from the teacher's")
    return {"encoded": encoded, "n_tokens": len(encoded.input_ids), "text_targets": xtok.targets(encoded, cached, layout),
            "visual_targets": layout.targets(cached, "visual"), "gram": cached["gram"]}


@dataclass
class Batch:
    """A micro-batch. Row indices select logits rows: (batch index, position) pairs."""

    model_inputs: dict[str, torch.Tensor]
    text_rows: torch.Tensor  # (2, Nt) long: batch index, position of rows predicting supervised tokens
    text_labels: torch.Tensor  # (Nt,) long: the supervised next tokens
    visual_rows: torch.Tensor  # (2, Nv) long
    visual_splits: list[int]  # visual rows per sample (for per-sample Gram matrices)
    text_targets: Targets | None  # the Nt text rows' teacher targets (torch), None without a cache
    visual_targets: Targets | None  # the Nv visual rows' teacher targets (torch)
    grams: list[torch.Tensor] | None  # the teacher's Gram per sample
    n_tokens: int

    def to(self, device) -> "Batch":
        mv = lambda t: t.to(device, non_blocking=True)  # noqa: E731
        return Batch(
            {k: mv(v) for k, v in self.model_inputs.items()}, mv(self.text_rows), mv(self.text_labels),
            mv(self.visual_rows), self.visual_splits,
            None if self.text_targets is None else self.text_targets.map(mv),
            None if self.visual_targets is None else self.visual_targets.map(mv),
            None if self.grams is None else [mv(g) for g in self.grams], self.n_tokens,
        )

    @property
    def has_targets(self) -> bool:
        return self.grams is not None

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


def _as_tensor(a: np.ndarray) -> torch.Tensor:
    """Log-probs as float32, ids and counts as int64."""
    return torch.as_tensor(a, dtype=torch.float32 if np.asarray(a).dtype.kind == "f" else torch.long)


def make_batch(items: list[dict], pad_id: int) -> Batch:
    """Collate `training_example` dicts into a Batch (runs in DataLoader workers)."""
    encs = [it["encoded"] for it in items]
    model_inputs = collate_model_inputs(encs, pad_id)
    text_rows = _rows([e.text_positions for e in encs])
    labels = torch.as_tensor(np.concatenate([e.input_ids[e.text_positions + 1] for e in encs]), dtype=torch.long)
    visual_rows = _rows([e.visual_positions for e in encs])
    text = visual = grams = None
    if "gram" in items[0]:
        texts = [it["text_targets"] for it in items]
        text = (CrossRows.concat(texts) if isinstance(texts[0], CrossRows) else concat_targets(texts)).map(_as_tensor)
        visual = concat_targets([it["visual_targets"] for it in items]).map(_as_tensor)
        grams = [torch.as_tensor(it["gram"]) for it in items]
    return Batch(model_inputs, text_rows, labels, visual_rows, [len(e.visual_positions) for e in encs], text, visual,
                 grams, int(sum(it["n_tokens"] for it in items)))


def encoder_for(processor, model_config, *, image_root: str | None, max_length: int | None,
                max_images: int | None = None, append_eos: bool = True) -> Encoder:
    tok = tokenizer_of(processor)
    multimodal = tok is not processor
    return Encoder(processor, image_token_id_of(model_config, tok) if multimodal else None, image_root=image_root,
                   max_length=max_length, max_images=max_images, append_eos=append_eos)
