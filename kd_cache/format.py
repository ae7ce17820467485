"""The cache format: one versioned contract shared by the writer, the reader and `kd cache verify`.

Everything that decides how bytes on disk map to targets lives here, so `docs/cache-format.md` has one
place to follow. One Parquet row holds one sample; per-row targets are stored as flattened lists
(row-major), and their shapes are recovered from the position columns and the target specs.

Version 2 (written now) chose its encodings by measurement (`benchmarks/cache_size.py`): top-k ids as uint16
when the vocabulary fits (else uint32), log-probs as delta-coded uint8 codes of 1/8 nat, the Gram as its
exact row-mean part plus a per-sample-rank int8 eigendecomposition of the row-centred Gram, and a second
target kind, `sampled` (random-sampling KD). Version 1 caches are still read.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

FORMAT_VERSION = 2
"""Bumped on any change a reader must know about. Readers refuse versions they do not know."""

SUPPORTED_VERSIONS = (1, 2)

MANIFEST_NAME = "manifest.json"
CONFIG_NAME = "build_config.json"
CARD_NAME = "README.md"
SHARD_DIR = "shards"
PROGRESS_DIR = "_progress"

# v1: uint16 codes, code = round(-logprob * 256): |error| <= 1/512 nat for logprob >= -255.99.
V1_LOGPROB_SCALE = 256.0
V1_LOGPROB_MAX_CODE = 65535

# v2: uint8 codes with step 1/8 nat, delta-coded along each row (codes ascend as probabilities descend):
# |error| <= 1/16 nat for logprob >= -31.9; lower log-probs (p < 1.4e-14) are stored as -31.875.
LOGPROB_SCALE = 8.0
LOGPROB_MAX_CODE = 255
LOGPROB_MAX_ABS_ERROR = 0.5 / LOGPROB_SCALE
LOGPROB_ENCODING = "uint8-delta-step-1/8"

TARGET_KINDS = ("topk", "sampled")
KNOWN_TARGET_KINDS = TARGET_KINDS
GRAM_ENCODINGS = ("lowrank-int8", "dense-upper-fp32")
GRAM_TOLERANCE = 1e-4  # 1 - cos(R, R_hat) on both the raw and the row-centred Gram

# Column groups, used by `info` to attribute bytes and by `verify` to check the schema.
COMMON_COLUMNS = ("sample_id", "sample_index", "input_ids")
GRAM_COLUMNS = ("gram", "gram_mean", "gram_eigvals", "gram_eigvec_scales", "gram_eigvecs_hi", "gram_eigvecs")
GRAM_HI_VECTORS = 2  # the leading eigenvectors carry most of R_c: int16 for them, int8 for the rest
_KIND_COLUMNS = {
    "topk": ("topk_ids", "topk_codes", "tail_logprob", "logsumexp"),
    "sampled": ("sample_ids", "sample_counts", "logsumexp"),
}
V1_TARGET_COLUMNS = ("topk_ids", "topk_logprobs", "tail_logprob", "logsumexp")


def row_columns(prefix: str, kind: str, version: int = FORMAT_VERSION) -> tuple[str, ...]:
    """Columns of the `prefix` ("text" / "visual") rows for a target kind, positions first."""
    cols = V1_TARGET_COLUMNS if version == 1 else _KIND_COLUMNS[kind]
    return (f"{prefix}_positions",) + tuple(f"{prefix}_{c}" for c in cols)


def id_type(vocab_size: int) -> pa.DataType:
    """Token ids take 2 bytes while the vocabulary fits (SmolLM2: 49K), else 4 (Qwen2: 152K)."""
    return pa.uint16() if vocab_size <= 65536 else pa.uint32()


def schema(text_kind: str = "topk", visual_kind: str = "topk", vocab_size: int = 65536,
           version: int = FORMAT_VERSION) -> pa.Schema:
    """Arrow schema of a shard."""
    i32, f32 = pa.list_(pa.int32()), pa.list_(pa.float32())
    if version == 1:
        types = {"topk_ids": i32, "topk_logprobs": pa.list_(pa.uint16()), "tail_logprob": f32, "logsumexp": f32}
        gram = [("gram", f32)]
    else:
        ids = pa.list_(id_type(vocab_size))
        types = {"topk_ids": ids, "topk_codes": pa.list_(pa.uint8()), "tail_logprob": f32, "logsumexp": f32,
                 "sample_ids": ids, "sample_counts": pa.list_(pa.uint8())}
        # eigenvector codes as raw little-endian bytes: Parquet would widen list<int8> to 32-bit values
        gram = [("gram", f32), ("gram_mean", f32), ("gram_eigvals", f32), ("gram_eigvec_scales", f32),
                ("gram_eigvecs_hi", pa.binary()), ("gram_eigvecs", pa.binary())]
    fields = [("sample_id", pa.string()), ("sample_index", pa.int64()), ("input_ids", i32)]
    for prefix, kind in (("text", text_kind), ("visual", visual_kind)):
        cols = row_columns(prefix, kind, version)
        fields.append((cols[0], i32))
        fields += [(c, types[c[len(prefix) + 1:]]) for c in cols[1:]]
    return pa.schema(fields + gram)


# Float lists compress better split by byte plane, and so do the 2-byte ids and the delta codes.
_BSS_SUFFIXES = ("tail_logprob", "logsumexp", "topk_ids", "topk_codes", "sample_ids", "sample_counts")
_BSS_COLUMNS = ("gram", "gram_mean", "gram_eigvals", "gram_eigvec_scales")


def parquet_write_options(sch: pa.Schema, compression_level: int = 3) -> dict:
    """Keyword arguments for `pyarrow.parquet.ParquetWriter` that every shard is written with."""
    bss = [f.name for f in sch if f.name in _BSS_COLUMNS or f.name.endswith(_BSS_SUFFIXES)]
    return {
        "compression": "zstd",
        "compression_level": compression_level,
        # Leaf paths: a list column's values live at "<col>.list.element". Dictionary encoding would take
        # precedence over byte-stream-split, so it is only enabled for the other columns.
        "use_byte_stream_split": [f"{c}.list.element" for c in bss],
        "use_dictionary": [_leaf(f) for f in sch if f.name not in bss],
        "write_statistics": False,  # statistics on flattened target lists are useless and cost bytes
        # CRC32 per data page: a reader opening with READ_OPTIONS detects flipped bytes in the pages it
        # decodes, instead of silently training on damaged targets (4 bytes per page).
        "write_page_checksum": True,
    }


def _leaf(field: pa.Field) -> str:
    return f"{field.name}.list.element" if pa.types.is_list(field.type) else field.name


READ_OPTIONS = {"page_checksum_verification": True}
"""Keyword arguments for `pyarrow.parquet.ParquetFile` wherever shards are read."""


# ------------------------------------------------------------------------------------------ log-probs


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


def decode_logprobs_v1(codes: np.ndarray) -> np.ndarray:
    """v1 uint16 codes -> float32 log-probs."""
    return (np.asarray(codes, dtype=np.float32) * np.float32(-1.0 / V1_LOGPROB_SCALE)).astype(np.float32)


# ------------------------------------------------------------------------------------------ sampled targets


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


# ------------------------------------------------------------------------------------------ Gram


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


@dataclass(frozen=True)
class TargetSpec:
    """What the per-row targets are for one kind of row (text or visual)."""

    kind: str  # "topk" | "sampled"; an unknown kind is refused by readers
    k: int = 0  # topk: ids kept per row
    samples: int = 0  # sampled: draws per row
    logprob_encoding: str = LOGPROB_ENCODING

    def to_dict(self) -> dict:
        d = {"kind": self.kind, "k": self.k}
        if self.kind == "topk":
            d["logprob_encoding"] = self.logprob_encoding
        else:
            d["samples"] = self.samples
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TargetSpec":
        return cls(kind=d["kind"], k=int(d.get("k", 0)), samples=int(d.get("samples", 0)),
                   logprob_encoding=d.get("logprob_encoding", LOGPROB_ENCODING))


def check_version(version, where: str) -> int:
    """Raise a clear error for a format version this reader does not know."""
    try:
        v = int(version)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: cache format version is missing or not an integer, got {version!r}") from None
    if v not in SUPPORTED_VERSIONS:
        raise ValueError(
            f"{where}: cache format version {v} is not supported by this kd (it reads {list(SUPPORTED_VERSIONS)}); "
            "upgrade kd to read newer caches, or rebuild the cache"
        )
    return v


def shard_metadata(teacher_fingerprint: str, targets: dict) -> dict[bytes, bytes]:
    """Key-value metadata repeated in every shard's Parquet footer."""
    return {
        b"kd.format_version": str(FORMAT_VERSION).encode(),
        b"kd.teacher_fingerprint": teacher_fingerprint.encode(),
        b"kd.targets": json.dumps(targets, sort_keys=True).encode(),
    }
