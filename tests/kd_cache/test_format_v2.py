"""Format v2: compact Gram, the `sampled` target kind end to end, and reading version-1 caches."""

from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from kd_cache import codec
from kd_cache import format as fmt
from kd_cache import open_cache
from kd_cache.build import BuildConfig, build
from kd_cache.targets import gram_factors
from kd_cache.verify import verify


def cos_gap(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(1 - (a * b).sum() / np.linalg.norm(a) / np.linalg.norm(b))


def test_gram_lowrank_meets_the_tolerance_on_raw_and_centred():
    torch.manual_seed(0)
    n, v, d = 120, 3000, 24  # logits of a real LM are low-rank (rank <= hidden size) plus row offsets
    z = (torch.randn(n, d) @ torch.randn(v, d).T) * 0.4 + torch.randn(n, 1) * 6
    g = gram_factors(z, tolerance=1e-4)
    assert g.dense is None and 0 < g.rank <= d
    r = codec.gram_from_lowrank(g.mean.numpy(), g.eigvals.numpy(), g.scales.numpy(), g.eigvecs.numpy(), v)
    z64 = z.double()
    zc = z64 - z64.mean(-1, keepdim=True)
    m = g.mean.double().numpy()
    assert cos_gap(r, (z64 @ z64.T).numpy()) <= 1e-4
    assert cos_gap(r - v * np.outer(m, m), (zc @ zc.T).numpy()) <= 1e-4
    stored = g.rank * (n + 8) + 4 * n  # int8 vectors + fp32 scale and value per rank + fp32 means
    assert stored < 0.15 * 4 * n * (n + 1) / 2  # 12 % here; the ratio falls as Nv grows (3 % at 728)


@pytest.mark.parametrize("n,d,noise,tol", [(40, 6, 0.0, 1e-4), (90, 24, 1e-2, 1e-4), (120, 60, 3e-3, 1e-4),
                                            (64, 64, 0.2, 1e-3)])
def test_the_rank_test_for_every_rank_at_once_equals_forming_each_approximation(n, d, noise, tol):
    """`_passing_ranks` (prefix sums, one host sync) against the dense reference: R̂_c(r) formed from the first r
    dequantized eigenvectors, 1 − cos taken against R_c and, with V m mᵀ added, against R, for every r."""
    from kd_cache.codec import quantize_eigvecs
    from kd_cache.targets import _passing_ranks

    g = torch.Generator().manual_seed(n + d)
    v = 2000
    z = (torch.randn(n, d, generator=g) @ torch.randn(v, d, generator=g).T) * 0.4 + torch.randn(n, 1, generator=g) * 6
    z = z + noise * z.std() * torch.randn(n, v, generator=g)
    m = z.double().mean(-1)
    zc = z.double() - m[:, None]
    rc = zc @ zc.T
    evals, evecs = torch.linalg.eigh(rc)
    evals, evecs = evals.flip(0).clamp_min(0), evecs.flip(1)
    q, scales = quantize_eigvecs(evecs)
    u = q * scales
    mm = v * torch.outer(m, m)
    want = []
    for r in range(1, n + 1):
        hat = (u[:, :r] * evals[:r]) @ u[:, :r].T
        want.append(cos_gap(hat, rc) <= tol and cos_gap(hat + mm, rc + mm) <= tol)
    got = _passing_ranks(u, evals, rc, m, v, tol).tolist()
    assert got == want and any(want) and not all(want)
    factors = gram_factors(z, tolerance=tol)
    assert factors.dense is not None or want[factors.rank - 1]


def test_gram_falls_back_to_dense_when_nothing_smaller_meets_the_tolerance():
    torch.manual_seed(1)
    z = torch.randn(64, 4096)  # full-rank, no structure
    g = gram_factors(z, tolerance=1e-9)
    assert g.dense is not None and torch.allclose(g.dense, z @ z.T)


@pytest.fixture(scope="module")
def sampled_cache(tmp_path_factory, llava_teacher, tiny_data):
    data, images = tiny_data
    out = tmp_path_factory.mktemp("sampled") / "cache"
    build(BuildConfig(teacher=str(llava_teacher), data=str(data), images=str(images), out=str(out), targets="sampled",
                      samples=50, shard_size=5, progress=False))
    return out


def test_sampled_targets_cache(sampled_cache, llava_teacher, tiny_data):
    from tests.kd_cache.test_build import reference_forward
    from kd_cache.data import RecordSource

    assert verify(str(sampled_cache)) == []
    cache = open_cache(str(sampled_cache))
    assert cache.manifest.raw["targets"]["text"] == {"kind": "sampled", "k": 64, "samples": 50}
    data, images = tiny_data
    records = RecordSource(str(data))
    for s in cache:
        for prefix in ("text", "visual"):
            n = len(s[f"{prefix}_positions"])
            lengths = s[f"{prefix}_sample_row_lengths"]
            assert lengths.shape == (n,) and lengths.sum() == len(s[f"{prefix}_sample_ids"])
            rows = np.repeat(np.arange(n), lengths)
            assert (np.bincount(rows, weights=s[f"{prefix}_sample_counts"], minlength=n) == 50).all()
        # sampled ids come from the teacher's distribution: none has negligible teacher probability
        idx = s["sample_index"]
        _, logits = reference_forward(llava_teacher, records[idx], idx, images)
        lp = torch.log_softmax(logits[torch.from_numpy(s["text_positions"])], -1)
        rows = torch.from_numpy(np.repeat(np.arange(len(s["text_positions"])), s["text_sample_row_lengths"]))
        assert lp[rows, torch.from_numpy(s["text_sample_ids"])].min() > -25
        assert np.allclose(s["text_logsumexp"], torch.logsumexp(logits[torch.from_numpy(s["text_positions"])], -1),
                           atol=1e-4)


def test_sampled_targets_are_reproducible(tmp_path, sampled_cache, llava_teacher, tiny_data):
    data, images = tiny_data
    again = tmp_path / "again"
    build(BuildConfig(teacher=str(llava_teacher), data=str(data), images=str(images), out=str(again),
                      targets="sampled", samples=50, shard_size=5, batch_size=1, progress=False))
    a = {s["sample_id"]: s for s in open_cache(str(sampled_cache))}
    b = {s["sample_id"]: s for s in open_cache(str(again))}
    for k in a:  # same seed, different batching: the same draws
        assert np.array_equal(a[k]["text_sample_ids"], b[k]["text_sample_ids"])
        assert np.array_equal(a[k]["visual_sample_counts"], b[k]["visual_sample_counts"])


def test_training_on_sampled_targets(tmp_path, sampled_cache, tiny_data):
    from kd_eval.tiny import make_tiny_teacher
    from kd_train.train import TrainConfig, run

    data, images = tiny_data
    student = make_tiny_teacher(tmp_path / "student", "llava", hidden_size=32, num_layers=1, seed=3)
    run(TrainConfig(student=str(student), out=str(tmp_path / "dft"), stage="dft", cache=str(sampled_cache),
                    data=str(data), images=str(images), batch_size=4, max_steps=2, progress=False))
    rows = [json.loads(x) for x in (tmp_path / "dft" / "metrics.jsonl").read_text().splitlines()]
    step = [r for r in rows if r.get("step") == 2][0]
    # a KL estimate (the Monte-Carlo cross-entropy minus the cached teacher entropy): >= 0 up to sampling noise, far
    # below the teacher's entropy (~log V) that the raw cross-entropy would show
    assert np.isfinite(step["mdist_text"]) and -0.1 < step["mdist_text"] < 1.0


def _write_v1_cache(src, dst):
    """A version-1 cache made by hand from a v2 one (v1: int32 ids, uint16 codes of 1/256 nat, dense Gram)."""
    cache = open_cache(str(src))
    m = json.loads((src / fmt.MANIFEST_NAME).read_text())
    (dst / fmt.SHARD_DIR).mkdir(parents=True)
    samples = list(cache)
    cols = {name: [] for name in fmt.schema(version=1).names}
    for s in samples:
        cols["sample_id"].append(s["sample_id"])
        cols["sample_index"].append(s["sample_index"])
        cols["input_ids"].append(s["input_ids"].astype(np.int32))
        for p in ("text", "visual"):
            cols[f"{p}_positions"].append(s[f"{p}_positions"].astype(np.int32))
            cols[f"{p}_topk_ids"].append(s[f"{p}_topk_ids"].ravel().astype(np.int32))
            codes = np.clip(np.rint(-s[f"{p}_topk_logprobs"].ravel() * 256), 0, 65535).astype(np.uint16)
            cols[f"{p}_topk_logprobs"].append(codes)
            cols[f"{p}_tail_logprob"].append(s[f"{p}_tail_logprob"])
            cols[f"{p}_logsumexp"].append(s[f"{p}_logsumexp"])
        cols["gram"].append(codec.gram_to_upper(s["gram"]) if s["gram"].size else np.zeros(0, np.float32))
    table = pa.table(cols, schema=fmt.schema(version=1))
    name = f"{fmt.SHARD_DIR}/v1.parquet"
    pq.write_table(table, dst / name, compression="zstd")
    m.update(format_version=1, shards=[{"name": name, "rows": len(samples), "bytes": (dst / name).stat().st_size,
                                        "sha256": hashlib.sha256((dst / name).read_bytes()).hexdigest(), "text_rows": 0, "visual_rows": 0, "gram_samples": 0}])
    for p in ("text", "visual"):
        m["targets"][p] = {"kind": "topk", "k": m["targets"][p]["k"], "logprob_encoding": "uint16-neg-scaled-256"}
    (dst / fmt.MANIFEST_NAME).write_text(json.dumps(m))
    return samples


def test_version_1_caches_are_still_read(tmp_path, llava_topk_cache):
    v2 = _write_v1_cache(llava_topk_cache, tmp_path / "v1")  # v1 held top-k targets only
    old = open_cache(str(tmp_path / "v1"))
    assert old.version == 1 and len(old) == len(v2)
    for a, b in zip(old, v2):
        assert a["sample_id"] == b["sample_id"]
        assert np.array_equal(a["text_topk_ids"], b["text_topk_ids"])
        assert np.abs(a["text_topk_logprobs"] - b["text_topk_logprobs"]).max() <= 1 / 512 + 1e-6
        assert np.allclose(a["gram"], b["gram"], rtol=1e-6)
    shutil.rmtree(tmp_path / "v1")


def test_version_2_caches_are_still_read(tmp_path, llava_cache):
    """A v2 cache (no teacher tokenizer files, no observed log-prob column) reads and verifies as before; it says
    that it cannot give what another tokenizer's student needs."""
    import pyarrow.parquet as pq

    from kd_cache.verify import info, verify

    dst = tmp_path / "v2"
    shutil.copytree(llava_cache, dst)
    shutil.rmtree(dst / fmt.TOKENIZER_DIR)
    m = json.loads((dst / fmt.MANIFEST_NAME).read_text())
    for s in m["shards"]:
        path = dst / s["name"]
        table = pq.read_table(path)
        table = table.drop_columns([c for c in table.column_names
                                    if c == f"text_{fmt.OBSERVED_COLUMN}" or c.endswith(fmt.ENTROPY_COLUMN)])
        meta = pq.read_metadata(path).metadata
        meta[b"kd.format_version"] = b"2"
        table = table.replace_schema_metadata(meta)
        pq.write_table(table, path, compression="zstd", write_page_checksum=True)
        s["bytes"] = path.stat().st_size
        s["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    m["format_version"] = 2
    del m["tokenizer_files"]
    (dst / fmt.MANIFEST_NAME).write_text(json.dumps(m))
    old, new = open_cache(str(dst)), open_cache(str(llava_cache))
    assert old.version == 2 and not old.manifest.self_contained and new.manifest.self_contained
    assert verify(str(dst)) == [] and info(str(dst))["self_contained"] is False
    for a, b in zip(old, new):
        assert "text_observed_logprob" not in a and "text_observed_logprob" in b
        assert np.array_equal(a["text_topk_ids"], b["text_topk_ids"]) and np.array_equal(a["gram"], b["gram"])
    with pytest.raises(ValueError, match="carries no teacher tokenizer"):
        old.teacher_tokenizer_folder()
