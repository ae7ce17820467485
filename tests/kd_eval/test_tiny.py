"""Tiny offline teachers, tokenizer and dataset load and run through the real transformers APIs."""

from __future__ import annotations

import json
from pathlib import Path

import jinja2
import pytest
import torch
import transformers
from PIL import Image
from safetensors.torch import load_file
from transformers.utils import is_torchvision_available

from tests.conftest import needs_torchvision
from kd_eval.tiny import (
    IMAGE_PLACEHOLDER,
    make_tiny_dataset,
    make_tiny_teacher,
    train_tiny_tokenizer,
)

VLM_FAMILIES = [
    "llava",
    pytest.param("llava-onevision", marks=needs_torchvision),
    pytest.param("qwen2-vl", marks=needs_torchvision),
]
# Visual tokens per (square) image at the default image_size=32, patch_size=8.
EXPECTED_IMAGE_TOKENS = {"llava": 16, "llava-onevision": 36, "qwen2-vl": 4}

CONVERSATION = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is the shape?"}]},
    {"role": "assistant", "content": "red"},
    {"role": "user", "content": "Where is it?"},
    {"role": "assistant", "content": [{"type": "text", "text": "on the left"}]},
]


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory: pytest.TempPathFactory):
    cache: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in cache:
            cache[family] = make_tiny_teacher(tmp_path_factory.mktemp(family.replace("-", "_")), family)
        return cache[family]

    return get


def _image(w: int = 48, h: int = 48) -> Image.Image:
    return Image.new("RGB", (w, h), (200, 30, 30))


# --- tokenizer / chat template -------------------------------------------------------------------


def test_tokenizer_is_deterministic_and_keeps_special_tokens_whole() -> None:
    extras = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>"]
    a, b = train_tiny_tokenizer(extras), train_tiny_tokenizer(extras)
    assert a.backend_tokenizer.to_str() == b.backend_tokenizer.to_str()
    assert len(a) <= 512
    assert a.pad_token == a.eos_token == "<|endoftext|>"
    for tok in ["<|im_start|>", "<|im_end|>", "<|endoftext|>", *extras]:
        assert a.encode(tok, add_special_tokens=False) == [a.convert_tokens_to_ids(tok)]
    text = "a small red circle on the left — ünïcode 123"
    assert a.decode(a.encode(text, add_special_tokens=False)) == text
    small = train_tiny_tokenizer(["<image>"], vocab_size=300)
    assert len(small) == 300 and small.convert_tokens_to_ids("<image>") == 3


def test_tokenizer_rejects_too_small_vocab() -> None:
    with pytest.raises(ValueError, match="got 100"):
        train_tiny_tokenizer([], vocab_size=100)


