"""A student whose tokenizer differs from the teacher's, trained from the teacher's cache.

The student encodes each record with its own tokenizer; its answer tokens are grouped with the teacher's cached
ones by the bytes they cover (`kd_train.align.answer_groups`), and the response rows are distilled with ULD or the
GOLD-style hybrid (`kd_train.cross_losses`), merging a group's rows by the chain rule (the cache's observed
log-probs, format v3). The visual rows keep their meaning (same vision tower, same count): RDist compares Gram
matrices, which do not depend on the vocabulary; the visual MDist is off (`kd_train.plan`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Any, Callable, ClassVar, Sequence

import numpy as np
import torch

from kd_cache.codec import CachedSample, TargetLayout, TopKRows
from kd_cache.data import EncodedSample
from kd_train.align import AlignmentError, answer_groups, token_bytes
from kd_train.cross_losses import MergeGroups, hybrid_loss, uld_loss, vocab_map

MODES = ("uld", "hybrid")

log = logging.getLogger("kd_train")


@dataclass(frozen=True)
class CrossRows:
    """The teacher's targets aligned to a student's response rows (another tokenizer), groups in order.

    Group g takes the next `student_sizes[g]` of the `student_rows` and the next `teacher_sizes[g]` rows of
    `teacher` (rows of the student's text rows and of the cached text rows a group covers; rows in no group get CE
    only).
    """

    n_text: int  # the student's text rows of the sample / micro-batch (what the objective checks against)
    student_rows: Any  # (N_s,) int64: indices into the student's text rows, group by group
    student_tokens: Any  # (N_s,) int64: the tokens those rows predict
    student_sizes: Any  # (G,) int64 >= 1
    teacher: TopKRows  # (N_t rows): the cached top-k + tail of the teacher rows, group by group
    teacher_sizes: Any  # (G,) int64 >= 1
    observed: Any  # (N_t,) float32: the teacher's log-prob of each row's observed token (format v3)
    kind: ClassVar[str] = "cross"

    @property
    def n_rows(self) -> int:
        return self.n_text

    def map(self, fn: Callable[[Any], Any]) -> "CrossRows":
        return replace(self, student_rows=fn(self.student_rows), student_tokens=fn(self.student_tokens),
                       student_sizes=fn(self.student_sizes), teacher=self.teacher.map(fn),
                       teacher_sizes=fn(self.teacher_sizes), observed=fn(self.observed))

    @staticmethod
    def concat(parts: Sequence["CrossRows"]) -> "CrossRows":
        """A micro-batch's: the samples' rows one after the other (student row indices shifted by the rows
        before)."""
        offsets = np.cumsum([0] + [p.n_text for p in parts])[:-1]
        cat = np.concatenate
        return CrossRows(
            n_text=int(sum(p.n_text for p in parts)),
            student_rows=cat([p.student_rows + o for p, o in zip(parts, offsets)]),
            student_tokens=cat([p.student_tokens for p in parts]), student_sizes=cat([p.student_sizes for p in parts]),
            teacher=TopKRows(cat([p.teacher.ids for p in parts]), cat([p.teacher.logprobs for p in parts]),
                             cat([p.teacher.tail for p in parts]), parts[0].teacher.vocab_size),
            teacher_sizes=cat([p.teacher_sizes for p in parts]), observed=cat([p.observed for p in parts]))


class CrossTokenizer:
    """What aligning one student tokenizer to one teacher tokenizer needs, worked out once per stage: each
    token's bytes on both sides and, for the hybrid, the teacher id -> student id map."""

    def __init__(self, teacher_tokenizer: Any, student_tokenizer: Any, mode: str, teacher_vocab: int):
        if mode not in MODES:
            raise ValueError(f"cross_tokenizer must be one of {', '.join(MODES)}, got {mode!r}")
        self.mode = mode
        self.teacher_bytes = token_bytes(teacher_tokenizer)
        self.student_bytes = token_bytes(student_tokenizer)
        self.mapping = (torch.as_tensor(vocab_map(teacher_tokenizer, student_tokenizer, teacher_size=teacher_vocab))
                        if mode == "hybrid" else None)

    def targets(self, encoded: EncodedSample, cached: CachedSample, layout: TargetLayout) -> CrossRows:
        """The cached text-row targets of `cached` regrouped for the student's encoding `encoded` of the same
        record. Answers whose texts differ between the two encodings (a normaliser, truncation) train with CE only."""
        try:
            groups = answer_groups(cached["input_ids"], cached["text_positions"], encoded.input_ids,
                                   encoded.text_positions, self.teacher_bytes, self.student_bytes, strict=False)
        except AlignmentError as e:  # not even the answers pair up (e.g. one side truncated one away)
            log.warning("sample %r: its answers do not pair up across the tokenizers (%s); CE only", cached["sample_id"],
                        e)
            groups = []
        observed = cached.get("text_observed_logprob")
        # a group with an empty side has nothing to compare; several teacher rows need their observed log-probs
        groups = [g for g in groups if g.teacher and g.student and (observed is not None or len(g.teacher) == 1)]
        t_idx = np.asarray([i for g in groups for i in g.teacher], dtype=np.int64)
        s_idx = np.asarray([i for g in groups for i in g.student], dtype=np.int64)
        teacher = layout.targets(cached, "text")
        if not isinstance(teacher, TopKRows):
            raise ValueError("cross-tokenizer distillation reads top-k response rows; this cache holds "
                             f"{teacher.kind} ones")
        labels = encoded.input_ids[encoded.text_positions + 1]
        obs = (np.asarray(observed, np.float32)[t_idx] if observed is not None
               else np.zeros(len(t_idx), np.float32))  # unused: every teacher group has one row
        return CrossRows(
            n_text=len(encoded.text_positions), student_rows=s_idx, student_tokens=labels[s_idx].astype(np.int64),
            student_sizes=np.asarray([len(g.student) for g in groups], np.int64),
            teacher=TopKRows(teacher.ids[t_idx], teacher.logprobs[t_idx], teacher.tail[t_idx], teacher.vocab_size),
            teacher_sizes=np.asarray([len(g.teacher) for g in groups], np.int64), observed=obs)


def cross_loss(z: torch.Tensor, targets: CrossRows, mode: str, mapping: torch.Tensor | None, *, kind: str,
               jsd_beta: float) -> torch.Tensor:
    """Sum over the groups of the ULD / hybrid divergence, from the student's text-row logits `z` (Nt, V_s)."""
    if targets.student_sizes.numel() == 0:
        return z.sum() * 0.0
    groups = MergeGroups(targets.student_sizes, targets.teacher_sizes, targets.student_tokens, targets.observed)
    zs = z[targets.student_rows]
    t = targets.teacher
    if mode == "uld":
        return uld_loss(zs, t.logprobs, t.tail, groups=groups, reduction="sum")
    return hybrid_loss(zs, t.ids, t.logprobs, t.tail, mapping.to(zs.device), kind=kind, jsd_beta=jsd_beta,
                       groups=groups, reduction="sum")
