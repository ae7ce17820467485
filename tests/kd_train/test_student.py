"""Composed students (vision tower + fresh projector + base LLM), loading/saving, and freezing by part."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers
from PIL import Image

from kd_cache.hf import tokenizer_fingerprint
from kd_train.student import (
    STAGES,
    compose_student,
    load_student,
    parameter_part,
    save_student,
    set_trainable,
    trainable_parameters,
    visual_tokens_per_image,
)

TEXT = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
            num_key_value_heads=2, bos_token_id=None, eos_token_id=None, pad_token_id=None)


@pytest.fixture(scope="session")
def tiny_llm(tmp_path_factory) -> Path:
    """A smaller base LLM than the teacher's (hidden 32 vs 64), with its own tokenizer (no <image>)."""
    from kd_eval.tiny import make_tiny_teacher

    return make_tiny_teacher(tmp_path_factory.mktemp("llm"), "causal-lm", hidden_size=32, seed=1)


@pytest.fixture(scope="session")
def student_dir(tmp_path_factory, llava_teacher, tiny_llm) -> Path:
    return compose_student(tmp_path_factory.mktemp("student"), vision=str(llava_teacher), llm=str(tiny_llm),
                           processor_from=str(llava_teacher))


def _image(size: int = 40) -> Image.Image:
    return Image.new("RGB", (size, size), (220, 30, 30))


def _prompt(processor) -> str:
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is the shape?"}]}]
    return processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)


def test_composed_student_loads_with_auto_classes_and_generates(student_dir):
    model = transformers.AutoModelForImageTextToText.from_pretrained(student_dir)
    processor = transformers.AutoProcessor.from_pretrained(student_dir)
    assert isinstance(model, transformers.LlavaForConditionalGeneration)
    assert isinstance(processor, transformers.LlavaProcessor)
    inputs = processor(text=[_prompt(processor)], images=[_image()], return_tensors="pt")
    n_image = int((inputs["input_ids"] == model.config.image_token_id).sum())
    assert n_image == model.config.image_seq_length == 16  # (32 / 8) ** 2, SigLIP: no CLS
    out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert out.shape[1] > inputs["input_ids"].shape[1]


def test_composed_student_has_teacher_vision_weights_llm_weights_and_fresh_projector(student_dir, llava_teacher,
                                                                                     tiny_llm):
    student = transformers.AutoModelForImageTextToText.from_pretrained(student_dir)
    teacher = transformers.AutoModelForImageTextToText.from_pretrained(llava_teacher)
    llm = transformers.AutoModelForCausalLM.from_pretrained(tiny_llm)
    s_vis, t_vis = student.model.vision_tower.state_dict(), teacher.model.vision_tower.state_dict()
    assert s_vis.keys() == t_vis.keys() and all(torch.equal(s_vis[k], t_vis[k]) for k in t_vis)
    s_lm, l_lm = student.model.language_model.state_dict(), llm.model.state_dict()
    assert s_lm.keys() == l_lm.keys() and all(torch.equal(s_lm[k], l_lm[k]) for k in l_lm)
    assert torch.equal(student.lm_head.weight, llm.lm_head.weight)
    proj = student.model.multi_modal_projector
    assert proj.linear_1.weight.shape == (32, 64) and proj.linear_2.weight.shape == (32, 32)  # vision 64 -> LLM 32
    assert student.config.projector_hidden_act == "gelu"
    # fresh and seeded: PyTorch's default Linear init under torch.manual_seed(0)
    torch.manual_seed(0)
    assert torch.equal(proj.linear_1.weight, torch.nn.Linear(64, 32).weight)


def test_composed_student_processor_matches_teacher_tokenizer(student_dir, llava_teacher):
    student = transformers.AutoProcessor.from_pretrained(student_dir)
    teacher = transformers.AutoProcessor.from_pretrained(llava_teacher)
    assert tokenizer_fingerprint(student) == tokenizer_fingerprint(teacher)
    assert student.image_token_id == teacher.image_token_id
    assert visual_tokens_per_image(student, _image()) == visual_tokens_per_image(teacher, _image()) == 16
    config = transformers.AutoConfig.from_pretrained(student_dir)
    assert config.image_token_id == teacher.image_token_id
    gen = transformers.GenerationConfig.from_pretrained(student_dir)
    assert gen.eos_token_id == transformers.GenerationConfig.from_pretrained(llava_teacher).eos_token_id


