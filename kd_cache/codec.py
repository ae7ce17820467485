"""The cache codec: targets -> Arrow columns (`encode_table`) and a stored row -> the decoded sample (`decode_row`),
with every encoding in between (delta-coded log-probs, id gaps, packed eigenvector codes, the low-rank Gram). The
writer, the reader, the training stream and the online reference all go through here; `kd_cache/format.py` holds
the contract they share (names, version, schema, target specs) and `docs/cache-format.md` documents both.

The decoded sample is a plain dict of numpy arrays (`CachedSample`, keyed like the Parquet columns: `sample_id`,
`input_ids`, `<rows>_positions`, `<rows>_<key>` for rows in ("text", "visual") and the keys of the rows' target kind
in `ROW_KEYS`, and `gram`), so it can be read without kd (pandas, `datasets`) under the same names. The trainer does
not read those keys: `TargetLayout.targets` turns a decoded sample's rows into typed targets (`TopKRows`,
`SampledRows`) that carry what the losses need besides the arrays (the teacher's vocabulary, the draws per row).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, ClassVar, TypedDict, Union

import numpy as np
import pyarrow as pa

from kd_cache.format import (ENTROPY_COLUMN, ENTROPY_MAX_CODE, ENTROPY_SCALE, GRAM_HI_VECTORS, LOGPROB_MAX_CODE,
                             LOGPROB_SCALE, OBSERVED_COLUMN, V1_LOGPROB_SCALE, TargetSpec)

ROWS = ("text", "visual")
# decoded per-row keys of each target kind, in the order of the typed targets' arrays (logsumexp is informational)
ROW_KEYS = {"topk": ("topk_ids", "topk_logprobs", "tail_logprob"),
            "sampled": ("sample_ids", "sample_counts", "sample_row_lengths")}


class CachedSample(TypedDict, total=False):
    """One decoded cache row (numpy arrays; shapes for N response rows, M visual rows, k ids, D unique draws)."""

    sample_id: str
    sample_index: int
    input_ids: np.ndarray  # (L,) int64
    text_positions: np.ndarray  # (N,) int64: rows whose next token is supervised
    visual_positions: np.ndarray  # (M,) int64: image-token rows
    text_topk_ids: np.ndarray  # (N, k) int64, descending probability (kind topk)
    text_topk_logprobs: np.ndarray  # (N, k) float32
    text_tail_logprob: np.ndarray  # (N,) float32
    text_sample_ids: np.ndarray  # (D,) int64, ascending within a row (kind sampled)
    text_sample_counts: np.ndarray  # (D,) int64, each row's counts sum to the draws per row
    text_sample_row_lengths: np.ndarray  # (N,) int64: unique ids per row
    text_logsumexp: np.ndarray  # (N,) float32
    text_entropy: np.ndarray  # (N,) float32: the teacher's entropy H(p_T) per sampled row (format v4, kind sampled)
    text_observed_logprob: np.ndarray  # (N,) float32: log-prob of the observed next token (format v3)
    visual_topk_ids: np.ndarray  # the same keys for the visual rows, with M rows
    visual_topk_logprobs: np.ndarray
    visual_tail_logprob: np.ndarray
    visual_sample_ids: np.ndarray
    visual_sample_counts: np.ndarray
    visual_sample_row_lengths: np.ndarray
    visual_logsumexp: np.ndarray
    visual_entropy: np.ndarray
    gram: np.ndarray  # (M, M) float32 R = Z Zᵀ of the teacher's visual logits ((0, 0) without a Gram)


@dataclass
class SampleTargets:
    """Host-side targets for one sample, ready for the writer."""

    sample_index: int
    sample_id: str
    input_ids: np.ndarray
    text_positions: np.ndarray
    visual_positions: np.ndarray
    text: dict  # numpy arrays: topk_ids/topk_logprobs/tail_logprob/logsumexp or sample_ids/sample_counts/...
    visual: dict
    gram: dict | None  # {"dense": (Nv, Nv)} or the low-rank parts {mean, eigvals, scales, eigvecs}


@dataclass(frozen=True)
class TopKRows:
    """Top-k targets of N rows: the teacher's k most probable ids, their log-probs and the log mass of the rest.

    The arrays are numpy as decoded, torch tensors once batched (`map`).
    """

    ids: Any  # (N, k) int64, in descending probability order
    logprobs: Any  # (N, k) float32: the teacher's log-probs (temperature 1) of those ids
    tail: Any  # (N,) float32: log of the teacher's mass outside the ids (-inf when they hold all of it)
    vocab_size: int | None  # the teacher's vocabulary: a tempered MDist spreads the tail over its other ids
    kind: ClassVar[str] = "topk"

    @property
    def n_rows(self) -> int:
        return int(self.tail.shape[0])

    def map(self, fn: Callable[[Any], Any]) -> "TopKRows":
        """The same targets with every array passed through `fn` (to torch, to a device)."""
        return replace(self, ids=fn(self.ids), logprobs=fn(self.logprobs), tail=fn(self.tail))


@dataclass(frozen=True)
class SampledRows:
    """Sampled targets of N rows: `draws` ids drawn per row from the teacher's distribution, kept as each row's
    unique ids with their counts, the rows one after the other.

    The arrays are numpy as decoded, torch tensors once batched (`map`).
    """

    ids: Any  # (D,) int64, ascending within a row
    counts: Any  # (D,) int64: each row's counts sum to `draws`
    row_lengths: Any  # (N,) int64: unique ids per row
    draws: int  # draws per row
    # (N,) float32: the teacher's entropy H(p_T) per row (format v4), or None (older caches): the logged MDist of
    # sampled rows is the cross-entropy minus it, an estimate of KL(p_T || q_S); the loss does not read it
    entropy: Any = None
    kind: ClassVar[str] = "sampled"

    @property
    def n_rows(self) -> int:
        return int(self.row_lengths.shape[0])

    def map(self, fn: Callable[[Any], Any]) -> "SampledRows":
        """The same targets with every array passed through `fn` (to torch, to a device)."""
        return replace(self, ids=fn(self.ids), counts=fn(self.counts), row_lengths=fn(self.row_lengths),
                       entropy=None if self.entropy is None else fn(self.entropy))


Targets = Union[TopKRows, SampledRows]
"""The targets of one kind of rows (text or visual) of a sample or a micro-batch."""


@dataclass(frozen=True)
class TargetLayout:
    """What the per-row targets of a cache (or of the online teacher) are: each row kind's target spec and the
    teacher's vocabulary. Built once per stage; `targets` turns a decoded sample's rows into typed targets."""

    text: TargetSpec
    visual: TargetSpec
    vocab_size: int | None  # None: the student's (MDist then spreads a tempered tail over the student's ids)

    def targets(self, sample: CachedSample, rows: str) -> Targets:
        """The typed targets of a decoded sample's `rows` ("text" or "visual")."""
        if rows not in ROWS:
            raise ValueError(f"rows must be one of {ROWS}, got {rows!r}")
        spec = self.text if rows == "text" else self.visual
        if spec.kind not in ROW_KEYS:
            raise ValueError(f"{rows} targets of kind {spec.kind!r} are not known to this kd (it reads "
                             f"{sorted(ROW_KEYS)})")
        names = [f"{rows}_{key}" for key in ROW_KEYS[spec.kind]]
        missing = [name for name in names if name not in sample]
        if missing:
            raise ValueError(f"sample {sample.get('sample_id')!r} holds no {', '.join(missing)}: its {rows} rows are "
                             f"not {spec.kind} targets as the cache's target spec says")
        arrays = [sample[name] for name in names]  # type: ignore[literal-required]
        if spec.kind == "topk":
            return TopKRows(*arrays, vocab_size=self.vocab_size)
        return SampledRows(*arrays, draws=spec.samples, entropy=sample.get(f"{rows}_entropy"))


