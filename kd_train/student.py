"""Students: compose a LLaVA-style student from parts, load/save it, and choose which parts train.

LLaVA-KD's small student is "composed from parts": the (teacher's) vision tower, a fresh 2-layer MLP
projector and a small base LLM. `compose_student` assembles these as a plain transformers
`LlavaForConditionalGeneration` + `LlavaProcessor`, so everything downstream (training, `generate`,
publishing) needs nothing from this package to load the result.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from transformers import (AutoConfig, AutoImageProcessor, AutoModelForCausalLM, AutoModelForImageTextToText,
                          AutoTokenizer, GenerationConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor)
from transformers.activations import ACT2FN
from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES, MODEL_MAPPING
from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

from kd_cache.config import to_dict
from kd_cache.hf import load_processor_and_config, pick_dtype
from kd_cache.paths import check_model_path
from kd_train.config import SELECT_STRATEGIES, ComposeConfig

log = logging.getLogger("kd_train")

__all__ = [
    "PARTS",
    "STAGES",
    "SUPPORTED_VISION_TOWERS",
    "compose_student",
    "load_student",
    "parameter_part",
    "save_student",
    "to_hub_layout",
    "set_trainable",
    "trainable_parameters",
    "visual_tokens_per_image",
]

PARTS: tuple[str, ...] = ("vision", "projector", "llm")

#: LLaVA-KD's three stages -> which parts train. The vision tower stays frozen throughout;
#: Distilled Pre-Training aligns only the projector, SFT and Distilled Fine-Tuning also train the LLM.
STAGES: dict[str, dict[str, bool]] = {
    "dpt": {"vision": False, "projector": True, "llm": False},
    "sft": {"vision": False, "projector": True, "llm": True},
    "dft": {"vision": False, "projector": True, "llm": True},
}

#: Fixed-resolution ViT towers that `LlavaForConditionalGeneration` runs on `pixel_values` alone.
SUPPORTED_VISION_TOWERS: tuple[str, ...] = ("siglip_vision_model", "clip_vision_model")



def _torch_dtype(dtype: str | torch.dtype | None, device: torch.device | None = None) -> torch.dtype:
    """None -> float32: students train with fp32 master weights (autocast gives bf16 speed)."""

    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    return pick_dtype(device or torch.device("cpu"), dtype)


def _is_multimodal_type(model_type: str) -> bool:
    return model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES


# --------------------------------------------------------------------------------------------- compose


def _load_vision(vision: str, dtype: torch.dtype) -> tuple[Any, Any, Any]:
    """(vision_config, tower module with weights, image processor) from a multimodal model or a ViT checkpoint."""

    try:
        cfg = AutoConfig.from_pretrained(vision)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot load vision source {vision!r}: {str(e).splitlines()[0]}") from None
    multimodal = _is_multimodal_type(cfg.model_type)
    # multimodal models and dual encoders (SiglipModel, CLIPModel) nest it; vision-only checkpoints are it
    vision_config = getattr(cfg, "vision_config", None) or cfg
    if vision_config.model_type not in SUPPORTED_VISION_TOWERS:
        raise ValueError(
            f"vision must be a LLaVA-style multimodal model or a SigLIP/CLIP vision checkpoint whose tower is one of "
            f"{SUPPORTED_VISION_TOWERS}; got {vision!r} ({cfg.model_type}) with a {vision_config.model_type!r} tower"
        )
    try:
        image_processor = AutoImageProcessor.from_pretrained(vision)
    except (OSError, ValueError) as e:
        raise ValueError(f"vision source {vision!r} has no usable image processor: {str(e).splitlines()[0]}") from None
    if getattr(image_processor, "image_grid_pinpoints", None):
        raise ValueError(
            f"vision source {vision!r} tiles images (anyres, {type(image_processor).__name__}); the composed LLaVA "
            "student takes one fixed-size view per image: pass its SigLIP/CLIP checkpoint as vision instead"
        )
    if multimodal:
        # Loading the whole teacher is the one loader that knows every checkpoint's key layout; it costs the
        # teacher's size in CPU memory once, at composition time. dtype "auto" keeps the checkpoint's dtype.
        full, info = AutoModelForImageTextToText.from_pretrained(vision, dtype="auto", output_loading_info=True)
        tower = getattr(getattr(full, "model", full), "vision_tower", None)
        if tower is None:
            raise ValueError(f"vision source {vision!r} ({type(full).__name__}) has no vision_tower module")
        missing = [k for k in info["missing_keys"] if "vision_tower" in k]
        del full
    else:
        tower_cls = MODEL_MAPPING[type(vision_config)]  # the class LlavaModel builds for this config
        tower, info = tower_cls.from_pretrained(vision, config=vision_config, dtype="auto", output_loading_info=True)
        missing = list(info["missing_keys"])
    if missing:
        raise ValueError(f"vision source {vision!r} lacks weights for its vision tower: got no {sorted(missing)[:5]}")
    return vision_config, tower.to(dtype).eval(), image_processor


def _load_tokenizer(processor_from: str | None, llm: str) -> tuple[Any, str | None, str]:
    """(tokenizer, chat template, image token). `processor_from` wins so the student sees the cache's exact ids."""

    if processor_from is not None:
        _, src, _ = load_processor_and_config(processor_from)
        tokenizer = getattr(src, "tokenizer", src)
        template = getattr(src, "chat_template", None) or getattr(tokenizer, "chat_template", None)
        image_token = getattr(src, "image_token", None) or getattr(tokenizer, "image_token", None) or "<image>"
        return tokenizer, template, image_token
    try:
        tokenizer = AutoTokenizer.from_pretrained(llm)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot load the tokenizer of llm {llm!r}: {str(e).splitlines()[0]}") from None
    return tokenizer, getattr(tokenizer, "chat_template", None), getattr(tokenizer, "image_token", None) or "<image>"


