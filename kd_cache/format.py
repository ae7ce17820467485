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
import re
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

FORMAT_VERSION = 4
"""Bumped on any change a reader must know about. Readers refuse versions they do not know."""

SUPPORTED_VERSIONS = (1, 2, 3, 4)

MANIFEST_NAME = "manifest.json"
CONFIG_NAME = "build_config.json"
CARD_NAME = "README.md"
SHARD_DIR = "shards"
PROGRESS_DIR = "_progress"
TOKENIZER_DIR = "teacher_tokenizer"  # v3: the teacher's tokenizer files, so a cache is read without the teacher

# v1: uint16 codes, code = round(-logprob * 256): |error| <= 1/512 nat for logprob >= -255.99.
V1_LOGPROB_SCALE = 256.0

# v2: uint8 codes with step 1/8 nat, delta-coded along each row (codes ascend as probabilities descend):
# |error| <= 1/16 nat for logprob >= -31.9; lower log-probs (p < 1.4e-14) are stored as -31.875.
LOGPROB_SCALE = 8.0
LOGPROB_MAX_CODE = 255
LOGPROB_MAX_ABS_ERROR = 0.5 / LOGPROB_SCALE
LOGPROB_ENCODING = "uint8-delta-step-1/8"

TARGET_KINDS = ("topk", "sampled")

# Column groups, used by `info` to attribute bytes and by `verify` to check the schema.
COMMON_COLUMNS = ("sample_id", "sample_index", "input_ids")
GRAM_COLUMNS = ("gram", "gram_mean", "gram_eigvals", "gram_eigvec_scales", "gram_eigvecs_hi", "gram_eigvecs")
GRAM_HI_VECTORS = 2  # the leading eigenvectors carry most of R_c: int16 for them, int8 for the rest
_KIND_COLUMNS = {
    "topk": ("topk_ids", "topk_codes", "tail_logprob", "logsumexp"),
    "sampled": ("sample_ids", "sample_counts", "logsumexp"),
}
V1_TARGET_COLUMNS = ("topk_ids", "topk_logprobs", "tail_logprob", "logsumexp")


# v3: the teacher's log-prob of the token actually observed next at each response row (it may fall outside the
# top-k); cross-tokenizer losses merge such log-probs over a group of tokens (chain rule). Same 1/8-nat uint8 code.
OBSERVED_COLUMN = "observed_codes"

# v4: the teacher's exact entropy H(p_T) of each sampled row (text or visual), from the full logits at build time, as
# uint8 codes of 1/16 nat (|error| <= 1/32 nat up to 15.94 nats = log of a 8.3M-id vocabulary): the trainer logs the
# sampled cross-entropy minus it, an estimate of KL(p_T || q_S) like the top-k rows' MDist. Top-k rows have none.
ENTROPY_COLUMN = "entropy_codes"
ENTROPY_SCALE = 16.0
ENTROPY_MAX_CODE = 255


def row_columns(prefix: str, kind: str, version: int = FORMAT_VERSION) -> tuple[str, ...]:
    """Columns of the `prefix` ("text" / "visual") rows for a target kind, positions first."""
    cols = V1_TARGET_COLUMNS if version == 1 else _KIND_COLUMNS[kind]
    if version >= 3 and prefix == "text":
        cols = cols + (OBSERVED_COLUMN,)
    if version >= 4 and kind == "sampled":
        cols = cols + (ENTROPY_COLUMN,)
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
                 "sample_ids": ids, "sample_counts": pa.list_(pa.uint8()), OBSERVED_COLUMN: pa.list_(pa.uint8()),
                 ENTROPY_COLUMN: pa.list_(pa.uint8())}
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
_BSS_SUFFIXES = ("tail_logprob", "logsumexp", "topk_ids", "topk_codes", "sample_ids", "sample_counts",
                 OBSERVED_COLUMN, ENTROPY_COLUMN)
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
    """Raise a clear error (ManifestError, a ValueError) for a format version this reader does not know."""
    if isinstance(version, bool) or not isinstance(version, int):
        raise ManifestError(f"{where}: cache format version is missing or not an integer, got {version!r}")
    if version not in SUPPORTED_VERSIONS:
        raise ManifestError(
            f"{where}: cache format version {version} is not supported by this kd (it reads "
            f"{list(SUPPORTED_VERSIONS)}); upgrade kd to read newer caches, or rebuild the cache"
        )
    return version


