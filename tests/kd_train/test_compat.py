"""Student/cache compatibility: a composed student passes; each kind of difference is refused by name."""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import pytest
import transformers
from PIL import Image

from kd_cache import open_cache
from kd_cache.format import Manifest
from kd_eval.tiny import make_tiny_teacher, train_tiny_tokenizer
from kd_train.compat import (
    IncompatibleCacheError,
    cached_visual_tokens_per_image,
    check_compatibility,
    max_cached_topk_id,
    require_compatible,
)
from kd_train.student import compose_student


def manifest_with(**fields) -> Manifest:
    """A minimal valid manifest with `fields` replacing its top-level entries."""
    raw = {"format_version": 2, "teacher": {"id": "t", "fingerprint": "f"}, "vocab_size": 512, "tokenizer": {},
           "targets": {"text": {"kind": "topk", "k": 8}, "visual": {"kind": "topk", "k": 8}}, "num_samples": 0,
           "shards": []}
    return Manifest.parse(raw | fields, "test manifest")


@pytest.fixture(scope="module")
def student(tmp_path_factory, llava_teacher):
    """(processor, config) of a student composed from the llava teacher's tower and a smaller LLM."""
    tmp = tmp_path_factory.mktemp("compat")
    llm = make_tiny_teacher(tmp / "llm", "causal-lm", hidden_size=32, seed=1)
    out = compose_student(tmp / "student", vision=str(llava_teacher), llm=str(llm), processor_from=str(llava_teacher))
    return transformers.AutoProcessor.from_pretrained(out), transformers.AutoConfig.from_pretrained(out)


@pytest.fixture(scope="module")
def cache(llava_cache):
    return open_cache(str(llava_cache))


def _processor(base, *, tokenizer=None, image_size=None, chat_template=None):
    """The student's processor with one part swapped."""
    ip = base.image_processor
    if image_size is not None:
        ip = transformers.SiglipImageProcessorPil(size={"height": image_size, "width": image_size})
    return transformers.LlavaProcessor(image_processor=ip, tokenizer=tokenizer or base.tokenizer,
                                       patch_size=base.patch_size, num_additional_image_tokens=0,
                                       vision_feature_select_strategy="full",
                                       chat_template=chat_template or base.chat_template)


def test_composed_student_is_compatible_with_the_teacher_cache(student, cache):
    processor, config = student
    assert cached_visual_tokens_per_image(cache) == 16
    assert max_cached_topk_id(cache) < config.text_config.vocab_size
    assert check_compatibility(cache, processor, config) == []
    require_compatible(cache, processor, config)
    # the bare manifest works when the cache-derived facts are passed in
    assert check_compatibility(cache.manifest, processor, config, cached_visual_tokens=16) == []


def test_different_tokenizer_is_refused(student, cache):
    processor, config = student
    other = _processor(processor, tokenizer=train_tiny_tokenizer(["<image>"], vocab_size=400))
    problems = check_compatibility(cache, other, config)
    assert any("student tokenizer vocabulary differs from the cache's (teacher" in p for p in problems), problems
    with pytest.raises(IncompatibleCacheError, match="vocabulary differs") as info:
        require_compatible(cache, other, config)
    assert isinstance(info.value, ValueError) and info.value.problems == problems


def test_different_special_token_is_refused(student, cache):
    processor, config = student
    tok = copy.deepcopy(processor.tokenizer)
    tok.pad_token = "<|im_end|>"  # same vocabulary, different padding token
    problems = check_compatibility(cache, _processor(processor, tokenizer=tok), config)
    assert problems == ["special token pad_token differs: student has '<|im_end|>', the cache's "
                        f"(teacher {cache.manifest.teacher_id}) has '<|endoftext|>'"]


def test_different_chat_template_is_refused(student, cache):
    processor, config = student
    problems = check_compatibility(cache, _processor(processor, chat_template=processor.chat_template + " "), config)
    assert len(problems) == 1 and "student chat template differs" in problems[0]


