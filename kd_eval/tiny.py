"""Tiny, offline, randomly initialised teachers, tokenizers and datasets.

Everything here is built from config with no model hub access, so tests and smoke runs of the
distillation pipeline can exercise the real ``transformers`` code paths (processors, chat
templates, image-token expansion, ``generate``) in milliseconds on a CPU.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
import transformers
from PIL import Image, ImageDraw
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers.utils import is_torchvision_available

__all__ = [
    "FAMILIES",
    "IMAGE_PLACEHOLDER",
    "make_tiny_dataset",
    "make_tiny_teacher",
    "train_tiny_tokenizer",
]

IM_START, IM_END, ENDOFTEXT = "<|im_start|>", "<|im_end|>", "<|endoftext|>"

FAMILIES = ("llava", "llava-onevision", "qwen2-vl", "causal-lm")

# What the chat template emits for one {"type": "image"} item; the processor then expands the
# image token inside it to the right number of visual tokens.
IMAGE_PLACEHOLDER: dict[str, str] = {
    "llava": "<image>",
    "llava-onevision": "<image>",
    "qwen2-vl": "<|vision_start|><|image_pad|><|vision_end|>",
}

# Extra special tokens per family. Video tokens are included so the processors' video token ids
# resolve to real ids (they are only looked up, never used).
_FAMILY_SPECIAL_TOKENS: dict[str, list[str]] = {
    "llava": ["<image>"],
    "llava-onevision": ["<image>", "<video>"],
    "qwen2-vl": ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"],
    "causal-lm": [],
}

_COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 60),
    "blue": (30, 60, 220),
    "yellow": (235, 210, 30),
    "purple": (140, 40, 170),
    "orange": (245, 140, 20),
}
_BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (245, 245, 245),
    "black": (15, 15, 15),
    "grey": (128, 128, 128),
}
_SHAPES = ("circle", "square", "triangle")
_POSITIONS = ("left", "right", "top", "bottom", "centre")
_SIZES = ("small", "large")
_GENERAL_TEXT = (
    "You are a helpful assistant.",
    "The quick brown fox jumps over the lazy dog.",
    "Please answer the question about the picture.",
    "Yes, no, maybe. I do not know. Thank you!",
    "one two three four five six seven eight nine ten",
    "What is this? Where is it? How many are there? Which one is bigger?",
    "The image shows a simple shape drawn on a plain background.",
    "A triangle has three sides, a square has four sides and a circle has none.",
    "Mixing red and blue gives purple; mixing red and yellow gives orange.",
)
_COMMON_WORDS = (
    "the of and to in is you that it he was for on are as with his they at be this have from or one "
    "had by word but not what all were we when your can said there use an each which she do how their "
    "if will up other about out many then them these so some her would make like him into time has look "
    "two more write go see number no way could people my than first water been call who oil its now find "
    "long down day did get come made may part over new sound take only little work know place year live "
    "me back give most very after thing our just name good sentence man think say great where help through "
    "much before line right too mean old any same tell boy follow came want show also around form three "
    "small set put end does another well large must big even such because turn here why ask went men read "
    "need land different home us move try kind hand picture again change off play spell air away animal "
    "house point page letter mother answer found study still learn should world high every near add food "
    "between own below country plant last school father keep tree never start city earth eye light thought "
    "head under story saw left right few while along might close something seem next hard open example begin "
    "life always those both paper together got group often run important until children side feet car mile"
)
_TEXT_ONLY_QA = (
    ("How many sides does a triangle have?", "three"),
    ("How many sides does a square have?", "four"),
    ("What colour do you get when you mix red and blue?", "purple"),
    ("What colour do you get when you mix red and yellow?", "orange"),
)


def _position_phrase(position: str) -> str:
    if position == "centre":
        return "in the centre"
    return f"{'on' if position in ('left', 'right') else 'at'} the {position}"


def _caption(size: str, colour: str, shape: str, position: str) -> str:
    return f"a {size} {colour} {shape} {_position_phrase(position)}"


def _corpus() -> list[str]:
    """Deterministic training text covering every word the tiny datasets and prompts use."""
    lines = list(_GENERAL_TEXT)
    for shape in _SHAPES:
        for colour in _COLOURS:
            for position in _POSITIONS:
                for size in _SIZES:
                    lines.append(_caption(size, colour, shape, position))
                    lines.append(f"There is a {size} {colour} {shape} {_position_phrase(position)}.")
        lines.append(f"What shape is in the image? It is a {shape}.")
    for colour in _COLOURS:
        lines.append(f"What colour is the shape? The shape is {colour}.")
    for background in _BACKGROUNDS:
        lines.append(f"What colour is the background? The background is {background}.")
    lines += [f"{q} {a}" for q, a in _TEXT_ONLY_QA]
    lines += ["Describe the image briefly.", "Is the shape large or small?", "Where is the shape?"]
    lines += ["user", "assistant", "system"]
    words = _COMMON_WORDS.split()
    lines += [" ".join(words[i : i + 12]) for i in range(0, len(words), 12)]
    lines += [" ".join(f"{i} {i * 7 % 100}" for i in range(j, j + 10)) for j in range(0, 100, 10)]
    return lines


def chat_template(image_placeholder: str | None) -> str:
    """ChatML template; ``image_placeholder`` is emitted per image item (None: images are an error).

    No default system prompt is injected, so rendering ``messages[:i]`` is always a prefix of
    rendering ``messages`` (needed to locate assistant spans for loss masking).
    LLaVA-style placeholders are followed by a newline so ``[image, text]`` content renders the
    same as the LLaVA dataset convention ``"<image>\\n" + text``.
    """
    if image_placeholder is None:
        image_expr = "raise_exception('this tokenizer has no image placeholder')"
    else:
        suffix = "\n" if image_placeholder == "<image>" else ""
        image_expr = json.dumps(image_placeholder + suffix)
    return (
        "{%- for message in messages -%}"
        "{{- '" + IM_START + "' + message['role'] + '\\n' -}}"
        "{%- if message['content'] is string -%}"
        "{{- message['content'] -}}"
        "{%- else -%}"
        "{%- for item in message['content'] -%}"
        "{%- if item['type'] == 'image' -%}{{- " + image_expr + " -}}"
        "{%- elif item['type'] == 'text' -%}{{- item['text'] -}}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{%- endif -%}"
        "{{- '" + IM_END + "\\n' -}}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- '" + IM_START + "assistant\\n' -}}{%- endif -%}"
    )


def _placeholder_for(extra_special_tokens: list[str]) -> str | None:
    if "<|image_pad|>" in extra_special_tokens:
        return IMAGE_PLACEHOLDER["qwen2-vl"]
    if "<image>" in extra_special_tokens:
        return IMAGE_PLACEHOLDER["llava"]
    return None


def train_tiny_tokenizer(
    extra_special_tokens: list[str], vocab_size: int = 512, corpus: list[str] | None = None
) -> transformers.PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on a built-in corpus plus `corpus` (deterministic, offline).

    Byte-level BPE means any text round-trips, like the real Qwen2 tokenizer. Special tokens get
    the first ids (``<|endoftext|>`` 0, ``<|im_start|>`` 1, ``<|im_end|>`` 2, then the extras in
    order); ``vocab_size`` is an upper bound that the built-in corpus reaches at the default.
    The image placeholder in the chat template is inferred from ``extra_special_tokens``:
    ``<|image_pad|>`` selects the Qwen2-VL form, ``<image>`` the LLaVA form, neither makes image
    items an error.
    """
    base_special = [ENDOFTEXT, IM_START, IM_END]
    special = base_special + [t for t in dict.fromkeys(extra_special_tokens) if t not in base_special]
    min_vocab = 256 + len(special)
    if vocab_size < min_vocab:
        raise ValueError(f"vocab_size must be >= {min_vocab} (256 bytes + special tokens), got {vocab_size}")

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus() + list(corpus or ()), trainer=trainer)

    hf_tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=ENDOFTEXT,
        pad_token=ENDOFTEXT,
        extra_special_tokens=special[len(base_special) :],
        model_max_length=4096,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )
    hf_tok.chat_template = chat_template(_placeholder_for(special))
    return hf_tok


