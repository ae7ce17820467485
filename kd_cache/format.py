"""The cache format: one versioned contract shared by the writer, the reader, the stream and `kd cache verify`.

Here: the names (files, folders, columns), the version and its check, the Arrow schema, the target specs and the
shard metadata. How targets become those columns and back is `kd_cache/codec.py`; `docs/cache-format.md`
documents both. One Parquet row holds one sample; per-row targets are stored as flattened lists (row-major), and
their shapes are recovered from the position columns and the target specs.

Version 2 (written now) chose its encodings by measurement (`benchmarks/cache_size.py`): top-k ids as uint16
when the vocabulary fits (else uint32), log-probs as delta-coded uint8 codes of 1/8 nat, the Gram as its
exact row-mean part plus a per-sample-rank int8 eigendecomposition of the row-centred Gram, and a second
target kind, `sampled` (random-sampling KD). Version 1 caches are still read.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

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
