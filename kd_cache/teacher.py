"""Teacher runner (transformers backend): load any LLaVA-family model (or a causal LM) and compute targets."""

from __future__ import annotations

from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

from kd_cache.codec import SampleTargets
from kd_cache.data import EncodedSample, image_token_id_of
from kd_cache.hf import (collate, head_vocab_size, load_processor_and_config, logit_transform, pad_token_id,
                         pick_device, pick_dtype, tokenizer_of)
from kd_cache.targets import TargetOptions, gram_factors, observed_logprobs, row_targets, to_host


class Teacher:
    """A loaded teacher. `targets(batch)` runs one batched no-grad forward and returns host-side targets."""

    def __init__(self, name: str, *, device: str | None = None, dtype: str | None = None,
                 trust_remote_code: bool = False, revision: str | None = None, attn_implementation: str | None = None):

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
        tok = tokenizer_of(self.processor)
        self.image_token_id = image_token_id_of(self.config, tok) if self.multimodal else None
        self.pad_id = pad_token_id(tok)
        self.vocab_size = head_vocab_size(self.model)
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
            obs = observed_logprobs(zt, torch.as_tensor(s.input_ids[s.text_positions + 1], device=self.device))
            vt = row_targets(zv, opts.visual_kind, opts.visual_k, opts.samples, gen)
            g = None
            if opts.gram and len(s.visual_positions):
                g = gram_factors(zv, tolerance=opts.gram_tolerance, lowrank=opts.gram_lowrank)
            pending.append((index, s, tt, obs, vt, g))
        # all device work is queued before the first host copy
        return [SampleTargets(sample_index=index, sample_id=s.sample_id, input_ids=s.input_ids,
                              text_positions=s.text_positions, visual_positions=s.visual_positions,
                              text=to_host(tt) | {"observed_logprob": obs.cpu().numpy()}, visual=to_host(vt),
                              gram=None if g is None else to_host(g))
                for index, s, tt, obs, vt, g in pending]

    def close(self) -> None:
        """Release the model. `build()` calls this when the build ends (the vLLM teacher stops its engine there)."""
        self.model = None