def test_compose_with_llm_tokenizer_adds_image_token(tmp_path, llava_teacher, tiny_llm):
    out = compose_student(tmp_path / "s", vision=str(llava_teacher), llm=str(tiny_llm))
    processor = transformers.AutoProcessor.from_pretrained(out)
    llm_tok = transformers.AutoTokenizer.from_pretrained(tiny_llm)
    assert "<image>" not in llm_tok.get_vocab()
    assert processor.image_token_id == len(llm_tok)  # appended
    model = transformers.AutoModelForImageTextToText.from_pretrained(out)
    assert model.config.text_config.vocab_size == len(llm_tok) + 1  # embeddings resized
    inputs = processor(text=["<image>hi"], images=[_image()], return_tensors="pt")
    assert model(**inputs).logits.shape[-1] == len(llm_tok) + 1


def test_compose_with_a_text_llms_own_template_renders_images(tmp_path, llava_teacher, smollm2_tokenizer):
    """A student of another family keeps its LLM's tokenizer and published chat template (SmolLM2's, with its default
    system prompt); the template renders no images, so compose makes an image item render as "<image>\n" before
    its text. Decoded: the conversation in SmolLM2's markup, the image expanded to the tower's rows, and the answer
    plus <|im_end|> supervised."""
    from kd_train.batch import encoder_for

    llm = tmp_path / "smollm2-tiny"
    config = transformers.LlamaConfig(vocab_size=len(smollm2_tokenizer), hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2)
    transformers.LlamaForCausalLM(config).save_pretrained(llm)
    smollm2_tokenizer.save_pretrained(llm)
    out = compose_student(tmp_path / "s", vision=str(llava_teacher), llm=str(llm))
    model, processor = load_student(out)
    tok = processor.tokenizer
    record = {"id": "r", "conversations": [{"from": "human", "value": "<image>\nWhat colour is it?"},
                                          {"from": "gpt", "value": "Red, like 🍎."}]}
    e = encoder_for(processor, model.config, image_root=None, max_length=None).encode(record, 0, images=[_image()])
    ids = e.input_ids.tolist()
    assert len(e.visual_positions) == model.config.image_seq_length > 0
    assert [ids[i] for i in e.visual_positions] == [processor.image_token_id] * len(e.visual_positions)
    text = tok.decode(ids)
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert "<|im_start|>user\n" + "<image>" * len(e.visual_positions) + "\nWhat colour is it?<|im_end|>" in text
    assert tok.decode(e.input_ids[e.labels_mask]) == "Red, like 🍎.<|im_end|>"
    # the generation prompt renders too (what kd eval and vLLM use)
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Q?"}]}], add_generation_prompt=True,
        tokenize=False)
    assert prompt.endswith("<|im_start|>user\n<image>\nQ?<|im_end|>\n<|im_start|>assistant\n")


def test_compose_keeps_tied_embeddings(tmp_path, llava_teacher, tiny_llm):
    config = transformers.AutoConfig.from_pretrained(tiny_llm)
    config.tie_word_embeddings = True
    torch.manual_seed(5)
    transformers.Qwen2ForCausalLM(config).save_pretrained(tmp_path / "llm")
    transformers.AutoTokenizer.from_pretrained(tiny_llm).save_pretrained(tmp_path / "llm")
    out = compose_student(tmp_path / "s", vision=str(llava_teacher), llm=str(tmp_path / "llm"),
                          processor_from=str(llava_teacher))
    model = transformers.AutoModelForImageTextToText.from_pretrained(out)
    assert model.lm_head.weight is model.model.language_model.embed_tokens.weight
    llm = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "llm")
    assert torch.equal(model.lm_head.weight, llm.lm_head.weight)


