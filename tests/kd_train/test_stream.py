"""CacheStream: every sample once across ranks and workers, determinism, exact resume, HTTP, and the refusals."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from kd_cache import format as fmt
from kd_cache import open_cache
from kd_cache.data import RecordSource
from kd_train import stream as stream_mod
from kd_train.stream import (CacheStream, CorruptShardError, DataMismatchError, MissingImageError, ResumeState,
                             collate_tags, ensure_nonempty)
from tests.conftest import write_records


# --------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def rg_cache(llava_cache, tmp_path_factory) -> Path:
    """The tiny cache with every shard rewritten into row groups of 2 rows (resume inside row groups)."""
    out = tmp_path_factory.mktemp("rg") / "cache"
    shutil.copytree(llava_cache, out)
    manifest = json.loads((out / fmt.MANIFEST_NAME).read_text())
    for s in manifest["shards"]:
        path = out / s["name"]
        table = pq.read_table(path)
        pq.write_table(table, path, row_group_size=2, **fmt.parquet_write_options(table.schema))
        s["bytes"] = path.stat().st_size
        s["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    (out / fmt.MANIFEST_NAME).write_text(json.dumps(manifest))
    assert pq.ParquetFile(out / manifest["shards"][0]["name"]).metadata.num_row_groups > 1
    return out


@pytest.fixture(scope="module")
def reference(llava_cache) -> dict[str, dict]:
    return {s["sample_id"]: s for s in open_cache(str(llava_cache))}


def make(cache, tiny_data, **kw) -> CacheStream:
    kw.setdefault("records", RecordSource(str(tiny_data[0])))
    kw.setdefault("image_root", tiny_data[1])
    kw.setdefault("shuffle_buffer", 4)
    return CacheStream(str(cache), **kw)


def loader(stream, workers: int, batch: int = 2):
    return torch.utils.data.DataLoader(stream, batch_size=batch, num_workers=workers, collate_fn=list)


def run(stream, workers: int = 0, batch: int = 2) -> list[dict]:
    return [s for b in loader(stream, workers, batch) for s in b]


def key(s: dict) -> tuple:
    p = s["position"]
    return s["sample_id"], p.shard, p.row_group, p.offset


# --------------------------------------------------------------------------------------------- coverage


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_one_pass_yields_every_sample_once(rg_cache, tiny_data, reference, world, workers):
    seen: list[tuple] = []
    per_rank = []
    for rank in range(world):
        st = make(rg_cache, tiny_data, rank=rank, world_size=world, seed=3)
        got = run(st, workers)
        assert len(got) == st.num_samples()
        per_rank.append({s["sample_id"] for s in got})
        seen += [key(s) for s in got]
    assert len(seen) == len(set(seen)) == len(reference)  # disjoint, and together everything
    assert set().union(*per_rank) == set(reference)
    if world == 4:  # 3 shards < 4 ranks: split by rows, shares differ by at most one
        assert max(map(len, per_rank)) - min(map(len, per_rank)) <= 1


def test_samples_match_the_cache_and_carry_images(llava_cache, tiny_data, reference):
    data = json.loads(Path(tiny_data[0]).read_text())
    got = list(make(llava_cache, tiny_data))
    assert sorted(s["sample_id"] for s in got) == sorted(reference)
    for s in got:
        ref = reference[s["sample_id"]]
        for k, v in ref.items():
            np.testing.assert_array_equal(s[k], v)
        assert len(s["images"]) == (1 if data[s["sample_index"]].get("image") else 0)
        assert all(im.mode == "RGB" for im in s["images"])


def test_transform_runs_in_the_stream_and_tags_survive(llava_cache, tiny_data):
    st = make(llava_cache, tiny_data, transform=lambda s: {"n_tokens": len(s["input_ids"])})
    got = run(st, workers=2)
    assert len(got) == 12 and all(set(s) == {"n_tokens", *stream_mod.TAG_KEYS} for s in got)
    bad = make(llava_cache, tiny_data, transform=lambda s: [s])
    with pytest.raises(ValueError, match="transform must return a dict, got list"):
        next(iter(bad))


# --------------------------------------------------------------------------------------------- order


def test_order_is_deterministic_and_depends_on_seed_and_epoch(rg_cache, tiny_data, llava_cache):
    ids = lambda **kw: [key(s) for s in make(rg_cache, tiny_data, **kw)]  # noqa: E731
    base = ids(seed=5)
    assert base == ids(seed=5)
    assert base != ids(seed=6)
    assert base != ids(seed=5, epoch=1)
    st = make(rg_cache, tiny_data, seed=5)
    st.set_epoch(1)
    assert [key(s) for s in st] == ids(seed=5, epoch=1)
    # no shuffling at all: the cache's own order
    plain = [s["sample_id"] for s in make(rg_cache, tiny_data, shuffle_buffer=0, shuffle_shards=False)]
    assert plain == [s["sample_id"] for s in open_cache(str(llava_cache))]
    # with workers, each worker's sequence is deterministic too
    assert [key(s) for s in run(make(rg_cache, tiny_data, seed=5), 2)] == \
        [key(s) for s in run(make(rg_cache, tiny_data, seed=5), 2)]


# --------------------------------------------------------------------------------------------- resume


def _resume(cache, tiny_data, state: dict, **kw) -> CacheStream:
    st = make(cache, tiny_data, **kw)
    st.load_state_dict(json.loads(json.dumps(state)))  # through JSON, as a checkpoint would
    return st


@pytest.mark.parametrize("rank,world", [(0, 1), (1, 2)])
def test_exact_resume_in_process(rg_cache, tiny_data, rank, world):
    kw = dict(rank=rank, world_size=world, seed=1)
    full = [key(s) for s in make(rg_cache, tiny_data, **kw)]
    for n in sorted({0, 1, 3, 5, len(full) // 2, len(full) - 1, len(full)}):  # mid row group, buffer not empty
        st = make(rg_cache, tiny_data, **kw)
        it = iter(st)
        consumed = []
        for _ in range(n):
            s = next(it)
            consumed.append(key(s))
            st.mark_consumed(s)
        state = st.state_dict()
        if 0 < n < len(full):
            nxt = next(it)  # the stream ran ahead of the loop: that must not count
            assert state["next_positions"][0] == [nxt["position"].shard, nxt["position"].row_group,
                                                  nxt["position"].offset]
        rest = [key(s) for s in _resume(rg_cache, tiny_data, state, **kw)]
        assert consumed + rest == full, n


@pytest.mark.parametrize("batches", [1, 2, 3])
def test_exact_resume_with_two_workers(rg_cache, tiny_data, batches):
    full = [key(s) for s in run(make(rg_cache, tiny_data, seed=2), 2)]
    st = make(rg_cache, tiny_data, seed=2)
    consumed, last = [], None
    for i, batch in enumerate(loader(st, 2)):  # workers prefetch well past what is consumed here
        if i == batches:
            break
        consumed += [key(s) for s in batch]
        st.mark_consumed(batch)
        last = batch
    state = st.state_dict()
    assert state["num_workers"] == 2 and sum(state["consumed"]) == len(consumed)
    rest = [key(s) for s in run(_resume(rg_cache, tiny_data, state, seed=2), 2)]
    assert consumed + rest == full
    with pytest.raises(ValueError, match="already"):  # reported twice
        st.mark_consumed(last)


def test_resume_reads_no_skipped_row_group(rg_cache, tiny_data, monkeypatch):
    st = make(rg_cache, tiny_data)
    for s in st:
        st.mark_consumed(s)
    loads = []
    real = stream_mod._ShardReader._load
    monkeypatch.setattr(stream_mod._ShardReader, "_load", lambda self, *a: (loads.append(a), real(self, *a))[1])
    assert list(_resume(rg_cache, tiny_data, st.state_dict())) == [] and loads == []


def test_resume_state_refuses_another_configuration(rg_cache, tiny_data):
    st = make(rg_cache, tiny_data, seed=1)
    it = iter(st)
    st.mark_consumed([next(it), next(it)])
    state = st.state_dict()
    assert ResumeState.from_json(ResumeState.from_dict(state).to_json()).to_dict() == state
    with pytest.raises(ValueError, match="seed: state has 1, got 2"):
        _resume(rg_cache, tiny_data, state, seed=2)
    with pytest.raises(ValueError, match="with 1 DataLoader workers.*got 2"):
        run(_resume(rg_cache, tiny_data, state, seed=1), workers=2)
    with pytest.raises(ValueError, match="version"):
        ResumeState.from_dict({**state, "version": 99})
    # a new epoch starts from its beginning; the same epoch keeps the position
    resumed = _resume(rg_cache, tiny_data, state, seed=1)
    resumed.set_epoch(0)
    assert len(list(resumed)) == 10
    resumed.set_epoch(1)
    assert len(list(resumed)) == 12


def test_collated_tags_report_consumption(rg_cache, tiny_data):
    st = make(rg_cache, tiny_data)
    it = iter(st)
    batch = [next(it), next(it), next(it)]
    st.mark_consumed({"input_ids": None, **collate_tags(batch)})
    assert st.state_dict()["consumed"] == [3]
    with pytest.raises(ValueError, match="missing"):
        st.mark_consumed({"input_ids": 1})


# --------------------------------------------------------------------------------------------- HTTP


class _RangeHandler(SimpleHTTPRequestHandler):
    """SimpleHTTPRequestHandler plus single byte ranges (what object stores and the HF hub serve)."""

    ranges_served = 0

    def log_message(self, *args):  # keep test output clean
        pass

    def send_head(self):
        rng = self.headers.get("Range")
        path = self.translate_path(self.path)
        if not rng or not os.path.isfile(path):
            return super().send_head()
        size = os.path.getsize(path)
        a, _, b = rng.removeprefix("bytes=").partition("-")
        start, end = int(a), min(int(b) if b else size - 1, size - 1)
        f = open(path, "rb")
        f.seek(start)
        type(self).ranges_served += 1
        self.send_response(206)
        self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.send_header("Content-Length", str(end - start + 1))
        self.end_headers()
        self._left = end - start + 1
        return f

    def copyfile(self, source, outputfile):
        if not hasattr(self, "_left"):
            return super().copyfile(source, outputfile)
        outputfile.write(source.read(self._left))


class _PlainHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def _serve(folder: Path, handler):
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(folder)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.fixture
def small_http_blocks(monkeypatch):
    """Tiny fsspec HTTP blocks, so the shards are really read in many range requests."""
    import fsspec.config

    monkeypatch.setitem(fsspec.config.conf, "http", {"block_size": 512})


@pytest.mark.parametrize("handler,workers", [(_RangeHandler, 0), (_RangeHandler, 2), (_PlainHandler, 0)])
def test_http_equals_local(rg_cache, tiny_data, small_http_blocks, handler, workers, caplog):
    server = _serve(rg_cache.parent, handler)
    _RangeHandler.ranges_served = 0
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/{rg_cache.name}"
        remote = run(make(url, tiny_data, seed=4), workers)
    finally:
        server.shutdown()
        server.server_close()
    if handler is _RangeHandler:  # read in pieces, never whole
        assert _RangeHandler.ranges_served > 3 * len(open_cache(str(rg_cache)).shards)
    else:  # a server without ranges: whole shards, with a warning
        assert "does not serve byte ranges" in caplog.text
    local = run(make(rg_cache, tiny_data, seed=4), workers)
    assert [key(s) for s in remote] == [key(s) for s in local] and len(local) == 12
    for a, b in zip(remote, local):
        np.testing.assert_array_equal(a["gram"], b["gram"])
        np.testing.assert_array_equal(a["text_topk_logprobs"], b["text_topk_logprobs"])


# --------------------------------------------------------------------------------------------- refusals


def test_missing_image_names_the_sample_or_is_skipped(llava_cache, tiny_data, tmp_path):
    data = json.loads(Path(tiny_data[0]).read_text())
    # the first sample of worker 0 with 2 workers: never the last of a worker, so its skip count is reported
    first = next(s for s in run(make(llava_cache, tiny_data), 2) if s["worker_id"] == 0)
    victim = data[first["sample_index"]]
    images = tmp_path / "images"
    shutil.copytree(tiny_data[1], images)
    (images / victim["image"]).unlink()
    with pytest.raises(MissingImageError, match=f"{victim['id']}.*{victim['image']}"):
        list(make(llava_cache, tiny_data, image_root=images))
    st = make(llava_cache, tiny_data, image_root=images, skip_missing_images=True)
    got = list(st)
    assert len(got) == 11 and victim["id"] not in {s["sample_id"] for s in got}
    assert st.stats["skipped_missing_image"] == 1
    st = make(llava_cache, tiny_data, image_root=images, skip_missing_images=True)
    got = []
    for b in loader(st, 2):  # with workers the counts arrive with consumed samples
        st.mark_consumed(b)
        got += b
    assert len(got) == 11 and st.stats["skipped_missing_image"] == 1
    assert st.state_dict()["stats"][0]["skipped_missing_image"] == 1


def test_corrupt_shard_is_named_or_skipped(llava_cache, tiny_data, tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(llava_cache, cache)
    shard = open_cache(str(cache)).shards[1]
    path = cache / shard.name
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.seek(size // 2)
        f.write(b"\xde\xad\xbe\xef" * 64)
    with pytest.raises(CorruptShardError, match=Path(shard.name).name):
        list(make(cache, tiny_data))
    st = make(cache, tiny_data, skip_corrupt_shards=True)
    got = list(st)
    lost = {s["sample_id"] for _, s in open_cache(str(llava_cache)).iter_with_positions(shards=[1])}
    everything = {s["sample_id"] for s in open_cache(str(llava_cache))}
    assert lost and {s["sample_id"] for s in got} == everything - lost
    assert st.stats["corrupt_shards"] == 1 and st.stats["skipped_corrupt_rows"] == len(lost)


def test_checksums_catch_corruption_that_still_decodes(llava_cache, tiny_data, tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(llava_cache, cache)
    name = open_cache(str(cache)).shards[0].name
    path = cache / name
    raw = path.read_bytes()
    assert b"parquet-cpp" in raw  # the writer's name in the footer: free text, no reader looks at it
    path.write_bytes(raw.replace(b"parquet-cpp", b"parquet-CPP"))
    assert len(list(make(cache, tiny_data))) == 12
    with pytest.raises(CorruptShardError, match=f"{Path(name).name}.*sha256"):
        list(make(cache, tiny_data, verify_checksums=True))
    st = make(cache, tiny_data, verify_checksums=True, skip_corrupt_shards=True)
    assert len(list(st)) == 12 - open_cache(str(cache)).shards[0].rows and st.stats["corrupt_shards"] == 1


def test_sample_id_mismatch_is_refused(llava_cache, tiny_data, tmp_path):
    data = json.loads(Path(tiny_data[0]).read_text())
    data[3]["id"] = "someone-else"
    changed = write_records(tmp_path, data)
    with pytest.raises(DataMismatchError, match="'someone-else'.*differs from the one the cache was built from"):
        list(make(llava_cache, tiny_data, records=RecordSource(str(changed))))
    short = write_records(tmp_path, data[:2], name="short.json")
    with pytest.raises(DataMismatchError, match="the data holds 2 records"):
        list(make(llava_cache, tiny_data, records=str(short)))


def test_images_need_records(llava_cache, tiny_data):
    with pytest.raises(ValueError, match="visual positions, got records=None"):
        next(iter(make(llava_cache, tiny_data, records=None)))


def test_empty_cache_yields_nothing_and_is_refused(llava_cache, tmp_path, tiny_data):
    empty = tmp_path / "empty"
    empty.mkdir()
    manifest = json.loads((llava_cache / fmt.MANIFEST_NAME).read_text())
    manifest.update(shards=[], num_samples=0)
    (empty / fmt.MANIFEST_NAME).write_text(json.dumps(manifest))
    st = make(empty, tiny_data, world_size=2, rank=1)
    assert run(st, 0) == [] and st.num_samples() == 0
    with pytest.raises(ValueError, match="holds no samples"):
        ensure_nonempty(st)
    assert len(ensure_nonempty(str(llava_cache))) == 12


def test_arguments_are_checked(llava_cache, tiny_data):
    with pytest.raises(ValueError, match="rank must be in \\[0, world_size=2\\), got 2"):
        make(llava_cache, tiny_data, rank=2, world_size=2)
    with pytest.raises(ValueError, match="shuffle_buffer must be an integer >= 0, got -1"):
        make(llava_cache, tiny_data, shuffle_buffer=-1)
