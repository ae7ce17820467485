"""Cross-tokenizer alignment: which teacher tokens and which student tokens cover the same bytes of an answer.

A teacher cache holds one distribution per supervised teacher token; a student with another tokenizer has one per
supervised student token. To compare them (the cross-tokenizer losses, `kd_train/cross_losses.py`), each answer's
tokens are grouped so that a group's teacher tokens and its student tokens cover the same **bytes** of the answer
text. Bytes, not characters: byte-level BPE (GPT-2, SmolLM2, Qwen, Llama-3) splits a multi-byte character across
tokens (東 = e6 9d b1 may be `æĿ` + `±`), and a sentencepiece tokenizer with byte fallback writes an unknown
character as `<0xF0><0x9F>...`, so character offsets cannot say where such a token ends.

Two steps, both pure Python (numpy only for flags), no torch:

* `token_bytes(tokenizer) -> TokenBytes`: per token id, the UTF-8 bytes the token contributes to decoded text when
  it follows another token, read from the tokenizer's backend (its decoder chain; the pre-tokenizer and model when
  there is no decoder), never guessed from how token strings look:

  - byte-level BPE (`ByteLevel` decoder): each character of the token stands for one byte (GPT-2's
    byte-to-unicode map: `Ġ` = 0x20, `Ċ` = 0x0a), so a token may hold part of a character;
  - sentencepiece style (`Metaspace` decoder, or Llama-2/Mistral's `Replace("▁", " ")`): `▁` is a space; byte
    fallback tokens `<0xHH>` (a `ByteFallback` decoder, or a BPE model with `byte_fallback`) are the byte 0xHH;
  - WordPiece (`WordPiece` decoder): a continuation token `##ing` is b"ing"; a word-start token gets the space the
    decoder writes before it (b" the"; the decoder writes none before the first token of a text, which a per-id
    table cannot know, so the space is always there and the alignment tolerates it, below). WordPiece's
    pre-tokenizer drops whitespace and splits punctuation, so its token bytes keep every non-space byte of the
    text but not its spacing: `TokenBytes.keeps_whitespace` is False;
  - Unigram, BPE with `</w>` suffixes (`BPEDecoder`), `Strip` / `Fuse` / `CTC` members of a decoder `Sequence`:
    as the decoder writes them mid-text;
  - special tokens (added tokens flagged special, and the tokenizer's named special tokens): b"", flagged in
    `TokenBytes.special`; non-special added tokens go through the decoder like any token, as `tokenizers` does.

  The result is cached per tokenizer object (invalidated when tokens are added); 49K ids take ~0.1 s, 150K ~0.3 s.

* `align(teacher_ids, teacher_bytes, student_ids, student_bytes) -> list[Group]`: the ids are one answer's
  supervised tokens on each side (the answer text and its end-of-answer marker). The trailing end markers
  (`teacher_end` / `student_end`, by default the trailing special tokens) form the last group, mapped to each
  other (`</s>` <-> `<|im_end|>` <-> `<|eot_id|>`). The other tokens are grouped between *cuts*: a cut is a
  teacher token boundary and a student token boundary with the same text before them, so each group covers the
  same bytes on both sides. Groups are one-to-one, one-to-many, many-to-one, or many-to-many where no boundary
  meets (e.g. `ĠĠ` `x` against `Ġ` `Ġx`).

What "the same text" means (`whitespace=`):

* ``"exact"``: the two answers' bytes must be equal, and a cut is where both sides have a boundary at the same byte
  offset; every group's teacher bytes equal its student bytes.
* ``"loose"`` (default): only the non-whitespace bytes must be equal (ASCII whitespace: space, tab, newline, CR,
  VT, FF). Templates and tokenizers disagree on whitespace around an answer: a byte-level token " three" carries
  the space that the Vicuna template writes after "ASSISTANT:" while a ChatML student's answer starts at "three";
  Llama-3's template trims the answer; a legacy sentencepiece tokenizer adds `▁` after a special token; WordPiece
  keeps no spacing. A cut is placed where both sides have seen the same non-whitespace bytes *and* sit at the
  same place of the whitespace run there (the same whitespace since the last non-whitespace byte; before the first
  one, the same whitespace still to come, so an answer's own leading spaces pair up whatever the template put
  before them): where the whitespace is the same, the groups have equal bytes. Where a stretch of text has no such
  pair of boundaries (one tokenizer writes the space before a word, the other after it) one cut is placed there
  anyway, between the same non-whitespace bytes, and those groups differ only in whitespace. Whitespace a side has
  and the other lacks joins a neighbouring group. When the two answers' bytes are equal and the tokenizers agree
  on where spaces go, both modes give the same groups.

When the texts differ beyond that (a tokenizer normalises text: lowercases, strips accents, NFKC; an unknown
token; one side truncated), `align` raises `AlignmentError`: the caller counts the answer (or sample) as skipped.
The error carries the byte offsets where the texts diverge (`teacher_offset` / `student_offset` into each side's
answer bytes, the concatenated token bytes before the end markers) and the partial `Alignment` (`.alignment`):
the groups of what matches before the divergence, the end-marker group when both sides have one, and the unmatched
token indices. `align_report` returns that `Alignment` without raising, for callers that want to train on the
matching part.

`answer_groups` does the same for a whole encoded sample: it splits both sides' supervised rows into answers
(maximal runs of consecutive supervised tokens), aligns them pairwise and returns groups of *row* indices (indices
into the cached text rows / the student's text rows), ready for `cross_losses.MergeGroups` (`group_sizes`).
"""