def concat_targets(parts: Sequence[Targets]) -> Targets:
    """Several samples' targets of one row kind as one, rows one after the other (numpy): a micro-batch's."""
    if not parts:
        raise ValueError("concat_targets needs at least one part, got none")
    first = parts[0]
    if any(type(p) is not type(first) for p in parts):
        raise ValueError(f"targets to concatenate must be of one kind, got {sorted({p.kind for p in parts})}")
    if isinstance(first, TopKRows):
        if any(p.vocab_size != first.vocab_size for p in parts):
            raise ValueError(f"top-k targets to concatenate must share a vocabulary, got "
                             f"{sorted({str(p.vocab_size) for p in parts})}")
        return TopKRows(np.concatenate([p.ids for p in parts]), np.concatenate([p.logprobs for p in parts]),
                        np.concatenate([p.tail for p in parts]), first.vocab_size)
    if any(p.draws != first.draws for p in parts):
        raise ValueError(f"sampled targets to concatenate must share the draws per row, got "
                         f"{sorted({p.draws for p in parts})}")
    # the teacher's entropy only when every part has it (a v4 cache's rows all do)
    entropy = (np.concatenate([p.entropy for p in parts]) if all(p.entropy is not None for p in parts) else None)
    return SampledRows(np.concatenate([p.ids for p in parts]), np.concatenate([p.counts for p in parts]),
                       np.concatenate([p.row_lengths for p in parts]), first.draws, entropy)


