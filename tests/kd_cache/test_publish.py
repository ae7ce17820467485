"""`kd cache publish` against a stand-in for `huggingface_hub.HfApi` (the hub is unreachable here): it records
every call, checks the arguments against the real HfApi's signatures, and applies `upload_folder` to a local folder
with huggingface_hub's own pattern filter, so the uploaded repo can be opened and verified."""

from __future__ import annotations

import inspect
import shutil
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub
import numpy as np
import pytest
from huggingface_hub.utils import filter_repo_objects
from typer.testing import CliRunner

from kd_cache import format as fmt
from kd_cache import open_cache
from kd_cache.publish import NotPublishable, publish
from kd_cache.verify import verify
from kd_cli.main import app

runner = CliRunner()
REAL_HFAPI = huggingface_hub.HfApi


class FakeHub:
    """HfApi stand-in: dataset repos are folders `<root>/<org>/<name>/<branch>`; one upload_folder = one commit."""

    def __init__(self, root: Path):
        self.root = root
        self.calls: list[tuple[str, dict]] = []
        self.token = None

    def __call__(self, token=None):  # used as the HfApi class
        self.token = token
        return self

    def _record(self, name: str, args: dict) -> None:
        params = inspect.signature(getattr(REAL_HFAPI, name)).parameters
        unknown = set(args) - set(params)
        assert not unknown, f"HfApi.{name} has no parameters {unknown}"
        self.calls.append((name, args))

    def repo(self, repo_id: str, branch: str | None = None) -> Path:
        return self.root / repo_id / (branch or "main")

    def create_repo(self, repo_id, **kw):
        self._record("create_repo", {"repo_id": repo_id, **kw})
        self.repo(repo_id).mkdir(parents=True, exist_ok=True)

    def create_branch(self, repo_id, **kw):
        self._record("create_branch", {"repo_id": repo_id, **kw})
        if not self.repo(repo_id, kw["branch"]).exists():
            shutil.copytree(self.repo(repo_id), self.repo(repo_id, kw["branch"]))

    def upload_folder(self, **kw):
        self._record("upload_folder", kw)
        src, dst = Path(kw["folder_path"]), self.repo(kw["repo_id"], kw.get("revision"))
        local = sorted(str(p.relative_to(src)) for p in src.rglob("*") if p.is_file())
        upload = list(filter_repo_objects(local, allow_patterns=kw.get("allow_patterns"),
                                          ignore_patterns=kw.get("ignore_patterns")))
        existing = [str(p.relative_to(dst)) for p in dst.rglob("*") if p.is_file()]
        for rel in filter_repo_objects(existing, allow_patterns=kw.get("delete_patterns")):
            if rel not in upload:
                (dst / rel).unlink()
        for rel in upload:
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src / rel, dst / rel)
        return SimpleNamespace(commit_url=f"https://huggingface.co/datasets/{kw['repo_id']}/commit/0123abc")


@pytest.fixture
def hub(tmp_path, monkeypatch) -> FakeHub:
    fake = FakeHub(tmp_path / "hub")
    monkeypatch.setattr(huggingface_hub, "HfApi", fake)
    return fake


@pytest.fixture
def cache_copy(tmp_path, llava_cache) -> Path:
    dst = tmp_path / "cache"
    shutil.copytree(llava_cache, dst)
    return dst


def test_publish_uploads_the_cache_and_its_card_in_one_commit(hub, cache_copy, llava_cache):
    # a stale shard from an earlier cache in the repo is removed by the same commit
    stale = hub.repo("org/tiny-kd", "v1") / fmt.SHARD_DIR / "shard-r00000-of-00002-000000.parquet"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"old")
    (cache_copy / "notes.txt").write_text("not part of the cache")
    r = runner.invoke(app, ["cache", "publish", str(cache_copy), "--repo", "org/tiny-kd", "--revision", "v1",
                            "--private", "--token", "hf_test"])
    assert r.exit_code == 0, r.output
    assert "published 3 shards to hf://datasets/org/tiny-kd@v1" in r.output and "/commit/0123abc" in r.output
    assert [name for name, _ in hub.calls] == ["create_repo", "create_branch", "upload_folder"]
    create, branch, upload = (args for _, args in hub.calls)
    assert create["repo_type"] == "dataset" and create["private"] is True and create["exist_ok"] is True
    assert branch["branch"] == "v1" and branch["repo_type"] == "dataset"
    assert upload["repo_type"] == "dataset" and upload["revision"] == "v1" and hub.token == "hf_test"
    assert "12 samples in 3 shards" in upload["commit_message"]

    repo = hub.repo("org/tiny-kd", "v1")
    m = open_cache(str(llava_cache)).manifest
    shards, tokenizer = {s.name for s in m.shards}, {f.name for f in m.tokenizer_files}
    assert tokenizer  # format v3: the teacher's tokenizer travels with the cache
    assert {str(p.relative_to(repo)) for p in repo.rglob("*") if p.is_file()} == \
           {fmt.CARD_NAME, fmt.MANIFEST_NAME, fmt.CONFIG_NAME, *shards, *tokenizer}  # no journals, no stray files
    assert (repo / fmt.CARD_NAME).read_text() == (llava_cache / fmt.CARD_NAME).read_text()
    assert verify(str(repo)) == []
    assert [s["sample_id"] for s in open_cache(str(repo))] == [s["sample_id"] for s in open_cache(str(llava_cache))]


def test_publish_from_python_writes_a_missing_card_and_defaults_to_main(hub, cache_copy):
    (cache_copy / fmt.CARD_NAME).unlink()  # caches from before the card existed
    done = publish(cache_copy, "org/tiny-kd")
    assert done.shards == 3 and done.revision is None
    assert [name for name, _ in hub.calls] == ["create_repo", "upload_folder"]
    assert hub.calls[0][1]["private"] is None  # the hub's default visibility unless --private
    assert (hub.repo("org/tiny-kd") / fmt.CARD_NAME).read_text().startswith("---\nlicense")


