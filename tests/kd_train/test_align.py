"""Cross-tokenizer alignment (`kd_train/align.py`, issue 20 item 2) on real tokenizer types.

Tokenizers:

* SmolLM2-135M-Instruct's real byte-level BPE (`smollm2_tokenizer`, tests/conftest.py): splits a CJK character
  into 2 tokens and an emoji into 3;
* a Llama-2 / Mistral style sentencepiece BPE trained here: the real layout of their tokenizer.json (normaliser
  Prepend("▁") + Replace(" ", "▁"), no pre-tokenizer, BPE with byte fallback `<0xHH>`, decoder Replace + ByteFallback
  + Fuse + Strip); characters it never saw (emoji, newline) become byte tokens;
* a sentencepiece Unigram (Metaspace pre-tokenizer and decoder) trained here;
* a BERT-style WordPiece (BertNormalizer keeping case and accents, BertPreTokenizer, `##` continuations) trained
  here: it keeps no whitespace; and an uncased one (lowercase + accent stripping) for the divergent case;
* hand-built Unigram and byte-fallback BPE vocabularies for the hand-checked groups.

Conversations are rendered by `kd_cache.data.Encoder` under the published chat templates of
tests/fixtures/chat_templates/ (each tokenizer gets the family's special tokens), and each answer's supervised
tokens are aligned with `answer_groups`.
"""

from __future__ import annotations

import copy
import json
import random
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from kd_cache.data import Encoder
from kd_train.align import (
    WHITESPACE,
    AlignmentError,
    Group,
    TokenBytes,
    align,
    align_report,
    answer_groups,
    group_sizes,
    token_bytes,
)

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "chat_templates"

# the special tokens each family's template writes and its end-of-answer marker (as in tests/kd_cache/test_templates)
FAMILIES = {
    "llava-1.5-7b-hf": dict(bos="<s>", eos="</s>", extra=["<image>"]),
    "Qwen2-VL-7B-Instruct": dict(bos=None, eos="<|im_end|>",
                                 extra=["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]),
    "Meta-Llama-3-8B-Instruct": dict(bos="<|begin_of_text|>", eos="<|eot_id|>",
                                     extra=["<|start_header_id|>", "<|end_header_id|>"]),
    "Mistral-7B-Instruct-v0.2": dict(bos="<s>", eos="</s>", extra=["[INST]", "[/INST]"]),
}

ANSWERS = [
    "東京は大きい",
    "  👍🏽 Thumbs up from 🇯🇵!  ",
    "The café is naïve about Ångström units.",
    "Pi is 3.14159, and a million is 1,000,000.",
    "def f(x):\n    return x**2",
    "Line one.\n\nLine two.\n",
]

SPECIALS = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|begin_of_text|>",
            "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>", "[INST]", "[/INST]", "<image>"]
CORPUS = """The quick brown fox jumps over the lazy dog.
A careful assistant answers briefly and exactly. Question 1? Question 2?
Tokyo is big: 東京は大きい and 大阪 is big too. 京都は古い町です。
The café in Ångström street serves naïve coffee; the Café closed.
Pi is about 3.14159 and a million is 1,000,000 or 1000000.
def f(x):
    return x**2
def square(value):
    return value * value
print(f(3)) # prints 9
Numbers 0 1 2 3 4 5 6 7 8 9 10 100 2024 are everywhere.
Thumbs up 👍 and 🇯🇵 flags; 👍🏽 means thumbs up with a skin tone.
How many sides does a triangle have? three. What colour is the sky? blue! Line one, line two.
You are a helpful assistant. Answer the question in one sentence.""".splitlines()


def strip_ws(b: bytes) -> bytes:
    return b.translate(None, WHITESPACE)


# ------------------------------------------------------------------------------------------------ tokenizers


def _hf(tok, **kw):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=tok, clean_up_tokenization_spaces=False, **kw)


def _llama_layout(spec: dict) -> dict:
    """Llama-2 / Mistral tokenizer.json layout: BPE with byte fallback behind a Prepend/Replace normaliser."""
    from tokenizers import decoders

    vocab = spec["model"]["vocab"]
    first = max([*vocab.values(), *(a["id"] for a in spec["added_tokens"])]) + 1
    for b in range(256):
        vocab.setdefault(f"<0x{b:02X}>", first + b)
    spec["model"]["byte_fallback"] = True
    spec["normalizer"] = {"type": "Sequence", "normalizers": [
        {"type": "Prepend", "prepend": "▁"}, {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]}
    spec["pre_tokenizer"] = None
    spec["decoder"] = json.loads(decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                                    decoders.Fuse(), decoders.Strip(" ", 1, 0)]).__getstate__())
    return spec


