"""`kd cache info` and `kd cache verify`: describe a cache and check it byte for byte."""

from __future__ import annotations

from collections import defaultdict

from kd_cache import format as fmt
from kd_cache.format import Manifest
from kd_cache.reader import Cache, fs_and_root
from kd_cache.shards import footer_problems, open_parquet, shard_sha256


def column_group(name: str) -> str:
    """Which bytes a column counts toward in `info`: per text row, per visual row, per Gram, per sample."""
    if name.startswith("gram"):
        return "gram"
    for prefix in ("text", "visual"):
        if name.startswith(prefix + "_"):
            return prefix
    return "common"


def expected_schema(m: Manifest):
    return fmt.schema(m.text.kind, m.visual.kind, m.vocab_size, version=m.version)


def info(path_or_url: str) -> dict:
    """Sizes and counts of a cache, with bytes per text row, per visual row and per Gram from Parquet metadata."""
    cache = Cache(path_or_url, cache_dir="")  # reads the cache itself, never a read-through copy
    m = cache.manifest
    col_bytes: dict[str, int] = defaultdict(int)
    shards = []
    for i, s in enumerate(m.shards):
        with cache.open_shard(i) as pf:
            md = pf.metadata
        for rg in range(md.num_row_groups):
            g = md.row_group(rg)
            for c in range(g.num_columns):
                col = g.column(c)
                col_bytes[col.path_in_schema.split(".")[0]] += col.total_compressed_size
        shards.append({"name": s.name, "rows": s.rows, "bytes": s.bytes, "row_groups": md.num_row_groups})
    by_group: dict[str, int] = defaultdict(int)
    for c, b in col_bytes.items():
        by_group[column_group(c)] += b

    def per(n_bytes: int, n: int):
        return round(n_bytes / n, 2) if n else None

    return {
        "path": str(path_or_url),
        "format_version": m.version,
        "teacher": m.teacher_id,
        "backend": m.backend,
        "samples": m.num_samples,
        "text_rows": m.num_text_rows,
        "visual_rows": m.num_visual_rows,
        "gram_samples": m.num_gram_samples,
        "k": {p: spec.k if spec.kind == "topk" else None for p, spec in (("text", m.text), ("visual", m.visual))},
        "targets": {"text": m.text.kind, "visual": m.visual.kind},
        "samples_per_row": {p: spec.samples if "samples" in m.raw["targets"][p] else None
                            for p, spec in (("text", m.text), ("visual", m.visual))},
        "total_bytes": m.total_bytes,
        "bytes_per_text_row": per(by_group["text"], m.num_text_rows),
        "bytes_per_visual_row": per(by_group["visual"], m.num_visual_rows),
        "bytes_per_gram": per(by_group["gram"], m.num_gram_samples),
        "bytes_per_sample_common": per(by_group["common"], m.num_samples),
        "column_bytes": dict(sorted(col_bytes.items())),
        "shards": shards,
        "skipped": {"total": m.skipped_total, "by_reason": m.skipped_by_reason},
        "self_contained": m.self_contained,  # carries the teacher tokenizer + observed log-probs (other students)
        "build": {k: m.build.get(k) for k in ("world_size", "wall_seconds", "finished_at")},
    }


def format_info(d: dict) -> str:
    """Human-readable `kd cache info`."""
    def fmt_b(x):
        return "n/a" if x is None else f"{x:,.1f} B"

    lines = [
        f"cache        {d['path']}  (format v{d['format_version']}, {d['backend']} backend)",
        f"teacher      {d['teacher']}",
        f"samples      {d['samples']:,}   shards {len(d['shards'])}   total {d['total_bytes']:,} bytes",
        f"rows         text {d['text_rows']:,} ({_kind(d, 'text')})   visual {d['visual_rows']:,} "
        f"({_kind(d, 'visual')})   grams {d['gram_samples']:,}",
        f"bytes/row    text {fmt_b(d['bytes_per_text_row'])}   visual {fmt_b(d['bytes_per_visual_row'])}   "
        f"gram {fmt_b(d['bytes_per_gram'])} per sample   common {fmt_b(d['bytes_per_sample_common'])} per sample",
        "tokenizer    " + ("the teacher's is stored (teacher_tokenizer/), with the observed next-token log-prob of "
                             "every response row: serves students of other tokenizers (kd train --cross-tokenizer)"
                             if d["self_contained"] else "not stored (format before v3: no tokenizer files, no "
                             "observed log-probs): students of other tokenizers need --teacher-tokenizer"),
        f"skipped      {d['skipped']['total']}" + "".join(f"\n  {r:<28} {n}" for r, n in d["skipped"]["by_reason"].items()),
        "shards:",
    ]
    lines += [f"  {s['name']:<48} {s['rows']:>7} rows {s['bytes']:>12,} B  {s['row_groups']} row groups"
              for s in d["shards"]]
    return "\n".join(lines)


def _kind(d: dict, rows: str) -> str:
    """"top-64" or "sampled, 50 draws" for one kind of row in `kd cache info`."""
    if d["targets"][rows] == "sampled":
        return f"sampled, {d['samples_per_row'][rows]} draws"
    return f"top-{d['k'][rows]}"


def verify(path_or_url: str, *, checksums: bool = True) -> list[str]:
    """Every problem found, as messages naming the shard; an empty list means the cache is intact."""
    fs_and_root(path_or_url)  # a URL whose filesystem is not installed is an error, not a finding
    try:
        cache = Cache(path_or_url, cache_dir="")  # checks the cache itself, never a read-through copy
    except (FileNotFoundError, ValueError) as e:
        return [" ".join(str(e).split())]
    m, fs = cache.manifest, cache.fs
    problems = []
    want_schema = expected_schema(m)
    total = 0
    for i, s in enumerate(m.shards):
        name, path = s.name, cache.shard_url(i)
        if not fs.exists(path):
            problems.append(f"{name}: missing")
            continue
        size = fs.size(path)
        if size != s.bytes:
            problems.append(f"{name}: size {size} bytes, manifest says {s.bytes} (truncated or replaced)")
        if checksums and shard_sha256(fs, path) != s.sha256:
            problems.append(f"{name}: sha256 mismatch (content changed since the build)")
        try:
            fh, pf = open_parquet(fs, path)
            with fh:
                schema, metadata = pf.schema_arrow, pf.metadata
        except Exception as e:  # noqa: BLE001 - any parse failure is a finding, not a crash
            problems.append(f"{name}: not a readable Parquet file ({type(e).__name__}: {e})")
            continue
        if not schema.remove_metadata().equals(want_schema):
            problems.append(f"{name}: schema differs from format v{m.version} with these targets")
        problems += [f"{name}: {p}" for p in footer_problems(metadata, s, m, strict=True)]
        total += metadata.num_rows
    for f in m.tokenizer_files:
        path = f"{cache.root}/{f.name}"
        if not fs.exists(path):
            problems.append(f"{f.name}: missing")
        elif fs.size(path) != f.bytes:
            problems.append(f"{f.name}: size {fs.size(path)} bytes, manifest says {f.bytes}")
        elif checksums and shard_sha256(fs, path) != f.sha256:
            problems.append(f"{f.name}: sha256 mismatch (content changed since the build)")
    if total != m.num_samples and not any("missing" in p for p in problems):
        problems.append(f"shards hold {total} samples, manifest says {m.num_samples}")
    return [" ".join(p.split()) for p in problems]  # one line each (arrow's messages may hold newlines)
