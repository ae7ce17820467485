"""`kd_eval.evaluate`: answer normalisation, exact-match evaluation on tiny real models, the table and the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from kd_eval.evaluate import evaluate, format_table, normalize_answer
from tests.conftest import needs_torchvision, save_image, write_records

# --------------------------------------------------------------------------------------------- normalisation

NORMALISATION = [
    # case and whitespace
    ("RED", "red"), ("  Red \n", "red"), ("dark   red", "dark red"),
    # trailing punctuation and surrounding quotes; inner punctuation is content
    ("red.", "red"), ("red!", "red"), ("red...", "red"), ('"red"', "red"), ("'Red.'", "red"), ("\u201cred\u201d", "red"),
    ("e.g. red", "e.g. red"), ("3.5", "3.5"),
    # leading articles, once, and only as words
    ("A square", "square"), ("an apple", "apple"), ("The circle.", "circle"), ("theory", "theory"),
    ("a", "a"), ("another one", "another 1"),
    # number words zero..twenty as whole words
    ("Three", "3"), ("three sides", "3 sides"), ("zero", "0"), ("seventeen", "17"), ("twenty", "20"),
    ("twenty-one", "twenty-one"), ("someone", "someone"), ("7", "7"),
    # yes/no
    ("Yes.", "yes"), ("Yes, it is red.", "yes"), ("no", "no"), ("No, there are none", "no"), ("Nothing", "nothing"),
    ("yesterday", "yesterday"),
    # multiple choice
    ("B", "b"), ("(B)", "b"), ("B.", "b"), ("B)", "b"), ("B. square", "b"), ("B) square", "b"), ("(b) square", "b"),
    ("Answer: B", "b"), ("The answer is (C).", "c"), ("Option D", "d"), ("answer: three", "3"),
    ("Answer", "answer"), ("", ""),
]


@pytest.mark.parametrize("text,expected", NORMALISATION)
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected
    assert normalize_answer(expected) == expected  # a normalised answer is its own canonical form


def test_normalize_answer_rejects_non_strings():
    with pytest.raises(ValueError, match="got int"):
        normalize_answer(3)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------- evaluate

FAST = dict(max_new_tokens=6, progress=False)


@pytest.fixture(scope="module")
def qa_data(tmp_path_factory, tiny_data) -> tuple[Path, Path, list[dict]]:
    """The tiny instruct records with question types on some, plus three unusable records at the end."""
    data, images = tiny_data
    records = json.loads(data.read_text())
    for i, r in enumerate(records):
        if i % 3 < 2:
            r["question_type"] = ("colour", "shape")[i % 3]
    records += [
        {"id": "gone", "image": "nowhere.png", "conversations": [{"from": "human", "value": "<image>\nWhat?"},
                                                                  {"from": "gpt", "value": "red"}]},
        {"id": "unanswered", "conversations": [{"from": "human", "value": "Hello?"}]},
        {"id": "trailing-question", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "hi"},
                                                      {"from": "human", "value": "And?"}]},
    ]
    return write_records(tmp_path_factory.mktemp("qa"), records), images, records


@pytest.fixture(scope="module")
def single(llava_teacher, qa_data) -> dict:
    data, images, _ = qa_data
    return evaluate(llava_teacher, str(data), str(images), batch_size=1, **FAST)


def test_counts_types_and_skips_add_up(single, qa_data, llava_teacher):
    _, _, records = qa_data
    r = single
    assert r["model"] == str(llava_teacher) and r["seconds"] >= 0
    assert r["n"] == r["overall"]["n"] == len(r["predictions"]) == len(records) - 3
    assert r["skipped"] == {"total": 3, "by_reason": {"missing image": 1, "no response": 2}}
    assert set(r["per_type"]) == {"colour", "shape", "all"}
    assert sum(s["n"] for s in r["per_type"].values()) == r["n"]
    assert sum(s["correct"] for s in r["per_type"].values()) == r["overall"]["correct"]
    for s in r["per_type"].values():
        assert s["accuracy"] == s["correct"] / s["n"]
    usable = records[:-3]
    assert [p["id"] for p in r["predictions"]] == [rec["id"] for rec in usable]
    for p, rec in zip(r["predictions"], usable):
        assert p["reference"] == rec["conversations"][-1]["value"]  # the LAST gpt turn is the reference
        assert p["question_type"] == rec.get("question_type", "all")
        assert isinstance(p["prediction"], str) and isinstance(p["correct"], bool)


def test_left_padded_batches_match_single_samples(single, llava_teacher, qa_data):
    data, images, _ = qa_data
    batched = evaluate(llava_teacher, str(data), str(images), batch_size=4, **FAST)
    assert [p["prediction"] for p in batched["predictions"]] == [p["prediction"] for p in single["predictions"]]
    assert batched["skipped"] == single["skipped"]
    # the teacher-forced NLL sums in another order with another padding: equal to rounding
    strip = lambda r: {t: {k: v for k, v in d.items() if k != "answer_nll"} for t, d in r["per_type"].items()}  # noqa: E731
    assert sum(d["answer_tokens"] for d in batched["per_type"].values()) == batched["overall"]["answer_tokens"] > 0
    assert strip(batched) == strip(single)
    for t, d in batched["per_type"].items():
        assert d["answer_nll"] == pytest.approx(single["per_type"][t]["answer_nll"], rel=1e-6)


@pytest.mark.parametrize("family", [pytest.param(f, marks=needs_torchvision) for f in ("llava-onevision", "qwen2-vl")])
def test_left_padding_other_families(family, teacher_factory, qa_data):
    """Qwen2-VL's multimodal RoPE and OneVision's anyres crops must survive left padding too."""
    data, images, _ = qa_data
    one = evaluate(teacher_factory(family), str(data), str(images), batch_size=1, **FAST)
    many = evaluate(teacher_factory(family), str(data), str(images), batch_size=4, **FAST)
    assert one["n"] == len(one["predictions"]) > 0
    assert [p["prediction"] for p in many["predictions"]] == [p["prediction"] for p in one["predictions"]]


def test_prediction_is_only_the_new_tokens_of_plain_transformers_greedy(tmp_path, llava_teacher, tiny_data):
    """The same answer plain transformers gives for the hand-written prompt (last gpt turn dropped)."""
    import torch
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    _, images = tiny_data
    image_rel = json.loads(tiny_data[0].read_text())[0]["image"]
    records = [
        {"id": "img", "image": image_rel, "conversations": [
            {"from": "human", "value": "<image>\nWhat colour is the shape?"}, {"from": "gpt", "value": "red"}]},
        {"id": "txt", "conversations": [
            {"from": "human", "value": "How many sides does a square have?"}, {"from": "gpt", "value": "four"},
            {"from": "human", "value": "And a triangle?"}, {"from": "gpt", "value": "three"}]},
    ]
    r = evaluate(llava_teacher, str(write_records(tmp_path, records)), str(images), batch_size=2, **FAST)

    processor = AutoProcessor.from_pretrained(llava_teacher)
    model = AutoModelForImageTextToText.from_pretrained(llava_teacher).eval()
    prompts = [
        ([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is the shape?"}]}],
         [Image.open(images / image_rel).convert("RGB")]),
        ([{"role": "user", "content": [{"type": "text", "text": "How many sides does a square have?"}]},
          {"role": "assistant", "content": [{"type": "text", "text": "four"}]},
          {"role": "user", "content": [{"type": "text", "text": "And a triangle?"}]}], None),
    ]
    for (messages, imgs), pred in zip(prompts, r["predictions"]):
        text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        inputs = processor(text=[text], images=imgs, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**inputs, do_sample=False, max_new_tokens=FAST["max_new_tokens"])
        expected = processor.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()
        assert pred["prediction"] == expected


def test_exact_match_scores_the_models_own_answers_correct(tmp_path, single, llava_teacher, qa_data):
    """References set to the model's own batch-1 answers must score correct; different strings must not."""
    _, images, records = qa_data
    preds = {p["id"]: p["prediction"] for p in single["predictions"]}
    usable = [rec for rec in records[:-3] if normalize_answer(preds[rec["id"]])]
    assert len(usable) >= 4
    expect = {}
    for k, rec in enumerate(usable):
        own = k % 2 == 0
        rec = json.loads(json.dumps(rec))
        rec["conversations"][-1]["value"] = preds[rec["id"]] if own else "#not-what-it-said#"
        usable[k] = rec
        expect[rec["id"]] = own
    r = evaluate(llava_teacher, str(write_records(tmp_path, usable)), str(images), batch_size=3, **FAST)
    assert {p["id"]: p["correct"] for p in r["predictions"]} == expect
    assert r["overall"]["correct"] == sum(expect.values())
    assert r["overall"]["accuracy"] == sum(expect.values()) / len(expect)