from __future__ import annotations

import json
import re
import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "WHITESPACE",
    "Alignment",
    "AlignmentError",
    "Group",
    "TokenBytes",
    "align",
    "align_report",
    "answer_groups",
    "group_sizes",
    "token_bytes",
]

WHITESPACE = b" \t\n\r\x0b\x0c"
"""The bytes `whitespace="loose"` lets differ between the two sides (ASCII whitespace)."""

_WHITESPACE_MODES = ("loose", "exact")

# ---------------------------------------------------------------------------------------------------- token bytes


@dataclass(frozen=True, eq=False)
class TokenBytes:
    """The bytes every token id of one tokenizer contributes to decoded text (`token_bytes`).

    Attributes:
        data: per id, the UTF-8 bytes (b"" for special tokens and for ids no token has).
        special: (V,) bool, True for special tokens (they carry no text; end-of-answer markers are among them).
        kind: what the tokenizer is, in words ("byte-level BPE", "Metaspace BPE, byte fallback", "WordPiece", ...).
        keeps_whitespace: False when the tokenizer drops whitespace (WordPiece / `Whitespace` pre-tokenizers): its
            token bytes hold the text's non-whitespace bytes only, so it aligns with `whitespace="loose"` only.
        normalizer: the backend normalizer's component types that may change text (("NFKC", "Lowercase"); () when
            none; the sentencepiece space marker steps Prepend("▁") / Replace(" ", "▁") are left out): texts a
            normaliser changes differ from the other tokenizer's and raise `AlignmentError`, whose message names
            them.
    """

    data: tuple[bytes, ...]
    special: np.ndarray
    kind: str = ""
    keeps_whitespace: bool = True
    normalizer: tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, token_id: int) -> bytes:
        return self.data[token_id]

    def join(self, ids: Iterable[int]) -> bytes:
        """The bytes of a sequence of ids, concatenated."""
        data = self.data
        return b"".join(data[i] for i in ids)

    def is_special(self, token_id: int) -> bool:
        return bool(self.special[token_id])