# Put in front of a text-only LLM's chat template (compose without --processor-from): content lists become strings,
# an image item "<image>\n" before its text (LLaVA's convention), then the LLM's own template renders them.
_IMAGE_PRELUDE = (
    "{%- set kd_ns = namespace(msgs=[]) -%}"
    "{%- for m in messages -%}"
    "{%- if m['content'] is string -%}{%- set kd_ns.msgs = kd_ns.msgs + [m] -%}"
    "{%- else -%}{%- set kd_text = namespace(s='') -%}"
    "{%- for item in m['content'] -%}"
    "{%- if item['type'] == 'image' -%}{%- set kd_text.s = kd_text.s + IMAGE -%}"
    "{%- elif item['type'] == 'text' -%}{%- set kd_text.s = kd_text.s + item['text'] -%}{%- endif -%}"
    "{%- endfor -%}"
    "{%- set kd_ns.msgs = kd_ns.msgs + [{'role': m['role'], 'content': kd_text.s}] -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- set messages = kd_ns.msgs -%}"
)


def _renders_images(tokenizer: Any, template: str, image_token: str) -> bool:
    """Whether `template` places `image_token` for an image item of a message's content list."""
    probe = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "kd-probe"}]},
             {"role": "assistant", "content": [{"type": "text", "text": "kd-answer"}]}]
    try:
        out = tokenizer.apply_chat_template(probe, chat_template=template, tokenize=False)
    except Exception:  # noqa: BLE001 - any failure means it does not render content lists with images
        return False
    return image_token in out and "kd-probe" in out and "kd-answer" in out


def with_image_placeholder(tokenizer: Any, template: str | None, image_token: str) -> str | None:
    """A text-only LLM's chat template made to render images: content lists are flattened to strings with
    `image_token` + newline per image item before the LLM's own template runs (its markup, system prompt and end
    markers unchanged). A template that already places the image token is returned as it is."""
    if template is None or _renders_images(tokenizer, template, image_token):
        return template
    wrapped = _IMAGE_PRELUDE.replace("IMAGE", json.dumps(image_token + "\n")) + template
    if not _renders_images(tokenizer, wrapped, image_token):
        raise ValueError(f"the chat template of the llm renders no {image_token!r} for an image and kd cannot make "
                         "it: pass --processor-from a model whose template places images")
    return wrapped


def _warn_if_ids_disagree(tokenizer: Any, llm: str) -> None:
    """A tokenizer that maps the LLM's tokens to other ids leaves its embeddings meaning other tokens."""

    try:
        own = AutoTokenizer.from_pretrained(llm).get_vocab()
    except (OSError, ValueError):
        return
    chosen = tokenizer.get_vocab()
    moved = sum(1 for t, i in own.items() if chosen.get(t) != i)
    if moved:
        log.warning("the tokenizer from processor_from maps %d of the %d tokens of %s to other ids: the LLM's "
                    "embeddings will not match their tokens until it is trained", moved, len(own), llm)