def test_limit_counts_records_read(llava_teacher, qa_data):
    data, images, _ = qa_data
    r = evaluate(llava_teacher, str(data), str(images), batch_size=2, limit=3, **FAST)
    assert r["n"] + r["skipped"]["total"] == 3


def test_causal_lm_on_text_only_data(tmp_path, teacher_factory):
    qa = [("How many sides does a triangle have?", "three"), ("What colour do you get when you mix red and blue?",
                                                            "purple"), ("How many sides does a square have?", "four")]
    records = [{"id": f"t{i}", "question_type": "text", "conversations": [{"from": "human", "value": q},
                                                                          {"from": "gpt", "value": a}]}
               for i, (q, a) in enumerate(qa * 2)]
    records.append({"id": "with-image", "image": "x.png", "conversations": [{"from": "human", "value": "<image>\nHi"},
                                                                             {"from": "gpt", "value": "hi"}]})
    save_image(tmp_path / "x.png")
    data = write_records(tmp_path, records, "data.jsonl")
    causal = teacher_factory("causal-lm")
    one = evaluate(causal, str(data), str(tmp_path), batch_size=1, **FAST)
    many = evaluate(causal, str(data), str(tmp_path), batch_size=4, **FAST)
    assert one["n"] == 6 and one["skipped"] == {"total": 1, "by_reason": {"model takes no images": 1}}
    assert one["per_type"]["text"]["n"] == 6
    assert [p["prediction"] for p in many["predictions"]] == [p["prediction"] for p in one["predictions"]]