def _byte_level_chars() -> dict[int, int]:
    """GPT-2's bytes_to_unicode, inverted: code point of the printable stand-in -> byte."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    out = {c: c for c in keep}
    n = 0
    for b in range(256):
        if b not in out:
            out[256 + n] = b
            n += 1
    return out


_BL_CHARS = _byte_level_chars()
# str.translate table: stand-in -> the latin-1 character of its byte; a latin-1 character that is not a stand-in
# (a raw space, 0x80-0xa0, 0xad) -> U+FFFF, so `.encode("latin-1")` fails for any token that is not all stand-ins
# and the token falls back to its UTF-8 bytes, as the ByteLevel decoder does.
_BL_TRANSLATE = {**{o: "\uffff" for o in range(256)}, **{c: chr(b) for c, b in _BL_CHARS.items()}}
_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")
# tokenizers' WordPiece / CTC decoder clean-up (`decoders::wordpiece::cleanup`), in its order
_CLEANUP = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"),
            (" do not", " don't"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))
_DROPS_WHITESPACE = {"BertPreTokenizer", "Whitespace", "WhitespaceSplit"}


def _cleanup(text: str) -> str:
    for a, b in _CLEANUP:
        text = text.replace(a, b)
    return text


def _state(component: Any) -> dict | None:
    """A `tokenizers` component (decoder, pre-tokenizer, normalizer) as its JSON dict; None when absent/opaque."""
    if component is None:
        return None
    try:
        return json.loads(component.__getstate__())
    except Exception:  # noqa: BLE001 - a custom (Python) component has no serialised form
        return {"type": "<custom>"}


def _flatten(spec: dict | None, key: str) -> list[dict]:
    """A component and the members of its `Sequence`s, in order."""
    if not spec:
        return []
    if spec.get("type") == "Sequence" and key in spec:
        return [m for member in spec[key] for m in _flatten(member, key)]
    return [spec]


_KNOWN_STEPS = {"ByteLevel", "ByteFallback", "Metaspace", "Replace", "WordPiece", "BPEDecoder", "Fuse", "Strip", "CTC"}


def _decoder_steps(backend: Any) -> list[dict]:
    """The decoder chain to apply per token. Without a decoder, what `tokenizers` would do: nothing for the
    byte-level / Metaspace / WordPiece kinds the pre-tokenizer and model name (their decoders are then the natural
    ones), else join tokens with spaces."""
    steps = _flatten(_state(backend.decoder), "decoders")
    model = backend.model
    if not steps:
        pre = {s.get("type") for s in _flatten(_state(backend.pre_tokenizer), "pretokenizers")}
        if "ByteLevel" in pre:
            steps = [{"type": "ByteLevel"}]
        elif "Metaspace" in pre:
            steps = [{"type": "Metaspace", "replacement": "▁"}]
        elif type(model).__name__ == "WordPiece":
            steps = [{"type": "WordPiece", "prefix": model.continuing_subword_prefix, "cleanup": False}]
        else:
            steps = [{"type": "<join>"}]
    if getattr(model, "byte_fallback", False) and not any(s.get("type") == "ByteFallback" for s in steps):
        steps = [{"type": "ByteFallback"}, *steps]  # the model emits <0xHH> for bytes; read them as bytes
    return steps


def _apply_steps(tokens: list[str], steps: list[dict]) -> list[bytes]:
    """Each token's bytes through the decoder chain, as when the token follows another token mid-text."""
    vals: list[str | bytes] = list(tokens)
    fused = False
    for step in steps:
        kind = step.get("type")
        if kind == "ByteLevel":
            for i, v in enumerate(vals):
                if isinstance(v, str):
                    try:
                        vals[i] = v.translate(_BL_TRANSLATE).encode("latin-1")
                    except UnicodeEncodeError:  # not all stand-ins (an added token): its UTF-8, like the decoder
                        vals[i] = v.encode("utf-8")
        elif kind == "ByteFallback":
            for i, v in enumerate(vals):
                if isinstance(v, str) and len(v) == 6 and v.startswith("<0x"):
                    m = _BYTE_FALLBACK.fullmatch(v)
                    if m:
                        vals[i] = bytes([int(m.group(1), 16)])
        elif kind == "Metaspace":  # mid-text: ▁ is a space (the decoder drops it only at the very start)
            rep = step.get("replacement", "▁")
            vals = [v.replace(rep, " ") if isinstance(v, str) else v for v in vals]
        elif kind == "Replace":
            pattern, content = step.get("pattern") or {}, step.get("content", "")
            if "String" in pattern:
                vals = [v.replace(pattern["String"], content) if isinstance(v, str) else v for v in vals]
            elif "Regex" in pattern:
                rx = re.compile(pattern["Regex"])
                vals = [rx.sub(content.replace("\\", "\\\\"), v) if isinstance(v, str) else v for v in vals]
        elif kind == "WordPiece":  # mid-text: a continuation loses its prefix, a word start gets a space
            prefix, cleanup = step.get("prefix", "##"), step.get("cleanup", True)
            for i, v in enumerate(vals):
                if isinstance(v, str):
                    v = v[len(prefix):] if prefix and v.startswith(prefix) else " " + v
                    vals[i] = _cleanup(v) if cleanup else v
        elif kind == "BPEDecoder":
            suffix = step.get("suffix", "</w>")
            vals = [v.replace(suffix, " ") if isinstance(v, str) else v for v in vals]
        elif kind == "CTC":
            pad, delim = step.get("pad_token", "<pad>"), step.get("word_delimiter_token", "|")
            vals = ["" if v == pad else (v.replace(delim, " ") if isinstance(v, str) else v) for v in vals]
        elif kind == "Fuse":
            fused = True  # from here on the decoder sees the whole text as one token
        elif kind == "Strip":
            if fused:
                continue  # strips the start / end of the whole text only, not a token in its middle
            content, start, stop = step.get("content", " "), int(step.get("start", 0)), int(step.get("stop", 0))
            for i, v in enumerate(vals):
                if isinstance(v, str):
                    n = 0
                    while n < start and v.startswith(content):
                        v, n = v[len(content):], n + 1
                    n = 0
                    while n < stop and v.endswith(content):
                        v, n = v[: -len(content)], n + 1
                    vals[i] = v
        elif kind == "<join>":  # no decoder at all: tokenizers joins the tokens with spaces
            vals = [" " + v if isinstance(v, str) else v for v in vals]
        else:  # pragma: no cover - _KNOWN_STEPS gates this
            raise ValueError(f"unknown decoder step {kind!r}")
    return [v if isinstance(v, bytes) else v.encode("utf-8") for v in vals]


def _anchored(decoder: Any, tokens: list[str]) -> list[bytes]:
    """Fallback for decoders this module does not interpret: what the decoder writes for the token after an
    anchor token, minus the anchor's text (string level: a partial UTF-8 character comes back as U+FFFD)."""
    anchor = "a"
    base = decoder.decode([anchor])
    out = []
    for t in tokens:
        text = decoder.decode([anchor, t])
        out.append((text[len(base):] if text.startswith(base) else text).encode("utf-8"))
    return out


