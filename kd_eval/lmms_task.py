"""LLaVA-format test records as a local lmms-eval task, scored with `kd eval`'s own scoring.

`write_lmms_task(data, out)` (what `kd data synth --lmms-task DIR` calls on its test split) writes

    DIR/data/           the records as a `datasets.DatasetDict` ({"test": ...}) saved with `save_to_disk`, images
                        embedded as `datasets.Image()` (PNG bytes): the folder is self-contained
    DIR/kd_synth.yaml   the task: `dataset_kwargs: {load_from_disk: true}`, greedy `generation_kwargs`,
                        `process_results` / aggregation from this module
    DIR/utils.py        the `!function` targets: re-exports of this module's functions (kd must be installed in
                        the venv that runs lmms-eval)

and lmms-eval reads it offline:

    lmms-eval --model llava_hf --model_args pretrained=<student final/>,device=cpu,device_map=cpu --tasks kd_synth \
        --include_path DIR --batch_size 1 --output_path out/

The score is `kd_eval.evaluate.answer_score` (exact match after `normalize_answer`; set-F1 / membership for the
ambiguous types), so lmms-eval's `accuracy` equals `kd eval`'s overall accuracy on the same records when the two
generate the same answers. They do (tests/kd_eval/test_lmms_eval.py) because the prompt is built the same way:
lmms-eval's `llava_hf` (its chat-model class, the default) renders `doc_to_messages` with the processor's chat
template, and `doc_to_messages` gives it the conversation up to the last answer exactly as `kd eval` builds it
(`kd_cache.data.build_messages`: the image items where the `<image>` placeholders were). Two differences remain
that this module cannot remove; both are about the model folder, not the records:

- stopping: `llava_hf` passes `eos_token_id=tokenizer.eos_token_id` to `generate`, `kd eval` stops at the
  generation config's EOS ids. They agree when the tokenizer's EOS token is the token the chat template ends an
  assistant turn with (Qwen2-Instruct tokenizers: `<|im_end|>`); `stop_mismatch(model)` says when they do not.
- sampling settings: `llava_hf` leaves the generation config's `repetition_penalty` (and the like) in force, `kd
  eval` decodes with `repetition_penalty=1.0`; `stop_mismatch` reports a generation config that sets one.

lmms-eval's other `llava_hf` class (`--force_simple`) renders `doc_to_text` with the *tokenizer's* template and
string contents instead; `doc_to_visual` / `doc_to_text` are provided for it, but only the default path is tested.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["TASK_NAME", "LmmsTask", "aggregate_mean", "doc_to_messages", "doc_to_target", "doc_to_text",
           "doc_to_visual", "process_results", "stop_mismatch", "write_lmms_task"]

TASK_NAME = "kd_synth"
SPLIT = "test"

_UTILS = '''"""lmms-eval `!function` targets of {yaml}: kd's own prompt building and scoring (kd_eval/lmms_task.py).

