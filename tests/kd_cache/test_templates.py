"""What is supervised, for the chat templates the model families publish, on real tokenizers.

The supervised tokens (`labels_mask`) of every assistant turn must decode to exactly that turn's answer plus the
end-of-turn marker the model was trained to emit: `<|im_end|>` (LLaVA-OneVision, Qwen2-VL), `<|eot_id|>`
(Llama-3), `</s>` (Mistral), and for the LLaVA-1.5 / LLaVA-NeXT (Vicuna) templates, which write no end marker,
the tokenizer's EOS that `Encoder` inserts (`append_eos=True`, the default), as original LLaVA training did.

Templates: the published ones, verbatim, in tests/fixtures/chat_templates/ (sources in its README.md).
Tokenizers: SmolLM2-135M-Instruct's real byte-level BPE (`smollm2_tokenizer`, tests/conftest.py) and a
sentencepiece-style one (Metaspace `▁`) trained here. Each gets the special tokens the real model family has.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest

from kd_cache.data import Encoder, SkipSample

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "chat_templates"

# The special tokens of each family's real tokenizer: bos/eos (None: keep the tokenizer's own), the extra special
# tokens its template writes, and the end marker a supervised answer must end with.
VICUNA = dict(bos="<s>", eos="</s>", extra=["<image>"], marker="</s>", system=True)
FAMILIES = {
    "llava-1.5-7b-hf": VICUNA,
    "llava-v1.6-vicuna-7b-hf": VICUNA,
    "llava-onevision-qwen2-7b-ov-hf": dict(bos=None, eos="<|im_end|>", extra=["<image>", "<video>"],
                                           marker="<|im_end|>", system=True),
    "Qwen2-VL-7B-Instruct": dict(bos=None, eos="<|im_end|>", marker="<|im_end|>", system=True,
                                 extra=["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]),
    "Meta-Llama-3-8B-Instruct": dict(bos="<|begin_of_text|>", eos="<|eot_id|>", marker="<|eot_id|>", system=True,
                                     extra=["<|start_header_id|>", "<|end_header_id|>"]),
    # v0.2's template raises on a system turn ("Conversation roles must alternate"): tested without one
    "Mistral-7B-Instruct-v0.2": dict(bos="<s>", eos="</s>", extra=["[INST]", "[/INST]"], marker="</s>",
                                     system=False),
}
TOKENIZERS = ("smollm2", "sentencepiece")

SYSTEM = "You are a careful assistant. Answer briefly."
QA = [
    ("How many sides does a triangle have?", "three"),
    ("What colour is the sky on a clear day?", "blue"),
    ("Describe the picture in one sentence.", "A small red circle on the left of a white square."),
]


def template(name: str) -> str:
    return (FIXTURES / f"{name}.jinja").read_text()


def record(qa, system: bool = False, rid: str = "x") -> dict:
    conv = [{"from": "system", "value": SYSTEM}] if system else []
    for q, a in qa:
        conv += [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
    return {"id": rid, "conversations": conv}


def runs(mask: np.ndarray) -> list[np.ndarray]:
    """Index arrays of the maximal runs of True in `mask` (one per supervised assistant turn)."""
    idx = np.flatnonzero(mask)
    return [r for r in np.split(idx, np.flatnonzero(np.diff(idx) > 1) + 1) if len(r)]


def supervised_turns(tok, s) -> list[str]:
    return [tok.decode(s.input_ids[r].tolist(), skip_special_tokens=False) for r in runs(s.labels_mask)]


def expected_turn(tok_name: str, name: str, answer: str, marker: str) -> str:
    # Byte-level BPE merges the space the Vicuna template writes after "ASSISTANT:" into the answer's first token
    # (" three"): the model emits that space, so it is supervised and decodes back; Metaspace decoding drops a
    # leading "▁" of the decoded text.
    space = " " if tok_name == "smollm2" and name in ("llava-1.5-7b-hf", "llava-v1.6-vicuna-7b-hf") else ""
    return space + answer + marker


# ------------------------------------------------------------------------------------------------ tokenizers


SP_SPECIALS = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|begin_of_text|>",
               "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>", "[INST]", "[/INST]", "<image>", "<video>",
               "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]


def _sp_corpus() -> list[str]:
    words = ("user assistant system USER ASSISTANT You are a careful assistant Answer briefly How many sides does "
             "triangle have What colour is the sky on clear day Describe picture in one sentence small red circle "
             "left of white square three blue four green Is it or two yes no the an and").split()
    lines = [SYSTEM, "USER: hello ASSISTANT: yes, no. system: user:"] + [f"{q} {a}" for q, a in QA]
    lines += [" ".join(words[i:i + 9]) for i in range(0, len(words), 3)]
    return lines * 3


@pytest.fixture(scope="module")
def sp_tokenizer():
    """A sentencepiece-style BPE tokenizer (Metaspace `▁`, like Llama-2/Mistral/Vicuna): adds <s> like them."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=400, min_frequency=2, special_tokens=SP_SPECIALS,
                                  initial_alphabet=["\n", "▁"], show_progress=False)
    tok.train_from_iterator(_sp_corpus(), trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", tok.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   extra_special_tokens=SP_SPECIALS[3:], clean_up_tokenization_spaces=False)


@pytest.fixture
def make_tokenizer(request):
    """(tokenizer name, template name) -> a copy of that tokenizer with the family's special tokens and template."""

    def make(tok_name: str, name: str, chat_template: str | None = None):
        base = request.getfixturevalue("smollm2_tokenizer" if tok_name == "smollm2" else "sp_tokenizer")
        tok = copy.deepcopy(base)
        fam = FAMILIES[name]
        tok.add_tokens(fam["extra"], special_tokens=True)
        named = {f"{k}_token": fam[k] for k in ("bos", "eos") if fam[k]}
        if named:
            tok.add_special_tokens(named)
        tok.chat_template = chat_template if chat_template is not None else template(name)
        return tok

    return make


# ------------------------------------------------------------------------------------------------ the table


@pytest.mark.parametrize("tok_name", TOKENIZERS)
@pytest.mark.parametrize("name", list(FAMILIES))
def test_supervised_tokens_are_the_answers_and_their_end_marker(make_tokenizer, tok_name, name):
    fam = FAMILIES[name]
    tok = make_tokenizer(tok_name, name)
    assert tok.eos_token == fam["eos"]
    enc = Encoder(tok, None)
    for qa, system in ((QA[:1], False), (QA[1:2], fam["system"]), (QA, fam["system"])):
        s = enc.encode(record(qa, system))
        got = supervised_turns(tok, s)
        assert got == [expected_turn(tok_name, name, a, fam["marker"]) for _, a in qa], (name, tok_name, got)
        # rows predicting those tokens, and nothing of the prompt (questions, system) is supervised
        assert np.array_equal(s.text_positions + 1, np.flatnonzero(s.labels_mask))
        prompt = tok.decode(s.input_ids[~s.labels_mask].tolist(), skip_special_tokens=False)
        assert all(q in prompt for q, _ in qa) and (SYSTEM in prompt) == system
        print(f"\n[{name} x {tok_name}] {got}")


def test_mistral_v02_template_refuses_a_system_turn(make_tokenizer):
    from jinja2.exceptions import TemplateError

    tok = make_tokenizer("sentencepiece", "Mistral-7B-Instruct-v0.2")
    with pytest.raises(TemplateError, match="roles must alternate"):
        Encoder(tok, None).encode(record(QA[:1], system=True))


@pytest.mark.parametrize("tok_name", TOKENIZERS)
@pytest.mark.parametrize("name", ["llava-1.5-7b-hf", "llava-v1.6-vicuna-7b-hf"])
def test_append_eos_false_leaves_vicuna_templates_as_they_render(make_tokenizer, tok_name, name):
    tok = make_tokenizer(tok_name, name)
    on, off = Encoder(tok, None), Encoder(tok, None, append_eos=False)
    rec = record(QA, system=True)
    s_off, s_on = off.encode(rec), on.encode(rec)
    # exactly the template's text, tokenized: no EOS anywhere, the answers alone supervised
    def msg(role, text):  # the LLaVA templates render content lists only
        return {"role": role, "content": [{"type": "text", "text": text}]}

    messages = [msg("system", SYSTEM)] + [m for q, a in QA for m in (msg("user", q), msg("assistant", a))]
    rendered = tok.apply_chat_template(messages, tokenize=False)
    assert "</s>" not in rendered
    assert np.array_equal(s_off.input_ids, np.asarray(tok(rendered)["input_ids"]))
    assert tok.eos_token_id not in s_off.input_ids
    assert supervised_turns(tok, s_off) == [expected_turn(tok_name, name, a, "") for _, a in QA]
    # append_eos=True: the same tokens with one EOS after each answer
    assert list(s_on.input_ids).count(tok.eos_token_id) == len(QA)
    assert np.array_equal(s_on.input_ids[s_on.input_ids != tok.eos_token_id], s_off.input_ids)


# ------------------------------------------------------------------------------------------------ the fixes


# Vicuna's layout with the end marker written and a generation prompt ending in a space, as FastChat-style
# templates have it: "USER: ... ASSISTANT: " + "three</s> "
SPACE_PROMPT = ("{% for m in messages %}{{ m['role'].upper() }}: {{ m['content'] }}{% if m['role'] == 'assistant' %}"
                "{{ eos_token }}{% endif %} {% endfor %}{% if add_generation_prompt %}ASSISTANT: {% endif %}")


def test_a_token_straddling_the_answer_start_is_supervised(make_tokenizer):
    """Byte-level BPE merges the prompt's last space into the first answer word (" three" is one token): the token
    starts before the answer's span, and used to be dropped, leaving only "</s>" supervised."""
    tok = make_tokenizer("smollm2", "llava-1.5-7b-hf", chat_template=SPACE_PROMPT)
    s = Encoder(tok, None).encode(record(QA))
    assert supervised_turns(tok, s) == [" " + a + "</s>" for _, a in QA]
    rendered = tok.apply_chat_template([{"role": "user", "content": QA[0][0]}], tokenize=False,
                                       add_generation_prompt=True)
    assert rendered.endswith("ASSISTANT: ")
    first = tok(rendered + "three", add_special_tokens=False, return_offsets_mapping=True)
    assert tok.convert_ids_to_tokens(first["input_ids"][-1]) == "Ġthree"
    assert first["offset_mapping"][-1][0] == len(rendered) - 1  # the token starts on the prompt's space


# A template that is not prefix-stable: it writes the number of messages first, so rendering the conversation up to
# a turn is no prefix of rendering all of it, and the answers are found by their text.
COUNTER_CHATML = ("{{ messages | length }} messages\n{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
                  "{{ m['content'] }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
                  "{% endif %}")
COUNTER_VICUNA = ("{{ messages | length }} messages. {% for m in messages %}{{ m['role'].upper() }}: "
                  "{{ m['content'] }} {% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}")


@pytest.mark.parametrize("tok_name", TOKENIZERS)
def test_not_prefix_stable_template_supervises_the_end_marker(make_tokenizer, tok_name):
    tok = make_tokenizer(tok_name, "Qwen2-VL-7B-Instruct", chat_template=COUNTER_CHATML)
    enc = Encoder(tok, None)
    msgs = [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]
    answered = msgs + [{"role": "assistant", "content": [{"type": "text", "text": "x"}]}]
    assert not enc.render(answered).startswith(enc.render(msgs, True))
    # the answer also appears in a question before it: the one the template writes as the answer is supervised
    qa = [("Is it three or four?", "three"), ("And the sky, blue or green?", "blue"), QA[2]]
    s = enc.encode(record(qa))
    assert supervised_turns(tok, s) == [a + "<|im_end|>" for _, a in qa]


@pytest.mark.parametrize("tok_name", TOKENIZERS)
def test_not_prefix_stable_template_without_end_marker_gets_the_eos(make_tokenizer, tok_name):
    tok = make_tokenizer(tok_name, "llava-1.5-7b-hf", chat_template=COUNTER_VICUNA)
    rec = record(QA)
    on = Encoder(tok, None).encode(rec)
    lead = " " if tok_name == "smollm2" else ""  # fallback spans start at the answer; " three" straddles it
    assert supervised_turns(tok, on) == [lead + a + "</s>" for _, a in QA]
    off = Encoder(tok, None, append_eos=False).encode(rec)
    assert supervised_turns(tok, off) == [lead + a for _, a in QA]
    assert tok.eos_token_id not in off.input_ids


def test_llava_onevision_template_is_not_prefix_stable(make_tokenizer):
    """The published OneVision template writes "<|im_start|>assistant " in a turn but "<|im_start|>assistant\\n" as
    the generation prompt: its answers are found by text, and the <|im_end|> after each is still supervised."""
    tok = make_tokenizer("smollm2", "llava-onevision-qwen2-7b-ov-hf")
    enc = Encoder(tok, None)
    msgs = [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]
    gen = enc.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    turn = enc.tokenizer.apply_chat_template(msgs + [{"role": "assistant", "content": [
        {"type": "text", "text": "x"}]}], tokenize=False)
    assert gen.endswith("<|im_start|>assistant\n") and "<|im_start|>assistant \nx<|im_end|>" in turn


# ------------------------------------------------------------------------------------------------ multimodal


def test_llava15_template_eos_survives_image_expansion(llava_teacher, tmp_path):
    from transformers import AutoConfig, AutoProcessor

    from kd_cache.data import image_token_id_of
    from tests.conftest import save_image

    save_image(tmp_path / "a.png", 0)
    proc = AutoProcessor.from_pretrained(llava_teacher)
    proc.chat_template = template("llava-1.5-7b-hf")
    tok = proc.tokenizer
    image_id = image_token_id_of(AutoConfig.from_pretrained(llava_teacher), tok)
    rec = {"id": "m", "image": "a.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat colour is the shape?"}, {"from": "gpt", "value": "red"},
        {"from": "human", "value": "Is the shape large or small?"}, {"from": "gpt", "value": "a small circle"}]}
    s = Encoder(proc, image_id, image_root=str(tmp_path)).encode(rec)
    assert len(s.visual_positions) == 16 and (s.input_ids[s.visual_positions] == image_id).all()
    eos = tok.eos_token  # the tiny teacher's: <|endoftext|>
    assert supervised_turns(tok, s) == [f" red{eos}", f" a small circle{eos}"]
    assert list(s.input_ids).count(tok.eos_token_id) == 2
    off = Encoder(proc, image_id, image_root=str(tmp_path), append_eos=False).encode(rec)
    assert supervised_turns(tok, off) == [" red", " a small circle"] and tok.eos_token_id not in off.input_ids
    assert np.array_equal(off.visual_positions, s.visual_positions)