@pytest.mark.parametrize(
    ("extras", "placeholder"),
    [
        (["<image>"], IMAGE_PLACEHOLDER["llava"]),
        (["<|vision_start|>", "<|vision_end|>", "<|image_pad|>"], IMAGE_PLACEHOLDER["qwen2-vl"]),
    ],
)
def test_chat_template_renders_chatml_and_is_prefix_stable(extras: list[str], placeholder: str) -> None:
    tok = train_tiny_tokenizer(extras)
    full = tok.apply_chat_template(CONVERSATION, tokenize=False)
    for i in range(1, len(CONVERSATION)):
        assert full.startswith(tok.apply_chat_template(CONVERSATION[:i], tokenize=False))
    system = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    assert full.startswith(system + "<|im_start|>user\n" + placeholder)
    assert full.count(placeholder) == 1
    assert full.endswith("<|im_start|>assistant\non the left<|im_end|>\n")
    prompt = tok.apply_chat_template(CONVERSATION[:2], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("What colour is the shape?<|im_end|>\n<|im_start|>assistant\n")
    # No default system prompt is injected.
    assert tok.apply_chat_template(CONVERSATION[3:4], tokenize=False) == "<|im_start|>user\nWhere is it?<|im_end|>\n"


def test_llava_image_item_renders_like_dataset_string() -> None:
    tok = train_tiny_tokenizer(["<image>"])
    as_items = tok.apply_chat_template(CONVERSATION[1:2], tokenize=False)
    as_string = tok.apply_chat_template(
        [{"role": "user", "content": "<image>\nWhat colour is the shape?"}], tokenize=False
    )
    assert as_items == as_string


def test_text_only_template_rejects_images() -> None:
    tok = train_tiny_tokenizer([])
    with pytest.raises(jinja2.TemplateError, match="no image placeholder"):
        tok.apply_chat_template(CONVERSATION[1:2], tokenize=False)


# --- teachers ------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", VLM_FAMILIES)
def test_vlm_teacher_loads_processes_forwards_and_generates(teacher_dir, family: str) -> None:
    path = teacher_dir(family)
    model = transformers.AutoModelForImageTextToText.from_pretrained(path).eval()
    processor = transformers.AutoProcessor.from_pretrained(path)
    tokenizer = processor.tokenizer

    assert model.dtype == torch.float32
    assert model.config.text_config.vocab_size == len(tokenizer)
    image_token_id = model.config.image_token_id
    assert image_token_id == processor.image_token_id
    assert tokenizer.convert_ids_to_tokens(image_token_id) == processor.image_token

    text = processor.apply_chat_template(CONVERSATION[:2], tokenize=False, add_generation_prompt=True)
    assert IMAGE_PLACEHOLDER[family] in text
    inputs = processor(text=text, images=_image(), return_tensors="pt")
    n_image_tokens = int((inputs["input_ids"] == image_token_id).sum())
    assert n_image_tokens == EXPECTED_IMAGE_TOKENS[family]

    # The forward pass itself checks that the placeholder count equals the vision tower's features.
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape == (1, inputs["input_ids"].shape[1], len(tokenizer))
    assert torch.isfinite(logits).all()

    out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert out.shape[0] == 1 and inputs["input_ids"].shape[1] < out.shape[1] <= inputs["input_ids"].shape[1] + 4


@pytest.mark.parametrize("family", VLM_FAMILIES)
def test_vlm_teacher_handles_padded_batches_and_odd_aspect_ratios(teacher_dir, family: str) -> None:
    path = teacher_dir(family)
    model = transformers.AutoModelForImageTextToText.from_pretrained(path).eval()
    processor = transformers.AutoProcessor.from_pretrained(path)
    texts = [
        processor.apply_chat_template(CONVERSATION[:3], tokenize=False),
        processor.apply_chat_template(CONVERSATION[1:2], tokenize=False, add_generation_prompt=True),
    ]
    inputs = processor(text=texts, images=[_image(64, 32), _image(40, 56)], padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape[:2] == inputs["input_ids"].shape
    assert int((inputs["attention_mask"] == 0).sum()) > 0


def test_causal_lm_teacher_loads_and_generates(teacher_dir) -> None:
    path = teacher_dir("causal-lm")
    model = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    assert isinstance(model, transformers.Qwen2ForCausalLM)
    assert model.config.vocab_size == len(tokenizer)
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "How many sides does a triangle have?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.no_grad():
        logits = model(**ids).logits
    assert logits.shape == (1, ids["input_ids"].shape[1], len(tokenizer))
    out = model.generate(**ids, max_new_tokens=4, do_sample=False)
    assert out.shape[1] > ids["input_ids"].shape[1]


@pytest.mark.skipif(is_torchvision_available(), reason="checks the error raised without torchvision")
@pytest.mark.parametrize("family", ["llava-onevision", "qwen2-vl"])
def test_video_capable_families_need_torchvision(tmp_path: Path, family: str) -> None:
    with pytest.raises(ImportError, match="needs torchvision"):
        make_tiny_teacher(tmp_path, family)
    assert not any(tmp_path.iterdir())


def test_teacher_weights_depend_only_on_seed(tmp_path: Path) -> None:
    def weights(name: str, seed: int) -> dict[str, torch.Tensor]:
        return load_file(make_tiny_teacher(tmp_path / name, "causal-lm", seed=seed) / "model.safetensors")

    a, b, c = weights("a", 0), weights("b", 0), weights("c", 1)
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_teacher_rejects_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="got 'gpt'"):
        make_tiny_teacher(tmp_path, "gpt")
    with pytest.raises(ValueError, match="got 30 and 8"):
        make_tiny_teacher(tmp_path, "llava", image_size=30)
    with pytest.raises(ValueError, match="got 60"):
        make_tiny_teacher(tmp_path, "llava", hidden_size=60)


# --- dataset -------------------------------------------------------------------------------------


def test_instruct_dataset_is_valid_llava_json_with_edge_cases(tmp_path: Path) -> None:
    json_path, image_dir = make_tiny_dataset(tmp_path, n=16, image_size=40)
    records = json.loads(json_path.read_text())
    assert len(records) == 16 and len({r["id"] for r in records}) == 16

    text_only = [r for r in records if "image" not in r]
    with_image = [r for r in records if "image" in r]
    assert len(text_only) == 2
    for r in with_image:
        with Image.open(image_dir / r["image"]) as img:
            assert img.size == (40, 40) and img.mode == "RGB"
    no_placeholder = [r for r in with_image if not any("<image>" in t["value"] for t in r["conversations"])]
    assert len(no_placeholder) == 1
    assert not any("<image>" in t["value"] for r in text_only for t in r["conversations"])

    turn_counts = set()
    for r in records:
        convs = r["conversations"]
        assert [t["from"] for t in convs] == ["human", "gpt"] * (len(convs) // 2)
        assert all(isinstance(t["value"], str) and t["value"] for t in convs)
        turn_counts.add(len(convs) // 2)
        # The placeholder, if any, opens the first human turn and appears once.
        placeholders = [t["value"].count("<image>") for t in convs]
        assert sum(placeholders) <= 1 and placeholders[1:].count(1) == 0
    assert turn_counts <= {1, 2, 3} and len(turn_counts) > 1


def test_caption_dataset_and_determinism(tmp_path: Path) -> None:
    json_a, dir_a = make_tiny_dataset(tmp_path / "a", n=6, seed=3, kind="caption")
    json_b, dir_b = make_tiny_dataset(tmp_path / "b", n=6, seed=3, kind="caption")
    records = json.loads(json_a.read_text())
    assert json_a.read_text() == json_b.read_text()
    for r in records:
        assert (dir_a / r["image"]).read_bytes() == (dir_b / r["image"]).read_bytes()
        human, gpt = r["conversations"]
        assert human == {"from": "human", "value": "<image>\nDescribe the image briefly."}
        assert gpt["from"] == "gpt" and gpt["value"].startswith("a ")
    json_c, _ = make_tiny_dataset(tmp_path / "c", n=6, seed=4, kind="caption")
    assert json_c.read_text() != json_a.read_text()


def test_dataset_rejects_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="got 'vqa'"):
        make_tiny_dataset(tmp_path, kind="vqa")
    with pytest.raises(ValueError, match="got 0"):
        make_tiny_dataset(tmp_path, n=0)
