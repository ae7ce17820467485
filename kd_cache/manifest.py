"""The manifest: merged from every rank's progress journal, written last. Its presence means complete."""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from typing import Any, Callable

from kd_cache import format as fmt
from kd_cache.errors import StorageError
from kd_cache.files import atomic_write_text
from kd_cache.writer import journal_path, read_journal


def done_path(out_dir: str, rank: int, world_size: int) -> str:
    return os.path.join(out_dir, fmt.PROGRESS_DIR, f"rank-{rank:05d}-of-{world_size:05d}.done.json")


DONE_REMEDY = "the done file is damaged: delete it and rerun the build (the rank resumes from its journal)"


def parse_done(data: bytes | str, rank: int, where: str) -> dict:
    """A rank's done file, checked as untrusted input (docs/cache-format.md, "Resume files"): a JSON object whose
    `rank` is this rank, `samples_this_run` an integer >= 0, `wall_seconds` a finite number >= 0, `finished_at` a
    string and `header` (what the shards were written with) an object or absent. ProgressFileError naming `where`
    and the field otherwise."""
    def bad(problem: str) -> fmt.ProgressFileError:
        return fmt.ProgressFileError(f"{where}: {problem}; {DONE_REMEDY}")

    try:
        d = json.loads(data.decode("utf-8") if isinstance(data, bytes) else data)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise bad(f"not valid JSON ({type(e).__name__})") from None
    if not isinstance(d, dict):
        raise bad(f"must be a JSON object, got {type(d).__name__}")
    if type(d.get("rank")) is not int or d["rank"] != rank:
        raise bad(f"rank must be {rank}, got {d.get('rank')!r}")
    v = d.get("samples_this_run")
    if type(v) is not int or v < 0:
        raise bad(f"samples_this_run must be an integer >= 0, got {v!r}")
    v = d.get("wall_seconds")
    if type(v) not in (int, float) or not math.isfinite(v) or v < 0:
        raise bad(f"wall_seconds must be a number >= 0, got {v!r}")
    if not isinstance(d.get("finished_at"), str):
        raise bad(f"finished_at must be a string, got {d.get('finished_at')!r}")
    if d.get("header") is not None and not isinstance(d["header"], dict):
        raise bad(f"header must be a JSON object, got {type(d['header']).__name__}")
    return d


def read_done(out_dir: str, rank: int, world_size: int, where: str | None = None) -> dict:
    """`parse_done` of rank `rank`'s done file in `out_dir` (named `where` in errors, default its path)."""
    path = done_path(out_dir, rank, world_size)
    with open(path, "rb") as f:
        return parse_done(f.read(), rank, where or path)