# ------------------------------------------------------------------------------------------------ the cache


@pytest.mark.parametrize("tok_name,name", [("smollm2", "llava-1.5-7b-hf"),
                                           ("sentencepiece", "llava-onevision-qwen2-7b-ov-hf")])
def test_cached_text_rows_are_the_supervised_rows(make_tokenizer, tmp_path, tok_name, name):
    """A text-only teacher with this tokenizer and template: the cache's text rows are the encoder's rows, and the
    tokens they predict decode to the answers plus their end marker."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, Olmo2Config

    from kd_cache import open_cache
    from kd_cache.build import BuildConfig, build

    tok = make_tokenizer(tok_name, name)
    teacher = tmp_path / "teacher"
    torch.manual_seed(0)
    # OLMo-2, not Qwen2: AutoTokenizer keeps a saved tokenizer as it is for it, where a qwen2 config makes it rebuild
    # the tokenizer as Qwen2's (byte-level pre-tokenizer and decoder), which would not be the tokenizer under test
    cfg = Olmo2Config(vocab_size=len(tok), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, intermediate_size=32, max_position_embeddings=512,
                      eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id, pad_token_id=tok.eos_token_id)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(teacher)
    tok.save_pretrained(teacher)
    records = [record(QA[:1], rid="one"), record(QA, system=True, rid="multi"), record(QA[1:2], rid="blue")]
    data = tmp_path / "data.json"
    data.write_text(json.dumps(records))
    out = tmp_path / "cache"
    m = build(BuildConfig(teacher=str(teacher), data=str(data), out=str(out), top_k=4, batch_size=2,
                          progress=False))
    assert m is not None and m["num_samples"] == len(records) and m["skipped"]["total"] == 0

    reloaded = AutoTokenizer.from_pretrained(teacher)  # what the build (and a student's trainer) sees
    marker = FAMILIES[name]["marker"]
    for sample in open_cache(str(out)):
        rec = records[sample["sample_index"]]
        ref = Encoder(tok, None).encode(rec, sample["sample_index"])
        assert np.array_equal(Encoder(reloaded, None).encode(rec).input_ids, ref.input_ids)
        assert np.array_equal(sample["input_ids"], ref.input_ids)
        assert np.array_equal(sample["text_positions"], ref.text_positions)
        nxt = np.zeros(len(ref.input_ids), dtype=bool)
        nxt[np.asarray(sample["text_positions"]) + 1] = True
        answers = [t["value"] for t in rec["conversations"] if t["from"] == "gpt"]
        assert [reloaded.decode(np.asarray(sample["input_ids"])[r].tolist(), skip_special_tokens=False)
                for r in runs(nxt)] == [expected_turn(tok_name, name, a, marker) for a in answers]


def test_truncation_inside_the_first_answer(make_tokenizer):
    """Truncating inside the first answer keeps its first (straddling) token and the sample; cutting before it
    leaves nothing supervised, and the sample is skipped as over max length."""
    tok = make_tokenizer("smollm2", "llava-1.5-7b-hf")
    full = Encoder(tok, None).encode(record(QA[2:]))
    first = int(np.flatnonzero(full.labels_mask)[0])
    cut = Encoder(tok, None, max_length=first + 2).encode(record(QA[2:]))
    assert cut.labels_mask[first] and cut.text_positions.tolist() == [first - 1, first]
    with pytest.raises(SkipSample) as e:
        Encoder(tok, None, max_length=first).encode(record(QA[2:]))
    assert e.value.reason == "over max length"