def _describe(backend: Any, steps: list[dict]) -> tuple[str, bool]:
    model = type(backend.model).__name__
    kinds = [s.get("type") for s in steps]
    pre = {s.get("type") for s in _flatten(_state(backend.pre_tokenizer), "pretokenizers")}
    if "ByteLevel" in kinds:
        kind = f"byte-level {model}"
    elif "Metaspace" in kinds or "Metaspace" in pre or any(
            (s.get("pattern") or {}).get("String") == "▁" for s in steps if s.get("type") == "Replace"):
        kind = f"Metaspace {model}"
    else:
        kind = model
    if "ByteFallback" in kinds:
        kind += ", byte fallback"
    keeps = not (pre & _DROPS_WHITESPACE) and "WordPiece" not in kinds
    return kind, keeps


def _harmless(step: dict) -> bool:
    """A normaliser step that only writes the sentencepiece space marker (Llama-2 / Mistral: Prepend("▁"),
    Replace(" ", "▁")), which the decoder undoes: it changes no byte of decoded text."""
    kind = step.get("type")
    if kind == "Prepend":
        return step.get("prepend") == "▁"
    if kind == "Replace":
        return (step.get("pattern") or {}).get("String") == " " and step.get("content") == "▁"
    return False


def _backend_of(tokenizer: Any) -> Any:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None and hasattr(tokenizer, "get_vocab") and hasattr(tokenizer, "decoder") \
            and hasattr(tokenizer, "model"):
        backend = tokenizer  # a `tokenizers.Tokenizer` itself
    if backend is None:
        raise ValueError("token_bytes needs a fast tokenizer backed by the `tokenizers` library (with "
                         f".backend_tokenizer), got {type(tokenizer).__name__}")
    return backend


def _fingerprint(tokenizer: Any, backend: Any) -> tuple:
    added = getattr(tokenizer, "added_tokens_decoder", None)
    if added is None:  # a bare `tokenizers.Tokenizer`
        added = backend.get_added_tokens_decoder()
    return (id(backend), backend.get_vocab_size(with_added_tokens=True),
            tuple(sorted((int(i), str(getattr(t, "content", t)), bool(getattr(t, "special", False)))
                         for i, t in added.items())),
            tuple(sorted(getattr(tokenizer, "all_special_ids", None) or ())))


_CACHE: "weakref.WeakKeyDictionary[Any, tuple[tuple, TokenBytes]]" = weakref.WeakKeyDictionary()


def token_bytes(tokenizer: Any) -> TokenBytes:
    """Per token id, the exact UTF-8 bytes the token contributes to decoded text, and which ids are special.

    Args:
        tokenizer: a transformers fast tokenizer (`PreTrainedTokenizerFast` / `TokenizersBackend`, anything with
            `.backend_tokenizer`) or a `tokenizers.Tokenizer`.

    Returns:
        `TokenBytes` over every id up to the largest one the tokenizer has (ids without a token: b"").
        Cached per tokenizer object; adding tokens to it invalidates the cache.

    Raises:
        ValueError: the tokenizer is not backed by `tokenizers` (a slow tokenizer).
    """
    backend = _backend_of(tokenizer)
    key = _fingerprint(tokenizer, backend)
    try:
        hit = _CACHE.get(tokenizer)
    except TypeError:  # not weak-referenceable: no cache
        hit = None
    if hit is not None and hit[0] == key:
        return hit[1]
    result = _token_bytes(tokenizer, backend)
    try:
        _CACHE[tokenizer] = (key, result)
    except TypeError:
        pass
    return result


def _token_bytes(tokenizer: Any, backend: Any) -> TokenBytes:
    vocab = backend.get_vocab(with_added_tokens=True)
    added = getattr(tokenizer, "added_tokens_decoder", None)
    if added is None:
        added = backend.get_added_tokens_decoder()
    size = max([0, *(i + 1 for i in vocab.values()), *(int(i) + 1 for i in added)])
    special = np.zeros(size, dtype=bool)
    for i, t in added.items():
        if getattr(t, "special", False):
            special[int(i)] = True
    for i in getattr(tokenizer, "all_special_ids", None) or ():
        if i is not None and 0 <= int(i) < size:
            special[int(i)] = True

    names = [""] * size
    present = np.zeros(size, dtype=bool)
    for tok, i in vocab.items():
        names[i] = tok
        present[i] = True
    for i, t in added.items():  # an added token's content is what the decoder sees
        names[int(i)] = str(getattr(t, "content", t))
        present[int(i)] = True

    steps = _decoder_steps(backend)
    ids = [i for i in range(size) if present[i] and not special[i]]
    tokens = [names[i] for i in ids]
    if all(s.get("type") in _KNOWN_STEPS or s.get("type") == "<join>" for s in steps):
        values = _apply_steps(tokens, steps)
    else:
        values = _anchored(backend.decoder, tokens)
    data = [b""] * size
    for i, v in zip(ids, values):
        data[i] = v

    kind, keeps = _describe(backend, steps)
    norm = tuple(str(s.get("type")) for s in _flatten(_state(backend.normalizer), "normalizers")
                 if not _harmless(s))
    return TokenBytes(data=tuple(data), special=special, kind=kind, keeps_whitespace=keeps, normalizer=norm)


