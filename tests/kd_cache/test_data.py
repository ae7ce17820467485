"""Inputs: conversation -> tokens, supervision mask, visual/text positions, and every skip reason."""

from __future__ import annotations

import json

import numpy as np
import pytest
from transformers import AutoConfig, AutoProcessor

from kd_cache.data import Encoder, RecordSource, SkipSample, build_messages, image_token_id_of
from tests.conftest import save_image, write_records


def conv(*turns):
    return [{"from": "human" if i % 2 == 0 else "gpt", "value": v} for i, v in enumerate(turns)]


@pytest.fixture(scope="module")
def encoder(llava_teacher, tmp_path_factory):
    root = tmp_path_factory.mktemp("imgs")
    save_image(root / "a.png", 0)
    save_image(root / "b.png", 1)
    (root / "corrupt.png").write_bytes(b"not a png at all")
    proc = AutoProcessor.from_pretrained(llava_teacher)
    cfg = AutoConfig.from_pretrained(llava_teacher)
    return Encoder(proc, image_token_id_of(cfg, proc.tokenizer), image_root=str(root), max_images=1)


def test_messages_insert_placeholder_before_first_human_turn():
    msgs = build_messages(conv("What is it?", "a cat"), n_images=1)
    assert msgs[0]["content"][0] == {"type": "image"}
    assert msgs[0]["content"][1]["text"].strip() == "What is it?"
    assert msgs[1] == {"role": "assistant", "content": [{"type": "text", "text": "a cat"}]}


@pytest.mark.parametrize(
    "turns,n_images,reason",
    [
        (conv("<image> <image> two?", "yes"), 1, "image placeholder mismatch"),
        (conv("<image> hi", "yes"), 0, "image placeholder mismatch"),
        (conv("hi", "   "), 0, "empty answer"),
        (conv("hi"), 0, "no response"),
        ([{"from": "robot", "value": "x"}], 0, "invalid record"),
        ("not a list", 0, "invalid record"),
    ],
)
def test_messages_refusals(turns, n_images, reason):
    with pytest.raises(SkipSample) as e:
        build_messages(turns, n_images)
    assert e.value.reason == reason


def test_supervision_is_exactly_the_assistant_turns(encoder):
    tok = encoder.tokenizer
    rec = {"id": "x", "image": "a.png", "conversations": conv("<image>\nColour?", "red circle", "Size?", "small")}
    s = encoder.encode(rec)
    assert tok.decode(s.input_ids[s.labels_mask]) == "red circle<|im_end|>small<|im_end|>"
    # every visual position holds the image token, and there are (32/8)^2 of them
    assert len(s.visual_positions) == 16
    assert (s.input_ids[s.visual_positions] == encoder.image_token_id).all()
    # text rows are the rows *predicting* supervised tokens: row t -> token t+1
    assert np.array_equal(s.text_positions + 1, np.flatnonzero(s.labels_mask))
    assert not set(s.text_positions) & set(s.visual_positions)
    # the processor saw the same ids (pixel inputs for one image)
    assert s.model_inputs["pixel_values"].shape[0] == 1


def test_text_only_sample_has_no_visual_rows(encoder):
    s = encoder.encode({"id": "t", "conversations": conv("How many sides has a square?", "four")})
    assert len(s.visual_positions) == 0 and s.n_images == 0
    assert encoder.tokenizer.decode(s.input_ids[s.labels_mask]) == "four<|im_end|>"


def test_truncation_cuts_the_response_not_the_image(encoder):
    rec = {"id": "x", "image": "a.png", "conversations": conv("<image>\nDescribe.", "word " * 40)}
    full = encoder.encode(rec)
    enc = Encoder(encoder.processor, encoder.image_token_id, image_root=encoder.image_root, max_length=len(full.input_ids) - 10)
    cut = enc.encode(rec)
    assert len(cut.input_ids) == len(full.input_ids) - 10
    assert np.array_equal(cut.input_ids, full.input_ids[: len(cut.input_ids)])
    assert np.array_equal(cut.visual_positions, full.visual_positions)
    assert cut.text_positions.max() == len(cut.input_ids) - 2
    # a limit that would cut visual tokens refuses the sample
    tight = Encoder(encoder.processor, encoder.image_token_id, image_root=encoder.image_root, max_length=10)
    with pytest.raises(SkipSample) as e:
        tight.encode(rec)
    assert e.value.reason == "over max length"
    # a limit that leaves no supervised token refuses it too
    no_answer = Encoder(encoder.processor, encoder.image_token_id, image_root=encoder.image_root,
                        max_length=int(full.visual_positions[-1]) + 3)
    with pytest.raises(SkipSample) as e:
        no_answer.encode(rec)
    assert e.value.reason == "over max length"


@pytest.mark.parametrize(
    "image,reason",
    [
        ("missing.png", "missing image"),
        ("corrupt.png", "corrupt image"),
        ("../outside.png", "image path escapes image root"),
        ("/etc/passwd", "image path escapes image root"),
        (["a.png", "b.png"], "too many images"),
    ],
)
def test_image_refusals(encoder, image, reason):
    n = len(image) if isinstance(image, list) else 1
    rec = {"id": "x", "image": image, "conversations": conv("<image>" * n + " hi", "yes")}
    with pytest.raises(SkipSample) as e:
        encoder.encode(rec)
    assert e.value.reason == reason


def test_record_sources_agree(tmp_path, encoder):
    import datasets
    from PIL import Image

    recs = [{"id": f"s{i}", "image": "a.png", "conversations": conv("<image>\nQ?", f"answer {i}")} for i in range(3)]
    js = write_records(tmp_path, recs, "d.json")
    jl = write_records(tmp_path, recs, "d.jsonl")
    ds = datasets.Dataset.from_list(
        [{"id": r["id"], "conversations": r["conversations"], "image": Image.open(f"{encoder.image_root}/a.png")}
         for r in recs],
        features=datasets.Features({"id": datasets.Value("string"), "image": datasets.Image(),
                                    "conversations": [{"from": datasets.Value("string"), "value": datasets.Value("string")}]}),
    )
    ds.save_to_disk(str(tmp_path / "ds"))
    sources = [RecordSource(str(js)), RecordSource(str(jl)), RecordSource(str(tmp_path / "ds")), RecordSource(recs)]
    encoded = [[encoder.encode(src[i], i) for i in range(len(src))] for src in sources]
    for other in encoded[1:]:
        for a, b in zip(encoded[0], other):
            assert a.sample_id == b.sample_id
            assert np.array_equal(a.input_ids, b.input_ids)
            assert np.array_equal(a.labels_mask, b.labels_mask)
            assert np.allclose(a.model_inputs["pixel_values"], b.model_inputs["pixel_values"], atol=1e-2)
    assert sources[0].fingerprint.startswith("sha256:") and sources[2].fingerprint.startswith("datasets:")


def test_record_source_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        RecordSource(str(tmp_path / "nope.json"))
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        RecordSource(str(bad))
    obj = tmp_path / "obj.json"
    obj.write_text(json.dumps({"a": 1}))
    with pytest.raises(ValueError, match="JSON list"):
        RecordSource(str(obj))
    txt = tmp_path / "d.txt"
    txt.write_text("x")
    with pytest.raises(ValueError, match=r"\.json, \.jsonl"):
        RecordSource(str(txt))