def sample_from_targets(t: SampleTargets) -> CachedSample:
    """The decoded sample of freshly computed host targets (unquantized; the Gram dense), as if cached and read
    back: what the online reference trains on."""
    nv = len(t.visual_positions)
    out: dict[str, Any] = {"sample_id": t.sample_id, "sample_index": t.sample_index, "input_ids": t.input_ids,
                           "text_positions": t.text_positions, "visual_positions": t.visual_positions}
    for rows, d in (("text", t.text), ("visual", t.visual)):
        for key, v in d.items():
            out[f"{rows}_{key}"] = v
    if t.gram is not None and "dense" not in t.gram:
        raise ValueError("sample_from_targets needs a dense Gram (compute it with gram_lowrank=False)")
    out["gram"] = t.gram["dense"] if t.gram is not None else np.zeros((nv, nv), np.float32)
    return out  # type: ignore[return-value]


def encode_logprobs(logprobs: np.ndarray) -> np.ndarray:
    """(N, k) log-probs in descending order -> (N, k) uint8 delta codes (first code absolute)."""
    lp = np.asarray(logprobs, dtype=np.float64)
    if lp.size == 0:
        return np.zeros(lp.shape, np.uint8)
    codes = np.clip(np.rint(-lp * LOGPROB_SCALE), 0, LOGPROB_MAX_CODE).astype(np.int16)
    codes = np.maximum.accumulate(codes, axis=1)  # ties at equal probability may round apart: keep monotone
    delta = np.diff(codes, axis=1, prepend=0)
    return delta.astype(np.uint8)


def decode_logprobs(delta: np.ndarray) -> np.ndarray:
    """(N, k) uint8 delta codes -> (N, k) float32 log-probs."""
    codes = np.cumsum(np.asarray(delta, dtype=np.int32), axis=1)
    return (codes.astype(np.float32) * np.float32(-1.0 / LOGPROB_SCALE)).astype(np.float32)


def encode_observed(logprobs: np.ndarray) -> np.ndarray:
    """(N,) log-probs of the observed next tokens -> (N,) uint8 codes of 1/8 nat (|error| <= 1/16 nat down to
    -31.9; lower ones stored as -31.875). Not delta-coded: one value per row."""
    lp = np.asarray(logprobs, dtype=np.float64).ravel()
    return np.clip(np.rint(-lp * LOGPROB_SCALE), 0, LOGPROB_MAX_CODE).astype(np.uint8)


def decode_observed(codes: np.ndarray) -> np.ndarray:
    """(N,) uint8 codes -> (N,) float32 log-probs."""
    return (np.asarray(codes, dtype=np.float32) * np.float32(-1.0 / LOGPROB_SCALE)).astype(np.float32)


def encode_entropy(entropy: np.ndarray) -> np.ndarray:
    """(N,) teacher entropies in nats -> (N,) uint8 codes of 1/16 nat (|error| <= 1/32 nat up to 15.94 nats)."""
    h = np.asarray(entropy, dtype=np.float64).ravel()
    return np.clip(np.rint(h * ENTROPY_SCALE), 0, ENTROPY_MAX_CODE).astype(np.uint8)


def decode_entropy(codes: np.ndarray) -> np.ndarray:
    """(N,) uint8 codes -> (N,) float32 entropies in nats."""
    return (np.asarray(codes, dtype=np.float32) * np.float32(1.0 / ENTROPY_SCALE)).astype(np.float32)