# ---------------------------------------------------------------------------------------------------- alignment


@dataclass(frozen=True)
class Group:
    """Teacher tokens and student tokens that cover the same bytes: indices into the two id sequences given to
    `align` (row indices for `answer_groups`), consecutive and increasing on each side. `end` marks the group of
    end-of-answer markers."""

    teacher: tuple[int, ...]
    student: tuple[int, ...]
    end: bool = False

    @property
    def kind(self) -> str:
        """"one-to-one", "one-to-many" (one teacher token, several student tokens), "many-to-one" or
        "many-to-many"."""
        t = "one" if len(self.teacher) == 1 else "many"
        s = "one" if len(self.student) == 1 else "many"
        return f"{t}-to-{s}"

    def shifted(self, teacher_by: int, student_by: int) -> Group:
        """The same group with its indices moved (from an answer's tokens to a sample's rows)."""
        return Group(tuple(i + teacher_by for i in self.teacher), tuple(i + student_by for i in self.student),
                     self.end)


@dataclass(frozen=True)
class Alignment:
    """Everything `align_report` found for one answer.

    Attributes:
        groups: the groups, in order (the end-marker group last when both sides have end markers, also after a
            divergence).
        unmatched_teacher, unmatched_student: token indices in no group: after a divergence, an end marker the
            other side lacks, whitespace-only tokens facing an empty answer when there is no end group (with one,
            they join it).
        teacher_text, student_text: each side's answer bytes (the token bytes before the end markers).
        teacher_offset, student_offset: where the texts diverge (byte offsets into the answer bytes), None when
            they match (under the `whitespace` rule).
        reason: None, "text" (the texts differ) or "end marker" (only one side ends with an end marker).
    """

    groups: tuple[Group, ...]
    unmatched_teacher: tuple[int, ...] = ()
    unmatched_student: tuple[int, ...] = ()
    teacher_text: bytes = b""
    student_text: bytes = b""
    teacher_offset: int | None = None
    student_offset: int | None = None
    reason: str | None = None
    message: str = ""

    @property
    def ok(self) -> bool:
        """True when the two answers match completely (no `AlignmentError` from `align`)."""
        return self.reason is None


class AlignmentError(ValueError):
    """One answer's teacher and student texts differ (beyond whitespace with `whitespace="loose"`), or only one
    side ends with an end marker. The caller counts the answer / sample as skipped.

    Attributes:
        reason: "text", "end marker" or "answers" (`answer_groups`: not the same number of answers).
        teacher_offset, student_offset: byte offsets into each side's answer bytes where they diverge (None for
            "answers").
        alignment: the partial `Alignment` (groups of what matches before the divergence), None for "answers".
        answer: which answer of the sample (`answer_groups`), else None.
    """

    def __init__(self, message: str, *, reason: str, teacher_offset: int | None = None,
                 student_offset: int | None = None, alignment: Alignment | None = None, answer: int | None = None):
        super().__init__(message)
        self.reason = reason
        self.teacher_offset = teacher_offset
        self.student_offset = student_offset
        self.alignment = alignment
        self.answer = answer


def _ids(name: str, ids: Any) -> list[int]:
    if hasattr(ids, "tolist"):
        ids = ids.tolist()
    if isinstance(ids, (str, bytes)) or not isinstance(ids, Iterable):
        raise ValueError(f"{name} must be a sequence of ints, got {type(ids).__name__}")
    try:
        return [int(i) for i in ids]
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a sequence of ints, got {ids!r:.80}") from None


def _end_set(name: str, end: Any) -> frozenset[int] | None:
    if end is None:
        return None
    if isinstance(end, (int, np.integer)):
        end = (end,)
    return frozenset(_ids(name, end))


def _split_end(ids: list[int], end: frozenset[int] | None, tb: TokenBytes, name: str) -> int:
    """Length of the body: ids before the trailing run of end markers."""
    n = len(ids)
    for i in ids:
        if not 0 <= i < len(tb):
            raise ValueError(f"{name} holds id {i}, outside the tokenizer's {len(tb)} ids")
    while n and (ids[n - 1] in end if end is not None else tb.special[ids[n - 1]]):
        n -= 1
    return n


_WS_RUN = re.compile(rb"[ \t\n\r\x0b\x0c]*")