def shard_metadata(teacher_fingerprint: str, targets: dict) -> dict[bytes, bytes]:
    """Key-value metadata repeated in every shard's Parquet footer."""
    return {
        b"kd.format_version": str(FORMAT_VERSION).encode(),
        b"kd.teacher_fingerprint": teacher_fingerprint.encode(),
        b"kd.targets": json.dumps(targets, sort_keys=True).encode(),
    }


def saved_build_config(saved: dict) -> dict:
    """A saved build configuration (`build_config.json`, the manifest's `config`) with the defaults of the kd that
    wrote it filled in: caches from before these settings existed were built by transformers, appended no EOS to
    answers, and had one target kind for both kinds of row."""
    out = {"backend": "transformers", "append_eos": False, **saved}
    out.setdefault("visual_targets", out.get("targets"))
    return out


# ---------------------------------------------------------------------------------------------- the manifest
# A cache comes from another team: every field is checked for type and range before anything uses it, and a shard
# name must be a plain relative path inside the cache (a crafted name must never read another file or URL).
_NAME_CHARS = re.compile(r"[A-Za-z0-9._\-/]+")
MAX_NAME_LENGTH = 255
_SHA256 = re.compile(r"[0-9a-fA-F]{64}")


class ManifestError(ValueError):
    """A manifest that is not valid JSON of the documented shape; the message names the file and the field."""


class ProgressFileError(ValueError):
    """A file `kd cache build` reads back to resume or finalize (a `_progress/` journal or done file, the saved
    build configuration) that is not of the documented shape; the message names the file, the line and the field."""


def check_relative_name(name: Any, field: str, where: str, error: type[ValueError] = ManifestError) -> str:
    """`name` as a relative path inside the cache folder, or `error` (ManifestError) naming `field`."""
    problem = None
    if not isinstance(name, str) or not name:
        problem = f"must be a non-empty string, got {name!r}"
    elif len(name) > MAX_NAME_LENGTH:
        problem = f"is longer than {MAX_NAME_LENGTH} characters"
    elif not _NAME_CHARS.fullmatch(name):
        problem = (f"{name!r} holds a character outside letters, digits and ._-/ (no scheme, backslash, NUL or "
                   "space)")
    elif name.startswith("/") or any(part in ("", ".", "..") for part in name.split("/")):
        problem = f"{name!r} is not a relative path inside the cache (no leading /, no empty, . or .. parts)"
    if problem:
        raise error(f"{where}: {field} {problem}")
    return name