def _save_vision_checkpoint(folder: Path, kind: str) -> Path:
    """A tiny SigLIP / CLIP vision-only checkpoint or a SigLIP dual encoder, with its image processor."""
    vis = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=16,
               patch_size=8)
    torch.manual_seed(3)
    if kind == "clip":
        model = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**vis))
        ip = transformers.CLIPImageProcessorPil(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
    elif kind == "siglip":
        model = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**vis, vision_use_head=False))
        ip = transformers.SiglipImageProcessorPil(size={"height": 16, "width": 16})
    else:  # siglip dual encoder
        model = transformers.SiglipModel(transformers.SiglipConfig(
            vision_config=dict(**vis, vision_use_head=False),
            text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                             vocab_size=64)))
        ip = transformers.SiglipImageProcessorPil(size={"height": 16, "width": 16})
    model.save_pretrained(folder)
    ip.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("kind, strategy, tokens", [("siglip", "full", 4), ("siglip-dual", "full", 4),
                                                     ("clip", "default", 4), ("clip", "full", 5)])
def test_compose_from_vision_checkpoint(tmp_path, llava_teacher, tiny_llm, kind, strategy, tokens):
    vision = _save_vision_checkpoint(tmp_path / "vision", kind)
    out = compose_student(tmp_path / "s", vision=str(vision), llm=str(tiny_llm), processor_from=str(llava_teacher),
                          vision_feature_select_strategy=strategy, vision_feature_layer=-2)
    model = transformers.AutoModelForImageTextToText.from_pretrained(out)
    processor = transformers.AutoProcessor.from_pretrained(out)
    assert visual_tokens_per_image(processor, _image()) == tokens  # (16 / 8) ** 2 patches (+ CLS under "full")
    assert processor.num_additional_image_tokens == (1 if kind == "clip" else 0)
    src = transformers.AutoModel.from_pretrained(vision)
    src = getattr(src, "vision_model", src)
    ref = src.state_dict()
    got = model.model.vision_tower.state_dict()
    ref = {k: v for k, v in ref.items() if k in got} if kind == "siglip-dual" else ref
    assert len(ref) > 0 and all(torch.equal(got[k], ref[k]) for k in ref)
    inputs = processor(text=[_prompt(processor)], images=[_image()], return_tensors="pt")
    assert model.generate(**inputs, max_new_tokens=2).shape[1] > inputs["input_ids"].shape[1]


def test_compose_rejects_bad_arguments(tmp_path, llava_teacher, tiny_llm):
    kw = dict(vision=str(llava_teacher), llm=str(tiny_llm))
    with pytest.raises(ValueError, match="has none"):  # SigLIP has no CLS token to drop
        compose_student(tmp_path / "a", vision_feature_select_strategy="default", **kw)
    with pytest.raises(ValueError, match="got 'mean'"):
        compose_student(tmp_path / "b", vision_feature_select_strategy="mean", **kw)
    with pytest.raises(ValueError, match="got -4"):
        compose_student(tmp_path / "c", vision_feature_layer=-4, **kw)
    with pytest.raises(ValueError, match="vision must be"):
        compose_student(tmp_path / "d", vision=str(tiny_llm), llm=str(tiny_llm))
    with pytest.raises(ValueError, match="llm folder .*missing does not exist"):
        compose_student(tmp_path / "e", vision=str(llava_teacher), llm=str(tmp_path / "missing"))


def _tiny_onevision():
    vision = transformers.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                             num_attention_heads=2, image_size=16, patch_size=8, vision_use_head=False)
    return transformers.LlavaOnevisionForConditionalGeneration(transformers.LlavaOnevisionConfig(
        vision_config=vision, text_config=transformers.Qwen2Config(**TEXT), image_token_id=3, video_token_id=4))


def _tiny_qwen2_vl():
    text = dict(**TEXT, rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]})
    vision = dict(depth=1, embed_dim=32, hidden_size=32, num_heads=2, mlp_ratio=2, patch_size=8, spatial_merge_size=2,
                  temporal_patch_size=2)
    return transformers.Qwen2VLForConditionalGeneration(transformers.Qwen2VLConfig(
        text_config=text, vision_config=vision, image_token_id=3, video_token_id=4, vision_start_token_id=5,
        vision_end_token_id=6))