def _boundary_keys(text: bytes, cuts: list[int]) -> list[tuple[int, bytes]]:
    """Per byte offset in `cuts` (increasing): (non-whitespace bytes before it, where it sits in its whitespace run).

    Two boundaries with the same key have seen the same non-whitespace text and sit at the same place of the
    whitespace run around them. Inside the answer the place is the whitespace since the last non-whitespace byte
    (runs are aligned from their start: the text before them is the same); in the run before the first
    non-whitespace byte (count 0), it is the whitespace still to come: templates add or drop whitespace at the start
    of an answer, and the answer's own whitespace is the end of that run, next to its first word."""
    keys = []
    k = 0
    last = 0  # offset just after the last non-whitespace byte seen
    pos = 0
    for c in cuts:
        seg = text[pos:c]
        if seg:
            stripped = seg.translate(None, WHITESPACE)
            k += len(stripped)
            if stripped:
                last = pos + len(seg.rstrip(WHITESPACE))
        keys.append((k, text[last:c] if k else _WS_RUN.match(text, c).group()))
        pos = c
    return keys


def _snippet(text: bytes, at: int) -> str:
    return repr(text[max(0, at - 16):at]) + " | " + repr(text[at:at + 16])


def align_report(
    teacher_ids: Sequence[int],
    teacher_bytes: TokenBytes,
    student_ids: Sequence[int],
    student_bytes: TokenBytes,
    *,
    teacher_end: Iterable[int] | int | None = None,
    student_end: Iterable[int] | int | None = None,
    whitespace: str = "loose",
) -> Alignment:
    """`align`, without raising on a divergence: the groups of what matches and the rest, described.

    Same arguments as `align`. Returns an `Alignment`; `.ok` is False where `align` would raise.
    """
    if whitespace not in _WHITESPACE_MODES:
        raise ValueError(f"whitespace must be one of {_WHITESPACE_MODES}, got {whitespace!r}")
    if not isinstance(teacher_bytes, TokenBytes) or not isinstance(student_bytes, TokenBytes):
        raise ValueError("teacher_bytes and student_bytes must be TokenBytes (from token_bytes(tokenizer)), got "
                         f"{type(teacher_bytes).__name__} and {type(student_bytes).__name__}")
    t_ids, s_ids = _ids("teacher_ids", teacher_ids), _ids("student_ids", student_ids)
    t_end = _end_set("teacher_end", teacher_end)
    s_end = _end_set("student_end", student_end)
    nt = _split_end(t_ids, t_end, teacher_bytes, "teacher_ids")
    ns = _split_end(s_ids, s_end, student_bytes, "student_ids")
    t_tok = [teacher_bytes.data[i] for i in t_ids[:nt]]
    s_tok = [student_bytes.data[i] for i in s_ids[:ns]]
    T, S = b"".join(t_tok), b"".join(s_tok)
    t_bounds = [0, *np.cumsum([len(b) for b in t_tok], dtype=np.int64).tolist()]  # nt + 1 offsets
    s_bounds = [0, *np.cumsum([len(b) for b in s_tok], dtype=np.int64).tolist()]

    # where the texts stop matching
    if whitespace == "exact":
        t_core, s_core = T, S
    else:
        t_core, s_core = T.translate(None, WHITESPACE), S.translate(None, WHITESPACE)
    if t_core == s_core:
        common = len(t_core)
        t_div = s_div = None
    else:
        n = min(len(t_core), len(s_core))
        common = next((i for i in range(n) if t_core[i] != s_core[i]), n)
        if whitespace == "exact":
            t_div = s_div = common
        else:
            t_div, s_div = _offset_of(T, common), _offset_of(S, common)

    # candidate cuts: per side, (count of matching bytes before, whitespace run) -> the last boundary with it
    if whitespace == "exact":
        t_keys = [(b, b"") for b in t_bounds]
        s_keys = [(b, b"") for b in s_bounds]
    else:
        t_keys = _boundary_keys(T, t_bounds)
        s_keys = _boundary_keys(S, s_bounds)
    groups: list[Group] = []
    t_used = s_used = 0
    if nt and ns and (common or t_div is None):
        cuts = _cuts(t_keys, s_keys, t_bounds, s_bounds, t_div, s_div, common, flexible=whitespace == "loose")
        if t_div is None:  # the whole body matches: the last cut is the end of both bodies
            end_cut = (nt, ns)
            while len(cuts) > 1 and (cuts[-1][0] >= nt or cuts[-1][1] >= ns):
                cuts.pop()
            cuts.append(end_cut)
        for (a0, b0), (a1, b1) in zip(cuts, cuts[1:]):
            groups.append(Group(tuple(range(a0, a1)), tuple(range(b0, b1))))
        t_used, s_used = cuts[-1]
    unmatched_t = list(range(t_used, nt))
    unmatched_s = list(range(s_used, ns))

    reason = None
    message = ""
    t_off = s_off = None
    if t_div is not None:
        reason, t_off, s_off = "text", t_div, s_div
        hint = [f"{side} tokenizer normalises text ({', '.join(tb.normalizer)})"
                for side, tb in (("teacher", teacher_bytes), ("student", student_bytes)) if tb.normalizer]
        for side, ids, n, tb in (("teacher", t_ids, nt, teacher_bytes), ("student", s_ids, ns, student_bytes)):
            if whitespace == "exact" and not tb.keeps_whitespace:
                hint.append(f"the {side} tokenizer ({tb.kind}) keeps no whitespace: align with whitespace='loose'")
            empty = sorted({i for i in ids[:n] if tb.special[i]})
            if empty:
                hint.append(f"the {side} answer holds special tokens, which have no bytes (ids {empty[:5]}: an "
                            "unknown token?)")
        message = (f"the answer texts differ at teacher byte {t_div} / student byte {s_div} "
                   f"(whitespace={whitespace!r}): teacher {_snippet(T, t_div)}, student {_snippet(S, s_div)}"
                   + (f"; {'; '.join(hint)}" if hint else ""))

    t_tail, s_tail = list(range(nt, len(t_ids))), list(range(ns, len(s_ids)))
    if t_tail and s_tail:
        if reason is None:  # whitespace-only tokens facing an empty answer: with the end markers, no gap
            t_tail, s_tail, unmatched_t, unmatched_s = unmatched_t + t_tail, unmatched_s + s_tail, [], []
        groups.append(Group(tuple(t_tail), tuple(s_tail), end=True))
    elif t_tail or s_tail:
        unmatched_t += t_tail
        unmatched_s += s_tail
        if reason is None:
            side, ids, tail = ("teacher", t_ids, t_tail) if t_tail else ("student", s_ids, s_tail)
            reason, t_off, s_off = "end marker", len(T), len(S)
            message = (f"only the {side} answer ends with an end marker (ids {[ids[i] for i in tail]}); the other "
                       "side's markers are the trailing special tokens unless teacher_end / student_end name them")
    return Alignment(groups=tuple(groups), unmatched_teacher=tuple(unmatched_t),
                     unmatched_student=tuple(unmatched_s), teacher_text=T, student_text=S, teacher_offset=t_off,
                     student_offset=s_off, reason=reason, message=message)


