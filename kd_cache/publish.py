"""`kd cache publish`: upload a complete, verified cache folder to a Hugging Face dataset repo in one commit.

The dataset card (`README.md`, written by the build) lands at the repo root, with `manifest.json`,
`build_config.json` and the shards; `huggingface_hub.HfApi.upload_folder` uploads the shard files first (LFS) and
then makes ONE commit holding every file, so the repo never shows a manifest without its shards or the reverse.
Shard files already in the repo that this cache does not list are deleted in the same commit. Build journals
(`_progress/`) stay local.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from kd_cache import format as fmt
from kd_cache.manifest import dataset_card
from kd_cache.reader import open_cache
from kd_cache.remote import is_remote
from kd_cache.verify import verify
from kd_cache.files import atomic_write_text

log = logging.getLogger("kd_cache")

UPLOADED = (fmt.CARD_NAME, fmt.MANIFEST_NAME, fmt.CONFIG_NAME, f"{fmt.SHARD_DIR}/*.parquet", f"{fmt.TOKENIZER_DIR}/*")


class NotPublishable(ValueError):
    """The folder is not a complete, intact kd cache: `problems` says why (one message per problem)."""

    def __init__(self, path: str, problems: list[str]):
        self.problems = list(problems)
        super().__init__(f"refusing to publish {path}: " + "; ".join(self.problems))


@dataclass
class Published:
    repo: str
    revision: str | None
    shards: int
    commit_url: str | None


def publish(path: str | os.PathLike, repo: str, *, revision: str | None = None, private: bool = False,
            token: str | None = None, checksums: bool = True, commit_message: str | None = None,
            api=None) -> Published:
    """Verify the cache at `path` (a local folder), then create the dataset repo `repo` (ORG/NAME) if needed and
    upload the cache to it (branch `revision`, created if needed; default the main branch) in one commit.

    `api` is an `huggingface_hub.HfApi` (default: a new one with `token`; no token means the usual login or
    `HF_TOKEN`). Raises NotPublishable, naming every problem, for an incomplete or damaged cache.
    """
    path = str(path)
    if is_remote(path):
        raise ValueError(f"publish uploads a local cache folder, got the URL {path}; download it first, or build "
                         f"straight to the hub with --out hf://datasets/{repo}")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: no such cache folder")
    if not repo or repo.count("/") != 1 or not all(repo.split("/")):
        raise ValueError(f"repo must look like ORG/NAME, got {repo!r}")
    problems = verify(path, checksums=checksums)
    if problems:
        raise NotPublishable(path, problems)
    manifest = open_cache(path).manifest
    listed = {s.name for s in manifest.shards}
    shard_dir = os.path.join(path, fmt.SHARD_DIR)
    present = {f"{fmt.SHARD_DIR}/{n}" for n in os.listdir(shard_dir) if n.endswith(".parquet")} \
        if os.path.isdir(shard_dir) else set()
    if present - listed:
        raise NotPublishable(path, [f"{n}: not listed in the manifest (left by another build?); move it away"
                                    for n in sorted(present - listed)])
    card = os.path.join(path, fmt.CARD_NAME)
    if not os.path.exists(card):  # caches from before the card existed
        log.info("writing the dataset card %s", card)
        atomic_write_text(card, dataset_card(manifest))

    if api is None:
        from huggingface_hub import HfApi  # deferred: only a real upload needs the hub client

        api = HfApi(token=token)
    api.create_repo(repo, repo_type="dataset", private=True if private else None, exist_ok=True, token=token)
    if revision:
        api.create_branch(repo, branch=revision, repo_type="dataset", exist_ok=True, token=token)
    message = commit_message or (f"kd cache: {manifest.teacher_id}, {manifest.num_samples} samples in "
                                 f"{len(manifest.shards)} shards (format v{manifest.version})")
    info = api.upload_folder(repo_id=repo, repo_type="dataset", folder_path=path, revision=revision,
                             allow_patterns=list(UPLOADED), delete_patterns=[f"{fmt.SHARD_DIR}/*.parquet"],
                             commit_message=message, token=token)
    return Published(repo=repo, revision=revision, shards=len(manifest.shards),
                     commit_url=getattr(info, "commit_url", None))