def llama_bpe():
    """Trained on the corpus without its emoji line: emoji (and newlines) go through byte fallback."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")  # training only
    trainer = trainers.BpeTrainer(vocab_size=420, min_frequency=2, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=["▁"])
    tok.train_from_iterator([line for line in CORPUS if "👍" not in line], trainer=trainer)
    tok = Tokenizer.from_str(json.dumps(_llama_layout(json.loads(tok.to_str()))))
    return _hf(tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", extra_special_tokens=SPECIALS[3:])


def unigram():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.UnigramTrainer(vocab_size=300, special_tokens=SPECIALS, unk_token="<unk>",
                                      show_progress=False, initial_alphabet=["\n"])
    tok.train_from_iterator(CORPUS, trainer=trainer)
    return _hf(tok, eos_token="<|endoftext|>", unk_token="<unk>", extra_special_tokens=SPECIALS[3:])


def wordpiece(uncased: bool = False):
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.WordPiece(unk_token="<unk>"))
    tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, strip_accents=uncased,
                                                lowercase=uncased)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    trainer = trainers.WordPieceTrainer(vocab_size=300, special_tokens=SPECIALS, show_progress=False)
    tok.train_from_iterator(CORPUS, trainer=trainer)
    return _hf(tok, eos_token="<|endoftext|>", unk_token="<unk>", extra_special_tokens=SPECIALS[3:])


def hand_unigram():
    """A sentencepiece Unigram with a hand-written vocabulary: one token per CJK character or emoji."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    pieces = [("<unk>", 0.0), ("▁", -2.0), ("▁東", -3.0), ("東", -4.0), ("京", -3.0), ("は", -3.0), ("大", -4.0),
              ("き", -4.0), ("い", -4.0), ("大きい", -3.0), ("▁👍", -3.0), ("🏽", -3.0)]
    tok = Tokenizer(models.Unigram(pieces, unk_id=0))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    tok.decoder = decoders.Metaspace(prepend_scheme="first")
    return _hf(tok, unk_token="<unk>")