def try_finalize(out_dir: str, world_size: int, header: dict,
                 shard_present: Callable[[str, int], bool] | None = None,
                 where: str | None = None) -> dict | None:
    """Write the manifest if every rank is done; return it (the JSON as written), or None while some rank is still
    running. It is checked as readers will check it (`format.Manifest.parse`) before anything is written.

    Every finishing rank calls this; the content is a pure function of the journals, so two ranks finishing
    at once write the same bytes through an atomic rename and no lock is needed. `shard_present(name, bytes)`
    says whether a recorded shard is where readers will find it (default: the file exists in `out_dir`; a
    remote build checks its object store, `where` naming it in the error).
    """
    if shard_present is None:
        shard_present = lambda name, size: os.path.exists(os.path.join(out_dir, name))  # noqa: E731
    progress_dir = f"{where}/{fmt.PROGRESS_DIR}" if where else os.path.join(out_dir, fmt.PROGRESS_DIR)

    def label(path: str) -> str:  # a file as errors name it: where it came from (the remote), else its path
        return f"{progress_dir}/{os.path.basename(path)}" if where else path

    dones = []
    for r in range(world_size):
        p = done_path(out_dir, r, world_size)
        if not os.path.exists(p):
            return None
        # the header it carries is the manifest's top level (rank 0's is the one used)
        dones.append({k: v for k, v in read_done(out_dir, r, world_size, label(p)).items() if k != "header"})
    shards, skipped = [], []
    totals = Counter()
    for r in range(world_size):
        jpath = journal_path(out_dir, r, world_size)
        entries = read_journal(jpath, where=label(jpath), rank=r, world_size=world_size)
        for e in entries:
            skipped.extend(e["skipped"])
            if e["shard"] is None:
                continue
            if not shard_present(e["shard"], e["bytes"]):
                what = f"missing or of another size at {where}" if where else "the file is missing"
                raise StorageError(f"rank {r} recorded shard {e['shard']} but {what}; rerun the build")
            shards.append({k: e[k] for k in ("rows", "bytes", "sha256", "text_rows", "visual_rows", "gram_samples")}
                          | {"name": e["shard"], "rank": r})
            for k in ("rows", "text_rows", "visual_rows", "gram_samples", "bytes"):
                totals[k] += e[k]
    skipped.sort(key=lambda s: s["index"])
    manifest: dict[str, Any] = {
        "format_version": fmt.FORMAT_VERSION,
        **header,
        "num_samples": totals["rows"],
        "num_text_rows": totals["text_rows"],
        "num_visual_rows": totals["visual_rows"],
        "num_gram_samples": totals["gram_samples"],
        "total_bytes": totals["bytes"],
        "shards": shards,
        "skipped": {"total": len(skipped), "by_reason": dict(sorted(Counter(s["reason"] for s in skipped).items())),
                    "samples": skipped},
        "build": {
            "world_size": world_size,
            "ranks": dones,
            "wall_seconds": max(d["wall_seconds"] for d in dones),
            "finished_at": max(d["finished_at"] for d in dones),
        },
    }
    path = os.path.join(out_dir, fmt.MANIFEST_NAME)
    try:  # what readers will accept, checked before anything is written
        typed = fmt.Manifest.parse(manifest, path)
    except fmt.ManifestError as e:  # its fields come from the done files' header and the journals
        raise fmt.ProgressFileError(
            f"{e} (the manifest to be written is made of the header in the done files and of the journals in "
            f"{progress_dir}: one is damaged; delete the done files and rerun the build, which writes them again)"
        ) from None
    atomic_write_text(os.path.join(out_dir, fmt.CARD_NAME), dataset_card(typed))
    atomic_write_text(path, json.dumps(manifest, indent=1, sort_keys=True))
    return manifest


def dataset_card(m: fmt.Manifest) -> str:
    """A Hugging Face dataset card, so the folder can be published as it is."""
    revision = m.raw["teacher"].get("revision")
    return f"""---
license: other
tags: [knowledge-distillation, kd-cache, llava-kd]
configs:
- config_name: default
  data_files: "{fmt.SHARD_DIR}/*.parquet"
---
# kd teacher cache: {m.teacher_id}

Offline LLaVA-KD targets written by `kd cache build` (cache format v{m.version}, see
`docs/cache-format.md` in the kd repository). One Parquet row per sample: the teacher's `input_ids`,
{_targets(m.text)} at the response rows, {_targets(m.visual)} at the visual
rows, and {"the Gram matrix R = Z Zᵀ of the raw logits at the visual rows" if m.gram
else "no Gram matrix (built `--no-gram`)"}.

| | |
|---|---|
| teacher | `{m.teacher_id}` (revision `{revision}`) |
| samples | {m.num_samples} ({m.skipped_total} skipped) |
| text rows | {m.num_text_rows} |
| visual rows | {m.num_visual_rows} |
| shards | {len(m.shards)} ({m.total_bytes} bytes) |
| end of answer | {_eos_rule(m)} |

Read it with `kd_cache.open_cache(path_or_url)`, or as plain Parquet (pandas, duckdb, `datasets`).
`manifest.json` lists every shard with its sha256; `kd cache verify` checks them.
"""


def _targets(spec: fmt.TargetSpec) -> str:
    """The card's words for one kind of row's targets."""
    if spec.kind == "sampled":
        return f"{spec.samples} draws from the teacher distribution (unique ids + counts) and the logsumexp"
    return f"the top-{spec.k} log-probs, tail mass and logsumexp"


def _eos_rule(m: fmt.Manifest) -> str:
    """The card's line on what ends each supervised answer (`append_eos`, docs/cache-format.md)."""
    if m.append_eos:
        return ("the template's end-of-turn marker; where the chat template writes none (LLaVA-1.5/NeXT Vicuna), "
                "the tokenizer's EOS was appended and supervised (`append_eos`)")
    return "the template's end-of-turn marker, if it writes one (`append_eos` off: nothing appended)"
