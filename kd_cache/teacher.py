"""Teacher runner (transformers backend): load any LLaVA-family model (or a causal LM) and compute targets."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kd_cache.data import EncodedSample, image_token_id_of
from kd_cache.targets import TargetOptions, gram_factors, row_targets, to_host


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
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
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
    from transformers import AutoConfig, AutoProcessor, AutoTokenizer
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    from kd_cache.paths import check_model_path

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
                while block := fh.read(1 << 24):
                    h.update(block)
        out["weights_sha256"] = h.hexdigest()
        out["weight_files"] = [f.name for f in files]
    return out


@dataclass
class SampleTargets:
    """Host-side targets for one sample, ready for the writer."""

    sample_index: int
    sample_id: str
    input_ids: np.ndarray
    text_positions: np.ndarray
    visual_positions: np.ndarray
    text: dict  # numpy arrays: topk_ids/topk_logprobs/tail_logprob/logsumexp or sample_ids/sample_counts/...
    visual: dict
    gram: dict | None  # {"dense": (Nv, Nv)} or the low-rank parts {mean, eigvals, scales, eigvecs}


class Teacher:
    """A loaded teacher. `targets(batch)` runs one batched no-grad forward and returns host-side targets."""

    def __init__(self, name: str, *, device: str | None = None, dtype: str | None = None,
                 trust_remote_code: bool = False, revision: str | None = None, attn_implementation: str | None = None):
        from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

        self.name = name
        self.config, self.processor, self.multimodal = load_processor_and_config(
            name, trust_remote_code=trust_remote_code, revision=revision
        )
        self.device = pick_device(device)
        self.dtype = pick_dtype(self.device, dtype)
        cls = AutoModelForImageTextToText if self.multimodal else AutoModelForCausalLM
        kwargs: dict[str, Any] = {"dtype": self.dtype, "trust_remote_code": trust_remote_code, "revision": revision}
        if attn_implementation:
            kwargs["attn_implementation"] = attn_implementation
        self.model = cls.from_pretrained(name, **kwargs).to(self.device).eval()
        tok = getattr(self.processor, "tokenizer", self.processor)
        self.image_token_id = image_token_id_of(self.config, tok) if self.multimodal else None
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
        self.transform = logit_transform(self.config)

    @torch.no_grad()
    def hidden_and_head(self, batch: dict) -> tuple[torch.Tensor, torch.nn.Module]:
        """Final hidden states (B, L, D) and the LM head, so logits are only formed at the rows we keep.

        Materialising (B, L, V) logits for a 152K vocabulary costs gigabytes; the rows we need are a subset.
        """
        base = self.model.model
        out = base(**batch, use_cache=False, return_dict=True)
        return out.last_hidden_state, self.model.get_output_embeddings()

    def row_logits(self, hidden: torch.Tensor, head: torch.nn.Module, rows: torch.Tensor) -> torch.Tensor:
        z = head(hidden[rows])
        return z if self.transform is None else self.transform(z)

    @torch.no_grad()
    def targets(self, samples: list[tuple[int, EncodedSample]], opts: TargetOptions) -> list[SampleTargets]:
        """One batched forward; targets for every sample computed on the teacher's device, then copied."""
        batch = collate([s for _, s in samples], self.pad_id)
        batch = {k: v.to(self.device) for k, v in batch.items()}
        if "pixel_values" in batch and batch["pixel_values"].is_floating_point():
            batch["pixel_values"] = batch["pixel_values"].to(self.dtype)
        hidden, head = self.hidden_and_head(batch)
        pending = []
        for b, (index, s) in enumerate(samples):
            # sampled targets depend on (seed, sample) only, never on batching or rank
            gen = torch.Generator(device=self.device).manual_seed(opts.seed * 1_000_003 + index)
            h = hidden[b]
            zt = self.row_logits(h, head, torch.as_tensor(s.text_positions, device=self.device))
            zv = self.row_logits(h, head, torch.as_tensor(s.visual_positions, device=self.device))
            tt = row_targets(zt, opts.text_kind, opts.text_k, opts.samples, gen)
            vt = row_targets(zv, opts.visual_kind, opts.visual_k, opts.samples, gen)
            g = None
            if opts.gram and len(s.visual_positions):
                g = gram_factors(zv, tolerance=opts.gram_tolerance, lowrank=opts.gram_lowrank)
            pending.append((index, s, tt, vt, g))
        # all device work is queued before the first host copy
        return [SampleTargets(sample_index=index, sample_id=s.sample_id, input_ids=s.input_ids,
                              text_positions=s.text_positions, visual_positions=s.visual_positions,
                              text=to_host(tt), visual=to_host(vt), gram=None if g is None else to_host(g))
                for index, s, tt, vt, g in pending]

    def close(self) -> None:
        """Release the model. `build()` calls this when the build ends (the vLLM teacher stops its engine there)."""
        self.model = None


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