def test_different_visual_token_count_is_refused(student, cache, tmp_path, llava_teacher):
    processor, config = student
    problems = check_compatibility(cache, _processor(processor, image_size=48), config)
    assert len(problems) == 1 and "to 36 visual tokens" in problems[0] and "used 16 visual tokens" in problems[0]
    # the same through a student composed from a teacher with a larger image size
    vision = make_tiny_teacher(tmp_path / "t48", "llava", image_size=48)
    llm = make_tiny_teacher(tmp_path / "llm", "causal-lm", hidden_size=32)
    out = compose_student(tmp_path / "s48", vision=str(vision), llm=str(llm), processor_from=str(llava_teacher))
    problems = check_compatibility(cache, transformers.AutoProcessor.from_pretrained(out),
                                   transformers.AutoConfig.from_pretrained(out),
                                   sample_image=Image.new("RGB", (40, 40)))
    assert problems == [f"student processor expands an image (40x40) to 36 visual tokens, the cache's teacher "
                        f"{cache.manifest.teacher_id} used 16 visual tokens per image"]


def test_visual_check_needs_the_cached_count(student, cache):
    processor, config = student
    problems = check_compatibility(cache.manifest, processor, config)
    assert problems == ["cannot check visual tokens per image: pass the Cache or "
                        "cached_visual_tokens=cached_visual_tokens_per_image(cache)"]
    assert "(id 3) differs from the cache's visual token id 4" in check_compatibility(
        cache.manifest, processor, config, cached_visual_tokens=16, cached_image_token_id=4)[0]


def test_student_vocabulary_rows(student, cache):
    processor, config = student
    manifest = dataclasses.replace(cache.manifest, vocab_size=600)  # a teacher whose LM head is padded past the tokenizer (like Qwen2-VL's)
    assert "pass the Cache or max_topk_id" in check_compatibility(manifest, processor, config,
                                                                 cached_visual_tokens=16)[0]
    assert check_compatibility(manifest, processor, config, cached_visual_tokens=16, max_topk_id=511) == []
    assert check_compatibility(manifest, processor, config, cached_visual_tokens=16, max_topk_id=512) == [
        "cache holds top-k id 512 but the student LM vocabulary has only 512 rows"]
    padded = open_cache(str(cache.url))
    padded.manifest = dataclasses.replace(padded.manifest, vocab_size=600)  # given the Cache, the cached ids are scanned: all are < 512
    assert check_compatibility(padded, processor, config) == []
    small = copy.deepcopy(config)
    small.text_config.vocab_size = 500
    problems = check_compatibility(cache, processor, small)
    assert problems == ["student LM vocabulary has 500 rows, fewer than the cache's tokenizer (512 tokens): "
                        "cached input ids would index past the student's embeddings"]


def test_text_only_student_is_refused_for_visual_targets(cache, tmp_path):
    llm = make_tiny_teacher(tmp_path / "llm", "causal-lm")
    tok = transformers.AutoTokenizer.from_pretrained(llm)
    problems = check_compatibility(cache, tok, transformers.AutoConfig.from_pretrained(llm))
    assert any("student is text-only" in p for p in problems)
    assert any("student tokenizer vocabulary differs" in p for p in problems)  # no <image> token: other ids


def test_cached_visual_tokens_on_a_text_only_cache(tmp_path, tiny_data):
    from kd_cache.build import BuildConfig, build

    llm = make_tiny_teacher(tmp_path / "llm", "causal-lm")
    data = json.loads(Path(tiny_data[0]).read_text())
    text_only = tmp_path / "text.json"
    text_only.write_text(json.dumps([r for r in data if "image" not in r]))
    build(BuildConfig(teacher=str(llm), data=str(text_only), out=str(tmp_path / "cache"), progress=False))
    text_cache = open_cache(str(tmp_path / "cache"))
    assert cached_visual_tokens_per_image(text_cache) is None
    tok = transformers.AutoTokenizer.from_pretrained(llm)
    assert check_compatibility(text_cache, tok, transformers.AutoConfig.from_pretrained(llm)) == []


def test_bad_manifest_argument():
    with pytest.raises(ValueError, match="got list"):
        check_compatibility([], None, None)
    with pytest.raises(ValueError, match="got dict"):
        check_compatibility({}, None, None)


