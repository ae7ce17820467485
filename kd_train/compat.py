"""Can this student learn from this cache? Every way the two can disagree, named before training starts.

The cache stores the teacher's token ids, its top-k ids and the positions of visual tokens. A student
that tokenizes differently, has fewer vocabulary rows than the cached ids reach, or expands an image
to a different number of visual tokens would train on misaligned targets without any error, so the
trainer refuses such a pair up front (`require_compatible`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pyarrow.compute as pc
from PIL import Image

from kd_cache.format import Manifest
from kd_cache.hf import text_config, tokenizer_fingerprint
from kd_cache.reader import Cache
from kd_train.student import visual_tokens_per_image

__all__ = [
    "IncompatibleCacheError",
    "cached_visual_tokens_per_image",
    "check_compatibility",
    "max_cached_topk_id",
    "require_compatible",
]


class IncompatibleCacheError(ValueError):
    """The student cannot train on the cache; `problems` lists every difference found."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        hint = ""
        if any(p.startswith(("student tokenizer", "special token", "student chat template")) for p in problems):
            hint = ("\na student with another tokenizer learns from this cache with --cross-tokenizer uld or hybrid "
                    "(its answers aligned to the teacher's by bytes)")
        super().__init__("student is incompatible with the cache:\n- " + "\n- ".join(self.problems) + hint)


def _first_visual_sample(cache: Any) -> tuple[int, int, str] | None:
    """(visual tokens per image, image token id, sample id) of the first cached sample with visual positions."""
    for sample in cache:
        vpos = sample["visual_positions"]
        if len(vpos) == 0:
            continue
        # One contiguous run of image tokens per image (LLaVA-1.5 caches hold one image per sample).
        runs = np.split(vpos, np.flatnonzero(np.diff(vpos) != 1) + 1)
        lengths = sorted({len(r) for r in runs})
        if len(lengths) > 1:
            raise ValueError(f"cache sample {sample['sample_id']} has images of different visual token counts "
                             f"(got {lengths}): the teacher's count depends on the image, so no single count applies")
        return lengths[0], int(sample["input_ids"][vpos[0]]), sample["sample_id"]
    return None


def cached_visual_tokens_per_image(cache: Any) -> int | None:
    """Visual tokens per image the teacher used: from the first cached sample that has any; None if none has."""
    if not cache.manifest.has_visual:
        return None  # text-only cache: no need to read it through
    first = _first_visual_sample(cache)
    return None if first is None else first[0]


def max_cached_topk_id(cache: Any) -> int:
    """Largest top-k token id anywhere in the cache (text and visual rows). Reads only the two id columns."""

    best = -1
    for i in range(len(cache.shards)):
        with cache.open_shard(i) as pf:
            for rg in range(pf.num_row_groups):
                table = pf.read_row_group(rg, columns=["text_topk_ids", "visual_topk_ids"])
                for name in table.column_names:
                    m = pc.max(pc.list_flatten(table.column(name))).as_py()
                    if m is not None:
                        best = max(best, int(m))
    return best


def _default_image(manifest: Manifest):
    """A neutral image at the teacher's image-processor size (fixed-resolution processors resize anyway)."""
    ip = manifest.image_processor or {}
    size = ip.get("crop_size") or ip.get("size") or {}
    h = size.get("height") or size.get("shortest_edge") or 336
    w = size.get("width") or size.get("shortest_edge") or 336
    return Image.new("RGB", (int(w), int(h)), (128, 128, 128))


def _describe(image: Any) -> str:
    if hasattr(image, "width") and hasattr(image, "height"):
        return f"{image.width}x{image.height}"
    return f"shape {tuple(getattr(image, 'shape', ()))}"


