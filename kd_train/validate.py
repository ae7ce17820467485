"""Held-out teacher-forced answer NLL: the validation metric of `kd train --val-data` and of `kd eval`.

The model reads each record exactly as training encodes it (`kd_cache.data.Encoder`) and is scored, in nats per
token, on the tokens training supervises (each answer and its end marker). Only the rows those tokens need are
turned into logits (`RowLogits`), with the model's own logit transform.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from kd_cache.data import Encoder, SkipSample
from kd_train.batch import make_batch, training_example
from kd_train.objective import RowLogits


@torch.no_grad()
def answer_nll(model: torch.nn.Module, encoder: Encoder, records: Sequence[dict], pad_id: int, *,
               batch_size: int = 16, dtype: torch.dtype | None = None) -> dict:
    """Teacher-forced NLL of the supervised tokens of every record.

    Returns {"nll": mean nats per supervised token over all records, "tokens": their number, "samples": records
    scored, "skipped": {reason: count}, "per_sample": [(nll sum, tokens) or None when skipped] in record order}.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
    rows_model = RowLogits(model)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    per_sample: list[tuple[float, int] | None] = [None] * len(records)
    skipped: dict[str, int] = {}
    pending: list[tuple[int, dict]] = []

    def flush() -> None:
        batch = make_batch([f for _, f in pending], pad_id).to(device)
        inputs = dict(batch.model_inputs)
        if dtype is not None and "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
        zt, _, _ = rows_model(inputs, batch.text_rows, batch.visual_rows[:, :0])
        nll = torch.nn.functional.cross_entropy(zt.float(), batch.text_labels, reduction="none")
        owner = batch.text_rows[0]
        sums = torch.zeros(len(pending), dtype=torch.float64, device=device).index_add(0, owner, nll.double())
        counts = torch.bincount(owner, minlength=len(pending))
        for j, (i, _) in enumerate(pending):
            per_sample[i] = (float(sums[j]), int(counts[j]))
        pending.clear()

    try:
        for i, record in enumerate(records):
            try:
                pending.append((i, training_example(encoder.encode(record, i))))
            except SkipSample as e:
                skipped[e.reason] = skipped.get(e.reason, 0) + 1
                continue
            if len(pending) == batch_size:
                flush()
        if pending:
            flush()
    finally:
        model.train(was_training)
    scored = [p for p in per_sample if p is not None]
    total, tokens = float(np.sum([s for s, _ in scored])) if scored else 0.0, int(sum(n for _, n in scored))
    return {"nll": total / tokens if tokens else None, "tokens": tokens, "samples": len(scored),
            "skipped": dict(sorted(skipped.items())), "per_sample": per_sample}