def _dummy_image(image_processor: Any):
    size = getattr(image_processor, "crop_size", None) or getattr(image_processor, "size", None) or {}
    size = dict(size) if not isinstance(size, dict) else size
    h = size.get("height") or size.get("shortest_edge") or 336
    w = size.get("width") or size.get("shortest_edge") or 336
    return Image.new("RGB", (int(w), int(h)), (128, 128, 128))


def compose(cfg: ComposeConfig) -> Path:
    """`kd student compose`: compose_student() with the config saved beside the model."""
    args = {k: v for k, v in to_dict(cfg).items() if k != "out"}
    out = compose_student(cfg.out, **args)
    (out / "compose_config.json").write_text(json.dumps(to_dict(cfg), indent=1) + "\n", encoding="utf-8")
    return out


def compose_student(
    out_dir: str | Path,
    *,
    vision: str,
    llm: str,
    processor_from: str | None = None,
    projector_hidden_act: str = "gelu",
    vision_feature_layer: int = -1,
    vision_feature_select_strategy: str = "full",
    seed: int = 0,
    dtype: str | torch.dtype = "float32",
) -> Path:
    """Assemble vision tower (weights copied) + fresh mlp2x projector + base LLM as a LLaVA model; save it.

    `vision`: a LLaVA-style multimodal checkpoint (the teacher) or a SigLIP/CLIP (vision) checkpoint.
    `llm`: a causal LM checkpoint. `processor_from`: where the tokenizer and chat template come from
    (the teacher, so the student tokenizes exactly as the cache did); default the LLM's own tokenizer.
    The saved folder loads with `AutoModelForImageTextToText` / `AutoProcessor`. Returns `out_dir`.
    """

    if vision_feature_select_strategy not in SELECT_STRATEGIES:
        raise ValueError(f"vision_feature_select_strategy must be one of {SELECT_STRATEGIES}, "
                         f"got {vision_feature_select_strategy!r}")
    if projector_hidden_act not in ACT2FN:
        raise ValueError(f"projector_hidden_act must be a transformers activation name, got {projector_hidden_act!r}")
    if isinstance(vision_feature_layer, bool) or not isinstance(vision_feature_layer, int):
        raise ValueError(f"vision_feature_layer must be an int, got {vision_feature_layer!r}")
    torch_dtype = _torch_dtype(dtype)

    for name, what in ((vision, "vision source"), (llm, "llm"), (processor_from, "processor source")):
        if name is not None:  # before the tower is loaded: a missing folder is named, not taken for a hub id
            check_model_path(name, what)

    vision_config, tower, image_processor = _load_vision(vision, torch_dtype)
    n_layers = vision_config.num_hidden_layers
    if not -(n_layers + 1) <= vision_feature_layer <= n_layers:
        raise ValueError(f"vision_feature_layer must index one of the tower's {n_layers + 1} hidden states "
                         f"(-{n_layers + 1}..{n_layers}), got {vision_feature_layer}")

    try:
        llm_config = AutoConfig.from_pretrained(llm)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot load llm {llm!r} as a causal LM: {str(e).splitlines()[0]}") from None
    if getattr(llm_config, "vision_config", None) is not None:
        raise ValueError(f"llm {llm!r} is a multimodal model ({llm_config.model_type}); --llm takes the text-only "
                         "causal LM the student's language model starts from (e.g. Qwen/Qwen2-0.5B-Instruct); pass "
                         "this model as --vision (and --processor-from) to reuse its vision tower")
    try:
        lm = AutoModelForCausalLM.from_pretrained(llm, dtype=torch_dtype)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot load llm {llm!r} as a causal LM: {str(e).splitlines()[0]}") from None
    tokenizer, chat_template, image_token = _load_tokenizer(processor_from, llm)
    if processor_from is not None:
        _warn_if_ids_disagree(tokenizer, llm)
    if image_token not in tokenizer.get_vocab():
        tokenizer.add_tokens([image_token], special_tokens=True)
    if processor_from is None:  # the LLM's own template: most text LLMs' templates render no images
        own = chat_template
        chat_template = with_image_placeholder(tokenizer, chat_template, image_token)
        if chat_template != own:
            log.info("the chat template of %s renders no images: an image item now renders as %r before its text "
                     "(LLaVA's convention), the rest of the template unchanged", llm, image_token + "\n")
    rows = lm.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > rows:
        # Only grow: LLMs often pad their vocab (e.g. Qwen2: 151936 rows for 151646 tokens); those rows are free.
        lm.resize_token_embeddings(len(tokenizer))
    image_token_id = tokenizer.convert_tokens_to_ids(image_token)

    # Visual tokens per image: what the tower emits for one processed image, minus CLS under "default".
    pixel_values = image_processor(_dummy_image(image_processor), return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        seq = tower(pixel_values.to(torch_dtype)).last_hidden_state.shape[1]
    patch = vision_config.patch_size
    patches = (pixel_values.shape[-2] // patch) * (pixel_values.shape[-1] // patch)
    extra = seq - patches
    if extra < 0:
        raise ValueError(f"vision tower of {vision!r} emits {seq} tokens for {patches} patches; expected >= patches")
    if vision_feature_select_strategy == "default" and extra < 1:
        raise ValueError(f"vision_feature_select_strategy 'default' drops a CLS token, but the tower of {vision!r} "
                         f"has none ({seq} tokens for {patches} patches); got 'default', use 'full'")
    n_visual = seq - (1 if vision_feature_select_strategy == "default" else 0)

    config = LlavaConfig(
        vision_config=vision_config,
        text_config=lm.config,
        image_token_id=image_token_id,
        image_seq_length=n_visual,
        projector_hidden_act=projector_hidden_act,
        vision_feature_layer=vision_feature_layer,
        vision_feature_select_strategy=vision_feature_select_strategy,
    )
    # Built on the meta device and filled by moving the loaded modules in: no random init of a second LLM copy.
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    model.model.vision_tower = tower
    model.model.language_model = lm.base_model
    model.lm_head = lm.get_output_embeddings()
    torch.manual_seed(seed)
    model.model.multi_modal_projector = LlavaMultiModalProjector(config).to(torch_dtype)  # fresh, PyTorch init
    on_meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if on_meta:
        raise RuntimeError(f"composed student left tensors uninitialised: {on_meta[:5]}")
    model.eval()

    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch,
        vision_feature_select_strategy=vision_feature_select_strategy,
        num_additional_image_tokens=extra,
        chat_template=chat_template,
        image_token=image_token,
    )
    if chat_template is None:
        log.warning("the student's tokenizer (%s) has no chat template", processor_from or llm)

    gen_source = processor_from if processor_from is not None else llm
    try:  # stop/pad ids belong to the tokenizer, so take them from where the tokenizer came from
        model.generation_config = GenerationConfig.from_pretrained(gen_source)
    except (OSError, ValueError):
        model.generation_config = GenerationConfig.from_model_config(lm.config)
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None \
            else tokenizer.eos_token_id

    # The contract the cache relies on: the processor's <image> expansion == the features the model scatters.
    image = _dummy_image(image_processor)
    expected = visual_tokens_per_image(processor, image)
    if expected != n_visual:
        raise ValueError(f"composed student's processor expands an image to {expected} tokens but the model "
                         f"produces {n_visual} visual features")
    inputs = processor(text=[image_token], images=[image], return_tensors="pt")
    inputs["pixel_values"] = inputs["pixel_values"].to(torch_dtype)
    with torch.no_grad():
        model(**inputs)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_student(model, processor, out)
    return out


# --------------------------------------------------------------------------------------------- load / save


def load_student(path: str | Path, *, dtype: str | torch.dtype | None = None,
                 device: str | torch.device | None = None) -> tuple[Any, Any]:
    """(model, processor) of a student: multimodal -> AutoModelForImageTextToText + AutoProcessor, else causal LM
    + tokenizer. dtype None loads float32 (master weights for training)."""

    _, processor, multimodal = load_processor_and_config(str(path))
    dev = torch.device(device) if device is not None else None
    cls = AutoModelForImageTextToText if multimodal else AutoModelForCausalLM
    model = cls.from_pretrained(str(path), dtype=_torch_dtype(dtype, dev))
    if dev is not None:
        model = model.to(dev)
    return model, processor


def _unwrap(model: Any) -> Any:
    """The transformers model inside DDP/FSDP-style wrappers (`.module`) and torch.compile (`._orig_mod`)."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if inner is None or not isinstance(inner, torch.nn.Module):
            return model
        model = inner


def save_student(model: Any, processor: Any, out_dir: str | Path, state_dict: dict | None = None) -> Path:
    """Save model, processor (or tokenizer) and generation config so plain transformers loads the folder, and so
    does vLLM: a LLaVA's SigLIP/CLIP tower is written in the hub layout (`to_hub_layout`), which transformers
    loads to the same weights.

    `state_dict`: the full weights when they are sharded across ranks (FSDP / ZeRO-3), gathered by the caller.
    """
    model = _unwrap(model)
    if not hasattr(model, "save_pretrained"):
        raise ValueError(f"model must be a transformers PreTrainedModel, got {type(model).__name__}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, state_dict=state_dict)
    to_hub_layout(out, model.config)
    gen = getattr(model, "generation_config", None)
    if gen is not None:  # save_pretrained skips it for some models; the stop ids matter for `generate`
        gen.save_pretrained(out)
    processor.save_pretrained(out)
    return out


#: Towers whose hub checkpoints (and vLLM's loaders) nest their weights under `vision_model.`: transformers 5
#: builds these flat (`vision_tower.embeddings...`) and saves them flat, while the llava-hf checkpoints and vLLM
#: (0.32: `LlavaForConditionalGeneration` -> `SiglipVisionModel` / `CLIPVisionModel`, each a `.vision_model`) read
#: `vision_tower.vision_model.embeddings...`. transformers 5 loads both layouts to the same weights.
_NESTED_TOWERS = ("siglip_vision_model", "clip_vision_model")
_TOWER_PREFIXES = ("vision_tower.", "model.vision_tower.")


def _hub_key(key: str) -> str:
    for prefix in _TOWER_PREFIXES:
        if key.startswith(prefix):
            rest = key[len(prefix):]
            return key if rest.startswith("vision_model.") else prefix + "vision_model." + rest
    return key


def to_hub_layout(folder: str | Path, config: Any) -> int:
    """Rename a saved LLaVA's SigLIP/CLIP tower keys to the hub layout (`vision_tower.vision_model.*`), in place.

    Only the safetensors headers change (the tensor bytes are copied as they are, one shard at a time, and each
    shard replaced atomically), plus the shard index. A no-op for other models and for folders already in the hub
    layout. Returns the number of keys renamed."""
    vision = getattr(config, "vision_config", None)
    if getattr(config, "model_type", None) != "llava" or getattr(vision, "model_type", None) not in _NESTED_TOWERS:
        return 0
    import os
    import shutil
    import struct

    folder = Path(folder)
    renamed = 0
    for path in sorted(folder.glob("*.safetensors")):
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
            new = {k if k == "__metadata__" else _hub_key(k): v for k, v in header.items()}
            changed = sum(1 for k in header if k != "__metadata__" and _hub_key(k) != k)
            if not changed:
                continue
            blob = json.dumps(new, separators=(",", ":")).encode("utf-8")
            blob += b" " * (-len(blob) % 8)  # data offsets are relative to the end of the header: any length works
            tmp = path.with_name(path.name + ".kd-tmp")
            with open(tmp, "wb") as g:
                g.write(struct.pack("<Q", len(blob)))
                g.write(blob)
                shutil.copyfileobj(f, g, 16 << 20)
                g.flush()
                os.fsync(g.fileno())
        os.replace(tmp, path)
        renamed += changed
    index = folder / "model.safetensors.index.json"
    if index.exists():
        data = json.loads(index.read_text(encoding="utf-8"))
        data["weight_map"] = {_hub_key(k): v for k, v in data.get("weight_map", {}).items()}
        tmp = index.with_name(index.name + ".kd-tmp")
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        os.replace(tmp, index)
    if renamed:
        log.debug("saved %d vision tower keys of %s in the hub layout (vision_tower.vision_model.*)", renamed, folder)
    return renamed


# --------------------------------------------------------------------------------------------- trainable parts


def parameter_part(model: Any, name: str) -> str:
    """'vision' | 'projector' | 'llm' for a parameter name of a Llava, LlavaOnevision, Qwen2-VL or causal LM.

    Qwen2-VL's `visual.merger` is its projector; LLaVA-OneVision's `image_newline` trains with the projector.
    """
    segs = name.split(".")
    if "multi_modal_projector" in segs or "image_newline" in segs or ("visual" in segs and "merger" in segs):
        return "projector"
    if "vision_tower" in segs or "visual" in segs:
        return "vision"
    if "language_model" in segs or "lm_head" in segs:
        return "llm"
    if getattr(_unwrap(model).config, "vision_config", None) is None:
        return "llm"  # a text-only causal LM is all LLM
    raise ValueError(f"cannot tell whether parameter {name!r} of {type(_unwrap(model)).__name__} belongs to the "
                     f"vision tower, the projector or the language model")


def parameter_counts(model: Any) -> dict[str, int]:
    counts = dict.fromkeys([*PARTS, "trainable", "total"], 0)
    for name, p in model.named_parameters():
        n = p.numel()
        counts["total"] += n
        if p.requires_grad:
            counts[parameter_part(model, name)] += n
            counts["trainable"] += n
    return counts


def enable_gradient_checkpointing(model: Any, *, vision: bool) -> list[str]:
    """Recompute activations in backward for the student's LLM, and for its vision tower when `vision` (it trains).
    Non-reentrant checkpointing: correct with frozen inputs (DPT, LoRA). Returns the parts it was enabled on."""
    model = _unwrap(model)
    inner = getattr(model, "model", None)
    parts = {"llm": getattr(inner, "language_model", None)}
    if vision:
        parts["vision"] = getattr(inner, "vision_tower", None) or getattr(inner, "visual", None)
    if parts["llm"] is None and getattr(model.config, "vision_config", None) is None:
        parts["llm"] = model  # a text-only causal LM is all LLM
    done = []
    for name, module in parts.items():
        if module is None:
            continue
        if not getattr(module, "supports_gradient_checkpointing", False):
            raise ValueError(f"the student's {name} ({type(module).__name__}) does not support gradient "
                             "checkpointing; got --gradient-checkpointing")
        if hasattr(module, "activation_checkpointing_enable"):  # transformers >= 5.x's name
            module.activation_checkpointing_enable({"use_reentrant": False})
        else:
            module.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        done.append(name)
    if not done:
        raise ValueError(f"found no LLM in {type(model).__name__} to checkpoint; got --gradient-checkpointing")
    return done


def set_trainable(model: Any, *, vision: bool, projector: bool, llm: bool) -> dict[str, int]:
    """Freeze/unfreeze by part; returns trainable counts per part plus 'trainable' and 'total'."""
    flags = {"vision": vision, "projector": projector, "llm": llm}
    for key, v in flags.items():
        if not isinstance(v, bool):
            raise ValueError(f"{key} must be a bool, got {v!r}")
    for name, p in model.named_parameters():
        p.requires_grad_(flags[parameter_part(model, name)])
    return parameter_counts(model)


def trainable_parameters(model: Any, stage: str) -> dict[str, int]:
    """Apply a LLaVA-KD stage's freezing (see `STAGES`) and return the counts `set_trainable` returns."""
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {tuple(STAGES)}, got {stage!r}")
    counts = set_trainable(model, **STAGES[stage])
    if counts["trainable"] == 0:
        trains = [k for k, v in STAGES[stage].items() if v]
        raise ValueError(f"stage {stage!r} trains {' and '.join(trains)}, which {type(_unwrap(model)).__name__} "
                         f"does not have: got 0 trainable parameters")
    return counts


# --------------------------------------------------------------------------------------------- visual tokens


def visual_tokens_per_image(processor: Any, image: Any) -> int:
    """How many image tokens `processor` expands one image to (run on a one-image prompt, counted)."""
    image_token = getattr(processor, "image_token", None)
    if image_token is None or getattr(processor, "image_processor", None) is None:
        raise ValueError(f"processor must be a multimodal processor with an image token, got {type(processor).__name__}")
    tokenizer = getattr(processor, "tokenizer", processor)
    image_token_id = getattr(processor, "image_token_id", None)
    if image_token_id is None:
        image_token_id = tokenizer.convert_tokens_to_ids(image_token)
    out = processor(text=[image_token], images=[image], return_tensors="np")
    return int((out["input_ids"] == image_token_id).sum())
