"""Exact-match evaluation of a teacher, baseline or distilled student on LLaVA-format QA records.

Each record's last gpt turn is the reference; every turn before it is the prompt, rendered with the model's own
chat template exactly as `kd_cache.data` renders it for training (same `<image>` placement), so a student is
asked the question in the format it was distilled on. Decoding is plain greedy, so scores are deterministic
and comparable across models.

Two generation backends (`kd eval --backend`): `transformers` (the default: `generate` on left-padded batches) and
`vllm` (`vllm.LLM` on the model folder as it is, continuous batching; the same prompt token ids, the images as
`multi_modal_data`, greedy, the same `max_new_tokens` and stop ids). Both score with the same code; with vLLM the
answer NLL comes from vLLM's prompt log-probs, so the transformers model is never loaded.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path
from typing import Any

import torch

from kd_cache.data import (Encoder, RecordSource, SkipSample, image_token_id_of, load_images, max_images_for,
                           sample_id_of)
from kd_cache.hf import pick_device
from kd_cache.paths import check_input_path, check_model_path
from kd_cache.progress import progress as progress_bar, quiet_library_bars
from kd_train.student import load_student
from kd_train.validate import answer_nll

__all__ = ["BACKENDS", "normalize_answer", "evaluate", "format_table"]

# --------------------------------------------------------------------------------------------- normalisation

_NUMBER_WORDS = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
                 "sixteen seventeen eighteen nineteen twenty").split()
# Whole words only: "someone" and "twenty-one" stay as they are.
_NUMBER_RE = re.compile(r"(?<![\w-])(" + "|".join(_NUMBER_WORDS) + r")(?![\w-])")
_QUOTES = "\"'`\u201c\u201d\u2018\u2019\u00ab\u00bb"
_TRAILING = ".,;:!?\u3002"
# A label in front of the answer ("Answer: B", "The correct answer is three", "Option C") is not content.
_PREFIX_RE = re.compile(r"^(?:the\s+)?(?:correct\s+|final\s+)?(?:answer|option|choice)\b(?:\s+is)?\s*[:\-]?\s*")
# A choice letter alone or with a delimiter: "b", "(b)", "(b) square", "b)", "b:", "b. square" (after trimming,
# "B." is already "b"). A letter followed by a bare space ("a square") is an article, not a choice.
_CHOICE_RE = re.compile(r"^\(([a-z])\)(?:\s+.*)?$|^([a-z])(?:[.):]\s+.*|\))?$", re.DOTALL)
_YES_NO_RE = re.compile(r"^(yes|no)\b")
_ARTICLE_RE = re.compile(r"^(?:a|an|the)\s+")


def _trim(text: str) -> str:
    """Strip whitespace, surrounding quotes and trailing punctuation until none is left."""
    while True:
        out = text.strip().strip(_QUOTES).rstrip(_TRAILING).strip()
        if out == text:
            return out
        text = out


def answer_score(prediction: str, reference: str, record: dict | None = None) -> float:
    """Score of one prediction in [0, 1]: exact match after `normalize_answer`, unless the record says its answer
    has several right forms (kd_eval.synth's ambiguous types): `valid_answers` (any one of them: membership) or
    `answer_items` (items listed in any order, separated by commas / "and": set-F1 against them)."""
    record = record or {}
    if record.get("valid_answers"):
        return float(normalize_answer(prediction) in {normalize_answer(v) for v in record["valid_answers"]})
    if record.get("answer_items"):
        want = {_item(x) for x in record["answer_items"]}
        got = {_item(x) for x in _ITEM_SPLIT.split(" ".join(prediction.lower().split())) if _item(x)}
        return 2 * len(want & got) / (len(want) + len(got)) if got else 0.0
    return float(normalize_answer(prediction) == normalize_answer(reference))


_ITEM_SPLIT = re.compile(r"\s*,\s*|\s+and\s+")


def _item(text: str) -> str:
    """One listed item without case, surrounding punctuation or a leading article."""
    return _ARTICLE_RE.sub("", _trim(text.strip().lower()), count=1)


def normalize_answer(text: str) -> str:
    """Canonical form of a short answer, applied identically to predictions and references.

    Only differences that carry no meaning for a short answer are removed, in this order: case, whitespace runs,
    surrounding quotes and trailing punctuation; a leading "answer:"/"the answer is"/"option" label; then
    - a multiple-choice answer becomes its letter ("(B)", "B.", "B) square", "B. square" -> "b"),
    - an answer that starts with the word yes/no becomes that word ("Yes, it is." -> "yes"),
    - otherwise one leading article (a/an/the) is dropped and the number words zero..twenty become digits.
    Everything else (inner punctuation, word order, synonyms) still counts, so exact match stays strict.
    """
    if not isinstance(text, str):
        raise ValueError(f"text must be a str, got {type(text).__name__}")
    t = _trim(" ".join(text.lower().split()))
    stripped = _PREFIX_RE.sub("", t, count=1)
    if stripped and stripped != t:
        t = _trim(stripped)
    m = _CHOICE_RE.match(t)
    if m:
        return m.group(1) or m.group(2)
    m = _YES_NO_RE.match(t)
    if m:
        return m.group(1)
    t = _ARTICLE_RE.sub("", t, count=1)
    return _NUMBER_RE.sub(lambda m: str(_NUMBER_WORDS.index(m.group(1))), t)


# --------------------------------------------------------------------------------------------- evaluation


BACKENDS = ("transformers", "vllm")


def evaluate(model_path: str | os.PathLike, data: Any, images: str | os.PathLike | None = None, *,
             batch_size: int = 8, max_new_tokens: int = 32, device: str | None = None, limit: int | None = None,
             progress: bool = True, dtype: str | None = "auto", backend: str = "transformers") -> dict:
    """Greedy-decode an answer for each record and score it by exact match after `normalize_answer`.

    `data` is anything `RecordSource` takes; `limit` keeps the first `limit` records (skipped ones included).
    Records `kd_cache.data` refuses (missing image, no gpt turn, ...) are counted under `skipped` by reason;
    so is a record whose last turn is not a gpt answer, since there is nothing to score it against.
    `dtype` "auto" is bf16 on GPU and fp32 on CPU, like the teacher cache. Besides accuracy, each type and the
    whole set get `answer_nll`: the teacher-forced NLL (nats per token) of the supervised tokens of each record,
    encoded as training encodes it (kd_train/validate.py).
    `backend` "vllm" generates with a vLLM engine started on the folder as it is (`_VllmRunner`: same prompt
    token ids, greedy, same `max_new_tokens` and stop ids; `batch_size` is then the engine's concurrent
    sequences); its answer NLL comes from vLLM's prompt log-probs of the same tokens, and the transformers model
    is not loaded. Raises ValueError when vLLM is not installed, before anything is loaded.
    """

    for name, v in (("batch_size", batch_size), ("max_new_tokens", max_new_tokens)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 0):
        raise ValueError(f"limit must be a non-negative integer or None, got {limit!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend == "vllm":
        from kd_cache.vllm_backend import INSTALL_HINT, vllm_version

        if vllm_version() is None:
            raise ValueError(f"--backend vllm needs vLLM, which is not installed here; {INSTALL_HINT}")

    # what can be wrong without the model fails before it is loaded: the model folder, the data, the image folder
    check_model_path(model_path)
    if images is not None:
        check_input_path(images, "image folder", folder=True)
    t0 = time.perf_counter()
    source = RecordSource(data)
    dev = pick_device(device)

    quiet_library_bars()  # no loading bar frames in a log file (stderr not a terminal)
    if backend == "vllm":
        runner: Any = _VllmRunner(str(model_path), dev, dtype, images, batch_size=batch_size,
                                  max_new_tokens=max_new_tokens)
    else:
        runner = _TransformersRunner(str(model_path), dev, dtype, images, batch_size=batch_size,
                                     max_new_tokens=max_new_tokens)
    load_seconds = time.perf_counter() - t0
    try:
        result = _evaluate(runner, source, images, batch_size=batch_size, limit=limit, progress=progress)
    finally:
        runner.close()
    return {"model": str(model_path), "data": source.description, **result, "backend": backend,
            "seconds": round(time.perf_counter() - t0, 3), "load_seconds": round(load_seconds, 3)}


def _evaluate(runner: Any, source: RecordSource, images: Any, *, batch_size: int, limit: int | None,
              progress: bool) -> dict:
    """The backend-independent part: prompts, batches, scoring, the answer NLL and the per-type tables."""
    encoder = runner.encoder

    def prepare(index: int) -> dict:
        record = source[index]
        imgs = load_images(record, images)
        prompt, messages = encoder.prompt(record, imgs)
        reference = "".join(c.get("text", "") for c in messages[-1]["content"])
        return {"id": sample_id_of(record, index), "question_type": str(record.get("question_type") or "all"),
                "prompt": prompt, "images": imgs,
                "reference": reference,
                "scoring": {k: record[k] for k in ("valid_answers", "answer_items") if record.get(k)}}

    n_records = len(source) if limit is None else min(limit, len(source))
    predictions: list[dict] = []
    skipped: dict[str, int] = {}
    # vLLM batches continuously: hand it many prompts per call (bounded, so the loaded images stay few)
    chunk = batch_size * runner.prompts_per_batch

    bar = progress_bar(n_records, desc="eval", unit="sample", enabled=progress)  # lines in a log file
    try:
        batch: list[dict] = []
        for i in range(n_records):
            try:
                batch.append(prepare(i))
            except SkipSample as e:
                skipped[e.reason] = skipped.get(e.reason, 0) + 1
            if len(batch) == chunk or (i == n_records - 1 and batch):
                for b, pred in zip(batch, runner.generate(batch)):
                    score = answer_score(pred, b["reference"], b["scoring"])
                    predictions.append({"id": b["id"], "question_type": b["question_type"], "prediction": pred,
                                        "reference": b["reference"], "correct": score == 1.0, "score": score})
                batch = []
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()

    # teacher-forced NLL of the reference answers (nats per supervised token), scored as training encodes them

    scored, kinds = [], []
    for i in range(n_records):
        try:
            record = source[i]
        except SkipSample:
            continue
        scored.append(record)
        kinds.append(str(record.get("question_type") or "all"))
    nll = runner.answer_nll(scored)
    nll_types: dict[str, list[float]] = {}
    for kind, one in zip(kinds, nll["per_sample"]):
        if one is not None:
            nll_types.setdefault(kind, [0.0, 0])
            nll_types[kind][0] += one[0]
            nll_types[kind][1] += one[1]

    per_type: dict[str, dict] = {}
    for p in predictions:
        s = per_type.setdefault(p["question_type"], {"n": 0, "correct": 0, "score": 0.0})
        s["n"] += 1
        s["correct"] += int(p["correct"])
        s["score"] += p["score"]
    for kind, s in per_type.items():
        s["accuracy"] = s["score"] / s["n"]  # exact match; set-F1 / membership for ambiguous types
        total, tokens = nll_types.get(kind, (0.0, 0))
        s["answer_nll"] = total / tokens if tokens else None
        s["answer_tokens"] = tokens
    correct = sum(s["correct"] for s in per_type.values())
    total_score = sum(s["score"] for s in per_type.values())
    return {
        "n": len(predictions),
        "overall": {"n": len(predictions), "correct": correct, "score": total_score,
                    "accuracy": total_score / len(predictions) if predictions else None, "answer_nll": nll["nll"],
                    "answer_tokens": nll["tokens"]},
        "per_type": dict(sorted(per_type.items())),
        "skipped": {"total": sum(skipped.values()), "by_reason": dict(sorted(skipped.items()))},
        "predictions": predictions,
    }


def _add_special_tokens(tokenizer: Any, texts: list[str]) -> bool:
    """The template may already start with BOS; adding another would change what the model sees (as Encoder)."""
    bos = getattr(tokenizer, "bos_token", None)
    return not (bos and all(t.startswith(bos) for t in texts))


class _TransformersRunner:
    """`generate` on left-padded batches; answer NLL by kd_train.validate.answer_nll."""

    prompts_per_batch = 1

    def __init__(self, model_path: str, dev: torch.device, dtype: str | None, images: Any, *, batch_size: int,
                 max_new_tokens: int):
        self.model, self.processor = load_student(model_path, dtype=dtype, device=dev)
        self.model.eval()
        self.dev, self.batch_size, self.max_new_tokens = dev, batch_size, max_new_tokens
        self.tokenizer = tokenizer = getattr(self.processor, "tokenizer", self.processor)
        self.encoder = Encoder(self.processor, image_token_id_of(self.model.config, tokenizer), image_root=images,
                               max_images=max_images_for(self.model.config))
        self.dtype = next(self.model.parameters()).dtype
        pad_id = self.model.generation_config.pad_token_id
        if pad_id is None:
            pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if isinstance(pad_id, list):
            pad_id = pad_id[0]
        self.pad_id = pad_id

    def generate(self, batch: list[dict]) -> list[str]:
        tokenizer, processor = self.tokenizer, self.processor
        texts = [b["prompt"] for b in batch]
        add_special = _add_special_tokens(tokenizer, texts)
        saved = (tokenizer.padding_side, tokenizer.pad_token)
        try:
            # Generation needs prompts flush right (new tokens then start at one column for every row).
            tokenizer.padding_side = "left"
            if tokenizer.pad_token is None:
                tokenizer.pad_token = tokenizer.convert_ids_to_tokens(self.pad_id)
            if self.encoder.is_multimodal:
                flat = [img for b in batch for img in b["images"]]
                inputs = processor(text=texts, images=flat or None, padding=True, add_special_tokens=add_special,
                                   return_tensors="pt")
            else:
                inputs = tokenizer(texts, padding=True, add_special_tokens=add_special, return_tensors="pt")
        finally:
            tokenizer.padding_side, tokenizer.pad_token = saved
        inputs = {k: (v.to(self.dev, self.dtype) if v.is_floating_point() else v.to(self.dev))
                  for k, v in inputs.items() if isinstance(v, torch.Tensor)}
        with torch.no_grad():
            out = self.model.generate(**inputs, do_sample=False, num_beams=1, repetition_penalty=1.0,
                                      max_new_tokens=self.max_new_tokens, pad_token_id=self.pad_id)
        # Left padding puts every prompt's end at the same column, so the answer is everything after it.
        new = out[:, inputs["input_ids"].shape[1]:]
        return [s.strip() for s in tokenizer.batch_decode(new, skip_special_tokens=True)]

    def answer_nll(self, records: list[dict]) -> dict:
        return answer_nll(self.model, self.encoder, records, self.pad_id, batch_size=self.batch_size,
                          dtype=self.dtype)

    def close(self) -> None:
        pass


class _VllmRunner:
    """A vLLM engine on the model folder as it is (`vllm.LLM(model=folder)`), for `evaluate(backend="vllm")`.

    Prompts are the token ids the transformers path feeds `generate` (the student's processor and chat template,
    unpadded), with each run of image tokens collapsed to one and the images passed as `multi_modal_data`; vLLM
    expands the placeholders itself and its expanded prompt must equal those ids (checked per request).
    Greedy (temperature 0), `max_new_tokens`, stopping at the generation config's EOS ids like `generate`;
    prefix caching off (a cached prefix has no prompt log-probs). Engine settings can be added as JSON in
    `KD_VLLM_ENGINE_ARGS`, as for the cache backend.
    """

    prompts_per_batch = 32  # prompts handed to the engine per call, in units of batch_size

    def __init__(self, model_path: str, dev: torch.device, dtype: str | None, images: Any, *, batch_size: int,
                 max_new_tokens: int):
        import json

        from transformers import GenerationConfig

        from kd_cache.hf import load_processor_and_config, pick_dtype, text_config
        from kd_cache.vllm_backend import _ENGINE_CLIENT_THREADS, _cpu_kv_bytes, _fields, preflight

        preflight()
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        self.config, self.processor, multimodal = load_processor_and_config(model_path)
        self.tokenizer = tokenizer = getattr(self.processor, "tokenizer", self.processor)
        self.image_token_id = image_token_id_of(self.config, tokenizer) if multimodal else None
        max_images = max_images_for(self.config)
        self.encoder = Encoder(self.processor, self.image_token_id, image_root=images, max_images=max_images)
        self.images, self.max_new_tokens = images, max_new_tokens
        try:
            gen = GenerationConfig.from_pretrained(model_path)
        except (OSError, ValueError):
            gen = GenerationConfig.from_model_config(self.config)
        eos = gen.eos_token_id if gen.eos_token_id is not None else tokenizer.eos_token_id
        self.stop_ids = [int(x) for x in (eos if isinstance(eos, list) else [eos]) if x is not None]

        from vllm import LLM
        from vllm.platforms import current_platform

        on_cpu = current_platform.is_cpu()
        if dev.type == "cuda" and dev.index is not None and "CUDA_VISIBLE_DEVICES" not in os.environ:
            os.environ["CUDA_VISIBLE_DEVICES"] = str(dev.index)
        torch_dtype = pick_dtype(torch.device("cpu" if on_cpu else "cuda"), dtype)
        kwargs: dict[str, Any] = dict(model=model_path, dtype=str(torch_dtype).replace("torch.", ""), seed=0,
                                      logprobs_mode="raw_logprobs", enable_prefix_caching=False,
                                      max_num_seqs=batch_size, generation_config="vllm")
        if multimodal:
            kwargs["limit_mm_per_prompt"] = {"image": max(1, max_images or 8)}
        if on_cpu and not os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
            cfg = text_config(self.config)
            longest = int(getattr(cfg, "max_position_embeddings", None) or 4096)
            tokens = max(batch_size * (min(longest, 4096) + max_new_tokens), longest)
            kwargs["kv_cache_memory_bytes"] = _cpu_kv_bytes(cfg, torch_dtype, 1, tokens - 1)
        kwargs.update(json.loads(os.environ.get("KD_VLLM_ENGINE_ARGS") or "{}"))
        import threading

        before = set(threading.enumerate())
        self.llm = LLM(**kwargs)
        self._threads = [t for t in threading.enumerate() if t not in before and t.name in _ENGINE_CLIENT_THREADS]
        self._skip_prefix = "skip_reading_prefix_cache" in _fields()

    def _request(self, ids: list[int], imgs: list) -> dict:
        """The prompt for vLLM: `ids` with each run of image tokens collapsed to one, and the images."""
        if self.image_token_id is None or not imgs:
            return {"prompt_token_ids": ids}
        collapsed: list[int] = []
        for x in ids:
            if not (x == self.image_token_id and collapsed and collapsed[-1] == x):
                collapsed.append(x)
        return {"prompt_token_ids": collapsed, "multi_modal_data": {"image": imgs}}

    def _check(self, want: list[int], r: Any, what: str) -> None:
        got = [int(x) for x in r.prompt_token_ids]
        if got != want:
            diff = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
            raise ValueError(f"{what}: vLLM's prompt differs from the processor's token ids at token {diff} "
                             f"({len(got)} vs {len(want)} tokens): vLLM expands the image placeholders differently "
                             "from the model's processor; use --backend transformers for this model")

    def generate(self, batch: list[dict]) -> list[str]:
        from vllm import SamplingParams

        texts = [b["prompt"] for b in batch]
        add_special = _add_special_tokens(self.tokenizer, texts)
        ids = []
        for b in batch:  # one prompt at a time: no padding, the same ids as a row of the transformers batch
            if self.encoder.is_multimodal:
                enc = self.processor(text=[b["prompt"]], images=b["images"] or None, add_special_tokens=add_special,
                                     return_tensors="np")
            else:
                enc = self.tokenizer([b["prompt"]], add_special_tokens=add_special, return_tensors="np")
            ids.append([int(x) for x in enc["input_ids"][0]])
        # stop where `generate` stops: at the generation config's EOS ids only (ignore_eos drops the tokenizer's
        # own EOS, which vLLM would otherwise add; the two agree for nearly every model)
        params = SamplingParams(temperature=0.0, max_tokens=self.max_new_tokens, stop_token_ids=self.stop_ids,
                                ignore_eos=True, skip_special_tokens=True, detokenize=False)
        results = self.llm.generate([self._request(i, b["images"]) for i, b in zip(ids, batch)], params,
                                    use_tqdm=False)
        for want, b, r in zip(ids, batch, results):
            self._check(want, r, f"record {b['id']!r}")
        outs = [list(r.outputs[0].token_ids) for r in results]
        return [s.strip() for s in self.tokenizer.batch_decode(outs, skip_special_tokens=True)]

    def answer_nll(self, records: list[dict]) -> dict:
        """`kd_train.validate.answer_nll`'s result from vLLM's prompt log-probs (fp32 log-softmax of the raw
        logits) of the observed tokens at the supervised rows."""
        from vllm import SamplingParams

        kw: dict[str, Any] = dict(max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False)
        if self._skip_prefix:
            kw["skip_reading_prefix_cache"] = True
        params = SamplingParams(**kw)
        per_sample: list[tuple[float, int] | None] = [None] * len(records)
        skipped: dict[str, int] = {}
        pending: list[tuple[int, Any, list]] = []

        def flush() -> None:
            reqs = [self._request([int(x) for x in s.input_ids], imgs) for _, s, imgs in pending]
            for (i, s, _), r in zip(pending, self.llm.generate(reqs, params, use_tqdm=False)):
                ids = [int(x) for x in s.input_ids]
                self._check(ids, r, f"sample {s.sample_id!r}")
                total = 0.0
                for t in s.text_positions:
                    total -= float(r.prompt_logprobs[int(t) + 1][ids[int(t) + 1]].logprob)
                per_sample[i] = (total, len(s.text_positions))
            pending.clear()

        for i, record in enumerate(records):
            try:
                imgs = load_images(record, self.images)
                pending.append((i, self.encoder.encode(record, i, images=imgs), imgs))
            except SkipSample as e:
                skipped[e.reason] = skipped.get(e.reason, 0) + 1
                continue
            if len(pending) == 256:
                flush()
        if pending:
            flush()
        scored = [p for p in per_sample if p is not None]
        total, tokens = float(sum(s for s, _ in scored)), int(sum(n for _, n in scored))
        return {"nll": total / tokens if tokens else None, "tokens": tokens, "samples": len(scored),
                "skipped": dict(sorted(skipped.items())), "per_sample": per_sample}

    def close(self) -> None:
        """Shut the engine down and wait for vLLM's client threads (as `VllmTeacher.close`). Idempotent."""
        llm, self.llm = getattr(self, "llm", None), None
        core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
        if core is not None:
            try:
                core.shutdown()
            except Exception:  # noqa: BLE001 - best effort
                pass
        del llm, core
        threads, self._threads = getattr(self, "_threads", []), []
        for t in threads:
            t.join(timeout=30.0)


# --------------------------------------------------------------------------------------------- reporting


def _labels(results: list[dict]) -> list[str]:
    """Short column names (the model folder's name), falling back to the full string when they collide."""
    short = [Path(str(r.get("model", ""))).name or str(r.get("model", "")) for r in results]
    labels = short if len(set(short)) == len(short) else [str(r.get("model", "")) for r in results]
    if len(set(labels)) != len(labels):
        labels = [f"{lab} #{i + 1}" for i, lab in enumerate(labels)]
    return labels


def _cell(stats: dict | None) -> str:
    if not stats or not stats.get("n"):
        return "-"
    return f"{100 * stats.get('score', stats['correct']) / stats['n']:.1f}% (n={stats['n']})"


def format_table(results: list[dict]) -> str:
    """Accuracy per question type and overall, one column per model, so models on the same data line up."""
    if not isinstance(results, list) or not results:
        raise ValueError(f"results must be a non-empty list of `evaluate` results, got {results!r:.80}")
    types = sorted({t for r in results for t in r.get("per_type", {})})
    rows = [["question type", *_labels(results)]]
    rows += [[t, *(_cell(r.get("per_type", {}).get(t)) for r in results)] for t in types]
    rows.append(["overall", *(_cell(r.get("overall")) for r in results)])
    rows.append(["skipped", *(str(r.get("skipped", {}).get("total", 0)) for r in results)])
    nll = [r.get("overall", {}).get("answer_nll") for r in results]
    rows.append(["answer NLL (nats/token)", *("-" if v is None else f"{v:.4f}" for v in nll)])
    widths = [max(len(row[c]) for row in rows) for c in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) if c == 0 else cell.rjust(w) for c, (cell, w) in enumerate(zip(row, widths)))
             .rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
