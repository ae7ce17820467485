"""Hugging Face glue shared by the teacher, the trainer and the evaluator: loading a processor and config, devices
and dtypes, batching encoded samples, fingerprints, and the small rules every caller needs the same way (the pad
id, the text config of a multimodal config, the LM head's vocabulary, the logit transform)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import AutoConfig, AutoProcessor, AutoTokenizer
from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

from kd_cache.data import EncodedSample
from kd_cache.files import hash_stream
from kd_cache.paths import check_model_path


def tokenizer_of(processor: Any) -> Any:
    """The tokenizer of a multimodal processor, or the tokenizer itself."""
    return getattr(processor, "tokenizer", processor)


def pad_token_id(tokenizer: Any) -> int:
    """The id batches are padded with: the pad token, else EOS, else 0 (padded rows are masked anyway)."""
    tok = tokenizer_of(tokenizer)
    if tok.pad_token_id is not None:
        return tok.pad_token_id
    return tok.eos_token_id or 0


def text_config(config: Any) -> Any:
    """The language model's config of a multimodal config, or the config itself."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def head_vocab_size(model: torch.nn.Module) -> int:
    """Rows of the LM head: the logits' width (may exceed the tokenizer's size; padded embedding tables)."""
    return model.get_output_embeddings().weight.shape[0]


def pick_device(device: str | None = None) -> torch.device:
    """`device` if given, else this rank's GPU (LOCAL_RANK) when CUDA is available, else CPU."""
    if device and device != "auto":
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def pick_dtype(device: torch.device, dtype: str | None = None) -> torch.dtype:
    """bf16 on GPUs that support it (fp16 otherwise), fp32 on CPU, unless the user says otherwise."""
    if dtype and dtype != "auto":
        table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
                 "float16": torch.float16, "fp16": torch.float16}
        if dtype not in table:
            raise ValueError(f"dtype must be one of auto, {', '.join(table)}; got {dtype!r}")
        return table[dtype]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def logit_transform(config: Any):
    """The transform a model's forward applies to its LM head's output, or None when the head's output is the logits.

    kd forms logits from the head at the rows it needs (never the model's full forward), so it must apply the same
    transform, on the teacher and on the student alike: Gemma-2/3 style `final_logit_softcapping`
    (cap * tanh(z / cap)), Cohere's `logit_scale` (z * s), Granite's `logits_scaling` (z / s) and HyperCLOVA X's
    (z * s). A `logits_scaling` of another model type is refused rather than guessed (its direction differs).
    """
    cfg = text_config(config)
    steps = []
    model_type = str(getattr(cfg, "model_type", "") or getattr(config, "model_type", ""))
    scaling = getattr(cfg, "logits_scaling", None)
    if scaling not in (None, 1, 1.0):
        if model_type.startswith("granite"):
            steps.append(lambda z, s=float(scaling): z / s)
        elif model_type.startswith("hyperclovax"):
            steps.append(lambda z, s=float(scaling): z * s)
        else:
            raise ValueError(f"model type {model_type!r} sets logits_scaling={scaling} and kd does not know whether "
                             "its forward multiplies or divides by it; got an unsupported model")
    scale = getattr(cfg, "logit_scale", None)
    if model_type.startswith("cohere") and scale not in (None, 1, 1.0):
        steps.append(lambda z, s=float(scale): z * s)
    cap = getattr(cfg, "final_logit_softcapping", None)
    if cap:
        steps.append(lambda z, c=float(cap): torch.tanh(z / c) * c)
    if not steps:
        return None

    def apply(z: torch.Tensor) -> torch.Tensor:
        for step in steps:
            z = step(z)
        return z

    return apply


def load_processor_and_config(name: str, *, trust_remote_code: bool = False, revision: str | None = None):
    """(config, processor_or_tokenizer, is_multimodal) without loading weights; clear errors for bad names."""

    check_model_path(name)  # a missing folder is named as such, not answered with the hub's repo-id rule
    try:
        config = AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code, revision=revision)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot load model {name!r}: {str(e).splitlines()[0]}") from None
    multimodal = config.model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES or (
        trust_remote_code and "AutoModelForImageTextToText" in (getattr(config, "auto_map", None) or {})
    )
    if multimodal:
        processor = AutoProcessor.from_pretrained(name, trust_remote_code=trust_remote_code, revision=revision)
    else:
        processor = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code, revision=revision)
    return config, processor, multimodal


def tokenizer_fingerprint(processor: Any) -> dict:
    """Everything that decides which token ids a text becomes: vocab, special tokens, chat template."""
    tok = getattr(processor, "tokenizer", processor)
    vocab = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    special = {k: str(v) for k, v in sorted(tok.special_tokens_map.items())}
    template = getattr(processor, "chat_template", None) or getattr(tok, "chat_template", None) or ""
    if not isinstance(template, str):
        template = json.dumps(template, sort_keys=True)
    parts = {
        "vocab_size": len(tok),
        "vocab_sha256": hashlib.sha256(json.dumps(vocab).encode()).hexdigest(),
        "special_tokens": special,
        "chat_template_sha256": hashlib.sha256(template.encode()).hexdigest(),
    }
    parts["fingerprint"] = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]
    return parts


def weights_fingerprint(name: str, revision: str | None = None) -> dict:
    """Teacher identity: the hub revision when known, and a sha256 over local weight files when they are local."""
    out: dict[str, Any] = {"id": name, "revision": revision}
    p = Path(name)
    if p.is_dir():
        h = hashlib.sha256()
        files = sorted(f for f in p.iterdir() if f.suffix in (".safetensors", ".bin", ".gguf", ".pt"))
        for f in files:
            h.update(f.name.encode())
            with open(f, "rb") as fh:
                hash_stream(h, fh, 1 << 24)
        out["weights_sha256"] = h.hexdigest()
        out["weight_files"] = [f.name for f in files]
    return out


SEQ_KEYS = ("input_ids", "attention_mask", "mm_token_type_ids", "token_type_ids")


def collate(samples: list[EncodedSample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad token-axis tensors; concatenate per-image tensors (pixels, grids, sizes) along dim 0."""
    L = max(len(s.input_ids) for s in samples)
    B = len(samples)
    out: dict[str, torch.Tensor] = {"input_ids": torch.full((B, L), pad_id, dtype=torch.long),
                                    "attention_mask": torch.zeros((B, L), dtype=torch.long)}
    for b, s in enumerate(samples):
        n = len(s.input_ids)
        out["input_ids"][b, :n] = torch.from_numpy(s.input_ids)
        out["attention_mask"][b, :n] = 1
    keys = sorted({k for s in samples for k in s.model_inputs} - {"input_ids", "attention_mask"})
    for key in keys:
        if key in SEQ_KEYS:
            t = torch.zeros((B, L), dtype=torch.long)
            for b, s in enumerate(samples):
                if key in s.model_inputs:
                    v = torch.from_numpy(np.asarray(s.model_inputs[key])[0][: len(s.input_ids)])
                    t[b, : len(v)] = v
            out[key] = t
            continue
        parts = [torch.from_numpy(np.asarray(s.model_inputs[key])) for s in samples if key in s.model_inputs]
        if len(parts) > 1 and parts[0].dim() >= 2 and len({p.shape[1:] for p in parts}) > 1:
            # e.g. LLaVA-OneVision patch counts differ per image: pad dim 1 (image_sizes tells the model the truth)
            m = max(p.shape[1] for p in parts)
            parts = [torch.nn.functional.pad(p, [0, 0] * (p.dim() - 2) + [0, m - p.shape[1]]) for p in parts]
        out[key] = torch.cat(parts, dim=0)
    return out