class _Fields:
    """Typed reads of one JSON object, each error naming the field's path."""

    def __init__(self, d: Any, path: str, where: str):
        if not isinstance(d, dict):
            raise ManifestError(f"{where}: {path or 'the manifest'} must be a JSON object, got {type(d).__name__}")
        self.d, self.path, self.where = d, path, where

    def _name(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def _bad(self, key: str, want: str) -> ManifestError:
        return ManifestError(f"{self.where}: {self._name(key)} must be {want}, got {self.d.get(key)!r}")

    def has(self, key: str) -> bool:
        return key in self.d

    def count(self, key: str, default: int | None = None) -> int:
        v = self.d.get(key, default)
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise self._bad(key, "an integer >= 0")
        return v

    def text(self, key: str, default: str | None = None, optional: bool = False) -> str | None:
        v = self.d.get(key, default)
        if v is None and optional:
            return None
        if not isinstance(v, str):
            raise self._bad(key, "a string")
        return v

    def flag(self, key: str, default: bool) -> bool:
        v = self.d.get(key, default)
        if not isinstance(v, bool):
            raise self._bad(key, "true or false")
        return v

    def obj(self, key: str, optional: bool = False) -> "_Fields":
        v = self.d.get(key)
        if v is None and optional:
            v = {}
        return _Fields(v, self._name(key), self.where)

    def items(self, key: str) -> list:
        v = self.d.get(key)
        if not isinstance(v, list):
            raise self._bad(key, "a list")
        return v


@dataclass(frozen=True)
class ShardEntry:
    """One shard as the manifest lists it."""

    name: str  # relative path inside the cache, e.g. "shards/rank-00000-of-00001-00000.parquet"
    rows: int
    bytes: int
    sha256: str | None  # lower-case hex; None in caches that recorded none
    text_rows: int = 0
    visual_rows: int = 0
    gram_samples: int = 0
    rank: int = 0


@dataclass(frozen=True)
class FileEntry:
    """A file of the cache beside its shards (the teacher's tokenizer files), with its size and sha256."""

    name: str  # relative path inside the cache, e.g. "teacher_tokenizer/tokenizer.json"
    bytes: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    """A parsed, checked `manifest.json`: the one place that knows its fields and the defaults of older versions.

    `raw` is the JSON as read (for `kd cache info --json` and the footer comparison); everything else is typed.
    """

    raw: dict = field(repr=False, compare=False)
    where: str  # the manifest's path or URL, for messages
    version: int
    teacher_id: str
    teacher_fingerprint: str
    multimodal: bool
    backend: str | None
    vocab_size: int  # the teacher's LM-head rows: every cached id is below it
    tokenizer: dict  # the teacher tokenizer's fingerprint (kd_cache.hf.tokenizer_fingerprint)
    image_processor: dict | None
    text: TargetSpec  # the response rows' targets
    visual: TargetSpec  # the visual rows' targets
    gram: bool  # whether the Gram matrix was stored (`--no-gram` off)
    gram_vocab: int  # the vocabulary the Gram's logits span
    max_length: int | None  # the build's token limit: the student must encode with it
    append_eos: bool  # the build's end-of-answer rule (caches from before the rule: off)
    num_samples: int
    num_text_rows: int
    num_visual_rows: int
    num_gram_samples: int
    total_bytes: int
    shards: tuple[ShardEntry, ...]
    skipped_total: int
    skipped_by_reason: dict
    data_source: str | None  # the records the cache was built from (their description and fingerprint)
    data_fingerprint: str | None
    build: dict  # world size, wall time, per-rank timings: informational
    tokenizer_files: tuple[FileEntry, ...] = ()  # v3: the teacher's tokenizer (empty in older caches)

    @property
    def self_contained(self) -> bool:
        """Whether the cache carries the teacher's tokenizer (and per-row observed log-probs): what a student with
        another tokenizer needs to learn from it."""
        return self.version >= 3 and bool(self.tokenizer_files)

    @property
    def has_visual(self) -> bool:
        return self.num_visual_rows > 0

    @property
    def targets_metadata(self) -> str:
        """The targets block as every shard footer repeats it (`shard_metadata`), for comparison."""
        return json.dumps(self.raw.get("targets", {}), sort_keys=True)

    @classmethod
    def parse(cls, d: Any, where: str) -> "Manifest":
        """Check and type a manifest's JSON; ManifestError (a ValueError) naming `where` and the field otherwise."""
        m = _Fields(d, "", where)
        version = check_version(d.get("format_version"), where)
        teacher = m.obj("teacher")
        targets = m.obj("targets")
        specs = {}
        for rows in ("text", "visual"):
            t = targets.obj(rows)
            kind = t.text("kind")
            if kind not in TARGET_KINDS:
                raise ManifestError(f"{where}: {rows} target kind {kind!r} is not known to this kd "
                                    f"(known: {list(TARGET_KINDS)}); upgrade kd")
            specs[rows] = TargetSpec(kind=kind, k=t.count("k", 0), samples=t.count("samples", 0),
                                     logprob_encoding=t.text("logprob_encoding", LOGPROB_ENCODING))
            if kind == "sampled" and specs[rows].samples < 1:
                raise ManifestError(f"{where}: targets.{rows}.samples must be >= 1 for sampled targets")
        vocab = m.count("vocab_size")
        if vocab < 1:
            raise ManifestError(f"{where}: vocab_size must be >= 1, got {vocab}")
        gram = targets.obj("gram", optional=True)
        config = m.obj("config", optional=True)
        config = _Fields(saved_build_config(config.d), "config", where)  # older kd: its defaults
        max_length = config.d.get("max_length")
        if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, int)
                                       or max_length < 1):
            raise ManifestError(f"{where}: config.max_length must be null or an integer >= 1, got {max_length!r}")
        shards = tuple(_shard_entry(s, i, where) for i, s in enumerate(m.items("shards")))
        names = [s.name for s in shards]
        if len(set(names)) != len(names):
            raise ManifestError(f"{where}: shards lists a shard twice")
        rows = sum(s.rows for s in shards)
        if rows != m.count("num_samples"):
            raise ManifestError(f"{where}: num_samples is {m.count('num_samples')}, but the shards' rows add up to "
                                f"{rows} (a shard entry lost or added?)")
        skipped = m.obj("skipped", optional=True)
        by_reason = skipped.d.get("by_reason", {})
        if not isinstance(by_reason, dict) or not all(
                isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) for k, v in by_reason.items()):
            raise ManifestError(f"{where}: skipped.by_reason must map reasons to counts")
        data = m.obj("data", optional=True)
        build = d.get("build") if isinstance(d.get("build"), dict) else {}
        image_processor = d.get("image_processor")
        tokenizer = d.get("tokenizer")
        if not isinstance(tokenizer, dict):
            raise ManifestError(f"{where}: tokenizer must be a JSON object, got {tokenizer!r}")
        return cls(
            raw=d, where=where, version=version,
            teacher_id=teacher.text("id"), teacher_fingerprint=teacher.text("fingerprint", ""),
            multimodal=teacher.flag("multimodal", False), backend=m.text("backend", optional=True),
            vocab_size=vocab, tokenizer=tokenizer,
            image_processor=image_processor if isinstance(image_processor, dict) else None,
            text=specs["text"], visual=specs["visual"],
            gram=gram.flag("enabled", True), gram_vocab=gram.count("vocab_size", vocab),
            max_length=max_length, append_eos=config.flag("append_eos", False),
            num_samples=m.count("num_samples"), num_text_rows=m.count("num_text_rows", 0),
            num_visual_rows=m.count("num_visual_rows", 1 if teacher.flag("multimodal", False) else 0),
            num_gram_samples=m.count("num_gram_samples", 0), total_bytes=m.count("total_bytes", 0),
            shards=shards, skipped_total=skipped.count("total", 0), skipped_by_reason=dict(by_reason),
            data_source=data.text("source", optional=True), data_fingerprint=data.text("fingerprint", optional=True),
            build=build,
            tokenizer_files=tuple(_file_entry(f, i, where) for i, f in enumerate(
                m.items("tokenizer_files") if "tokenizer_files" in d else [])),
        )

    @classmethod
    def load(cls, fs: Any, root: str, where: str | None = None) -> "Manifest":
        """Read `<root>/manifest.json` on the fsspec filesystem `fs`. FileNotFoundError when it is absent (the build is
        incomplete), ManifestError when it is not valid."""
        path = f"{root}/{MANIFEST_NAME}"
        where = where or path
        try:
            with fs.open(path, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            raise FileNotFoundError(path) from None
        try:
            d = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ManifestError(f"{where}: not valid JSON ({e})") from None
        return cls.parse(d, where)


def _file_entry(e: Any, i: int, where: str) -> FileEntry:
    f = _Fields(e, f"tokenizer_files[{i}]", where)
    name = check_relative_name(e.get("name"), f"tokenizer_files[{i}].name", where)
    if not name.startswith(TOKENIZER_DIR + "/"):
        raise ManifestError(f"{where}: tokenizer_files[{i}].name {name!r} must lie in {TOKENIZER_DIR}/")
    sha = e.get("sha256")
    if not isinstance(sha, str) or not _SHA256.fullmatch(sha):
        raise ManifestError(f"{where}: tokenizer_files[{i}].sha256 must be 64 hexadecimal characters, got {sha!r}")
    return FileEntry(name=name, bytes=f.count("bytes"), sha256=sha.lower())


def _shard_entry(s: Any, i: int, where: str) -> ShardEntry:
    f = _Fields(s, f"shards[{i}]", where)
    name = check_relative_name(s.get("name") if isinstance(s, dict) else None, f"shards[{i}].name", where)
    sha = s.get("sha256")
    if sha in (None, ""):
        sha = None
    elif not isinstance(sha, str) or not _SHA256.fullmatch(sha):
        raise ManifestError(f"{where} is malformed: shard {name!r} has sha256 {sha!r}, not 64 hexadecimal characters "
                            f"(shards[{i}].sha256)")
    return ShardEntry(name=name, rows=f.count("rows"), bytes=f.count("bytes"), sha256=sha.lower() if sha else None,
                      text_rows=f.count("text_rows", 0), visual_rows=f.count("visual_rows", 0),
                      gram_samples=f.count("gram_samples", 0), rank=f.count("rank", 0))