@pytest.mark.parametrize("kwargs,match", [(dict(batch_size=0), "batch_size must be a positive integer, got 0"),
                                          (dict(max_new_tokens=-1), "max_new_tokens must be a positive integer, got -1"),
                                          (dict(limit=-2), "limit must be a non-negative integer or None, got -2")])
def test_bad_arguments(llava_teacher, qa_data, kwargs, match):
    with pytest.raises(ValueError, match=match):
        evaluate(llava_teacher, str(qa_data[0]), **kwargs)


# --------------------------------------------------------------------------------------------- table and CLI


def test_format_table_lines_models_up_by_type():
    def res(model, per_type, skipped=0):
        n, c = sum(v[0] for v in per_type.values()), sum(v[1] for v in per_type.values())
        return {"model": model, "per_type": {t: {"n": a, "correct": b, "accuracy": b / a} for t, (a, b) in
                                             per_type.items()},
                "overall": {"n": n, "correct": c, "accuracy": c / n}, "skipped": {"total": skipped}}

    table = format_table([res("runs/teacher", {"colour": (4, 3), "shape": (4, 1)}),
                          res("runs/distilled", {"colour": (4, 2)}, skipped=1)])
    lines = table.splitlines()
    assert lines[0].split() == ["question", "type", "teacher", "distilled"]
    assert lines[2].split() == ["colour", "75.0%", "(n=4)", "50.0%", "(n=4)"]
    assert lines[3].split() == ["shape", "25.0%", "(n=4)", "-"]
    assert lines[4].split() == ["overall", "50.0%", "(n=8)", "50.0%", "(n=4)"]
    assert lines[5].split() == ["skipped", "0", "1"]
    assert lines[6].split() == ["answer", "NLL", "(nats/token)", "-", "-"]  # results without it
    with pytest.raises(ValueError, match="non-empty list"):
        format_table([])


def test_cli_prints_table_and_writes_json(tmp_path, llava_teacher, qa_data):
    from kd_cli.eval import eval_command

    app = typer.Typer()
    app.command()(eval_command)
    runner = CliRunner()
    data, images, _ = qa_data
    out = tmp_path / "res" / "eval.json"
    r = runner.invoke(app, ["--model", str(llava_teacher), "--data", str(data), "--images", str(images),
                            "--out", str(out), "--batch-size", "4", "--max-new-tokens", "4", "--limit", "6", "--quiet"])
    assert r.exit_code == 0, r.output
    saved = json.loads(out.read_text())
    assert saved["n"] + saved["skipped"]["total"] == 6 and len(saved["predictions"]) == saved["n"]
    assert "overall" in r.output and "question type" in r.output and str(out) in r.output

    r = runner.invoke(app, ["--model", str(llava_teacher), "--data", str(tmp_path / "missing.json")])
    assert r.exit_code == 2 and "error:" in r.output and "not found" in r.output


def test_answer_score_for_answers_with_several_right_forms():
    from kd_eval.evaluate import answer_score

    items = {"answer_items": ["blue square", "red circle"]}
    assert answer_score("Red circle and blue square.", "x", items) == 1.0  # any order, case, punctuation
    assert answer_score("blue square, red circle", "x", items) == 1.0
    assert answer_score("red circle", "x", items) == pytest.approx(2 / 3)
    assert answer_score("red circle, green square and blue square", "x", items) == pytest.approx(0.8)
    assert answer_score("", "x", items) == 0.0
    names = {"valid_answers": ["blue", "red"]}
    assert answer_score("Red", "blue", names) == 1.0 and answer_score("green", "blue", names) == 0.0
    assert answer_score("The answer is B.", "B") == 1.0 and answer_score("C", "B") == 0.0  # exact match otherwise