def hand_byte_fallback():
    """Llama layout with a vocabulary of single characters and no merges: what it does not know goes to bytes."""
    from tokenizers import Tokenizer, models

    vocab = {"<unk>": 0, "▁": 1, "東": 2, "京": 3}
    spec = json.loads(Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>")).to_str())
    spec["added_tokens"] = [{"id": 0, "content": "<unk>", "single_word": False, "lstrip": False, "rstrip": False,
                             "normalized": False, "special": True}]
    return _hf(Tokenizer.from_str(json.dumps(_llama_layout(spec))), unk_token="<unk>")


@pytest.fixture(scope="module")
def bases(smollm2_tokenizer):
    return {"smollm2": smollm2_tokenizer, "llama_bpe": llama_bpe(), "unigram": unigram(),
            "wordpiece": wordpiece(), "wordpiece_uncased": wordpiece(uncased=True)}


def record(answers: list[str]) -> dict:
    return {"id": "x", "conversations": [
        turn for i, a in enumerate(answers)
        for turn in ({"from": "human", "value": f"Question {i}?"}, {"from": "gpt", "value": a})]}


@pytest.fixture(scope="module")
def encoded(bases):
    """(tokenizer name, template name[, answers]) -> (tokenizer with the family's specials and template,
    EncodedSample of a conversation with those answers, `ANSWERS` by default)."""
    made: dict = {}
    tokenizers: dict = {}

    def get(tok_name: str, template: str, answers: tuple[str, ...] = tuple(ANSWERS)):
        if (tok_name, template) not in tokenizers:
            tok = copy.deepcopy(bases[tok_name])
            fam = FAMILIES[template]
            tok.add_tokens(fam["extra"], special_tokens=True)
            tok.add_special_tokens({f"{k}_token": fam[k] for k in ("bos", "eos") if fam[k]})
            tok.chat_template = (FIXTURES / f"{template}.jinja").read_text()
            tokenizers[tok_name, template] = tok
        tok = tokenizers[tok_name, template]
        if (tok_name, template, answers) not in made:
            made[tok_name, template, answers] = Encoder(tok, image_token_id=None).encode(record(list(answers)))
        return tok, made[tok_name, template, answers]

    return get


def toks(tok, ids) -> list[str]:
    return tok.convert_ids_to_tokens([int(i) for i in ids])


# ------------------------------------------------------------------------------------------------ token_bytes

HARD = "Tokyo: 東京は大きい 👍🏽 🇯🇵 café, naïve Ångström 3.14159 1,000,000\ndef f(x):\n    return x**2  "


def test_token_bytes_byte_level_smollm2(smollm2_tokenizer):
    from kd_train import align as align_module

    tok = smollm2_tokenizer
    align_module._CACHE.pop(tok, None)
    t0 = time.perf_counter()
    tb = token_bytes(tok)
    elapsed = time.perf_counter() - t0
    assert elapsed < 2.0, f"token_bytes took {elapsed:.2f} s on 49K ids"
    assert token_bytes(tok) is tb  # cached
    assert len(tb) == 49152 and tb.kind == "byte-level BPE" and tb.keeps_whitespace and tb.normalizer == ()
    ids = tok(HARD, add_special_tokens=False)["input_ids"]
    assert tb.join(ids) == HARD.encode()
    # byte-level tokens hold parts of characters: 東 (e6 9d b1) is 'æĿ' + '±'
    assert [tb[i] for i in tok.convert_tokens_to_ids(["æĿ", "±", "Ġ", "Ċ", "ĠðŁ"])] == \
        [b"\xe6\x9d", b"\xb1", b" ", b"\n", b" \xf0\x9f"]
    for name in ("<|im_start|>", "<|im_end|>", "<|endoftext|>"):
        i = tok.convert_tokens_to_ids(name)
        assert tb[i] == b"" and tb.is_special(i)
    assert int(tb.special.sum()) == 17
    # every id decodes as the tokenizer decodes it (where its bytes are whole characters)
    rng = random.Random(0)
    for i in rng.sample(range(17, len(tb)), 3000):
        try:
            text = tb[i].decode()
        except UnicodeDecodeError:
            continue
        assert text == tok.decode([i]), i


@pytest.mark.parametrize("name", ["llama_bpe", "unigram", "wordpiece"])
def test_token_bytes_follow_the_decoder(bases, name):
    """Mid-text bytes: what the tokenizer's own decoder writes for a token after another token."""
    tok = bases[name]
    tb = token_bytes(tok)
    ids = tok(HARD, add_special_tokens=False)["input_ids"]
    text = tb.join(ids)
    if name == "wordpiece":
        assert not tb.keeps_whitespace and tb.kind == "WordPiece" and tb.normalizer == ("BertNormalizer",)
        assert strip_ws(text) == strip_ws(HARD.encode())  # every non-space byte, not the spacing
        assert text.decode() == " " + tok.decode(ids)  # the decoder writes no space before the first token
        assert tb[tok.convert_tokens_to_ids("##ïve")] == "ïve".encode()
        assert tb[tok.convert_tokens_to_ids("na")] == b" na"
    else:
        assert tb.keeps_whitespace and tb.normalizer == ()
        assert text == b" " + HARD.encode()  # sentencepiece writes the text's first space too
        assert text.decode()[1:] == tok.decode(ids)
        assert tb[tok.convert_tokens_to_ids("▁")] == b" "
    if name == "llama_bpe":
        assert tb.kind == "Metaspace BPE, byte fallback"
        assert [tb[tok.convert_tokens_to_ids(f"<0x{b:02X}>")] for b in (0x0A, 0xF0, 0x9F)] == \
            [b"\n", b"\xf0", b"\x9f"]
        assert toks(tok, tok("👍", add_special_tokens=False)["input_ids"]) == \
            ["▁", "<0xF0>", "<0x9F>", "<0x91>", "<0x8D>"]
    if name == "unigram":
        assert tb.kind == "Metaspace Unigram"
    for special in ("<unk>", "<|im_end|>", "</s>"):
        assert tb[tok.convert_tokens_to_ids(special)] == b"" and tb.is_special(tok.convert_tokens_to_ids(special))
    # any two tokens after a first one decode to their bytes, one after the other
    rng = random.Random(1)
    first = tok("The", add_special_tokens=False)["input_ids"]
    normal = [i for i in range(len(tb)) if not tb.special[i] and not toks(tok, [i])[0].startswith("<0x")]
    for _ in range(1000):
        a, b = rng.choice(normal), rng.choice(normal)
        assert tok.decode([*first, a, b]).encode() == b"The" + tb[a] + tb[b], (a, b)


def test_token_bytes_cache_sees_added_tokens(bases):
    tok = copy.deepcopy(bases["unigram"])
    first = token_bytes(tok)
    assert token_bytes(tok) is first
    tok.add_tokens(["<think>"], special_tokens=False)
    tok.add_tokens(["<|new_end|>"], special_tokens=True)
    second = token_bytes(tok)
    assert second is not first and len(second) == len(first) + 2
    assert second[tok.convert_tokens_to_ids("<think>")] == b"<think>"  # a plain added token: its text
    assert second.is_special(tok.convert_tokens_to_ids("<|new_end|>"))


def test_token_bytes_refuses_a_slow_tokenizer():
    with pytest.raises(ValueError, match="backed by the `tokenizers` library"):
        token_bytes(object())


# ------------------------------------------------------------------------------------------------ hand-checked


def test_cjk_and_emoji_split_by_byte_level_bpe_hand_checked(smollm2_tokenizer):
    """SmolLM2 writes " 東" as 3 tokens, 京 as 2 and " 👍" as 3; a sentencepiece Unigram writes each as 1:
    many-to-one groups (one-to-many the other way round), each covering the same bytes."""
    smol, uni = smollm2_tokenizer, hand_unigram()
    text = " 東京は大きい 👍🏽"
    t_ids = smol(text, add_special_tokens=False)["input_ids"]
    s_ids = uni(text, add_special_tokens=False)["input_ids"]
    tb_t, tb_s = token_bytes(smol), token_bytes(uni)
    groups = align(t_ids, tb_t, s_ids, tb_s)
    got = [(toks(smol, [t_ids[i] for i in g.teacher]), toks(uni, [s_ids[i] for i in g.student])) for g in groups]
    assert got == [
        (["Ġæ", "Ŀ", "±"], ["▁東"]),  # " 東" (20 e6 9d b1) in 3 tokens, 2 of them inside the character
        (["äº", "¬"], ["京"]),
        (["ãģ", "¯"], ["は"]),
        (["å¤§", "ãģ", "į", "ãģĦ"], ["大きい"]),
        (["ĠðŁ", "ĳ", "į"], ["▁👍"]),
        (["ðŁ", "ı", "½"], ["🏽"]),
    ]
    assert [g.kind for g in groups] == ["many-to-one"] * 6
    assert all(tb_t.join(t_ids[i] for i in g.teacher) == tb_s.join(s_ids[i] for i in g.student) for g in groups)
    assert groups[0] == Group(teacher=(0, 1, 2), student=(0,))
    # the other way round: one-to-many, the same groups mirrored
    back = align(s_ids, tb_s, t_ids, tb_t)
    assert [(g.student, g.teacher) for g in back] == [(g.teacher, g.student) for g in groups]
    assert [g.kind for g in back] == ["one-to-many"] * 6


def test_byte_fallback_against_byte_level_hand_checked(smollm2_tokenizer):
    """An emoji is 4 byte-fallback tokens for a Llama-style tokenizer and 3 byte-level tokens for SmolLM2; the
    Llama normaliser also puts a space before the text that SmolLM2 does not have (absorbed by the first group)."""
    smol, bf = smollm2_tokenizer, hand_byte_fallback()
    text = "東京 👍"
    t_ids = bf(text, add_special_tokens=False)["input_ids"]
    s_ids = smol(text, add_special_tokens=False)["input_ids"]
    assert toks(bf, t_ids) == ["▁", "東", "京", "▁", "<0xF0>", "<0x9F>", "<0x91>", "<0x8D>"]
    tb_t, tb_s = token_bytes(bf), token_bytes(smol)
    assert tb_t.join(t_ids) == b" " + text.encode() and tb_s.join(s_ids) == text.encode()
    groups = align(t_ids, tb_t, s_ids, tb_s)
    got = [(toks(bf, [t_ids[i] for i in g.teacher]), toks(smol, [s_ids[i] for i in g.student])) for g in groups]
    assert got == [
        (["▁", "東"], ["æĿ", "±"]),  # the leading space only the teacher writes joins the first group
        (["京"], ["äº", "¬"]),
        (["▁", "<0xF0>", "<0x9F>"], ["ĠðŁ"]),
        (["<0x91>"], ["ĳ"]),
        (["<0x8D>"], ["į"]),
    ]
    assert [g.kind for g in groups] == ["many-to-many", "one-to-many", "many-to-one", "one-to-one", "one-to-one"]
    # under whitespace="exact" the leading space is a divergence at byte 0
    with pytest.raises(AlignmentError) as err:
        align(t_ids, tb_t, s_ids, tb_s, whitespace="exact")
    assert (err.value.reason, err.value.teacher_offset, err.value.student_offset) == ("text", 0, 0)


def _tb(*pieces: bytes, special: tuple[int, ...] = ()) -> TokenBytes:
    """A hand-made table (names of special tokens are only for reading: they carry no bytes)."""
    flags = np.zeros(len(pieces), dtype=bool)
    flags[list(special)] = True
    return TokenBytes(data=tuple(b"" if flags[i] else p for i, p in enumerate(pieces)), special=flags)


def test_space_before_or_after_a_word():
    """Tokenizers that write the space before a word (Ġ, ▁) and one that writes it after: by bytes the boundaries
    never meet (exact: one group); loose cuts between the same non-space bytes (groups differ only in spaces)."""
    vocab = _tb(b"</s>", b"Hello", b" world", b" foo", b"Hello ", b"world ", b"foo", special=(0,))
    teacher, student = [1, 2, 3, 0], [4, 5, 6, 0]
    assert align(teacher, vocab, student, vocab, whitespace="exact") == [
        Group((0, 1, 2), (0, 1, 2)), Group((3,), (3,), end=True)]
    assert align(teacher, vocab, student, vocab) == [
        Group((0,), (0,)), Group((1,), (1,)), Group((2,), (2,)), Group((3,), (3,), end=True)]


def test_whitespace_runs_and_zero_byte_tokens():
    v = _tb(b"<eos>", b" ", b"  ", b" x", b"x", b"three", b"<img>", b"\n", b"\n\n", b"y", special=(0, 6))
    # the same bytes, spaces split differently: one group, exact in both modes
    for mode in ("exact", "loose"):
        assert align([1, 3, 0], v, [2, 4, 0], v, whitespace=mode) == [
            Group((0, 1), (0, 1)), Group((2,), (2,), end=True)]
    # whitespace one side lacks joins the group next to it (leading: the first group; trailing: the one before)
    assert align([1, 5], v, [5], v, teacher_end=(), student_end=()) == [Group((0, 1), (0,))]
    assert align([5, 1, 2], v, [5], v, teacher_end=(), student_end=()) == [Group((0, 1, 2), (0,))]
    # a token with no bytes inside an answer joins the group before it; at the start, the first group
    assert align([4, 6, 9, 0], v, [4, 9, 0], v) == [Group((0, 1), (0,)), Group((2,), (1,)), Group((3,), (2,), end=True)]
    assert align([6, 4, 0], v, [4, 0], v) == [Group((0, 1), (0,)), Group((2,), (1,), end=True)]
    # newline runs: exact cuts where both have seen the same whitespace
    assert align([4, 7, 7, 9, 0], v, [4, 8, 9, 0], v) == [
        Group((0,), (0,)), Group((1, 2), (1,)), Group((3,), (2,)), Group((4,), (3,), end=True)]
    # an answer with no text: the end markers, with whatever whitespace one side writes
    assert align([0], v, [7, 0], v) == [Group((0,), (0, 1), end=True)]


def test_end_markers():
    v = _tb(b"</s>", b"<|im_end|>", b"<|eot_id|>", b"ok", b"!", b"<pad>", special=(0, 1, 2, 5))
    # default: the trailing special tokens of each side, mapped to each other as one group
    assert align([3, 4, 0], v, [3, 4, 1], v) == [Group((0,), (0,)), Group((1,), (1,)), Group((2,), (2,), end=True)]
    assert align([3, 2], v, [3, 1, 2], v) == [Group((0,), (0,)), Group((1,), (1, 2), end=True)]
    # named markers: only those end an answer (here <pad> is a zero-byte token of the text, not an end marker)
    assert align(np.array([3, 5, 0]), v, [3, 1], v, teacher_end=0, student_end=[1, 2]) == [
        Group((0, 1), (0,)), Group((2,), (1,), end=True)]
    # only one side ends with a marker: AlignmentError, the groups of the text in .alignment
    with pytest.raises(AlignmentError, match="only the student answer ends with an end marker") as err:
        align([3, 4], v, [3, 4, 1], v)
    assert err.value.reason == "end marker" and (err.value.teacher_offset, err.value.student_offset) == (3, 3)
    report = err.value.alignment
    assert report.groups == (Group((0,), (0,)), Group((1,), (1,))) and report.unmatched_student == (2,)
    assert align_report([3, 4], v, [3, 4, 1], v).message == report.message


def test_divergence_gives_offsets_and_the_matching_part():
    v = _tb(b"<eos>", b"abc", b" d", b"ef", b"X", b"Y", b" abc", b"<unk>", special=(0, 7))
    with pytest.raises(AlignmentError) as err:
        align([1, 2, 3, 4, 0], v, [6, 2, 3, 5, 0], v)
    e = err.value
    # teacher "abc def" + "X" vs student " abc def" + "Y": the non-space bytes match up to "abcdef"
    assert (e.reason, e.teacher_offset, e.student_offset) == ("text", 7, 8)
    assert "teacher byte 7 / student byte 8" in str(e) and "b'X'" in str(e) and "b'Y'" in str(e)
    assert e.alignment.groups == (Group((0,), (0,)), Group((1,), (1,)), Group((2,), (2,)), Group((4,), (4,), end=True))
    assert (e.alignment.unmatched_teacher, e.alignment.unmatched_student) == ((3,), (3,))
    assert not e.alignment.ok and e.alignment.teacher_text == b"abc defX"
    # one side cut short (truncated answer): the divergence is where the shorter one ends
    r = align_report([1, 2, 3], v, [1, 2], v)  # "abc def" vs "abc d"
    assert (r.reason, r.teacher_offset, r.student_offset) == ("text", 5, 5)
    assert r.groups == (Group((0,), (0,)), Group((1,), (1,)))
    assert (r.unmatched_teacher, r.unmatched_student) == ((2,), ())
    # an unknown token has no bytes: named in the message
    r = align_report([1, 2, 3], v, [1, 7, 3], v, teacher_end=(), student_end=())
    assert r.reason == "text" and "student answer holds special tokens" in r.message and "[7]" in r.message


def test_invalid_arguments():
    v = _tb(b"<eos>", b"a", special=(0,))
    with pytest.raises(ValueError, match="whitespace must be one of"):
        align([1], v, [1], v, whitespace="ignore")
    with pytest.raises(ValueError, match="outside the tokenizer's 2 ids"):
        align([1, 5], v, [1], v)
    with pytest.raises(ValueError, match="must be TokenBytes"):
        align([1], [b"", b"a"], [1], v)
    with pytest.raises(ValueError, match="sequence of ints"):
        align("ab", v, [1], v)


@pytest.mark.parametrize("seed", range(6))
def test_random_segmentations_cover_the_same_bytes(seed):
    """Random texts cut at random bytes (inside characters too) on both sides, half of them with the student's
    whitespace changed: the groups cover both sides in order with no gap, each with equal bytes (equal but for
    whitespace under "loose"), and "exact" cuts exactly where both sides have a boundary."""
    rng = random.Random(seed)
    alphabet = ["a", "b", " ", "\n", "東", "é", "👍🏽", "1", ","]
    for _ in range(50):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 30))).encode()

        def cut(n):
            points = sorted(rng.sample(range(1, len(text)), min(n, len(text) - 1)))
            return [text[a:b] for a, b in zip([0, *points], [*points, len(text)])]

        t_pieces = cut(rng.randint(0, 12))
        if loose_only := rng.random() < 0.5:  # the student's whitespace differs: some dropped, some added
            text = b"".join(b"" if c in WHITESPACE and rng.random() < 0.5 else bytes([c]) +
                            (rng.choice([b" ", b"\n", b"\t "]) if rng.random() < 0.1 else b"") for c in text)
            text = text or b" "
        s_pieces = cut(rng.randint(0, 12))
        v = _tb(b"<eos>", *t_pieces, *s_pieces, special=(0,))
        t_ids = [*range(1, 1 + len(t_pieces)), 0]
        s_ids = [*range(1 + len(t_pieces), 1 + len(t_pieces) + len(s_pieces)), 0]
        for mode in ("loose",) if loose_only else ("exact", "loose"):
            groups = align(t_ids, v, s_ids, v, whitespace=mode)
            assert [i for g in groups for i in g.teacher] == list(range(len(t_ids)))
            assert [i for g in groups for i in g.student] == list(range(len(s_ids)))
            assert groups[-1].end and not any(g.end for g in groups[:-1])
            for g in groups[:-1]:
                tb, sb = v.join(t_ids[i] for i in g.teacher), v.join(s_ids[i] for i in g.student)
                assert (tb == sb) if mode == "exact" else (strip_ws(tb) == strip_ws(sb))
            if mode == "exact":
                t_cuts = set(np.cumsum([len(p) for p in t_pieces]).tolist())
                s_cuts = set(np.cumsum([len(p) for p in s_pieces]).tolist())
                assert len(groups) - 1 == len(t_cuts & s_cuts)


