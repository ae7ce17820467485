"""Teacher runtimes behind one protocol, so `build()` never branches on the backend's name: transformers (the
default, `kd_cache.teacher.Teacher`) and vLLM (`kd_cache.vllm_backend.VllmTeacher`, the `vllm` extra)."""

from __future__ import annotations

import logging
import os
import sys
from typing import Any, Protocol

import torch

from kd_cache.build_config import BuildConfig
from kd_cache.codec import SampleTargets
from kd_cache.data import EncodedSample
from kd_cache.targets import TargetOptions
from kd_cache.teacher import Teacher


class TeacherBackend(Protocol):
    """What `build()` needs from a teacher runtime."""

    image_token_id: int | None  # the multimodal teacher's image token (None for a causal LM)
    vocab_size: int  # rows of the LM head: the logits' width
    dtype: torch.dtype | str
    device: Any

    def targets(self, samples: list[tuple[int, EncodedSample]], opts: TargetOptions) -> list[SampleTargets]:
        """Host-side targets of the (sample index, encoded sample) pairs, in order."""

    def close(self) -> None:
        """Release the model (and the engine's processes): called when the build ends."""


def preflight(backend: str) -> None:
    """Refuse, before any work, a backend this installation cannot serve (ValueError naming what to install).
    `backend` is one of `BACKENDS` (`BuildConfig` checks it)."""
    if backend == "vllm":
        from kd_cache.vllm_backend import preflight as vllm_preflight  # deferred: vLLM is an optional extra

        vllm_preflight()


def load_teacher(cfg: BuildConfig, records, opts: TargetOptions) -> TeacherBackend:
    """The teacher of `cfg.backend`, loaded on this rank's device, for the targets of `opts` (a vLLM engine is
    sized for them when it starts; the transformers teacher takes them per batch only)."""
    if cfg.backend == "vllm":
        from kd_cache.vllm_backend import VllmTeacher  # deferred: vLLM is an optional extra

        return VllmTeacher(cfg.teacher, records=records, opts=opts, image_root=cfg.images, device=cfg.device,
                           dtype=cfg.dtype, trust_remote_code=cfg.trust_remote_code, revision=cfg.revision,
                           max_length=cfg.max_length, batch_size=cfg.batch_size, max_images=cfg.max_images)
    return Teacher(cfg.teacher, device=cfg.device, dtype=cfg.dtype, trust_remote_code=cfg.trust_remote_code,
                   revision=cfg.revision)


def end_process(backend: str, status: int = 0) -> None:
    """Called by the CLI once the build has returned. vLLM can leave a native thread behind that aborts the
    interpreter's teardown, so after a vLLM build (everything written, the engine shut down) the process exits
    without it and the exit status says what happened to the cache. Other backends return normally."""
    if backend != "vllm":
        return
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(status)
