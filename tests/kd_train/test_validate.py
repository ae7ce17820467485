"""Held-out answer NLL (kd_train/validate.py), --val-data and --keep-best (early stopping)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from kd_cache.data import RecordSource
from kd_eval.tiny import make_tiny_dataset, make_tiny_teacher
from kd_train.batch import encoder_for
from kd_train.student import load_student
from kd_train.train import TrainConfig, run
from kd_train.validate import answer_nll


@pytest.fixture(scope="module")
def val_data(tmp_path_factory):
    return make_tiny_dataset(tmp_path_factory.mktemp("val"), n=6, seed=11, kind="instruct")


def _nll(model_dir, data, images):
    model, processor = load_student(model_dir)
    enc = encoder_for(processor, model.config, image_root=str(images), max_length=None)
    tok = processor.tokenizer
    return answer_nll(model, enc, RecordSource(str(data)), tok.pad_token_id, batch_size=4)


def test_answer_nll_equals_the_dense_cross_entropy_of_the_full_forward(llava_teacher, val_data):
    data, images = val_data
    model, processor = load_student(llava_teacher)
    enc = encoder_for(processor, model.config, image_root=str(images), max_length=None)
    records = RecordSource(str(data))
    res = answer_nll(model, enc, records, processor.tokenizer.pad_token_id, batch_size=4)
    want_sum, want_n = 0.0, 0
    for i in range(len(records)):
        e = enc.encode(records[i], i)
        inputs = {k: torch.as_tensor(v) for k, v in e.model_inputs.items()}
        inputs["input_ids"] = torch.as_tensor(e.input_ids)[None]
        with torch.no_grad():
            logits = model(**inputs).logits[0]
        rows = torch.as_tensor(e.text_positions)
        nll = torch.nn.functional.cross_entropy(logits[rows].double(), torch.as_tensor(e.input_ids[e.text_positions + 1]),
                                                reduction="sum")
        assert res["per_sample"][i][1] == len(rows)
        assert res["per_sample"][i][0] == pytest.approx(float(nll), rel=1e-4)
        want_sum, want_n = want_sum + float(nll), want_n + len(rows)
    assert res["tokens"] == want_n and res["nll"] == pytest.approx(want_sum / want_n, rel=1e-4)
    assert res["samples"] == len(records) and res["skipped"] == {}


def test_keep_best_saves_the_lowest_val_nll_weights(tmp_path, tiny_data, val_data):
    student = make_tiny_teacher(tmp_path / "student", "llava", hidden_size=32, num_layers=1, seed=7)
    data, images = tiny_data
    vdata, vimages = val_data
    out = tmp_path / "run"
    # a large lr makes the val NLL move non-monotonically, so the best step is rarely the last
    cfg = TrainConfig(student=str(student), out=str(out), stage="sft", data=str(data), images=str(images),
                      val_data=str(vdata), val_images=str(vimages), val_every=1, keep_best=True, batch_size=2,
                      lr=0.05, warmup_ratio=0.0, epochs=2, progress=False)
    [final] = run(cfg)
    stage = json.loads((Path(final) / "kd_stage.json").read_text())
    history = stage["validation"]
    assert [h["step"] for h in history] == list(range(1, stage["steps"] + 1))
    best = min(history, key=lambda h: h["val_nll"])
    assert stage["kept_step"] == best["step"]
    assert _nll(final, vdata, vimages)["nll"] == pytest.approx(best["val_nll"], rel=1e-5)
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("val_nll" in row for row in logged)


def test_keep_best_needs_validation_and_no_checkpoints():
    with pytest.raises(ValueError, match="keep_best needs val_data and val_every > 0"):
        TrainConfig(student="s", out="o", data="d", stage="sft", keep_best=True)
    with pytest.raises(ValueError, match="checkpoints do not hold"):
        TrainConfig(student="s", out="o", data="d", stage="sft", keep_best=True, val_data="v", val_every=2,
                    checkpoint_every=5)