# ------------------------------------------------------------------------------------------------ chat templates

# (teacher tokenizer, teacher template), (student tokenizer, student template): every tokenizer type and template
PAIRS = [
    (("smollm2", "Qwen2-VL-7B-Instruct"), ("llama_bpe", "llava-1.5-7b-hf")),
    (("llama_bpe", "Mistral-7B-Instruct-v0.2"), ("smollm2", "Meta-Llama-3-8B-Instruct")),
    (("smollm2", "llava-1.5-7b-hf"), ("unigram", "Qwen2-VL-7B-Instruct")),
    (("unigram", "Meta-Llama-3-8B-Instruct"), ("wordpiece", "Mistral-7B-Instruct-v0.2")),
    (("wordpiece", "Qwen2-VL-7B-Instruct"), ("smollm2", "Mistral-7B-Instruct-v0.2")),
    (("llama_bpe", "Qwen2-VL-7B-Instruct"), ("unigram", "llava-1.5-7b-hf")),
]


def _runs(rows: np.ndarray) -> list[np.ndarray]:
    return [r for r in np.split(np.arange(len(rows)), np.flatnonzero(np.diff(rows) != 1) + 1) if len(r)]


@pytest.mark.parametrize("teacher,student", PAIRS, ids=lambda p: "-".join(p))
def test_answers_under_chat_templates(encoded, teacher, student):
    t_tok, t_enc = encoded(*teacher)
    s_tok, s_enc = encoded(*student)
    tb_t, tb_s = token_bytes(t_tok), token_bytes(s_tok)
    groups = answer_groups(t_enc.input_ids, t_enc.text_positions, s_enc.input_ids, s_enc.text_positions, tb_t, tb_s)
    t_sup = t_enc.input_ids[t_enc.text_positions + 1]  # the supervised tokens, one per text row
    s_sup = s_enc.input_ids[s_enc.text_positions + 1]

    # groups cover both sides' rows in order, with no gap
    assert [i for g in groups for i in g.teacher] == list(range(len(t_sup)))
    assert [i for g in groups for i in g.student] == list(range(len(s_sup)))
    for g in groups:
        assert list(g.teacher) == list(range(g.teacher[0], g.teacher[-1] + 1)) and g.teacher and g.student

    # one end group per answer, pairing the two families' end markers
    ends = [g for g in groups if g.end]
    assert len(ends) == len(ANSWERS) == len(_runs(t_enc.text_positions))
    t_eos, s_eos = FAMILIES[teacher[1]]["eos"], FAMILIES[student[1]]["eos"]
    for g in ends:
        assert toks(t_tok, t_sup[list(g.teacher)]) == [t_eos] and toks(s_tok, s_sup[list(g.student)]) == [s_eos]

    # per answer: the groups' bytes are the answer's bytes, the same on both sides
    bounds = [i for i, g in enumerate(groups) if g.end]
    both_keep = tb_t.keeps_whitespace and tb_s.keeps_whitespace
    for answer, start, stop in zip(ANSWERS, [-1, *bounds[:-1]], bounds):
        text = groups[start + 1:stop]
        t_parts = [tb_t.join(t_sup[list(g.teacher)]) for g in text]
        s_parts = [tb_s.join(s_sup[list(g.student)]) for g in text]
        for k, (a, b) in enumerate(zip(t_parts, s_parts)):
            assert strip_ws(a) == strip_ws(b), (answer, k, a, b)
            if both_keep and 0 < k < len(text) - 1:  # inside the answer the whitespace is the same too
                assert a == b, (answer, k, a, b)
        for parts, tb in ((t_parts, tb_t), (s_parts, tb_s)):
            body = b"".join(parts)
            if tb.keeps_whitespace:  # templates add or trim whitespace around the answer, never inside it
                assert body.strip(WHITESPACE) == answer.strip().encode(), (answer, body)
            else:
                assert strip_ws(body) == strip_ws(answer.encode()), (answer, body)

    kinds = Counter(g.kind for g in groups if not g.end)
    assert kinds["one-to-one"] and (kinds["one-to-many"] or kinds["many-to-one"]), kinds
    t_sizes, s_sizes = group_sizes(groups)
    assert t_sizes.sum() == len(t_sup) and s_sizes.sum() == len(s_sup) and (t_sizes >= 1).all()