def decode_logprobs_v1(codes: np.ndarray) -> np.ndarray:
    """v1 uint16 codes -> float32 log-probs."""
    return (np.asarray(codes, dtype=np.float32) * np.float32(-1.0 / V1_LOGPROB_SCALE)).astype(np.float32)


def ids_to_gaps(ids: np.ndarray, row_lengths: np.ndarray) -> np.ndarray:
    """Ascending ids per row -> gaps (first id of a row absolute): small numbers compress far better."""
    ids = np.asarray(ids, dtype=np.int64)
    gaps = np.diff(ids, prepend=0)
    starts = np.cumsum(row_lengths) - row_lengths
    starts = starts[row_lengths > 0]
    gaps[starts] = ids[starts]
    return gaps


def gaps_to_ids(gaps: np.ndarray, row_lengths: np.ndarray) -> np.ndarray:
    """Inverse of `ids_to_gaps`."""
    gaps = np.asarray(gaps, dtype=np.int64)
    total = np.cumsum(gaps)
    starts = np.cumsum(row_lengths) - row_lengths
    before = np.where(starts > 0, total[np.maximum(starts - 1, 0)], 0) if len(gaps) else np.zeros(0, np.int64)
    return total - np.repeat(before, row_lengths)


def sampled_rows(counts: np.ndarray, n_draws: int, n_rows: int) -> np.ndarray:
    """Unique ids per row from the counts alone: every row's counts sum to `n_draws`."""
    counts = np.asarray(counts, dtype=np.int64)
    before = np.cumsum(counts) - counts
    row = before // n_draws
    return np.bincount(row, minlength=n_rows).astype(np.int64)


def gram_to_upper(gram: np.ndarray) -> np.ndarray:
    """(Nv, Nv) symmetric matrix -> its upper triangle (diagonal included), row-major, float32."""
    iu = np.triu_indices(gram.shape[0])
    return np.ascontiguousarray(gram[iu], dtype=np.float32)


def gram_from_upper(upper: np.ndarray, n: int) -> np.ndarray:
    """Inverse of `gram_to_upper`: rebuild the full symmetric (n, n) float32 matrix."""
    expected = n * (n + 1) // 2
    if upper.shape[0] != expected:
        raise ValueError(f"gram upper triangle for {n} visual rows needs {expected} values, got {upper.shape[0]}")
    out = np.zeros((n, n), dtype=np.float32)
    iu = np.triu_indices(n)
    out[iu] = upper
    out.T[iu] = upper
    return out


def eigvec_codes_to_bytes(codes: np.ndarray) -> tuple[bytes, bytes]:
    """(Nv, r) integer codes -> (int16 bytes of the first GRAM_HI_VECTORS columns, int8 bytes of the rest)."""
    h = min(GRAM_HI_VECTORS, codes.shape[1])
    return (np.ascontiguousarray(codes[:, :h], dtype="<i2").tobytes(),
            np.ascontiguousarray(codes[:, h:], dtype=np.int8).tobytes())


def eigvec_codes_from_bytes(hi: bytes, lo: bytes, n: int, r: int) -> np.ndarray:
    """Inverse of `eigvec_codes_to_bytes`: the (n, r) int32 code matrix."""
    h = min(GRAM_HI_VECTORS, r)
    out = np.empty((n, r), dtype=np.int32)
    out[:, :h] = np.frombuffer(hi, dtype="<i2").reshape(n, h)
    out[:, h:] = np.frombuffer(lo, dtype=np.int8).reshape(n, r - h)
    return out


def gram_from_lowrank(mean: np.ndarray, eigvals: np.ndarray, scales: np.ndarray, eigvecs: np.ndarray,
                      vocab_size: int) -> np.ndarray:
    """R = U diag(λ) Uᵀ + V m mᵀ, U = integer eigenvector codes (Nv, r) × per-column scales
    (see `kd_cache.targets.gram_factors`).

    Exact identity: with m the per-row mean logit and Z_c = Z − m 1ᵀ, Z_c 1 = 0, so Z Zᵀ = Z_c Z_cᵀ + V m mᵀ.
    """
    n, r = len(mean), len(eigvals)
    u = np.asarray(eigvecs, dtype=np.float64).reshape(n, r) * np.asarray(scales, dtype=np.float64)[None, :]
    m = np.asarray(mean, dtype=np.float64)
    rc = (u * np.asarray(eigvals, dtype=np.float64)[None, :]) @ u.T
    return (rc + float(vocab_size) * np.outer(m, m)).astype(np.float32)


