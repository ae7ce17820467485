"""Inputs: LLaVA-format conversations -> the exact token sequence and supervision mask a model sees.

This is the single place where a conversation becomes tokens. `kd cache build` and `kd train` both call
`encode_sample`, so teacher and student agree on every token, every visual position and every
supervised position.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import jinja2
import numpy as np
from PIL import Image, UnidentifiedImageError

from kd_cache.files import sha256_file

IMAGE_PLACEHOLDER = "<image>"
ROLE_MAP = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


class ChatTemplateError(jinja2.TemplateError, ValueError):
    """A chat template refused a conversation (its own `raise_exception`): a ValueError (one `error:` line, exit 2)
    that is still the jinja2 TemplateError it was."""


class SkipSample(Exception):
    """A sample that cannot be used. `reason` is a short stable key counted in the manifest."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


# --------------------------------------------------------------------------------------------- records


class RecordSource(Sequence):
    """Random access to LLaVA-format records from a JSON/JSONL/Parquet file or a `datasets` dataset.

    JSONL files are indexed by line offsets, so only the records in use are held in memory.
    """

    def __init__(self, data: Any):
        self.description: str
        self._records: Any = None
        self._jsonl: tuple[str, np.ndarray] | None = None
        if isinstance(data, (str, os.PathLike)):
            self._open_path(str(data))
        elif hasattr(data, "__getitem__") and hasattr(data, "__len__"):
            # a `datasets.Dataset` or a plain list of dicts
            self._records = data
            fp = getattr(data, "_fingerprint", None)
            self.description = f"in-memory dataset ({type(data).__name__})"
            self.fingerprint = str(fp) if fp else _sha256_bytes(json.dumps(list(data), default=str).encode())
        else:
            raise ValueError(f"data must be a path or a dataset, got {type(data).__name__}")

    def _open_path(self, path: str) -> None:
        self.description = path
        p = Path(path)
        if p.is_dir():
            import datasets  # deferred: importing datasets takes ~0.6 s; only these sources need it

            if (p / "dataset_info.json").exists() or (p / "state.json").exists() or (p / "dataset_dict.json").exists():
                ds = datasets.load_from_disk(str(p))
                if isinstance(ds, datasets.DatasetDict):
                    split = "train" if "train" in ds else next(iter(ds))
                    ds = ds[split]
                self._records = ds
                self.fingerprint = f"datasets:{ds._fingerprint}"
                return
            raise ValueError(f"data folder {path} is not a dataset saved with `datasets.save_to_disk`")
        if not p.exists():
            if path.startswith("hf://datasets/") or path.startswith("hf:"):
                import datasets  # deferred: importing datasets takes ~0.6 s; only these sources need it

                name = path.split("hf://datasets/", 1)[-1] if "hf://datasets/" in path else path[3:]
                name, _, split = name.partition(":")
                self._records = datasets.load_dataset(name, split=split or "train")
                self.fingerprint = f"datasets:{self._records._fingerprint}"
                return
            raise FileNotFoundError(f"data file not found: {path}")
        self.fingerprint = f"sha256:{sha256_file(p)}"
        suffix = p.suffix.lower()
        if suffix == ".jsonl":
            self._jsonl = (str(p), _line_offsets(p))
        elif suffix == ".json":
            try:
                with open(p, "rb") as f:
                    records = json.load(f)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ValueError(f"data file {path} is not valid JSON: {e}") from None
            if not isinstance(records, list):
                raise ValueError(f"data file {path} must hold a JSON list of samples, got {type(records).__name__}")
            self._records = records
        elif suffix == ".parquet":
            import datasets  # deferred: importing datasets takes ~0.6 s; only these sources need it

            self._records = datasets.load_dataset("parquet", data_files=str(p), split="train")
        else:
            raise ValueError(f"data file must be .json, .jsonl, .parquet or a saved dataset folder, got {path}")

    def __len__(self) -> int:
        if self._jsonl is not None:
            return len(self._jsonl[1])
        return len(self._records)

    def __getitem__(self, i: int) -> dict:  # type: ignore[override]
        if self._jsonl is not None:
            path, offsets = self._jsonl
            with open(path, "rb") as f:
                f.seek(int(offsets[i]))
                line = f.readline()
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise SkipSample("invalid record", f"line {i + 1}: {e}") from None
        else:
            rec = self._records[i]
        if not isinstance(rec, dict):
            raise SkipSample("invalid record", f"record {i} is a {type(rec).__name__}, expected an object")
        return rec

    def __iter__(self) -> Iterator[dict]:
        for i in range(len(self)):
            yield self[i]