def test_same_template_lossless_pair_aligns_exactly(encoded):
    """Under the same template two lossless tokenizers supervise the same bytes: `whitespace="exact"` holds, every
    group's bytes are equal and the text groups of an answer concatenate to the answer. (No answer starts with
    whitespace here: SmolLM2 merges the newline before the answer with the answer's leading spaces into one token,
    which then carries a template byte, so such an answer aligns under "loose" only.)"""
    answers = tuple(a.lstrip() for a in ANSWERS)
    t_tok, t_enc = encoded("smollm2", "Qwen2-VL-7B-Instruct", answers)
    s_tok, s_enc = encoded("llama_bpe", "Qwen2-VL-7B-Instruct", answers)
    tb_t, tb_s = token_bytes(t_tok), token_bytes(s_tok)
    exact = answer_groups(t_enc.input_ids, t_enc.text_positions, s_enc.input_ids, s_enc.text_positions, tb_t, tb_s,
                          whitespace="exact")
    loose = answer_groups(t_enc.input_ids, t_enc.text_positions, s_enc.input_ids, s_enc.text_positions, tb_t, tb_s)
    assert exact == loose
    t_sup, s_sup = t_enc.input_ids[t_enc.text_positions + 1], s_enc.input_ids[s_enc.text_positions + 1]
    texts, current = [], b""
    for g in exact:
        t_b, s_b = tb_t.join(t_sup[list(g.teacher)]), tb_s.join(s_sup[list(g.student)])
        assert t_b == s_b
        if g.end:
            texts.append(current)
            current = b""
        else:
            current += t_b
    assert texts == [a.encode() for a in answers]
    kinds = Counter(g.kind for g in exact)
    assert kinds["one-to-one"] and kinds["one-to-many"] and kinds["many-to-one"]