def _list_array(chunks: list[np.ndarray], dtype: pa.DataType) -> pa.ListArray:
    """Arrow list column from per-sample 1-D arrays without a Python loop over elements."""
    lengths = np.fromiter((len(c) for c in chunks), dtype=np.int64, count=len(chunks))
    offsets = np.zeros(len(chunks) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    values = np.concatenate(chunks) if chunks else np.zeros(0)
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(values, type=dtype))


def encode_table(samples: list[SampleTargets], sch: pa.Schema) -> pa.Table:
    """Samples -> one Arrow table in the v2 schema `sch` (log-probs as delta codes, Gram low-rank or dense)."""
    cols: dict[str, Any] = {
        "sample_id": pa.array([s.sample_id for s in samples], pa.string()),
        "sample_index": pa.array([s.sample_index for s in samples], pa.int64()),
        "input_ids": _list_array([s.input_ids.astype(np.int32) for s in samples], pa.int32()),
    }
    for prefix in ("text", "visual"):
        cols[f"{prefix}_positions"] = _list_array(
            [getattr(s, f"{prefix}_positions").astype(np.int32) for s in samples], pa.int32())
        t = [getattr(s, prefix) for s in samples]
        for name in sch.names:
            if not name.startswith(prefix + "_") or name == f"{prefix}_positions":
                continue
            key = name[len(prefix) + 1:]
            typ = sch.field(name).type.value_type
            if key == "topk_codes":
                chunks = [encode_logprobs(d["topk_logprobs"]).ravel() for d in t]
            elif key == OBSERVED_COLUMN:
                chunks = [encode_observed(d["observed_logprob"]) for d in t]
            elif key == ENTROPY_COLUMN:
                chunks = [encode_entropy(d["entropy"]) for d in t]
            elif key == "sample_ids":
                chunks = [ids_to_gaps(d["sample_ids"], d["sample_row_lengths"]) for d in t]
            else:
                chunks = [np.asarray(d[key]).ravel() for d in t]
            cols[name] = _list_array([c.astype(typ.to_pandas_dtype()) for c in chunks], typ)
    grams = [s.gram or {} for s in samples]
    empty = np.zeros(0, np.float32)
    cols["gram"] = _list_array([gram_to_upper(g["dense"]) if "dense" in g else empty for g in grams], pa.float32())
    for name, key in (("gram_mean", "mean"), ("gram_eigvals", "eigvals"), ("gram_eigvec_scales", "scales")):
        cols[name] = _list_array([g[key].astype(np.float32) if key in g else empty for g in grams], pa.float32())
    packed = [eigvec_codes_to_bytes(g["eigvecs"]) if "eigvecs" in g else (b"", b"") for g in grams]
    cols["gram_eigvecs_hi"] = pa.array([p[0] for p in packed], pa.binary())
    cols["gram_eigvecs"] = pa.array([p[1] for p in packed], pa.binary())
    return pa.table(cols, schema=sch)


def columns(table) -> dict[str, Any]:
    """A row group as {name: (offsets, values) for list columns, Python list otherwise}, decoded once."""
    cols: dict[str, Any] = {}
    for name in table.column_names:
        col = table.column(name).combine_chunks()
        if pa.types.is_list(col.type):
            cols[name] = (np.asarray(col.offsets), col.values.to_numpy(zero_copy_only=False))
        else:
            cols[name] = col.to_pylist()
    return cols


def stored_row(cols: dict[str, Any], i: int) -> dict[str, Any]:
    """Stored row i of `columns(...)`, still encoded: numpy slices for list columns (no per-element Python
    objects)."""
    return {k: (v[1][v[0][i]:v[0][i + 1]] if isinstance(v, tuple) else v[i]) for k, v in cols.items()}


