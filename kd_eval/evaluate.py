"""Exact-match evaluation of a teacher, baseline or distilled student on LLaVA-format QA records.

Each record's last gpt turn is the reference; every turn before it is the prompt, rendered with the model's own
chat template exactly as `kd_cache.data` renders it for training (same `<image>` placement), so a student is
asked the question in the format it was distilled on. Decoding is plain greedy, so scores are deterministic
and comparable across models.
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

__all__ = ["normalize_answer", "evaluate", "format_table"]

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


def evaluate(model_path: str | os.PathLike, data: Any, images: str | os.PathLike | None = None, *,
             batch_size: int = 8, max_new_tokens: int = 32, device: str | None = None, limit: int | None = None,
             progress: bool = True, dtype: str | None = "auto") -> dict:
    """Greedy-decode an answer for each record and score it by exact match after `normalize_answer`.

    `data` is anything `RecordSource` takes; `limit` keeps the first `limit` records (skipped ones included).
    Records `kd_cache.data` refuses (missing image, no gpt turn, ...) are counted under `skipped` by reason;
    so is a record whose last turn is not a gpt answer, since there is nothing to score it against.
    `dtype` "auto" is bf16 on GPU and fp32 on CPU, like the teacher cache. Besides accuracy, each type and the
    whole set get `answer_nll`: the teacher-forced NLL (nats per token) of the supervised tokens of each record,
    encoded as training encodes it (kd_train/validate.py).
    """

    for name, v in (("batch_size", batch_size), ("max_new_tokens", max_new_tokens)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 0):
        raise ValueError(f"limit must be a non-negative integer or None, got {limit!r}")

    # what can be wrong without the model fails before it is loaded: the model folder, the data, the image folder
    check_model_path(model_path)
    if images is not None:
        check_input_path(images, "image folder", folder=True)
    t0 = time.perf_counter()
    source = RecordSource(data)
    dev = pick_device(device)

    quiet_library_bars()  # no loading bar frames in a log file (stderr not a terminal)
    model, processor = load_student(model_path, dtype=dtype, device=dev)
    model.eval()
    tokenizer = getattr(processor, "tokenizer", processor)
    encoder = Encoder(processor, image_token_id_of(model.config, tokenizer), image_root=images,
                      max_images=max_images_for(model.config))
    model_dtype = next(model.parameters()).dtype

    pad_id = model.generation_config.pad_token_id
    if pad_id is None:
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if isinstance(pad_id, list):
        pad_id = pad_id[0]

    def prepare(index: int) -> dict:
        record = source[index]
        imgs = load_images(record, images)
        prompt, messages = encoder.prompt(record, imgs)
        reference = "".join(c.get("text", "") for c in messages[-1]["content"])
        return {"id": sample_id_of(record, index), "question_type": str(record.get("question_type") or "all"),
                "prompt": prompt, "images": imgs,
                "reference": reference,
                "scoring": {k: record[k] for k in ("valid_answers", "answer_items") if record.get(k)}}

    def generate(batch: list[dict]) -> list[str]:
        texts = [b["prompt"] for b in batch]
        bos = getattr(tokenizer, "bos_token", None)
        # The template may already start with BOS; adding another would change what the model sees (as Encoder).
        add_special = not (bos and all(t.startswith(bos) for t in texts))
        if encoder.is_multimodal:
            flat = [img for b in batch for img in b["images"]]
            inputs = processor(text=texts, images=flat or None, padding=True, add_special_tokens=add_special,
                               return_tensors="pt")
        else:
            inputs = tokenizer(texts, padding=True, add_special_tokens=add_special, return_tensors="pt")
        inputs = {k: (v.to(dev, model_dtype) if v.is_floating_point() else v.to(dev)) for k, v in inputs.items()
                  if isinstance(v, torch.Tensor)}
        with torch.no_grad():
            out = model.generate(**inputs, do_sample=False, num_beams=1, repetition_penalty=1.0,
                                 max_new_tokens=max_new_tokens, pad_token_id=pad_id)
        # Left padding puts every prompt's end at the same column, so the answer is everything after it.
        new = out[:, inputs["input_ids"].shape[1]:]
        return [s.strip() for s in tokenizer.batch_decode(new, skip_special_tokens=True)]

    n_records = len(source) if limit is None else min(limit, len(source))
    predictions: list[dict] = []
    skipped: dict[str, int] = {}
    saved = (tokenizer.padding_side, tokenizer.pad_token)

    bar = progress_bar(n_records, desc="eval", unit="sample", enabled=progress)  # lines in a log file
    try:
        # Generation needs prompts flush right (new tokens then start at one column for every row); restored after.
        tokenizer.padding_side = "left"
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.convert_ids_to_tokens(pad_id)
        batch: list[dict] = []
        for i in range(n_records):
            try:
                batch.append(prepare(i))
            except SkipSample as e:
                skipped[e.reason] = skipped.get(e.reason, 0) + 1
            if len(batch) == batch_size or (i == n_records - 1 and batch):
                for b, pred in zip(batch, generate(batch)):
                    score = answer_score(pred, b["reference"], b["scoring"])
                    predictions.append({"id": b["id"], "question_type": b["question_type"], "prediction": pred,
                                        "reference": b["reference"], "correct": score == 1.0, "score": score})
                batch = []
            if bar is not None:
                bar.update(1)
    finally:
        tokenizer.padding_side, tokenizer.pad_token = saved
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
    nll = answer_nll(model, encoder, scored, pad_id, batch_size=batch_size, dtype=model_dtype)
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
        "model": str(model_path),
        "data": source.description,
        "n": len(predictions),
        "overall": {"n": len(predictions), "correct": correct, "score": total_score,
                    "accuracy": total_score / len(predictions) if predictions else None, "answer_nll": nll["nll"],
                    "answer_tokens": nll["tokens"]},
        "per_type": dict(sorted(per_type.items())),
        "skipped": {"total": sum(skipped.values()), "by_reason": dict(sorted(skipped.items()))},
        "predictions": predictions,
        "seconds": round(time.perf_counter() - t0, 3),
    }


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
