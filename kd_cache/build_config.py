"""The configuration of `kd cache build` (kept free of torch: the CLI builds its options from it at start-up)."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

from kd_cache.config import check_choices, option

# format.py's TARGET_KINDS, repeated so that `kd --help` does not import pyarrow; tests check they agree
TARGET_KINDS = ("topk", "sampled")

BACKENDS = ("transformers", "vllm")


@dataclass
class BuildConfig:
    """Configuration of `kd cache build`. Fields outside NON_SEMANTIC decide the cache's content."""

    teacher: str = option(help="Teacher model: local folder or hub id.")
    data: str = option(help="LLaVA-format .json/.jsonl/.parquet file or a saved `datasets` folder.")
    out: str = option(help="Output cache folder or URL (s3://, gs://, hf://...): new, or a partial build of the "
                           "same config to resume.")
    images: str | None = option(None, help="Root folder that image paths in the data are relative to.")
    top_k: int = option(64, help="Top-k ids kept per response row (--targets topk).")
    visual_top_k: int = option(64, help="Top-k ids kept per visual row (--visual-targets topk).")
    max_length: int | None = option(4096, help="Max tokens per sample; responses are truncated, visual tokens never.")
    max_images: int | None = option(None, help="Max images per sample.",
                                    default_help="1 for LLaVA-1.5, else unlimited")
    shard_size: int = option(1024, help="Samples per Parquet shard.")
    targets: str = option("topk", choices=TARGET_KINDS,
                          help="Response rows: topk (--top-k ids + tail per row) or sampled (random-sampling KD: "
                               "--samples draws per row).")
    visual_targets: str = option("sampled", choices=TARGET_KINDS,
                                 help="Visual rows: sampled (unbiased; the teacher's image-position distributions "
                                      "are near flat, where top-k + tail keeps a small part of the gradient: "
                                      "docs/results.md) or topk (--visual-top-k ids + tail per row).")
    samples: int = option(50, help="Sampled targets: draws per row (<= 255).")
    gram: bool = option(True, flag="--gram/--no-gram", help="Store the visual Gram matrix (the RDist target).")
    gram_encoding: str = option("lowrank", choices=("lowrank", "dense"),
                                help="Gram storage: lowrank (int8 eigenpairs, rank per sample) or dense.")
    gram_tolerance: float = option(1e-4, help="Max 1 - cos of the stored Gram, raw and row-centred.")
    seed: int = option(0, help="Seed of sampled targets.")
    append_eos: bool = option(True, flag="--append-eos/--no-append-eos",
                              help="When the chat template writes no end-of-turn marker after an answer (LLaVA-1.5/"
                                   "NeXT Vicuna templates), append the tokenizer's EOS there and supervise it, as "
                                   "LLaVA's training did.")
    dtype: str = option("auto", choices=("auto", "float32", "bfloat16", "float16", "fp32", "bf16", "fp16"),
                        help="Teacher dtype; auto is bf16/fp16 on GPU, fp32 on CPU.")
    revision: str | None = option(None, help="Hub revision of the teacher.")
    trust_remote_code: bool = option(False, help="Allow the teacher's own code from the hub.")
    backend: str = option("transformers", choices=BACKENDS,
                          help="Teacher runtime: transformers, or vllm (the vllm extra; see docs/scaling.md).")
    # not semantic: may change between a crash and its resume
    batch_size: int = option(8, help="Samples per teacher forward.")
    device: str | None = option(None, help="cpu, cuda, cuda:N.", default_help="this rank's GPU, else CPU")
    num_workers: int = option(0, help="DataLoader workers preparing samples.")
    compression_level: int = option(3, help="zstd level of the shards (1-22).")
    progress: bool = option(True, flag="--progress/--quiet", help="Show progress.")
    staging: str | None = option(None, help="With a URL --out: local folder the build is staged in before each "
                                            "shard is uploaded.", default_help="~/.cache/kd/staging/<from the URL>")

    NON_SEMANTIC = ("batch_size", "device", "num_workers", "progress", "out", "staging")

    def __post_init__(self) -> None:
        for name in ("top_k", "visual_top_k", "shard_size", "batch_size", "samples"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        check_choices(self)
        if "sampled" in (self.targets, self.visual_targets) and self.samples > 255:
            raise ValueError(f"samples must be <= 255 (counts are stored as uint8), got {self.samples!r}")
        if not 0 < self.gram_tolerance < 1:
            raise ValueError(f"gram_tolerance must be in (0, 1), got {self.gram_tolerance!r}")
        if self.max_length is not None and self.max_length < 2:
            raise ValueError(f"max_length must be >= 2 or None, got {self.max_length!r}")
        if self.max_images is not None and self.max_images < 0:
            raise ValueError(f"max_images must be >= 0 or None, got {self.max_images!r}")
        if self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {self.num_workers!r}")
        if not 1 <= self.compression_level <= 22:
            raise ValueError(f"compression_level must be in 1..22, got {self.compression_level!r}")
        if self.images is not None and not os.path.isdir(self.images):
            raise ValueError(f"images must be an existing folder, got {self.images!r}")
        if not self.out:
            raise ValueError("out must be a folder path or URL, got an empty string")
        from kd_cache.remote import is_remote  # deferred: remote.py imports pyarrow, the CLI starts without it

        if self.staging is not None and not is_remote(self.out):
            raise ValueError(f"staging is only used when out is a URL (s3://...), got out={self.out!r}")

    def semantic(self) -> dict:
        d = dataclasses.asdict(self)
        return {k: v for k, v in d.items() if k not in self.NON_SEMANTIC}