def _offset_of(text: bytes, k: int) -> int:
    """Byte offset of the k-th non-whitespace byte of `text` (len(text) when there are only k)."""
    seen = 0
    for i, c in enumerate(text):
        if c not in WHITESPACE:
            if seen == k:
                return i
            seen += 1
    return len(text)


def _cuts(t_keys, s_keys, t_bounds, s_bounds, t_div, s_div, common, *, flexible: bool) -> list[tuple[int, int]]:
    """The cuts (teacher boundary index, student boundary index), increasing on both sides, starting at (0, 0).

    A boundary is usable when it lies before the divergence (all of them when there is none). Exact cuts: the same
    key (`_boundary_keys`) on both sides; the last boundary with a key is taken, so a zero-byte token joins the
    group before it. Flexible cuts (`flexible`): for a count of non-whitespace bytes (> 0) where no key is shared,
    the last boundary with that count on each side."""

    def usable(keys, bounds, div):
        by_key: dict[tuple[int, bytes], int] = {}
        by_k: dict[int, int] = {}
        for idx, key in enumerate(keys):
            if div is not None and (bounds[idx] > div or key[0] > common):
                break
            by_key[key] = idx
            by_k[key[0]] = idx
        return by_key, by_k

    t_by_key, t_by_k = usable(t_keys, t_bounds, t_div)
    s_by_key, s_by_k = usable(s_keys, s_bounds, s_div)
    shared = t_by_key.keys() & s_by_key.keys()
    pairs = [(t_by_key[key], s_by_key[key]) for key in shared]
    if flexible:
        exact_ks = {k for k, _ in shared}
        pairs += [(t_by_k[k], s_by_k[k]) for k in t_by_k.keys() & s_by_k.keys() if k and k not in exact_ks]
    cuts = [(0, 0)]
    for a, b in sorted(pairs):
        if a > cuts[-1][0] and b > cuts[-1][1]:
            cuts.append((a, b))
    return cuts


def align(
    teacher_ids: Sequence[int],
    teacher_bytes: TokenBytes,
    student_ids: Sequence[int],
    student_bytes: TokenBytes,
    *,
    teacher_end: Iterable[int] | int | None = None,
    student_end: Iterable[int] | int | None = None,
    whitespace: str = "loose",
) -> list[Group]:
    """Group one answer's teacher tokens and student tokens by the bytes of the answer they cover.

    Args:
        teacher_ids, student_ids: one answer's supervised token ids on each side (its text, then its end-of-answer
            marker(s)); lists, numpy arrays or tensors of ints.
        teacher_bytes, student_bytes: `token_bytes(tokenizer)` of each side.
        teacher_end, student_end: the end-of-answer marker ids of each side (`</s>`, `<|im_end|>`, `<|eot_id|>`,
            `<|endoftext|>`); the trailing run of them is the end group. None (default): the trailing special
            tokens; (): no end markers.
        whitespace: "loose" (default: only non-whitespace bytes must match, whitespace differences are absorbed
            into groups) or "exact" (the answer bytes must be equal). See the module docstring.

    Returns:
        The groups, in order, covering both id sequences with no gap: each group's teacher tokens and student tokens
        cover the same bytes (the same non-whitespace bytes under "loose"); the end-marker group last
        (`Group.end`). Tokens with no bytes (special tokens inside an answer) join the group before them (the
        first group at the start).

    Raises:
        AlignmentError: the texts differ (`reason` "text", with the byte offsets where they diverge), or only one
            side ends with an end marker ("end marker"); `.alignment` holds the groups of what matches.
        ValueError: invalid arguments (an id outside the tokenizer, an unknown `whitespace`).
    """
    result = align_report(teacher_ids, teacher_bytes, student_ids, student_bytes, teacher_end=teacher_end,
                          student_end=student_end, whitespace=whitespace)
    if not result.ok:
        raise AlignmentError(result.message, reason=str(result.reason), teacher_offset=result.teacher_offset,
                             student_offset=result.student_offset, alignment=result)
    return list(result.groups)