def _image_processor(cls_name: str, **kwargs: object) -> object:
    """Pick the torchvision image processor when available, else its PIL twin.

    Both save the same ``image_processor_type``, so the checkpoint loads either way.
    """
    cls = getattr(transformers, cls_name if is_torchvision_available() else cls_name + "Pil")
    return cls(**kwargs)


def _require_torchvision(family: str) -> None:
    # transformers 5.x processors with a video_processor attribute cannot be built (nor loaded
    # by AutoProcessor) without a real video processor, and every video processor is torchvision-based.
    if not is_torchvision_available():
        raise ImportError(
            f"family {family!r} needs torchvision: its transformers processor requires a video processor, "
            f"got torchvision not installed"
        )


def _text_kwargs(tokenizer: transformers.PreTrainedTokenizerBase, hidden_size: int, num_layers: int) -> dict:
    eos_id = tokenizer.convert_tokens_to_ids(ENDOFTEXT)
    return dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        bos_token_id=None,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
        tie_word_embeddings=False,
    )


def _siglip_config(
    hidden_size: int, num_layers: int, image_size: int, patch_size: int
) -> transformers.PreTrainedConfig:
    return transformers.SiglipVisionConfig(
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=patch_size,
        vision_use_head=False,
    )


def make_tiny_teacher(
    out_dir: str | Path,
    family: str = "llava",
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    image_size: int = 32,
    patch_size: int = 8,
    seed: int = 0,
    vocab_size: int = 512,
    corpus: list[str] | None = None,
) -> Path:
    """Build and save a random tiny model + processor of ``family``; returns ``out_dir``.

    The result loads with ``AutoModelForImageTextToText`` / ``AutoProcessor`` (or
    ``AutoModelForCausalLM`` / ``AutoTokenizer`` for ``"causal-lm"``), so it stands in for a real
    hub checkpoint. Weights depend only on the arguments (``torch.manual_seed(seed)``).
    """
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    if hidden_size <= 0 or hidden_size % 8:
        # 2 heads, and Qwen2-VL's 2D vision rotary embedding splits each head dim in quarters.
        raise ValueError(f"hidden_size must be a positive multiple of 8, got {hidden_size}")
    if num_layers <= 0:
        raise ValueError(f"num_layers must be positive, got {num_layers}")
    if patch_size <= 0 or image_size <= 0 or image_size % patch_size:
        raise ValueError(f"image_size must be a positive multiple of patch_size, got {image_size} and {patch_size}")
    if family == "qwen2-vl" and image_size % (2 * patch_size):
        raise ValueError(f"qwen2-vl needs image_size divisible by 2 * patch_size, got {image_size} and {patch_size}")

    if family in ("llava-onevision", "qwen2-vl"):
        _require_torchvision(family)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tiny_tokenizer(_FAMILY_SPECIAL_TOKENS[family], vocab_size=vocab_size, corpus=corpus)
    text_kwargs = _text_kwargs(tokenizer, hidden_size, num_layers)
    tid = tokenizer.convert_tokens_to_ids
    processor: object

    if family == "causal-lm":
        config = transformers.Qwen2Config(**text_kwargs)
        processor = tokenizer
        model_cls = transformers.Qwen2ForCausalLM
    elif family == "llava":
        config = transformers.LlavaConfig(
            vision_config=_siglip_config(hidden_size, num_layers, image_size, patch_size),
            text_config=transformers.Qwen2Config(**text_kwargs),
            image_token_id=tid("<image>"),
            image_seq_length=(image_size // patch_size) ** 2,
            vision_feature_select_strategy="full",
            vision_feature_layer=-1,
            projector_hidden_act="gelu",
        )
        processor = transformers.LlavaProcessor(
            image_processor=_image_processor(
                "SiglipImageProcessor", size={"height": image_size, "width": image_size}
            ),
            tokenizer=tokenizer,
            patch_size=patch_size,
            num_additional_image_tokens=0,
            vision_feature_select_strategy="full",
            chat_template=tokenizer.chat_template,
        )
        model_cls = transformers.LlavaForConditionalGeneration
    elif family == "llava-onevision":
        # A single grid pinpoint equal to the tower's resolution keeps anyres minimal: one base
        # view plus one full-resolution crop -> (s/p)^2 base + (s/p)^2 crop + s/p newline tokens.
        pinpoints = [[image_size, image_size]]
        config = transformers.LlavaOnevisionConfig(
            vision_config=_siglip_config(hidden_size, num_layers, image_size, patch_size),
            text_config=transformers.Qwen2Config(**text_kwargs),
            image_token_id=tid("<image>"),
            video_token_id=tid("<video>"),
            image_grid_pinpoints=pinpoints,
            vision_feature_select_strategy="full",
            vision_feature_layer=-1,
            vision_aspect_ratio="anyres_max_9",
        )
        processor = transformers.LlavaOnevisionProcessor(
            image_processor=transformers.LlavaOnevisionImageProcessor(
                size={"height": image_size, "width": image_size}, image_grid_pinpoints=pinpoints
            ),
            tokenizer=tokenizer,
            video_processor=transformers.LlavaOnevisionVideoProcessor(
                size={"height": image_size, "width": image_size}
            ),
            num_image_tokens=(image_size // patch_size) ** 2,
            vision_feature_select_strategy="full",
            vision_aspect_ratio="anyres_max_9",
            chat_template=tokenizer.chat_template,
        )
        model_cls = transformers.LlavaOnevisionForConditionalGeneration
    else:  # qwen2-vl
        head_half = hidden_size // 2 // 2  # rotary pairs per head (2 heads)
        t_section = head_half // 4
        hw_section = (head_half - t_section) // 2
        mrope_section = [head_half - 2 * hw_section, hw_section, hw_section]
        config = transformers.Qwen2VLConfig(
            text_config=dict(
                **text_kwargs,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": mrope_section},
            ),
            vision_config=dict(
                depth=num_layers,
                embed_dim=hidden_size,
                hidden_size=hidden_size,  # merger output = LM hidden size
                num_heads=2,
                mlp_ratio=2,
                patch_size=patch_size,
                spatial_merge_size=2,
                temporal_patch_size=2,
            ),
            image_token_id=tid("<|image_pad|>"),
            video_token_id=tid("<|video_pad|>"),
            vision_start_token_id=tid("<|vision_start|>"),
            vision_end_token_id=tid("<|vision_end|>"),
        )
        # min_pixels == max_pixels pins square images to image_size x image_size.
        vision_kwargs = dict(
            patch_size=patch_size,
            merge_size=2,
            temporal_patch_size=2,
            size={"shortest_edge": image_size * image_size, "longest_edge": image_size * image_size},
        )
        processor = transformers.Qwen2VLProcessor(
            image_processor=transformers.Qwen2VLImageProcessor(**vision_kwargs),
            tokenizer=tokenizer,
            video_processor=transformers.Qwen2VLVideoProcessor(**vision_kwargs),
            chat_template=tokenizer.chat_template,
        )
        model_cls = transformers.Qwen2VLForConditionalGeneration

    torch.manual_seed(seed)
    model = model_cls(config).to(torch.float32).eval()
    eos_ids = [tid(IM_END), tid(ENDOFTEXT)]
    model.generation_config = transformers.GenerationConfig(
        eos_token_id=eos_ids, pad_token_id=tid(ENDOFTEXT), bos_token_id=None, do_sample=False
    )
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def _draw_shape(
    size_px: int, background: str, colour: str, shape: str, position: str, size: str, rng: random.Random
) -> Image.Image:
    img = Image.new("RGB", (size_px, size_px), _BACKGROUNDS[background])
    half = size_px * (0.12 if size == "small" else 0.22)
    cx, cy = {
        "left": (0.27, 0.5),
        "right": (0.73, 0.5),
        "top": (0.5, 0.27),
        "bottom": (0.5, 0.73),
        "centre": (0.5, 0.5),
    }[position]
    jitter = size_px / 24
    cx = cx * size_px + rng.uniform(-jitter, jitter)
    cy = cy * size_px + rng.uniform(-jitter, jitter)
    box = (cx - half, cy - half, cx + half, cy + half)
    draw = ImageDraw.Draw(img)
    fill = _COLOURS[colour]
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([(cx, cy - half), (cx - half, cy + half), (cx + half, cy + half)], fill=fill)
    return img


def make_tiny_dataset(
    out_dir: str | Path,
    n: int = 16,
    *,
    seed: int = 0,
    image_size: int = 48,
    kind: str = "instruct",
) -> tuple[Path, Path]:
    """Write a LLaVA-format JSON file plus PNG images of coloured shapes; returns (json, image_dir).

    Answers are exact functions of the drawn attributes, so a model trained on it can in principle
    learn them. ``kind="instruct"`` deliberately includes the awkward cases real LLaVA mixes
    contain: text-only samples (no ``"image"`` key, indices ``i % 8 == 3``) and one sample
    (index 1) that has an image but no ``<image>`` placeholder in its human turn.
    ``"image"`` paths are relative to ``image_dir``. Output depends only on the arguments.
    """
    if kind not in ("instruct", "caption"):
        raise ValueError(f"kind must be 'instruct' or 'caption', got {kind!r}")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if image_size < 16:
        raise ValueError(f"image_size must be >= 16, got {image_size}")

    out = Path(out_dir)
    image_dir = out / "images"
    (image_dir / kind).mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    records: list[dict] = []
    for i in range(n):
        sample_id = f"{kind}-{i:05d}"
        if kind == "instruct" and i % 8 == 3:
            qa = rng.sample(_TEXT_ONLY_QA, k=rng.randint(1, 2))
            turns = [t for q, a in qa for t in ({"from": "human", "value": q}, {"from": "gpt", "value": a})]
            records.append({"id": sample_id, "conversations": turns})
            continue

        colour = rng.choice(list(_COLOURS))
        background = rng.choice(list(_BACKGROUNDS))
        shape = rng.choice(_SHAPES)
        position = rng.choice(_POSITIONS)
        size = rng.choice(_SIZES)
        rel_path = f"{kind}/{i:05d}.png"
        _draw_shape(image_size, background, colour, shape, position, size, rng).save(image_dir / rel_path)

        caption = _caption(size, colour, shape, position)
        if kind == "caption":
            qa = [("Describe the image briefly.", caption)]
        else:
            pool = [
                ("What colour is the shape?", colour),
                ("What shape is in the image?", f"a {shape}"),
                ("Where is the shape?", _position_phrase(position)),
                ("Is the shape large or small?", size),
                ("What colour is the background?", background),
                ("Describe the image briefly.", caption),
            ]
            qa = rng.sample(pool, k=rng.randint(1, 3))
        turns = []
        for j, (q, a) in enumerate(qa):
            with_placeholder = j == 0 and not (kind == "instruct" and i == 1)
            turns.append({"from": "human", "value": f"<image>\n{q}" if with_placeholder else q})
            turns.append({"from": "gpt", "value": a})
        records.append({"id": sample_id, "image": rel_path, "conversations": turns})

    json_path = out / f"{kind}.json"
    json_path.write_text(json.dumps(records, indent=2) + "\n", encoding="utf-8")
    return json_path, image_dir