def decode_row(row: dict[str, Any], text_spec: TargetSpec, visual_spec: TargetSpec, version: int,
               gram_vocab: int) -> CachedSample:
    """One stored row (`stored_row(columns(table), i)`) -> the decoded sample: log-probs dequantized, sampled ids
    rebuilt from their gaps, the Gram dense. `gram_vocab`: the V of R = Z Zᵀ's row-mean part (the manifest's)."""
    tpos = np.asarray(row["text_positions"], dtype=np.int64)
    vpos = np.asarray(row["visual_positions"], dtype=np.int64)
    out: dict[str, Any] = {
        "sample_id": row["sample_id"],
        "sample_index": int(row["sample_index"]),
        "input_ids": np.asarray(row["input_ids"], dtype=np.int64),
        "text_positions": tpos,
        "visual_positions": vpos,
    }
    if f"text_{OBSERVED_COLUMN}" in row:
        out["text_observed_logprob"] = decode_observed(row[f"text_{OBSERVED_COLUMN}"])
    for prefix, spec, n in (("text", text_spec, len(tpos)), ("visual", visual_spec, len(vpos))):
        get = lambda key: row[f"{prefix}_{key}"]  # noqa: E731
        out[f"{prefix}_logsumexp"] = np.asarray(get("logsumexp"), dtype=np.float32)
        if spec.kind == "sampled":
            counts = np.asarray(get("sample_counts"), dtype=np.int64)
            lengths = sampled_rows(counts, spec.samples, n)
            out[f"{prefix}_sample_ids"] = gaps_to_ids(get("sample_ids"), lengths)
            out[f"{prefix}_sample_counts"] = counts
            out[f"{prefix}_sample_row_lengths"] = lengths
            if f"{prefix}_{ENTROPY_COLUMN}" in row:  # format v4
                ent = decode_entropy(get(ENTROPY_COLUMN))
                if ent.shape != (n,):
                    raise ValueError(f"sample {row['sample_id']!r}: {prefix}_{ENTROPY_COLUMN} holds {ent.shape[0]} "
                                     f"codes for {n} {prefix} rows")
                out[f"{prefix}_entropy"] = ent
            continue
        out[f"{prefix}_topk_ids"] = np.asarray(get("topk_ids"), dtype=np.int64).reshape(n, spec.k)
        if version == 1:
            lp = decode_logprobs_v1(np.asarray(get("topk_logprobs")))
        else:
            lp = decode_logprobs(np.asarray(get("topk_codes")).reshape(n, spec.k))
        out[f"{prefix}_topk_logprobs"] = lp.reshape(n, spec.k)
        out[f"{prefix}_tail_logprob"] = np.asarray(get("tail_logprob"), dtype=np.float32)
    out["gram"] = _decode_gram(row, len(vpos), version, gram_vocab)
    return out  # type: ignore[return-value]


def _decode_gram(row: dict[str, Any], nv: int, version: int, vocab: int) -> np.ndarray:
    dense = np.asarray(row["gram"], dtype=np.float32)
    if nv == 0:
        return np.zeros((0, 0), np.float32)
    if len(dense) or version == 1:
        return gram_from_upper(dense, nv)
    if len(row["gram_mean"]) == 0:  # built with --no-gram
        return np.zeros((0, 0), np.float32)
    eigvals = np.asarray(row["gram_eigvals"])
    codes = eigvec_codes_from_bytes(row["gram_eigvecs_hi"], row["gram_eigvecs"], nv, len(eigvals))
    return gram_from_lowrank(np.asarray(row["gram_mean"]), eigvals, np.asarray(row["gram_eigvec_scales"]), codes,
                             vocab)


def quantize_eigvecs(u: Any, hi_vectors: int = GRAM_HI_VECTORS) -> tuple[Any, Any]:
    """(Nv, r) eigenvectors (torch, any device) -> (integer codes, per-column scales) as format v2 stores them:
    int16 range for the first `hi_vectors` columns (most of ‖R_c‖), int8 range for the rest. Dequantized:
    codes * scales."""
    import torch  # deferred: `import kd_cache` (the reader) must not need torch; only builds quantize

    levels = torch.full((u.shape[1],), 127.0, dtype=u.dtype, device=u.device)
    levels[:hi_vectors] = 32767.0
    scales = u.abs().amax(dim=0).clamp_min(1e-30) / levels
    q = torch.maximum(torch.minimum(torch.round(u / scales), levels), -levels)
    return q, scales