def check_compatibility(manifest: Any, processor: Any, model_config: Any, *, sample_image: Any = None,
                        cached_visual_tokens: int | None = None, cached_image_token_id: int | None = None,
                        max_topk_id: int | None = None, same_tokenizer: bool = True) -> list[str]:
    """Every mismatch between a cache and a student, as messages naming the difference ([] = compatible).

    `manifest` is the cache's `Manifest`, or the opened `kd_cache.Cache`, from which the cache-derived
    facts (visual tokens per image, the teacher's image token id, and — only when the student's vocabulary
    is smaller than the teacher's LM head — the largest cached top-k id) are read. With a bare Manifest
    pass them as `cached_visual_tokens` / `cached_image_token_id` / `max_topk_id`: a check that cannot be made
    is reported as a problem, never skipped. `same_tokenizer=False` (a student of another tokenizer, aligned by
    bytes): the tokenizer, vocabulary and image-token-id checks do not apply; the visual token count still must
    match. `sample_image` is the image the visual-token counts are compared
    on (default: a blank image at the teacher's image size; pass a cached sample's image for processors whose
    count depends on the image size).
    """

    cache = None
    if isinstance(manifest, Cache):
        cache, manifest = manifest, manifest.manifest
    if not isinstance(manifest, Manifest):
        raise ValueError(f"manifest must be a kd_cache Manifest or Cache, got {type(manifest).__name__}")
    teacher = f"teacher {manifest.teacher_id}"
    problems: list[str] = []

    # ---- tokenizer: the cached input ids and top-k ids are ids of the teacher's tokenizer
    if not same_tokenizer:
        return problems + _visual_problems(manifest, cache, processor, model_config, teacher, sample_image,
                                           cached_visual_tokens, cached_image_token_id, compare_ids=False)
    want, have = manifest.tokenizer, tokenizer_fingerprint(processor)
    if have["vocab_sha256"] != want.get("vocab_sha256"):
        problems.append(f"student tokenizer vocabulary differs from the cache's ({teacher}): student has "
                        f"{have['vocab_size']} tokens (sha256 {have['vocab_sha256'][:12]}), the cache "
                        f"{want.get('vocab_size')} (sha256 {str(want.get('vocab_sha256'))[:12]})")
    want_sp, have_sp = want.get("special_tokens") or {}, have["special_tokens"]
    for name in sorted(set(want_sp) | set(have_sp)):
        if want_sp.get(name) != have_sp.get(name):
            problems.append(f"special token {name} differs: student has {have_sp.get(name)!r}, "
                            f"the cache's ({teacher}) has {want_sp.get(name)!r}")
    if have["chat_template_sha256"] != want.get("chat_template_sha256"):
        problems.append(f"student chat template differs from the cache's ({teacher}): sha256 "
                        f"{have['chat_template_sha256'][:12]} vs {str(want.get('chat_template_sha256'))[:12]}")
    if not problems and want.get("fingerprint") not in (None, have["fingerprint"]):
        problems.append(f"student tokenizer fingerprint {have['fingerprint']} differs from the cache's "
                        f"{want['fingerprint']} ({teacher})")

    # ---- vocabulary rows: every cached id must index a row of the student's LM head
    text_cfg = text_config(model_config)
    rows, head, n_tok = int(text_cfg.vocab_size), manifest.vocab_size, int(want.get("vocab_size") or 0)
    if rows < n_tok:
        problems.append(f"student LM vocabulary has {rows} rows, fewer than the cache's tokenizer ({n_tok} tokens): "
                        "cached input ids would index past the student's embeddings")
    elif rows < head:
        if max_topk_id is None and cache is not None:
            max_topk_id = max_cached_topk_id(cache)
        if max_topk_id is None:
            problems.append(f"student LM vocabulary has {rows} rows, fewer than the {teacher} LM head ({head} rows): "
                            "cached top-k ids may reach past it; pass the Cache or max_topk_id=max_cached_topk_id(cache)")
        elif max_topk_id >= rows:
            problems.append(f"cache holds top-k id {max_topk_id} but the student LM vocabulary has only {rows} rows")

    # ---- images: the cached visual positions are where the teacher put its image tokens
    return problems + _visual_problems(manifest, cache, processor, model_config, teacher, sample_image,
                                       cached_visual_tokens, cached_image_token_id)