def test_divergent_normalisation_is_reported(encoded):
    """An uncased WordPiece (lowercase + accent stripping) against SmolLM2: `answer_groups` raises AlignmentError
    naming the answer, the byte offsets and the normaliser; strict=False keeps the groups of what matches."""
    t_tok, t_enc = encoded("smollm2", "Qwen2-VL-7B-Instruct")
    s_tok, s_enc = encoded("wordpiece_uncased", "Qwen2-VL-7B-Instruct")
    tb_t, tb_s = token_bytes(t_tok), token_bytes(s_tok)
    assert tb_s.normalizer == ("BertNormalizer",)
    args = (t_enc.input_ids, t_enc.text_positions, s_enc.input_ids, s_enc.text_positions, tb_t, tb_s)
    with pytest.raises(AlignmentError) as err:
        answer_groups(*args)
    e = err.value
    # answer 0 (CJK) matches; answer 1 "  👍🏽 Thumbs up ..." diverges at "Thumbs" / "thumbs"
    part = e.alignment
    assert (e.answer, e.reason) == (1, "text") and not part.ok
    assert part.teacher_text[e.teacher_offset:].startswith(b"Thumbs")
    assert part.student_text[e.student_offset:].startswith(b"thumbs")
    assert f"answer 1: the answer texts differ at teacher byte {e.teacher_offset} / student byte " \
           f"{e.student_offset}" in str(e) and "student tokenizer normalises text (BertNormalizer)" in str(e)
    # what matches before the divergence ("👍🏽 ") is grouped, the rest is unmatched, the end markers pair up
    t_answer = t_enc.input_ids[t_enc.text_positions[_runs(t_enc.text_positions)[1]] + 1]
    assert b"".join(tb_t.join(t_answer[list(g.teacher)]) for g in part.groups if not g.end).strip() == "👍🏽".encode()
    assert part.groups[-1].end and part.unmatched_teacher and part.unmatched_student

    partial = answer_groups(*args, strict=False)
    assert sum(g.end for g in partial) == len(ANSWERS)  # every answer's end markers still pair up
    used_t = [i for g in partial for i in g.teacher]
    assert used_t == sorted(used_t) and len(used_t) < len(t_enc.text_positions)  # rows after a divergence left out
    # a word-start WordPiece token carries its space: b" pi", so "p" is at student byte 1
    with pytest.raises(AlignmentError, match="differ at teacher byte 0 / student byte 1"):
        align(t_tok("Pi", add_special_tokens=False)["input_ids"], tb_t,
              s_tok("Pi", add_special_tokens=False)["input_ids"], tb_s, teacher_end=(), student_end=())


def test_answer_counts_must_match(encoded):
    t_tok, t_enc = encoded("smollm2", "Qwen2-VL-7B-Instruct")
    s_tok, s_enc = encoded("unigram", "Qwen2-VL-7B-Instruct")
    first = _runs(s_enc.text_positions)[0]
    with pytest.raises(AlignmentError, match="the teacher has 6 answers and the student 1") as err:
        answer_groups(t_enc.input_ids, t_enc.text_positions, s_enc.input_ids, s_enc.text_positions[first],
                      token_bytes(t_tok), token_bytes(s_tok))
    assert err.value.reason == "answers"
