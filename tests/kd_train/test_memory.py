"""Training on small GPUs: the row-chunked objective, gradient checkpointing and LoRA students, each checked
against the plain path (values, gradients, exact resume, the merged export)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from kd_eval.tiny import make_tiny_teacher
from kd_train.lora import add_lora, merge_lora
from kd_train.objective import RowLogits
from kd_train.student import enable_gradient_checkpointing, load_student
from kd_train.train import TrainConfig, run
from tests.kd_train.test_train import child_env, ddp_train_cmd, metrics

from tests.conftest import run_in_group
from tests.conftest import saved_weights as weights


@pytest.fixture(scope="module")
def student(tmp_path_factory) -> Path:
    return make_tiny_teacher(tmp_path_factory.mktemp("student"), "llava", hidden_size=32, num_layers=2, seed=11)


def cfg(student, tiny_data, cache, out, **kw) -> TrainConfig:
    data, images = tiny_data
    args = dict(student=str(student), out=str(out), stage="dft", cache=str(cache), data=str(data),
                images=str(images), batch_size=4, lr=1e-3, progress=False, shuffle_buffer=0, max_steps=3)
    args.update(kw)
    return TrainConfig(**args)


def _loss_and_grads(model, inputs) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    zt, zv, _ = RowLogits(model)(inputs["model_inputs"], inputs["text_rows"], inputs["visual_rows"])
    loss = torch.log_softmax(zt, -1).logsumexp(-1).sum() + zv.pow(2).mean()
    loss.backward()
    return float(loss.detach()), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _one_batch(model_dir, tiny_data):
    from kd_cache.data import RecordSource
    from kd_train.batch import encoder_for, make_batch, training_example

    model, proc = load_student(model_dir)
    data, images = tiny_data
    enc = encoder_for(proc, model.config, image_root=str(images), max_length=None)
    recs = RecordSource(str(data))
    b = make_batch([training_example(enc.encode(recs[i], i)) for i in range(3)], 0)
    return model, {"model_inputs": b.model_inputs, "text_rows": b.text_rows, "visual_rows": b.visual_rows}


# ------------------------------------------------------------------------------------------ chunked objective


def test_chunked_objective_trains_like_the_unchunked_one(tmp_path, student, tiny_data, llava_cache, llava_topk_cache):
    """The same 3 DFT steps with all logits at once and with 7-row chunks: the same losses and final weights, on
    the default cache (sampled visual rows) and on a top-k one; RDist included."""
    for name, cache in (("default", llava_cache), ("topk", llava_topk_cache)):
        plain = run(cfg(student, tiny_data, cache, tmp_path / f"{name}-plain", loss_chunk_size=0))[0]
        chunk = run(cfg(student, tiny_data, cache, tmp_path / f"{name}-chunk", loss_chunk_size=7))[0]
        a, b = metrics(tmp_path / f"{name}-plain"), metrics(tmp_path / f"{name}-chunk")
        for step in (1, 2, 3):
            for k in ("loss", "ce", "mdist_text", "mdist_visual", "rdist"):
                # abs: sampled terms are logged as a KL (cross-entropy minus the cached entropy) near 0, where the
                # float32 rounding of the ~6-nat cross-entropy (a few ulps, ~5e-7 each) is the whole difference
                assert b[step][k] == pytest.approx(a[step][k], rel=1e-5, abs=2e-6), (name, step, k)
        wa, wb = weights(Path(plain)), weights(Path(chunk))
        assert wa.keys() == wb.keys()
        for k in wa:
            torch.testing.assert_close(wb[k], wa[k], rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------------------------ checkpointing


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(student, tiny_data):
    model, inputs = _one_batch(student, tiny_data)
    model.train()
    loss, grads = _loss_and_grads(model, inputs)
    assert enable_gradient_checkpointing(model, vision=True) == ["llm", "vision"]
    on = lambda m: getattr(m, "is_activation_checkpointing", None) or m.is_gradient_checkpointing  # noqa: E731
    assert on(model.model.language_model) and on(model.model.vision_tower)
    loss_ckpt, grads_ckpt = _loss_and_grads(model, inputs)
    assert loss_ckpt == pytest.approx(loss, rel=1e-6)
    assert grads.keys() == grads_ckpt.keys() and len(grads) > 10
    for k in grads:
        torch.testing.assert_close(grads_ckpt[k], grads[k], rtol=1e-5, atol=1e-7)


def test_gradient_checkpointing_flag_trains_the_same(tmp_path, student, tiny_data, llava_cache):
    run(cfg(student, tiny_data, llava_cache, tmp_path / "plain"))
    run(cfg(student, tiny_data, llava_cache, tmp_path / "ckpt", gradient_checkpointing=True))
    a, b = metrics(tmp_path / "plain"), metrics(tmp_path / "ckpt")
    assert [b[s]["loss"] for s in (1, 2, 3)] == pytest.approx([a[s]["loss"] for s in (1, 2, 3)], rel=1e-5)


# ------------------------------------------------------------------------------------------ LoRA


def test_merged_lora_equals_the_adapted_model(student, tiny_data):
    model, inputs = _one_batch(student, tiny_data)
    model.eval()
    tuner = add_lora(model, r=4, alpha=8.0, targets=["q_proj", "v_proj", "down_proj"], vision=False, projector=True)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or "multi_modal_projector" in n for n in trainable)
    assert any("multi_modal_projector" in n for n in trainable)
    torch.manual_seed(0)
    with torch.no_grad():  # a trained adapter: B is zero at init, so give it weight
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2)
        zt, zv, _ = RowLogits(model)(inputs["model_inputs"], inputs["text_rows"], inputs["visual_rows"])
        base = merge_lora(tuner)
        assert base is model and not any("lora_" in n for n, _ in model.named_parameters())
        zt2, zv2, _ = RowLogits(model)(inputs["model_inputs"], inputs["text_rows"], inputs["visual_rows"])
    torch.testing.assert_close(zt2, zt, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(zv2, zv, rtol=1e-4, atol=1e-5)


def test_lora_dft_lowers_the_loss_and_exports_a_plain_model(tmp_path, student, tiny_data, llava_cache):
    from transformers import AutoModelForImageTextToText

    out = tmp_path / "lora"
    final = Path(run(cfg(student, tiny_data, llava_cache, out, lora_r=8, lora_alpha=16, lr=5e-3, batch_size=12,
                         max_steps=6, epochs=6))[0])
    m = metrics(out)
    assert m[6]["loss"] < m[1]["loss"]  # the same 12 samples every step
    stage = json.loads((final / "kd_stage.json").read_text())
    assert stage["lora"] == {"r": 8, "alpha": 16.0, "targets": TrainConfig.lora_target_list(
        cfg(student, tiny_data, llava_cache, out)), "merged": True}
    w = weights(final)
    assert not any("lora" in k or "base_layer" in k for k in w)
    before = weights(Path(student))
    assert w.keys() == before.keys()
    changed = {k for k in w if not torch.equal(w[k], before[k])}
    assert any("q_proj" in k for k in changed) and any("multi_modal_projector" in k for k in changed)
    assert not any("vision_tower" in k or "embed_tokens" in k for k in changed)  # frozen; no adapter there
    AutoModelForImageTextToText.from_pretrained(final)  # loads as any student


def test_lora_resume_matches_an_uninterrupted_run(tmp_path, student, tiny_data, llava_cache):
    kw = dict(lora_r=4, max_steps=4, checkpoint_every=2, batch_size=2)
    whole = Path(run(cfg(student, tiny_data, llava_cache, tmp_path / "whole", **kw))[0])
    part = tmp_path / "part"
    run(cfg(student, tiny_data, llava_cache, part, **kw))
    shutil.rmtree(part / "final")  # as if killed after the step-2 checkpoint: the rerun resumes there
    (part / "metrics.jsonl").unlink()
    resumed = Path(run(cfg(student, tiny_data, llava_cache, part, **kw))[0])
    assert min(metrics(part)) == 3  # steps 1-2 came from the checkpoint
    wa, wb = weights(whole), weights(resumed)
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-5, atol=1e-7)


@pytest.mark.slow
def test_lora_two_process_ddp(tmp_path, student, tiny_data, llava_cache):
    out = tmp_path / "ddp"
    cmd = ddp_train_cmd(student, tiny_data, llava_cache, out, "--max-steps", "2", "--lora-r", "4",
                        "--gradient-checkpointing", "--loss-chunk-size", "5")
    r = run_in_group(cmd, env=child_env(), timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert len(metrics(out)) == 2
    assert json.loads((out / "final" / "kd_stage.json").read_text())["lora"]["merged"] is True
    assert not any("lora" in k for k in weights(out / "final"))


def test_bad_lora_and_chunk_options_are_refused(tmp_path, student, tiny_data, llava_cache):
    with pytest.raises(ValueError, match="loss_chunk_size must be an integer >= 0, got -1"):
        cfg(student, tiny_data, llava_cache, tmp_path / "x", loss_chunk_size=-1)
    with pytest.raises(ValueError, match="lora_alpha must be > 0"):
        cfg(student, tiny_data, llava_cache, tmp_path / "x", lora_r=4, lora_alpha=0)
    with pytest.raises(ValueError, match="match no linear layer of the student's LLM"):
        run(cfg(student, tiny_data, llava_cache, tmp_path / "y", lora_r=4, lora_targets="qkv"))