def _line_offsets(path: Path) -> np.ndarray:
    offsets = []
    pos = 0
    with open(path, "rb") as f:
        for line in f:
            if line.strip():
                offsets.append(pos)
            pos += len(line)
    return np.asarray(offsets, dtype=np.int64)


def _sha256_bytes(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def sample_id_of(record: dict, index: int) -> str:
    sid = record.get("id", record.get("sample_id"))
    return str(sid) if sid is not None and str(sid) != "" else f"#{index}"


# --------------------------------------------------------------------------------------------- images


def load_images(record: dict, image_root: str | os.PathLike | None) -> list:
    """The record's images as RGB PIL images. Raises SkipSample for missing/corrupt/escaping paths."""

    raw = record.get("image", record.get("images"))
    if raw is None or raw == "" or raw == []:
        return []
    items = raw if isinstance(raw, (list, tuple)) else [raw]
    out = []
    for item in items:
        if isinstance(item, Image.Image):
            out.append(item.convert("RGB"))
            continue
        if isinstance(item, dict):  # `datasets` Image feature with decode=False
            if item.get("bytes"):
                try:
                    img = Image.open(io.BytesIO(item["bytes"]))
                    img.load()
                except (UnidentifiedImageError, OSError, ValueError) as e:
                    raise SkipSample("corrupt image", str(e)) from None
                out.append(img.convert("RGB"))
                continue
            item = item.get("path")
        if not isinstance(item, str) or not item:
            raise SkipSample("missing image", f"unusable image entry {item!r}")
        path = resolve_image_path(item, image_root)
        if not path.exists():
            raise SkipSample("missing image", str(path))
        try:
            with Image.open(path) as img:
                img.load()
                out.append(img.convert("RGB"))
        except (UnidentifiedImageError, OSError, ValueError) as e:
            raise SkipSample("corrupt image", f"{path}: {e}") from None
    return out


def resolve_image_path(rel: str, image_root: str | os.PathLike | None) -> Path:
    """Join an image path to the root and refuse paths that escape it (`../`, absolute, symlinks out)."""
    if image_root is None:
        return Path(rel)
    root = Path(image_root).resolve()
    path = (root / rel).resolve()
    if path != root and root not in path.parents:
        raise SkipSample("image path escapes image root", rel)
    return path


# --------------------------------------------------------------------------------------------- messages


def build_messages(conversations: Any, n_images: int) -> list[dict]:
    """LLaVA `conversations` -> chat-template messages with `{"type": "image"}` items in place of `<image>`.

    An image with no placeholder follows LLaVA's convention: the placeholder goes before the first human turn.
    """
    if not isinstance(conversations, list) or not conversations:
        raise SkipSample("invalid record", "conversations must be a non-empty list")
    turns = []
    for turn in conversations:
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            raise SkipSample("invalid record", "each turn needs a string 'value'")
        role = ROLE_MAP.get(str(turn.get("from", turn.get("role", ""))).lower())
        if role is None:
            raise SkipSample("invalid record", f"unknown speaker {turn.get('from')!r}")
        turns.append((role, turn["value"]))
    n_placeholders = sum(v.count(IMAGE_PLACEHOLDER) for _, v in turns)
    if n_images and n_placeholders == 0:
        first_user = next((i for i, (r, _) in enumerate(turns) if r == "user"), None)
        if first_user is None:
            raise SkipSample("invalid record", "no human turn to attach the image to")
        role, value = turns[first_user]
        turns[first_user] = (role, IMAGE_PLACEHOLDER * n_images + "\n" + value)
        n_placeholders = n_images
    if n_placeholders != n_images:
        raise SkipSample("image placeholder mismatch", f"{n_placeholders} <image> placeholders for {n_images} images")
    if not any(r == "assistant" for r, _ in turns):
        raise SkipSample("no response", "no gpt/assistant turn")
    messages = []
    for role, value in turns:
        if role == "assistant":
            if not value.strip():
                raise SkipSample("empty answer")
            messages.append({"role": role, "content": [{"type": "text", "text": value}]})
            continue
        content: list[dict] = []
        for j, part in enumerate(value.split(IMAGE_PLACEHOLDER)):
            if j > 0:
                content.append({"type": "image"})
            part = part.strip("\n") if j > 0 or IMAGE_PLACEHOLDER in value else part
            if part:
                content.append({"type": "text", "text": part})
        messages.append({"role": role, "content": content})
    return messages


def _text_only(messages: list[dict]) -> list[dict]:
    """Plain-string contents, for tokenizers whose chat templates know nothing of content lists."""
    return [{"role": m["role"], "content": "".join(c.get("text", "") for c in m["content"])} for m in messages]


# --------------------------------------------------------------------------------------------- encoding


@dataclass
class EncodedSample:
    """One sample as the model sees it. Positions index `input_ids` (and the logits rows)."""

    sample_id: str
    input_ids: np.ndarray  # (L,) int64, image tokens expanded
    labels_mask: np.ndarray  # (L,) bool, True where the token is supervised (assistant tokens)
    visual_positions: np.ndarray  # (Nv,) int64, rows whose input token is an image token
    text_positions: np.ndarray  # (Nt,) int64, rows t whose next token t+1 is supervised
    model_inputs: dict = field(default_factory=dict)  # processor outputs except input_ids (pixels, masks, ...)
    n_images: int = 0


@dataclass
class Encoder:
    """Wraps a processor (multimodal) or a tokenizer (text-only) and turns records into `EncodedSample`s.

    What is supervised (`labels_mask`): every token carrying at least one character of an assistant turn's
    span, i.e. the answer text (plus what the template puts between the generation prompt and it) and the
    end-of-turn marker that follows it. A template that writes no end marker (no special token of the
    tokenizer) after an answer, like the LLaVA-1.5 / LLaVA-NeXT (Vicuna) templates, gets the tokenizer's EOS
    inserted right after the answer text, supervised with it, as original LLaVA training did;
    `append_eos=False` turns that off (the answer alone is then supervised).
    """

    processor: Any
    image_token_id: int | None
    image_root: str | None = None
    max_length: int | None = None
    max_images: int | None = None
    append_eos: bool = True
    # chat template -> whether it renders plain-string contents (text-only path; see render)
    _takes_strings: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def tokenizer(self):
        return getattr(self.processor, "tokenizer", self.processor)

    @property
    def is_multimodal(self) -> bool:
        return self.image_token_id is not None and self.processor is not self.tokenizer

    def encode(self, record: dict, index: int = 0, images: list | None = None) -> EncodedSample:
        sid = sample_id_of(record, index)
        if images is None:
            images = load_images(record, self.image_root)
        self.check_images(images)
        messages = build_messages(record.get("conversations"), len(images))
        full = self.render(messages)
        eos = getattr(self.tokenizer, "eos_token", None) if self.append_eos else None
        full, spans = _assistant_spans(self.render, messages, full, _special_tokens(self.tokenizer), eos)
        bos = getattr(self.tokenizer, "bos_token", None)
        add_special = not (bos and full.startswith(bos))

        plain = self.tokenizer(full, add_special_tokens=add_special, return_offsets_mapping=True)
        u_ids = np.asarray(plain["input_ids"], dtype=np.int64)
        offsets = np.asarray(plain["offset_mapping"], dtype=np.int64).reshape(-1, 2)
        a, b = offsets[:, 0], offsets[:, 1]
        u_mask = np.zeros(len(u_ids), dtype=bool)
        for s, e in spans:
            # every token that carries a character of the span: a byte-level BPE token that merges the answer's
            # first word with the space before it (" three") straddles the span start and is still the answer
            u_mask |= (b > a) & (a < e) & (b > s)
        if self.is_multimodal:
            out = self.processor(text=[full], images=images or None, add_special_tokens=add_special, return_tensors="np")
            ids = np.asarray(out.pop("input_ids"))[0].astype(np.int64)
            mask = _expand_mask(u_ids, u_mask, ids, self.image_token_id)
            model_inputs = {k: np.asarray(v) for k, v in out.items()}
        else:
            ids, mask, model_inputs = u_ids, u_mask, {"attention_mask": np.ones((1, len(u_ids)), dtype=np.int64)}
        visual = np.flatnonzero(ids == self.image_token_id) if self.image_token_id is not None else np.zeros(0, np.int64)
        if len(images) and len(visual) == 0:
            raise SkipSample("tokenization mismatch", "images given but no image tokens produced")
        if self.max_length is not None and len(ids) > self.max_length:
            if len(visual) and visual[-1] >= self.max_length:
                raise SkipSample("over max length", f"{len(ids)} tokens with visual tokens past max_length={self.max_length}")
            ids, mask = ids[: self.max_length], mask[: self.max_length]
            model_inputs = {k: (v[:, : self.max_length] if k in _SEQ_KEYS else v) for k, v in model_inputs.items()}
        text = np.flatnonzero(mask[1:]).astype(np.int64)
        if len(text) == 0:
            reason = "over max length" if self.max_length is not None and len(ids) == self.max_length else "no response"
            raise SkipSample(reason, "no supervised tokens left")
        return EncodedSample(
            sample_id=sid,
            input_ids=ids,
            labels_mask=mask,
            visual_positions=visual.astype(np.int64),
            text_positions=text,
            model_inputs=model_inputs,
            n_images=len(images),
        )

    def check_images(self, images: list) -> None:
        """The image rules of every use of this encoder (training, caching, generation): SkipSample otherwise."""
        if images and not self.is_multimodal:
            raise SkipSample("model takes no images", "text-only teacher/student")
        if self.max_images is not None and len(images) > self.max_images:
            raise SkipSample("too many images", f"{len(images)} images, the model takes {self.max_images}")

    def prompt(self, record: dict, images: list) -> tuple[str, list[dict]]:
        """(the conversation up to its last answer rendered for generation, all its messages): what a model is
        asked at evaluation time, with the same image rules and chat template as `encode`."""
        self.check_images(images)
        messages = build_messages(record.get("conversations"), len(images))
        if messages[-1]["role"] != "assistant":
            raise SkipSample("no response", "the last turn is not a gpt answer")
        return self.render(messages[:-1], add_generation_prompt=True), messages

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        target = self.processor if self.is_multimodal else self.tokenizer
        template = getattr(target, "chat_template", None)
        if template is None:
            raise ValueError("the processor/tokenizer has no chat template; pass a model that ships one")
        msgs = messages
        if not self.is_multimodal and self._template_takes_strings(target, template):
            msgs = _text_only(messages)
        try:
            return target.apply_chat_template(msgs, tokenize=False, add_generation_prompt=add_generation_prompt)
        # the template refuses the conversation (e.g. it renders no images), or crashes on a content list
        except (jinja2.TemplateError, TypeError) as e:
            raise ChatTemplateError(f"the chat template of {type(target).__name__} cannot render this conversation "
                             f"({type(e).__name__}: {e}); give the model a template that renders it (a multimodal "
                             "student needs one that places the image token, e.g. --processor-from a LLaVA model)"
                             ) from None

    def _template_takes_strings(self, target, template) -> bool:
        """Text-only path: give the template plain-string contents, unless it only renders content lists (the
        LLaVA processors' templates iterate `message['content']` items and would silently drop a string)."""
        key = template if isinstance(template, str) else json.dumps(template, sort_keys=True, default=str)
        if key not in self._takes_strings:
            probe = [{"role": "user", "content": "kd-probe-question"}, {"role": "assistant", "content": "kd-probe-answer"}]

            def renders(msgs: list[dict]) -> bool:
                try:
                    out = target.apply_chat_template(msgs, tokenize=False)
                except Exception:  # noqa: BLE001 - any template error means "not this form"
                    return False
                return "kd-probe-question" in out and "kd-probe-answer" in out

            # strings unless they vanish (or fail) where content lists render
            self._takes_strings[key] = renders(probe) or not renders(
                [{"role": m["role"], "content": [{"type": "text", "text": m["content"]}]} for m in probe])
        return self._takes_strings[key]


# Processor outputs laid out along the token axis (truncated and padded with input_ids).
_SEQ_KEYS = ("attention_mask", "mm_token_type_ids", "token_type_ids")


def _special_tokens(tokenizer) -> list[str]:
    """The tokenizer's special tokens (named ones and added tokens flagged special), longest first."""
    found = set(getattr(tokenizer, "all_special_tokens", None) or ())
    for t in (getattr(tokenizer, "added_tokens_decoder", None) or {}).values():
        if getattr(t, "special", False):
            found.add(str(t))
    return sorted((t for t in found if t), key=len, reverse=True)


def _assistant_spans(render, messages: list[dict], full: str, specials: Sequence[str] = (),
                     eos: str | None = None) -> tuple[str, list[tuple[int, int]]]:
    """Character spans of each assistant turn (its text and end-of-turn marker) in the rendered conversation.

    Returns the rendered text (with `eos` inserted after every answer the template leaves without an end
    marker, when `eos` is given) and the spans in it. A turn's span starts where the generation prompt ends
    (prefix-stable templates) or at the answer text (others) and ends after the end marker: the first special
    token the template writes after the answer (within the turn; right after it for templates that are not
    prefix-stable), else the inserted `eos`, else the answer (or the turn's rendering, whitespace stripped).
    """
    turns = []  # (start, answer end or None, end without inserting eos, end marker found)
    cursor = 0
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        text = "".join(c.get("text", "") for c in m["content"])
        before = render(messages[:i], add_generation_prompt=True)
        upto = render(messages[: i + 1])
        if full.startswith(before) and full.startswith(upto) and len(upto) > len(before):
            start, turn_end = len(before), len(upto.rstrip())
            answer_end = _find_answer(full, text, start, turn_end)
            marker_end = None
            if answer_end is not None:
                marker_end = _first_special_end(full, answer_end, turn_end, specials)
            end = marker_end if marker_end is not None else turn_end
        else:  # template is not prefix-stable (e.g. it injects dates): find the answer text itself, preferably
            # where the template writes it (after the same characters as in `upto`, so not inside a question)
            k = upto.rfind(text)
            context = upto[max(0, k - 32):k] if k >= 0 else ""
            start = full.find(context + text, cursor) if context else -1
            start = start + len(context) if start >= 0 else full.find(text, cursor)
            if start < 0:
                raise SkipSample("tokenization mismatch", "assistant turn not found in the rendered chat template")
            answer_end = start + len(text)
            marker_end = next((answer_end + len(t) for t in specials if full.startswith(t, answer_end)), None)
            end = marker_end if marker_end is not None else answer_end
        turns.append((start, answer_end, end, marker_end is not None))
        cursor = end
    if not eos:
        return full, [(s, e) for s, _, e, _ in turns]
    out, spans, shift, last = [], [], 0, 0
    for start, answer_end, end, has_marker in turns:
        if has_marker or answer_end is None:
            spans.append((start + shift, end + shift))
            continue
        out.append(full[last:answer_end] + eos)
        last = answer_end
        spans.append((start + shift, answer_end + shift + len(eos)))
        shift += len(eos)
    out.append(full[last:])
    return "".join(out), spans


def _find_answer(full: str, text: str, start: int, end: int) -> int | None:
    """End of the answer text inside full[start:end] (as written, or trimmed as some templates do), or None."""
    for t in (text, text.strip()):
        if t:
            i = full.find(t, start, end)
            if i >= 0:
                return i + len(t)
    return None


def _first_special_end(full: str, pos: int, end: int, specials: Sequence[str]) -> int | None:
    """End of the first special token in full[pos:end], or None if there is none."""
    best = None
    for t in specials:
        i = full.find(t, pos, end)
        if i >= 0 and (best is None or i < best[0]):
            best = (i, i + len(t))
    return None if best is None else best[1]


def _expand_mask(u_ids: np.ndarray, u_mask: np.ndarray, ids: np.ndarray, image_token_id: int) -> np.ndarray:
    """Carry the supervision mask from the unexpanded token sequence to the image-expanded one.

    The processor only multiplies image tokens, so every other token must match one to one; anything else
    means the processor changed the text and the sample is refused rather than silently misaligned.
    """
    mask = np.zeros(len(ids), dtype=bool)
    i = j = 0
    while i < len(u_ids) and j < len(ids):
        if u_ids[i] == image_token_id:
            while i < len(u_ids) and u_ids[i] == image_token_id:
                i += 1
            if ids[j] != image_token_id:
                break
            while j < len(ids) and ids[j] == image_token_id:
                j += 1
            continue
        if u_ids[i] != ids[j]:
            break
        mask[j] = u_mask[i]
        i += 1
        j += 1
    if i != len(u_ids) or j != len(ids):
        raise SkipSample("tokenization mismatch", f"processor output diverges from the tokenizer at token {j}")
    return mask


def image_token_id_of(config: Any, tokenizer: Any) -> int | None:
    """The token id that marks visual positions, from the model config (or the tokenizer as a fallback)."""
    for name in ("image_token_id", "image_token_index"):
        v = getattr(config, name, None)
        if isinstance(v, int):
            return v
    tok = getattr(tokenizer, "image_token", None)
    if tok:
        return tokenizer.convert_tokens_to_ids(tok)
    return None


def max_images_for(config: Any, max_images: int | None = None) -> int | None:
    """The images per sample a model takes: `max_images` when given, else the model's own rule (None: no limit).

    LLaVA-1.5 (model type "llava") was trained on one image per sample, so its samples with more are skipped
    rather than shown to it out of distribution; the builder, the vLLM engine and `kd eval` all ask here.
    """
    if max_images is not None:
        return max_images
    return 1 if getattr(config, "model_type", None) == "llava" else None
