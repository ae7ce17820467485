"""The built-in end-to-end example behind `kd demo`: tiny teacher + tiny dataset -> cache -> verify -> info."""

from __future__ import annotations

import os

from kd_cache.build import BuildConfig, build
from kd_cache.tiny import make_tiny_dataset, make_tiny_teacher
from kd_cache.verify import format_info, info, verify


def run_demo(out: str, *, n: int = 32, family: str = "llava", seed: int = 0) -> str:
    """Build a cache from a freshly made tiny teacher and dataset under `out`; return the `info` report."""
    teacher_dir = os.path.join(out, f"teacher-{family}")
    data_dir = os.path.join(out, "data")
    cache_dir = os.path.join(out, "cache")
    if not os.path.exists(os.path.join(teacher_dir, "config.json")):
        make_tiny_teacher(teacher_dir, family, seed=seed)
    json_path, image_dir = make_tiny_dataset(data_dir, n=n, seed=seed, kind="instruct")
    build(BuildConfig(teacher=teacher_dir, data=str(json_path), images=str(image_dir), out=cache_dir,
                      batch_size=8, shard_size=16))
    problems = verify(cache_dir)
    if problems:
        raise RuntimeError("demo cache failed verification: " + "; ".join(problems))
    return format_info(info(cache_dir)) + f"\n\nverify: OK\nteacher: {teacher_dir}\ncache:   {cache_dir}"