# ---------------------------------------------------------------------------------------------------- samples


def _answer_runs(rows: np.ndarray) -> list[np.ndarray]:
    """Indices into `rows` of each answer: maximal runs of consecutive rows (consecutive supervised tokens)."""
    if len(rows) == 0:
        return []
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    return np.split(np.arange(len(rows)), breaks)


def answer_groups(
    teacher_input_ids: Sequence[int],
    teacher_rows: Sequence[int],
    student_input_ids: Sequence[int],
    student_rows: Sequence[int],
    teacher_bytes: TokenBytes,
    student_bytes: TokenBytes,
    *,
    teacher_end: Iterable[int] | int | None = None,
    student_end: Iterable[int] | int | None = None,
    whitespace: str = "loose",
    strict: bool = True,
) -> list[Group]:
    """Align every answer of one encoded sample; groups of *row* indices.

    Args:
        teacher_input_ids, student_input_ids: each side's whole token sequence (`EncodedSample.input_ids`; the
            cache's `input_ids` for the teacher).
        teacher_rows, student_rows: each side's text rows (`EncodedSample.text_positions`, the cache's text rows):
            row t predicts the supervised token t + 1. Consecutive rows form one answer.
        teacher_bytes, student_bytes, teacher_end, student_end, whitespace: as in `align`.
        strict: True (default): a divergent answer raises `AlignmentError` (with `.answer`); False: its matching
            groups are kept and its other rows left out (the caller trains on the groups' rows only).

    Returns:
        The groups of all answers in order; indices are positions in `teacher_rows` / `student_rows` (so they
        index the cached text-row targets and the student's text-row logits directly).

    Raises:
        AlignmentError: the sides have a different number of answers (reason "answers"), or (strict) an answer's
            texts differ.
    """
    t_in = np.asarray(_ids("teacher_input_ids", teacher_input_ids), dtype=np.int64)
    s_in = np.asarray(_ids("student_input_ids", student_input_ids), dtype=np.int64)
    t_rows = np.asarray(_ids("teacher_rows", teacher_rows), dtype=np.int64)
    s_rows = np.asarray(_ids("student_rows", student_rows), dtype=np.int64)
    for name, rows, seq in (("teacher_rows", t_rows, t_in), ("student_rows", s_rows, s_in)):
        if len(rows) and (rows.min() < 0 or rows.max() + 1 >= len(seq) or np.any(np.diff(rows) <= 0)):
            raise ValueError(f"{name} must be increasing rows t with t + 1 < {len(seq)} (the sequence length), "
                             f"got {rows.tolist()[:8]}...")
    t_runs, s_runs = _answer_runs(t_rows), _answer_runs(s_rows)
    if len(t_runs) != len(s_runs):
        raise AlignmentError(f"the teacher has {len(t_runs)} answers and the student {len(s_runs)}",
                             reason="answers")
    out: list[Group] = []
    for a, (tr, sr) in enumerate(zip(t_runs, s_runs)):
        result = align_report(t_in[t_rows[tr] + 1], teacher_bytes, s_in[s_rows[sr] + 1], student_bytes,
                              teacher_end=teacher_end, student_end=student_end, whitespace=whitespace)
        if not result.ok and strict:
            raise AlignmentError(f"answer {a}: {result.message}", reason=str(result.reason),
                                 teacher_offset=result.teacher_offset, student_offset=result.student_offset,
                                 alignment=result, answer=a)
        out.extend(g.shifted(int(tr[0]), int(sr[0])) for g in result.groups)
    return out


def group_sizes(groups: Sequence[Group]) -> tuple[np.ndarray, np.ndarray]:
    """(teacher sizes (G,), student sizes (G,)) int64: tokens per group on each side, for
    `cross_losses.MergeGroups` over the rows the groups select (`[i for g in groups for i in g.teacher]`)."""
    return (np.asarray([len(g.teacher) for g in groups], dtype=np.int64),
            np.asarray([len(g.student) for g in groups], dtype=np.int64))