def _visual_problems(manifest: Manifest, cache: Any, processor: Any, model_config: Any, teacher: str,
                     sample_image: Any, cached_visual_tokens: int | None,
                     cached_image_token_id: int | None, *, compare_ids: bool = True) -> list[str]:
    """The image checks of `check_compatibility` (`compare_ids=False`: the student's image token id is its own
    tokenizer's, not comparable with the cache's)."""
    problems: list[str] = []
    student_mm = getattr(processor, "image_processor", None) is not None
    has_visual = manifest.has_visual
    if has_visual and not student_mm:
        problems.append(f"cache holds visual targets from the multimodal {teacher} but the student is text-only "
                        f"(got a {type(processor).__name__} without an image processor)")
    elif has_visual:
        if cache is not None and (cached_visual_tokens is None or cached_image_token_id is None):
            first = _first_visual_sample(cache)
            if first is not None:
                cached_visual_tokens = cached_visual_tokens if cached_visual_tokens is not None else first[0]
                cached_image_token_id = cached_image_token_id if cached_image_token_id is not None else first[1]
        tokenizer = getattr(processor, "tokenizer", processor)
        image_token = getattr(processor, "image_token", None)
        proc_id = tokenizer.convert_tokens_to_ids(image_token) if image_token is not None else None
        cfg_id = getattr(model_config, "image_token_id", None)
        if cfg_id is None:
            cfg_id = getattr(model_config, "image_token_index", None)
        if proc_id is None:
            problems.append(f"student processor {type(processor).__name__} has no image token")
        elif cfg_id is not None and cfg_id != proc_id:
            problems.append(f"student processor's image token {image_token!r} has id {proc_id} but the student "
                            f"model's image_token_id is {cfg_id}")
        if (compare_ids and cached_image_token_id is not None and proc_id is not None
                and proc_id != cached_image_token_id):
            problems.append(f"student image token {image_token!r} (id {proc_id}) differs from the cache's visual token "
                            f"id {cached_image_token_id} ({teacher})")
        if cached_visual_tokens is None:
            problems.append("cannot check visual tokens per image: pass the Cache or "
                            "cached_visual_tokens=cached_visual_tokens_per_image(cache)")
        elif proc_id is not None:
            image = sample_image if sample_image is not None else _default_image(manifest)
            n = visual_tokens_per_image(processor, image)
            if n != cached_visual_tokens:
                problems.append(f"student processor expands an image ({_describe(image)}) to {n} visual "
                                f"tokens, the cache's {teacher} used {cached_visual_tokens} visual tokens per image")
    return problems


def require_compatible(manifest: Any, processor: Any, model_config: Any, **kwargs: Any) -> None:
    """`check_compatibility`, raising `IncompatibleCacheError` (a ValueError) listing every problem."""
    problems = check_compatibility(manifest, processor, model_config, **kwargs)
    if problems:
        raise IncompatibleCacheError(problems)


# Loss options that only shape top-k MDist; random-sampling targets (an importance-weighted CE) ignore them.
_TOPK_ONLY = {"kind": "forward_kl", "temperature": 1.0, "visual_temperature": None, "use_tail": True, "jsd_beta": 0.5}


def fit_loss_to_cache(loss: Any, cfg: Any, manifest: Manifest) -> tuple[Any, list[str]]:
    """(the loss config this cache can serve, warnings to log once). Refuses what the user asked for explicitly
    and the cache cannot give; turns off, with a warning, what only the stage preset asked for.

    - RDist with a cache built `--no-gram`: refused when `rdist_weight` was set > 0, else off with a warning.
    - Sampled response targets with top-k-only MDist options (kind, temperatures, --no-tail, jsd_beta) set: refused.
    - Sampled visual targets only (the build default): --visual-temperature refused; the other options shape the
      response rows, and a warning says the visual rows take the sampled forward-KL estimate.
    """

    warnings = []
    if not manifest.gram and loss.rdist_weight:
        if cfg.rdist_weight is not None:
            raise ValueError(f"rdist_weight={cfg.rdist_weight} but the cache was built without the Gram matrix "
                             "(--no-gram): RDist has no target; set rdist_weight 0 or rebuild the cache with it")
        warnings.append("the cache was built without the Gram matrix (--no-gram): RDist is off for this stage "
                        "(the stage preset asked for it)")
        loss = dataclasses.replace(loss, rdist_weight=0.0)  # KDLossConfig refuses all-zero weights
    text_sampled = manifest.text.kind == "sampled"
    visual_sampled = manifest.visual.kind == "sampled"
    changed = {k: getattr(cfg, k) for k, default in _TOPK_ONLY.items() if getattr(cfg, k) != default}
    if cfg.kind != "jsd":
        changed.pop("jsd_beta", None)  # only meaningful with jsd
    if text_sampled:
        if not visual_sampled:
            changed.pop("visual_temperature", None)  # shapes the visual rows, which hold top-k targets
        if changed:
            raise ValueError(f"the cache holds sampled targets (random-sampling KD), whose loss is an importance-"
                             f"weighted CE; the top-k MDist options {changed} do not apply to it: leave them at "
                             "their defaults or use a top-k cache")
    elif visual_sampled and loss.mdist_visual_weight:
        if "visual_temperature" in changed:
            raise ValueError(f"visual_temperature={cfg.visual_temperature} but the cache's visual rows hold sampled "
                             "targets (random-sampling KD: forward KL at T = 1): leave it unset or rebuild the cache "
                             "with --visual-targets topk")
        if changed:
            warnings.append(f"the cache's visual rows hold sampled targets: their MDist is the sampled forward-KL "
                            f"estimate at T = 1; {changed} shape the response rows only (rebuild with "
                            "--visual-targets topk to apply them to the visual rows too)")
    return loss, warnings
