"""The cache format: one versioned contract shared by the writer, the reader and `kd cache verify`.

Everything that decides how bytes on disk map to targets lives here, so `docs/cache-format.md` has one
place to follow. One Parquet row holds one sample; per-row targets are stored as flattened lists
(row-major), and their shapes are recovered from the position columns and the `k` values.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

FORMAT_VERSION = 1
"""Bumped on any change a reader must know about. Readers refuse versions they do not know."""

SUPPORTED_VERSIONS = (1,)

MANIFEST_NAME = "manifest.json"
CONFIG_NAME = "build_config.json"
CARD_NAME = "README.md"
SHARD_DIR = "shards"
PROGRESS_DIR = "_progress"

# Log-probs are stored as uint16 codes: code = round(-logprob * LOGPROB_SCALE), clipped to 65535.
# The step is 1/256 nat, so |error| <= 1/512 nat for logprob >= -255.99; anything lower (p < e^-255) is clipped.
LOGPROB_SCALE = 256.0
LOGPROB_MAX_CODE = 65535
LOGPROB_MAX_ABS_ERROR = 0.5 / LOGPROB_SCALE

# Column groups, used by `info` to attribute bytes and by `verify` to check the schema.
COMMON_COLUMNS = ("sample_id", "sample_index", "input_ids")
TEXT_COLUMNS = ("text_positions", "text_topk_ids", "text_topk_logprobs", "text_tail_logprob", "text_logsumexp")
VISUAL_COLUMNS = (
    "visual_positions",
    "visual_topk_ids",
    "visual_topk_logprobs",
    "visual_tail_logprob",
    "visual_logsumexp",
)
GRAM_COLUMNS = ("gram",)


def schema() -> pa.Schema:
    """Arrow schema of a v1 shard (target kind `topk` for text and visual rows)."""
    i32 = pa.list_(pa.int32())
    f32 = pa.list_(pa.float32())
    u16 = pa.list_(pa.uint16())
    return pa.schema(
        [
            ("sample_id", pa.string()),
            ("sample_index", pa.int64()),
            ("input_ids", i32),
            ("text_positions", i32),
            ("text_topk_ids", i32),
            ("text_topk_logprobs", u16),
            ("text_tail_logprob", f32),
            ("text_logsumexp", f32),
            ("visual_positions", i32),
            ("visual_topk_ids", i32),
            ("visual_topk_logprobs", u16),
            ("visual_tail_logprob", f32),
            ("visual_logsumexp", f32),
            ("gram", f32),
        ]
    )


# Float lists compress better split by byte plane; everything else uses dictionary/plain + zstd.
BYTE_STREAM_SPLIT_COLUMNS = ("text_tail_logprob", "text_logsumexp", "visual_tail_logprob", "visual_logsumexp", "gram")


def parquet_write_options(compression_level: int = 3) -> dict:
    """Keyword arguments for `pyarrow.parquet.ParquetWriter` that every shard is written with."""
    return {
        "compression": "zstd",
        "compression_level": compression_level,
        # Leaf paths: a list column's values live at "<col>.list.element". Dictionary encoding would take
        # precedence over byte-stream-split, so it is only enabled for the other columns.
        "use_byte_stream_split": [f"{c}.list.element" for c in BYTE_STREAM_SPLIT_COLUMNS],
        "use_dictionary": [_leaf(f) for f in schema() if f.name not in BYTE_STREAM_SPLIT_COLUMNS],
        "write_statistics": False,  # statistics on flattened target lists are useless and cost bytes
        # CRC32 per data page: a reader opening with READ_OPTIONS detects flipped bytes in the pages it
        # decodes, instead of silently training on damaged targets (4 bytes per page).
        "write_page_checksum": True,
    }


def _leaf(field: pa.Field) -> str:
    return f"{field.name}.list.element" if pa.types.is_list(field.type) else field.name


READ_OPTIONS = {"page_checksum_verification": True}
"""Keyword arguments for `pyarrow.parquet.ParquetFile` wherever shards are read."""


def encode_logprobs(logprobs: np.ndarray) -> np.ndarray:
    """float log-probs (<= 0) -> uint16 codes with step 1/LOGPROB_SCALE nat."""
    codes = np.rint(-np.asarray(logprobs, dtype=np.float64) * LOGPROB_SCALE)
    return np.clip(codes, 0, LOGPROB_MAX_CODE).astype(np.uint16)


def decode_logprobs(codes: np.ndarray) -> np.ndarray:
    """uint16 codes -> float32 log-probs."""
    return (np.asarray(codes, dtype=np.float32) * np.float32(-1.0 / LOGPROB_SCALE)).astype(np.float32)


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


@dataclass(frozen=True)
class TargetSpec:
    """What the per-row targets are for one kind of row (text or visual)."""

    kind: str  # "topk" in v1; a later kind (e.g. "sampled") adds its own columns
    k: int
    logprob_encoding: str = "uint16-neg-scaled-256"

    def to_dict(self) -> dict:
        return {"kind": self.kind, "k": self.k, "logprob_encoding": self.logprob_encoding}

    @classmethod
    def from_dict(cls, d: dict) -> "TargetSpec":
        return cls(kind=d["kind"], k=int(d["k"]), logprob_encoding=d.get("logprob_encoding", "uint16-neg-scaled-256"))


KNOWN_TARGET_KINDS = ("topk",)
GRAM_ENCODING = "upper-triangle-float32"


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