Written by `kd data synth --lmms-task`; needs kd installed in the venv that runs lmms-eval (pip install -e <kd>).
"""

try:
    from kd_eval.lmms_task import (aggregate_mean, doc_to_messages, doc_to_target, doc_to_text,  # noqa: F401
                                   doc_to_visual, process_results)
except ImportError as e:  # pragma: no cover - only where kd is missing
    raise ImportError(f"the {task} lmms-eval task scores with kd's own code: install kd in this venv "
                      f"(pip install -e <kd checkout>), got: {{e}}") from e
'''


@dataclass(frozen=True)
class LmmsTask:
    """What `write_lmms_task` wrote: the folder for `--include_path`, the task name for `--tasks`."""

    folder: Path
    yaml: Path
    utils: Path
    dataset: Path
    task: str
    n: int


# --------------------------------------------------------------------------------------------- writing


def _columns(records: list[dict]) -> list[str]:
    """Every key of every record, first-seen order (Dataset.from_list would keep only the first record's)."""
    keys: dict[str, None] = {}
    for r in records:
        keys.update(dict.fromkeys(r))
    return list(keys)


def _image_entry(record: dict, image_root: Path | None) -> Any:
    """The record's image(s) as `datasets.Image()` values: the file's bytes as they are (PNG stays PNG)."""
    from kd_cache.data import resolve_image_path

    raw = record.get("image", record.get("images"))
    if raw is None or raw == "" or raw == []:
        return None
    items = raw if isinstance(raw, (list, tuple)) else [raw]
    out = []
    for item in items:
        if not isinstance(item, str):
            raise ValueError(f"record {record.get('id')!r}: image entries must be paths, got {type(item).__name__}")
        path = resolve_image_path(item, image_root)
        if not path.is_file():
            raise FileNotFoundError(f"record {record.get('id')!r}: image not found: {path}")
        out.append({"bytes": path.read_bytes(), "path": item})
    return out if isinstance(raw, (list, tuple)) else out[0]


def write_lmms_task(data: str | os.PathLike, out: str | os.PathLike, *, images: str | os.PathLike | None = None,
                    task: str = TASK_NAME, max_new_tokens: int = 32) -> LmmsTask:
    """Write the LLaVA-format records of `data` (a .json / .jsonl file; image paths relative to `images`) as the
    lmms-eval task `task` in the folder `out` (see the module docstring). `max_new_tokens` is the task's
    generation limit: `kd eval`'s default, so both generate the same answers. Returns where things went."""
    import datasets

    from kd_cache.data import RecordSource

    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if not task or not all(c.isalnum() or c in "_-" for c in task):
        raise ValueError(f"task must be a non-empty name of letters, digits, _ and -, got {task!r}")
    source = RecordSource(data)
    records = [dict(source[i]) for i in range(len(source))]
    if not records:
        raise ValueError(f"{data}: no records to write")
    root = Path(images).resolve() if images is not None else None
    folder = Path(out).resolve()
    folder.mkdir(parents=True, exist_ok=True)

    columns = _columns(records)
    image_key = "images" if "images" in columns and "image" not in columns else "image"
    table: dict[str, list] = {}
    for key in columns:
        if key == image_key:
            table[key] = [_image_entry(r, root) for r in records]
        elif key == "scene":  # structured metadata: one JSON string, so records of any shape share a schema
            table[key] = [None if r.get(key) is None else json.dumps(r[key], sort_keys=True) for r in records]
        else:
            table[key] = [r.get(key) for r in records]
    # the reference answer (the last turn), for lmms-eval's `doc_to_target` and its sample logs
    table["answer"] = [str(r["conversations"][-1]["value"]) if r.get("conversations") else "" for r in records]
    ds = datasets.Dataset.from_dict(table)
    if image_key in table:
        is_list = any(isinstance(v, list) for v in table[image_key])
        feature = datasets.Image()
        ds = ds.cast_column(image_key, datasets.List(feature) if is_list else feature)
    dataset_dir = folder / "data"
    bars = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # "Saving the dataset" frames: not worth a line of `kd data synth` output
    try:
        datasets.DatasetDict({SPLIT: ds}).save_to_disk(str(dataset_dir))
    finally:
        if bars:
            datasets.enable_progress_bars()

    yaml_path = folder / f"{task}.yaml"
    yaml_path.write_text(_task_yaml(task, dataset_dir, max_new_tokens), encoding="utf-8")
    utils_path = folder / "utils.py"
    utils_path.write_text(_UTILS.format(yaml=yaml_path.name, task=task), encoding="utf-8")
    return LmmsTask(folder=folder, yaml=yaml_path, utils=utils_path, dataset=dataset_dir, task=task, n=len(records))


def _task_yaml(task: str, dataset_dir: Path, max_new_tokens: int) -> str:
    # json.dumps gives a YAML-safe double-quoted string for the path
    return f"""# lmms-eval task written by `kd data synth --lmms-task` (kd_eval/lmms_task.py): the records of a LLaVA-format
# test split, asked as `kd eval` asks them and scored with kd's own scoring (kd_eval.evaluate.answer_score).
#   lmms-eval --model llava_hf --model_args pretrained=<model>,device=cpu,device_map=cpu --tasks {task} \\
#       --include_path {json.dumps(str(dataset_dir.parent))} --batch_size 1 --output_path <out>
# Offline: the dataset is the folder below (datasets.load_from_disk), images embedded.
task: {task}
dataset_path: {json.dumps(str(dataset_dir))}
dataset_kwargs:
  load_from_disk: true
test_split: {SPLIT}
output_type: generate_until
doc_to_messages: !function utils.doc_to_messages
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: !function utils.doc_to_target
# greedy, as `kd eval` decodes (its default --max-new-tokens is 32)
generation_kwargs:
  max_new_tokens: {max_new_tokens}
  temperature: 0
  top_p: 1.0
  num_beams: 1
  do_sample: false
process_results: !function utils.process_results
metric_list:
  - metric: accuracy
    aggregation: !function utils.aggregate_mean
    higher_is_better: true
  - metric: exact_match
    aggregation: !function utils.aggregate_mean
    higher_is_better: true
metadata:
  version: 1.0
  generator: kd_eval.lmms_task
"""


# --------------------------------------------------------------------------------------------- task functions


def _images(doc: dict) -> list:
    from kd_cache.data import load_images

    return load_images(doc, None)


def doc_to_messages(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> list[dict]:
    """The conversation before the last answer, as lmms-eval chat messages: exactly the messages `kd eval` renders
    with the processor's chat template (`kd_cache.data.build_messages`), each image item carrying its image."""
    from kd_cache.data import build_messages

    imgs = _images(doc)
    messages = build_messages(doc.get("conversations"), len(imgs))
    if messages[-1]["role"] != "assistant":
        raise ValueError(f"record {doc.get('id')!r}: the last turn is not a gpt answer")
    it = iter(imgs)
    out = []
    for m in messages[:-1]:
        content = [{"type": "image", "url": next(it)} if c["type"] == "image" else dict(c) for c in m["content"]]
        out.append({"role": m["role"], "content": content})
    return out


def doc_to_visual(doc: dict) -> list:
    """The record's images (RGB PIL), for lmms-eval's simple model classes."""
    return _images(doc)


def doc_to_text(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> str:
    """The last question without its `<image>` placeholder (lmms-eval's simple `llava_hf` puts `<image>\\n` in
    front itself); earlier turns are not part of it: multi-turn records need the chat path (`doc_to_messages`)."""
    from kd_cache.data import IMAGE_PLACEHOLDER

    turns = doc.get("conversations") or []
    question = next((t["value"] for t in reversed(turns[:-1]) if t.get("from") in ("human", "user")), "")
    return question.replace(IMAGE_PLACEHOLDER, "").strip("\n")


def doc_to_target(doc: dict) -> str:
    """The reference answer: the record's last turn."""
    turns = doc.get("conversations") or []
    return str(turns[-1]["value"]) if turns else str(doc.get("answer", ""))


def process_results(doc: dict, results: list) -> dict:
    """kd's score of the generated answer: `answer_score` (exact match after `normalize_answer`, or membership /
    set-F1 when the record lists `valid_answers` / `answer_items`); the answer is stripped as `kd eval` strips it.
    Each metric keeps the record id and prediction, so lmms-eval's sample log lines up with `kd eval`'s."""
    from kd_eval.evaluate import answer_score

    first = results[0] if results else ""
    prediction = str(getattr(first, "text", first)).strip()
    reference = doc_to_target(doc)
    scoring = {k: doc[k] for k in ("valid_answers", "answer_items") if doc.get(k)}
    score = answer_score(prediction, reference, scoring)
    row = {"id": doc.get("id"), "question_type": doc.get("question_type"), "prediction": prediction,
           "reference": reference}
    return {"accuracy": {**row, "score": score}, "exact_match": {**row, "score": float(score == 1.0)}}


def aggregate_mean(items: list) -> float:
    """Mean score over the records (`kd eval`'s overall `accuracy`, or its `correct / n` for exact_match)."""
    scores = [float(x["score"]) if isinstance(x, dict) else float(x) for x in items]
    return sum(scores) / len(scores) if scores else 0.0


# --------------------------------------------------------------------------------------------- checks


def stop_mismatch(model: str | os.PathLike) -> list[str]:
    """Why lmms-eval's `llava_hf` could decode `model` differently from `kd eval` (empty: it cannot). Reads only
    the folder's tokenizer and generation config files."""
    folder = Path(model)
    problems = []
    tok_cfg = _read_json(folder / "tokenizer_config.json")
    gen = _read_json(folder / "generation_config.json")
    eos_token = tok_cfg.get("eos_token")
    if isinstance(eos_token, dict):
        eos_token = eos_token.get("content")
    eos_ids = gen.get("eos_token_id")
    eos_ids = [] if eos_ids is None else eos_ids if isinstance(eos_ids, list) else [eos_ids]
    if eos_token is not None and eos_ids:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(folder))
        eos_id = tok.convert_tokens_to_ids(eos_token)
        if eos_ids != [eos_id]:
            problems.append(f"lmms-eval's llava_hf stops only at the tokenizer's EOS {eos_token!r} (id {eos_id}), kd "
                            f"eval at the generation config's EOS ids {eos_ids}: answers differ where the model "
                            "emits one of those first")
    penalty = gen.get("repetition_penalty")
    if penalty not in (None, 1.0):
        problems.append(f"the generation config sets repetition_penalty={penalty}: lmms-eval's llava_hf applies it, "
                        "kd eval decodes with repetition_penalty=1.0")
    return problems


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
