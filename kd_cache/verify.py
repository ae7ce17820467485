"""`kd cache info` and `kd cache verify`: describe a cache and check it byte for byte."""

from __future__ import annotations

import json
from collections import defaultdict


from kd_cache import format as fmt
from kd_cache.shards import footer_problems, open_parquet, shard_sha256
from kd_cache.reader import _fs_and_root


def _load_manifest(fs, root: str) -> dict:
    path = f"{root}/{fmt.MANIFEST_NAME}"
    if not fs.exists(path):
        raise FileNotFoundError(f"{root}: no {fmt.MANIFEST_NAME}; the cache is incomplete or this is not a kd cache")
    with fs.open(path, "rb") as f:
        m = json.load(f)
    fmt.check_version(m.get("format_version"), path)
    return m


def column_group(name: str) -> str:
    """Which bytes a column counts toward in `info`: per text row, per visual row, per Gram, per sample."""
    if name.startswith("gram"):
        return "gram"
    for prefix in ("text", "visual"):
        if name.startswith(prefix + "_"):
            return prefix
    return "common"


def expected_schema(m: dict):
    t = m["targets"]
    return fmt.schema(t["text"]["kind"], t["visual"]["kind"], m["vocab_size"], version=int(m["format_version"]))


def info(path_or_url: str) -> dict:
    """Sizes and counts of a cache, with bytes per text row, per visual row and per Gram from Parquet metadata."""
    fs, root = _fs_and_root(path_or_url)
    m = _load_manifest(fs, root)
    col_bytes: dict[str, int] = defaultdict(int)
    shards = []
    for s in m["shards"]:
        fh, pf = open_parquet(fs, f"{root}/{s['name']}")
        with fh:
            md = pf.metadata
        for rg in range(md.num_row_groups):
            g = md.row_group(rg)
            for c in range(g.num_columns):
                col = g.column(c)
                col_bytes[col.path_in_schema.split(".")[0]] += col.total_compressed_size
        shards.append({"name": s["name"], "rows": s["rows"], "bytes": s["bytes"], "row_groups": md.num_row_groups})
    by_group: dict[str, int] = defaultdict(int)
    for c, b in col_bytes.items():
        by_group[column_group(c)] += b

    def per(n_bytes: int, n: int):
        return round(n_bytes / n, 2) if n else None

    return {
        "path": str(path_or_url),
        "format_version": m["format_version"],
        "teacher": m["teacher"]["id"],
        "backend": m.get("backend"),
        "samples": m["num_samples"],
        "text_rows": m["num_text_rows"],
        "visual_rows": m["num_visual_rows"],
        "gram_samples": m["num_gram_samples"],
        "k": {"text": m["targets"]["text"]["k"], "visual": m["targets"]["visual"]["k"]},
        "targets": {"text": m["targets"]["text"]["kind"], "visual": m["targets"]["visual"]["kind"]},
        "samples_per_row": {p: m["targets"][p].get("samples") for p in ("text", "visual")},
        "total_bytes": m["total_bytes"],
        "bytes_per_text_row": per(by_group["text"], m["num_text_rows"]),
        "bytes_per_visual_row": per(by_group["visual"], m["num_visual_rows"]),
        "bytes_per_gram": per(by_group["gram"], m["num_gram_samples"]),
        "bytes_per_sample_common": per(by_group["common"], m["num_samples"]),
        "column_bytes": dict(sorted(col_bytes.items())),
        "shards": shards,
        "skipped": {"total": m["skipped"]["total"], "by_reason": m["skipped"]["by_reason"]},
        "build": {k: m["build"].get(k) for k in ("world_size", "wall_seconds", "finished_at")},
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
    fs, root = _fs_and_root(path_or_url)
    try:
        m = _load_manifest(fs, root)
    except (FileNotFoundError, ValueError, json.JSONDecodeError) as e:
        return [str(e)]
    problems = []
    want_schema = expected_schema(m)
    total = 0
    for s in m["shards"]:
        name = s["name"]
        path = f"{root}/{name}"
        if not fs.exists(path):
            problems.append(f"{name}: missing")
            continue
        size = fs.size(path)
        if size != s["bytes"]:
            problems.append(f"{name}: size {size} bytes, manifest says {s['bytes']} (truncated or replaced)")
        if checksums and shard_sha256(fs, path) != s["sha256"]:
            problems.append(f"{name}: sha256 mismatch (content changed since the build)")
        try:
            fh, pf = open_parquet(fs, path)
            with fh:
                schema, metadata = pf.schema_arrow, pf.metadata
        except Exception as e:  # noqa: BLE001 - any parse failure is a finding, not a crash
            problems.append(f"{name}: not a readable Parquet file ({type(e).__name__}: {e})")
            continue
        if not schema.remove_metadata().equals(want_schema):
            problems.append(f"{name}: schema differs from format v{m['format_version']} with these targets")
        problems += [f"{name}: {p}" for p in footer_problems(metadata, s, m, strict=True)]
        total += metadata.num_rows
    if total != m["num_samples"] and not any("missing" in p for p in problems):
        problems.append(f"shards hold {total} samples, manifest says {m['num_samples']}")
    return problems