def test_publish_refuses_incomplete_or_damaged_caches(hub, cache_copy):
    manifest = open_cache(str(cache_copy)).manifest
    name = manifest.shards[1].name
    data = bytearray((cache_copy / name).read_bytes())
    data[len(data) // 2] ^= 0x01
    (cache_copy / name).write_bytes(bytes(data))
    r = runner.invoke(app, ["cache", "publish", str(cache_copy), "--repo", "org/x"])
    assert r.exit_code == 1 and "refusing to publish" in r.output and f"FAIL {name}: sha256 mismatch" in r.output

    (cache_copy / name).write_bytes(bytes(data[:-50]))  # truncated: caught without checksums too
    r = runner.invoke(app, ["cache", "publish", str(cache_copy), "--repo", "org/x", "--no-checksums"])
    assert r.exit_code == 1 and f"FAIL {name}: size" in r.output

    (cache_copy / fmt.MANIFEST_NAME).unlink()
    with pytest.raises(NotPublishable, match="the cache is incomplete"):
        publish(cache_copy, "org/x")
    assert not hub.calls  # nothing was created or uploaded


def test_publish_refuses_unlisted_shards_bad_repos_and_urls(hub, cache_copy):
    extra = cache_copy / fmt.SHARD_DIR / "shard-r00001-of-00002-000000.parquet"
    shutil.copyfile(next((cache_copy / fmt.SHARD_DIR).glob("*.parquet")), extra)
    with pytest.raises(NotPublishable, match=f"{fmt.SHARD_DIR}/{extra.name}: not listed in the manifest"):
        publish(cache_copy, "org/x")
    extra.unlink()
    r = runner.invoke(app, ["cache", "publish", str(cache_copy), "--repo", "just-a-name"])
    assert r.exit_code == 2 and "repo must look like ORG/NAME" in r.output
    r = runner.invoke(app, ["cache", "publish", "s3://bucket/cache", "--repo", "org/x"])
    assert r.exit_code == 2 and "publish uploads a local cache folder" in r.output
    r = runner.invoke(app, ["cache", "publish", str(cache_copy / "nope"), "--repo", "org/x"])
    assert r.exit_code == 2 and "no such cache folder" in r.output  # a path that does not exist: exit 2 (errors.py)
    assert not hub.calls


def test_hub_errors_are_one_error_line(hub, cache_copy, monkeypatch):
    import importlib

    from huggingface_hub.errors import HfHubHTTPError, LocalTokenNotFoundError
    from huggingface_hub.utils import get_session

    request = get_session().build_request("POST", "https://huggingface.co/api/repos/create")
    http = importlib.import_module(type(request).__module__.split(".")[0])  # the HTTP library huggingface_hub uses
    unauthorized = HfHubHTTPError("401 Client Error: Unauthorized for url: https://huggingface.co/api/repos/create\n\n"
                                  "Invalid credentials in Authorization header",
                                  response=http.Response(401, request=request))
    for error in (unauthorized, LocalTokenNotFoundError("Token is required (`token=True`), but no token found.")):
        def create_repo(repo_id, error=error, **kw):
            raise error

        monkeypatch.setattr(hub, "create_repo", create_repo)
        r = runner.invoke(app, ["cache", "publish", str(cache_copy), "--repo", "org/x", "--no-checksums"])
        assert r.exit_code == 1, r.output
        lines = r.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"error: {type(error).__name__}: ") and \
            lines[0].endswith("(log in with `hf auth login`, set HF_TOKEN or pass --token)"), r.output


def _same_sample(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        x, y = a[key], b[key]
        if isinstance(x, np.ndarray) or isinstance(y, np.ndarray):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=key)
        else:
            assert x == y, key


def test_the_cache_and_its_published_repo_load_as_hub_datasets(hub, cache_copy, tmp_path, monkeypatch):
    """`datasets.load_dataset("parquet", data_files=...)` on a cache folder, and `load_dataset(<repo folder>)` on the
    layout `kd cache publish` uploads (the card's `configs:` metadata picks the shards, not manifest.json or the
    tokenizer files), both give every stored row; each decodes (`Cache.decode`) to the sample `open_cache` gives."""
    datasets = pytest.importorskip("datasets")
    from huggingface_hub import DatasetCard

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cache = open_cache(str(cache_copy))
    expected = {s["sample_id"]: s for s in cache}
    publish(cache_copy, "org/tiny-kd")
    repo = hub.repo("org/tiny-kd")
    card = DatasetCard.load(repo / fmt.CARD_NAME)
    assert card.data.configs == [{"config_name": "default", "data_files": f"{fmt.SHARD_DIR}/*.parquet"}]
    assert (repo / fmt.TOKENIZER_DIR).is_dir() and (repo / fmt.MANIFEST_NAME).is_file()  # beside the data files

    for ds in (datasets.load_dataset("parquet", data_files=str(cache_copy / fmt.SHARD_DIR / "*.parquet"),
                                     split="train", cache_dir=str(tmp_path / "hf1")),
               datasets.load_dataset(str(repo), split="train", cache_dir=str(tmp_path / "hf2"))):
        assert ds.num_rows == cache.manifest.num_samples == len(expected)
        assert {"sample_id", "input_ids", "text_topk_ids", "text_logsumexp"} <= set(ds.column_names)
        seen = set()
        for row in ds:
            _same_sample(cache.decode(row), expected[row["sample_id"]])
            seen.add(row["sample_id"])
        assert seen == set(expected)