def test_fit_loss_to_cache_refuses_or_warns_once(tmp_path):
    from kd_train.compat import fit_loss_to_cache
    from kd_train.config import TrainConfig
    from kd_train.stages import PRESETS

    def manifest(gram: bool, kind: str = "topk", visual: str | None = None) -> Manifest:
        return manifest_with(targets={"text": {"kind": kind, "k": 8, "samples": 50},
                                      "visual": {"kind": visual or kind, "k": 8, "samples": 50},
                                      "gram": {"enabled": gram}})

    def cfg(**kw):
        return TrainConfig(student="s", out=str(tmp_path), stage="dft", cache="c", data="d.json", **kw)

    preset = PRESETS["dft"]
    c = cfg()
    loss, notes = fit_loss_to_cache(c.loss_config(preset), c, manifest(gram=True))
    assert loss.rdist_weight == 1.0 and notes == []
    loss, notes = fit_loss_to_cache(c.loss_config(preset), c, manifest(gram=False))
    assert loss.rdist_weight == 0.0 and len(notes) == 1 and "--no-gram" in notes[0]
    c = cfg(rdist_weight=0.5)
    with pytest.raises(ValueError, match=r"rdist_weight=0.5 but the cache was built without the Gram"):
        fit_loss_to_cache(c.loss_config(preset), c, manifest(gram=False))
    c = cfg(ce_weight=0.0, mdist_text_weight=0.0, mdist_visual_weight=0.0)
    with pytest.raises(ValueError, match="at least one loss weight must be > 0"):
        fit_loss_to_cache(c.loss_config(preset), c, manifest(gram=False))
    for kw in ({"kind": "jsd"}, {"temperature": 2.0}, {"use_tail": False}):
        c = cfg(**kw)
        with pytest.raises(ValueError, match="sampled targets"):
            fit_loss_to_cache(c.loss_config(preset), c, manifest(gram=True, kind="sampled"))
    c = cfg(jsd_beta=0.3)  # jsd_beta alone is inert without jsd: not refused
    assert fit_loss_to_cache(c.loss_config(preset), c, manifest(gram=True, kind="sampled"))[1] == []
    # the build default: top-k response rows, sampled visual rows
    default = manifest(gram=True, visual="sampled")
    assert fit_loss_to_cache(c.loss_config(preset), cfg(), default)[1] == []
    c = cfg(visual_temperature=2.0)
    with pytest.raises(ValueError, match="visual_temperature=2.0 but the cache's visual rows hold sampled"):
        fit_loss_to_cache(c.loss_config(preset), c, default)
    for kw in ({"kind": "reverse_kl"}, {"temperature": 2.0}, {"use_tail": False}):
        c = cfg(**kw)
        loss, notes = fit_loss_to_cache(c.loss_config(preset), c, default)
        assert len(notes) == 1 and "shape the response rows only" in notes[0] and "--visual-targets topk" in notes[0]
        assert loss == c.loss_config(preset)  # applied to the response rows, unchanged
    c = cfg(kind="reverse_kl", mdist_visual_weight=0.0)  # no visual MDist: nothing to say
    assert fit_loss_to_cache(c.loss_config(preset), c, default)[1] == []
    c = cfg(visual_temperature=2.0)  # sampled response rows with top-k visual rows: the visual option applies
    assert fit_loss_to_cache(c.loss_config(preset), c, manifest(gram=True, kind="sampled", visual="topk"))[1] == []


def test_the_student_follows_the_caches_eos_rule():
    from kd_train.plan import cache_append_eos

    assert cache_append_eos(manifest_with(config={"append_eos": True}), None) is True
    assert cache_append_eos(manifest_with(config={}), None) is False  # caches from before the rule appended nothing
    assert cache_append_eos(manifest_with(config={"append_eos": False}), False) is False
    with pytest.raises(ValueError, match="append_eos=True but the cache was built with append_eos=False"):
        cache_append_eos(manifest_with(config={"append_eos": False}), True)