def _part_sizes(model) -> dict[str, int]:
    sizes = dict.fromkeys(("vision", "projector", "llm"), 0)
    for name, p in model.named_parameters():
        sizes[parameter_part(model, name)] += p.numel()
    return sizes


@pytest.mark.parametrize("family", ["llava", "llava-onevision", "qwen2-vl"])
def test_set_trainable_per_part(family, student_dir):
    if family == "llava":
        model = transformers.AutoModelForImageTextToText.from_pretrained(student_dir)
        projector_prefix = "model.multi_modal_projector."
    elif family == "llava-onevision":
        model, projector_prefix = _tiny_onevision(), "model.multi_modal_projector."
    else:
        model, projector_prefix = _tiny_qwen2_vl(), "model.visual.merger."
    sizes = _part_sizes(model)
    assert all(sizes.values())
    for flags in [dict(vision=False, projector=True, llm=False), dict(vision=True, projector=False, llm=True),
                  dict(vision=False, projector=False, llm=False)]:
        counts = set_trainable(model, **flags)
        for part, on in flags.items():
            assert counts[part] == (sizes[part] if on else 0)
        assert counts["trainable"] == sum(counts[p] for p in flags)
        assert counts["total"] == sum(sizes.values())
        for name, p in model.named_parameters():
            assert p.requires_grad == flags[parameter_part(model, name)], name
    set_trainable(model, vision=False, projector=True, llm=False)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(projector_prefix) or n == "model.image_newline" for n in trainable)
    if family == "llava-onevision":
        assert "model.image_newline" in trainable
    frozen_lm = [p.requires_grad for n, p in model.named_parameters() if "language_model" in n or "lm_head" in n]
    assert frozen_lm and not any(frozen_lm)


def test_stage_presets(student_dir, tiny_llm):
    model = transformers.AutoModelForImageTextToText.from_pretrained(student_dir)
    sizes = _part_sizes(model)
    dpt = trainable_parameters(model, "dpt")
    assert (dpt["vision"], dpt["projector"], dpt["llm"]) == (0, sizes["projector"], 0)
    for stage in ("sft", "dft"):
        counts = trainable_parameters(model, stage)
        assert (counts["vision"], counts["projector"], counts["llm"]) == (0, sizes["projector"], sizes["llm"])
    with pytest.raises(ValueError, match="got 'pretrain'"):
        trainable_parameters(model, "pretrain")
    assert set(STAGES) == {"dpt", "sft", "dft"}
    lm = transformers.AutoModelForCausalLM.from_pretrained(tiny_llm)
    with pytest.raises(ValueError, match="got 0 trainable"):
        trainable_parameters(lm, "dpt")  # a text-only student has no projector
    counts = trainable_parameters(lm, "sft")
    assert counts["llm"] == counts["trainable"] == counts["total"] > 0


def test_load_and_save_student_roundtrip(tmp_path, student_dir, tiny_llm):
    model, processor = load_student(student_dir)
    assert isinstance(model, transformers.LlavaForConditionalGeneration) and model.dtype == torch.float32
    assert isinstance(processor, transformers.LlavaProcessor)
    trainable_parameters(model, "sft")
    with torch.no_grad():
        model.model.multi_modal_projector.linear_2.bias.add_(1.0)  # "trained"
    model.generation_config.max_new_tokens = 7
    out = save_student(model, processor, tmp_path / "saved")
    again = transformers.AutoModelForImageTextToText.from_pretrained(out)
    ref = model.state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in again.state_dict().items())
    assert transformers.GenerationConfig.from_pretrained(out).max_new_tokens == 7
    assert tokenizer_fingerprint(transformers.AutoProcessor.from_pretrained(out)) == tokenizer_fingerprint(processor)

    lm, tok = load_student(tiny_llm, dtype="bfloat16")
    assert isinstance(lm, transformers.Qwen2ForCausalLM) and lm.dtype == torch.bfloat16
    assert isinstance(tok, transformers.PreTrainedTokenizerBase)


def test_visual_tokens_per_image_rejects_a_tokenizer(tiny_llm):
    tok = transformers.AutoTokenizer.from_pretrained(tiny_llm)
    with pytest.raises(ValueError, match="got .*Tokenizer"):
        visual_tokens_per_image(tok, _image())
