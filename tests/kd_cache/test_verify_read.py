"""`verify` catches damage; shards are plain Parquet for pandas and `datasets`; the reader refuses what it can't read."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from kd_cache import codec
from kd_cache import format as fmt
from kd_cache import open_cache
from kd_cache.verify import verify


@pytest.fixture
def cache_copy(tmp_path, llava_cache):
    dst = tmp_path / "cache"
    shutil.copytree(llava_cache, dst)
    return dst


def first_shard(cache_dir):
    m = json.loads((cache_dir / fmt.MANIFEST_NAME).read_text())
    return cache_dir / m["shards"][0]["name"], m["shards"][0]["name"]


def test_intact_cache_verifies(llava_cache):
    assert verify(str(llava_cache)) == []


def test_flipped_byte_is_caught(cache_copy):
    path, name = first_shard(cache_copy)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    problems = verify(str(cache_copy))
    assert any(name in p and "sha256 mismatch" in p for p in problems)


def test_truncated_shard_is_caught(cache_copy):
    path, name = first_shard(cache_copy)
    path.write_bytes(path.read_bytes()[:-100])
    problems = verify(str(cache_copy))
    assert any(name in p and "truncated" in p for p in problems)
    assert any(name in p and "not a readable Parquet file" in p for p in problems)


def test_missing_shard_and_missing_manifest(cache_copy):
    path, name = first_shard(cache_copy)
    path.unlink()
    assert any(name in p and "missing" in p for p in verify(str(cache_copy)))
    (cache_copy / fmt.MANIFEST_NAME).unlink()
    assert "incomplete" in verify(str(cache_copy))[0]
    with pytest.raises(FileNotFoundError, match="not a complete kd cache"):
        open_cache(str(cache_copy))


def test_unknown_format_version_is_refused_clearly(cache_copy):
    m = json.loads((cache_copy / fmt.MANIFEST_NAME).read_text())
    m["format_version"] = 99
    (cache_copy / fmt.MANIFEST_NAME).write_text(json.dumps(m))
    with pytest.raises(ValueError, match="format version 99 is not supported"):
        open_cache(str(cache_copy))
    assert "format version 99 is not supported" in verify(str(cache_copy))[0]


def test_unknown_target_kind_is_refused_clearly(cache_copy):
    m = json.loads((cache_copy / fmt.MANIFEST_NAME).read_text())
    m["targets"]["text"]["kind"] = "sampled-v9"
    (cache_copy / fmt.MANIFEST_NAME).write_text(json.dumps(m))
    with pytest.raises(ValueError, match="target kind 'sampled-v9' is not known"):
        open_cache(str(cache_copy))


def test_shards_read_with_pandas_and_datasets(llava_cache):
    import datasets
    import pandas as pd

    cache = open_cache(str(llava_cache))
    files = [str(llava_cache / s.name) for s in cache.shards]
    df = pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)
    assert len(df) == len(cache)
    ds = datasets.load_dataset("parquet", data_files=files, split="train")
    assert ds.num_rows == len(cache)
    ours = {s["sample_id"]: s for s in cache}
    row = ds[0]
    s = ours[row["sample_id"]]
    assert np.array_equal(np.asarray(row["input_ids"]), s["input_ids"])
    k = cache.text_spec.k
    lp = codec.decode_logprobs(np.asarray(row["text_topk_codes"], dtype=np.uint8).reshape(-1, k))
    assert np.array_equal(lp, s["text_topk_logprobs"])
    # the Gram rebuilds from plain columns: dense upper triangle, or row means + int8 eigenpairs
    pd_row = df[df.sample_id == row["sample_id"]].iloc[0]
    nv = len(s["visual_positions"])
    if len(pd_row["gram"]):
        g = codec.gram_from_upper(np.asarray(pd_row["gram"], dtype=np.float32), nv)
    else:
        codes = codec.eigvec_codes_from_bytes(pd_row["gram_eigvecs_hi"], pd_row["gram_eigvecs"], nv,
                                            len(pd_row["gram_eigvals"]))
        g = codec.gram_from_lowrank(pd_row["gram_mean"], pd_row["gram_eigvals"], pd_row["gram_eigvec_scales"],
                                  codes, cache.manifest.vocab_size)
    assert np.array_equal(g, s["gram"]) and np.allclose(g, g.T)


def test_shard_metadata_repeats_version_and_teacher(llava_cache):
    import pyarrow.parquet as pq

    cache = open_cache(str(llava_cache))
    for i in range(len(cache.shards)):
        with cache.open_shard(i) as pf:
            kv = pf.metadata.metadata
        assert kv[b"kd.format_version"] == str(fmt.FORMAT_VERSION).encode()
        assert kv[b"kd.teacher_fingerprint"].decode() == cache.manifest.teacher_fingerprint
        assert json.loads(kv[b"kd.targets"])["text"]["k"] == 64
    assert pq.read_schema(str(llava_cache / cache.shards[0].name)).remove_metadata().equals(fmt.schema("topk", "sampled"))


def test_reader_resumes_at_a_position_and_reads_row_groups_lazily(llava_cache):
    cache = open_cache(str(llava_cache))
    everything = list(cache.iter_with_positions())
    assert len(everything) == len(cache)
    pos, _ = everything[3]
    rest = [s["sample_id"] for _, s in cache.iter_with_positions(start=pos)]
    assert rest == [s["sample_id"] for _, s in everything[3:]]


def test_logprob_codes_round_trip_within_the_stated_bound():
    lp = -np.sort(np.random.default_rng(0).exponential(4.0, size=(2000, 64)), axis=1).astype(np.float32)
    codes = codec.encode_logprobs(lp)
    assert codes.dtype == np.uint8
    back = codec.decode_logprobs(codes)
    inside = lp >= -(fmt.LOGPROB_MAX_CODE + 0.5) / fmt.LOGPROB_SCALE
    assert np.abs(back[inside] - lp[inside]).max() <= fmt.LOGPROB_MAX_ABS_ERROR + 1e-6
    assert back.min() >= -fmt.LOGPROB_MAX_CODE / fmt.LOGPROB_SCALE
    assert (np.diff(back, axis=1) <= 0).all()  # order preserved


def test_verify_and_read_a_cache_served_over_http(llava_cache):
    import functools
    import http.server
    import threading

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(llava_cache.parent)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/{llava_cache.name}"
        assert verify(url) == []
        remote = [s["sample_id"] for s in open_cache(url)]
    finally:
        server.shutdown()
    assert remote == [s["sample_id"] for s in open_cache(str(llava_cache))]


def test_http_reading_is_in_the_base_install_and_the_remote_extra():
    """`kd cache verify http://...` must work after a plain `pip install kd-offline`: fsspec's HTTP filesystem needs
    aiohttp and requests, so they are base dependencies (and the remote extra names them too, with s3fs)."""
    import re
    import tomllib
    from pathlib import Path

    project = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())["project"]

    def names(reqs):
        return {re.split(r"[\s<>=!~;\[]", r, maxsplit=1)[0].lower() for r in reqs}

    assert {"fsspec", "aiohttp", "requests"} <= names(project["dependencies"])
    assert {"s3fs", "aiohttp", "requests"} <= names(project["optional-dependencies"]["remote"])


def test_a_missing_http_dependency_names_the_extra(monkeypatch, tmp_path):
    """Should aiohttp be missing anyway, the one-line error names what to install (not fsspec's ImportError)."""
    import importlib
    import sys

    from typer.testing import CliRunner

    from kd_cache.errors import MissingDependencyError
    from kd_cli.main import app

    monkeypatch.setitem(sys.modules, "aiohttp", None)  # `import aiohttp` raises ImportError
    monkeypatch.delitem(sys.modules, "fsspec.implementations.http", raising=False)
    loaded = importlib.import_module("fsspec.registry")._registry  # filesystem classes imported so far
    for protocol in ("http", "https"):
        monkeypatch.delitem(loaded, protocol, raising=False)
    url = "http://127.0.0.1:9/cache"
    with pytest.raises(MissingDependencyError) as e:
        open_cache(url)
    assert isinstance(e.value, ImportError) and "kd-offline[remote]" in str(e.value) and url in str(e.value)
    r = CliRunner().invoke(app, ["cache", "verify", url])
    assert r.exit_code == 2 and "error: cannot open http://127.0.0.1:9/cache" in r.output
    assert "pip install 'kd-offline[remote]'" in " ".join(r.output.split())
