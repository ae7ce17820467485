"""The objective (one table of terms, the step-wide normalisation), the student's row-only forward and the exact
cheap Gram used by RDist."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from kd_cache.codec import TopKRows
from kd_train.losses import KDLossConfig, ce_loss, gram, mdist_loss
from kd_train.objective import TERM_TABLE, TERMS, Objective, RowLogits, StepCounts, StudentGram, loss_scales
from kd_train.student import load_student

F64 = dict(rtol=1e-9, atol=1e-11)


@pytest.fixture(scope="module")
def student(llava_teacher):
    model, _ = load_student(llava_teacher)
    return model


@pytest.mark.parametrize("head_trainable", [True, False])
def test_student_gram_equals_z_zt_with_the_same_gradients(student, head_trainable):
    torch.manual_seed(0)
    student.get_output_embeddings().weight.requires_grad_(head_trainable)
    d = student.get_output_embeddings().weight.shape[1]
    hv = torch.randn(7, d, dtype=torch.float32, requires_grad=True)
    zv = student.get_output_embeddings()(hv)
    sg = StudentGram(student)
    assert sg.exact_form
    cheap = sg.grams(zv, hv, [3, 0, 4])
    direct = [gram(z) for z in torch.split(zv, [3, 0, 4]) if z.shape[0]]
    assert len(cheap) == len(direct) == 2
    for a, b in zip(cheap, direct):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item())
    ga = torch.autograd.grad(sum(g.sum() for g in cheap), hv, retain_graph=True)[0]
    gb = torch.autograd.grad(sum(g.sum() for g in direct), hv)[0]
    assert torch.allclose(ga, gb, rtol=1e-4, atol=1e-4 * gb.abs().max().item())
    student.get_output_embeddings().weight.requires_grad_(True)


def test_row_logits_equal_the_full_forward_at_those_rows(student, llava_teacher):
    from transformers import AutoProcessor
    from PIL import Image

    proc = AutoProcessor.from_pretrained(llava_teacher)
    text = proc.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi?"}]},
                                     {"role": "assistant", "content": [{"type": "text", "text": "red"}]}])
    x = proc(text=[text], images=[Image.new("RGB", (40, 40), "blue")], return_tensors="pt")
    ids = x["input_ids"][0]
    vis = torch.nonzero(ids == student.config.image_token_id).flatten()
    txt = torch.tensor([len(ids) - 3, len(ids) - 2])
    rows = lambda p: torch.stack([torch.zeros_like(p), p])  # noqa: E731
    with torch.no_grad():
        zt, zv, hv = RowLogits(student)(dict(x), rows(txt), rows(vis))
        full = student(**x).logits[0]
    assert torch.allclose(zt, full[txt], atol=1e-5) and torch.allclose(zv, full[vis], atol=1e-5)
    assert hv.shape == (len(vis), student.config.text_config.hidden_size)


def _tiny_lm(kind: str):
    """A tiny causal LM whose forward transforms its head's output: soft-capping, a logit scale or a divisor."""
    from transformers import (AutoModelForCausalLM, CohereConfig, Gemma2Config, GraniteConfig)

    common = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                  num_key_value_heads=1)
    cfg = {"gemma2": lambda: Gemma2Config(**common, head_dim=16, final_logit_softcapping=2.0),
           "cohere": lambda: CohereConfig(**common, logit_scale=0.25),
           "granite": lambda: GraniteConfig(**common, logits_scaling=4.0)}[kind]()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():  # large logits, so the transform matters (softcap saturates, scales differ)
        model.get_output_embeddings().weight.mul_(20.0)
    return model


@pytest.mark.parametrize("kind", ["gemma2", "cohere", "granite"])
def test_row_logits_apply_the_students_own_logit_transform(kind):
    from kd_cache.hf import logit_transform

    model = _tiny_lm(kind)
    assert logit_transform(model.config) is not None and not StudentGram(model).exact_form
    ids = torch.randint(0, 96, (1, 9), generator=torch.Generator().manual_seed(1))
    x = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    rows = torch.stack([torch.zeros(3, dtype=torch.long), torch.tensor([2, 5, 8])])
    with torch.no_grad():
        zt, zv, _ = RowLogits(model)(x, rows, rows[:, :2])
        full = model(**x).logits[0]
        raw = model.get_output_embeddings()(model.model(**x).last_hidden_state)[0]
    assert torch.allclose(zt, full[[2, 5, 8]], atol=1e-4) and torch.allclose(zv, full[[2, 5]], atol=1e-4)
    assert not torch.allclose(raw[[2, 5, 8]], full[[2, 5, 8]], atol=1e-2)  # the transform is not a no-op here


def test_a_student_equal_to_a_softcapped_teacher_has_zero_mdist(tmp_path):
    """Teacher targets from kd_cache.teacher (softcapped) vs the same model as a student through RowLogits."""
    from kd_cache.targets import row_targets
    from kd_train.losses import mdist_loss

    model = _tiny_lm("gemma2")
    ids = torch.randint(0, 96, (1, 12), generator=torch.Generator().manual_seed(2))
    x = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    pos = torch.arange(3, 11)
    with torch.no_grad():
        teacher_z = model(**x).logits[0, pos]  # what the real teacher forward produces
        t = row_targets(teacher_z, "topk", 8, 0, None)
        rows = torch.stack([torch.zeros_like(pos), pos])
        zt, _, _ = RowLogits(model)(x, rows, rows[:, :0])
        raw = model.get_output_embeddings()(model.model(**x).last_hidden_state)[0, pos]
    kd = lambda z: float(mdist_loss(z, t.topk_ids, t.topk_logprobs, t.tail_logprob).sum())  # noqa: E731
    assert kd(zt) < 1e-4 * len(pos)  # the same function: nothing to distil
    assert kd(raw) > 100 * max(kd(zt), 1e-6)  # without the transform the student would chase another function


# ------------------------------------------------------------------------------------------ the step-wide normalisation


def _text_batch(n: int, v: int, seed: int) -> SimpleNamespace:
    """A micro-batch of n text rows (every third unlabelled) with top-4 teacher targets, no visual rows."""
    g = torch.Generator().manual_seed(seed)
    lp = torch.log_softmax(torch.randn(n, v, generator=g, dtype=torch.float64) * 2, -1)
    tlp, ids = lp.topk(4, dim=-1)
    labels = torch.randint(0, v, (n,), generator=g)
    labels[::3] = -100
    return SimpleNamespace(text_labels=labels, text_targets=TopKRows(ids, tlp, torch.log1p(-tlp.exp().sum(-1)), None),
                           visual_targets=None, n_text=n, n_visual=0, visual_splits=[], grams=None, has_targets=True)


def test_micro_batches_normalised_by_the_step_rows_equal_one_big_batch():
    """Each micro-batch's sums divided by the rows of the whole step (all micro-batches, all ranks): the accumulated
    gradient is the per-row mean of one combined batch; `world_size` undoes DDP's gradient averaging."""
    v, sizes = 11, (2, 5, 4)  # uneven micro-batches
    cfg = KDLossConfig(rdist_weight=0.0, mdist_visual_weight=0.0, kind="jsd", temperature=2.0)
    objective = Objective(cfg, None)
    batches = [_text_batch(n, v, seed=30 + i) for i, n in enumerate(sizes)]
    g = torch.Generator().manual_seed(40)
    s_all = (torch.randn(sum(sizes), v, generator=g, dtype=torch.float64) * 1.5).requires_grad_(True)
    parts = torch.split(s_all, sizes)
    no_visual = s_all[:0]
    step = StepCounts(text=sum(sizes), visual=0, gram=0)

    cat = lambda f: torch.cat([f(b) for b in batches])  # noqa: E731
    labels = cat(lambda b: b.text_labels)
    ids, tlp, tail = (cat(lambda b: getattr(b.text_targets, k)) for k in ("ids", "logprobs", "tail"))
    big = (ce_loss(s_all, labels) + mdist_loss(s_all, ids, tlp, tail, kind="jsd", temperature=2.0)) / sum(sizes)
    (g_big,) = torch.autograd.grad(big, s_all)

    acc = sum(objective(p, no_visual, None, b, step, 1)[0] for p, b in zip(parts, batches))
    (g_acc,) = torch.autograd.grad(acc, s_all)
    torch.testing.assert_close(acc, big, **F64)
    torch.testing.assert_close(g_acc, g_big, **F64)

    # per-micro-batch means do NOT reproduce the big batch (what the step-wide counts avoid)
    own = lambda b: StepCounts(text=b.n_text, visual=0, gram=0)  # noqa: E731
    wrong = sum(objective(p, no_visual, None, b, own(b), 1)[0] for p, b in zip(parts, batches)) / len(sizes)
    assert not torch.allclose(wrong, big)

    # two DDP ranks ({mb0, mb1} and {mb2}) whose gradients are averaged: world_size=2
    rank_losses = [objective(parts[0], no_visual, None, batches[0], step, 2)[0]
                   + objective(parts[1], no_visual, None, batches[1], step, 2)[0],
                   objective(parts[2], no_visual, None, batches[2], step, 2)[0]]
    rank_grads = [torch.autograd.grad(loss, s_all)[0] for loss in rank_losses]
    torch.testing.assert_close((rank_grads[0] + rank_grads[1]) / 2, g_big, **F64)


def test_one_table_of_terms_for_the_loss_and_the_metrics():
    cfg = KDLossConfig(ce_weight=0.5, mdist_text_weight=2.0, mdist_visual_weight=3.0, rdist_weight=4.0)
    assert TERMS == tuple(t.name for t in TERM_TABLE) == ("ce", "mdist_text", "mdist_visual", "rdist")
    counts = StepCounts(text=10, visual=40, gram=0)
    assert loss_scales(cfg, counts, 2) == {"ce": 0.5 * 2 / 10, "mdist_text": 2.0 * 2 / 10,
                                           "mdist_visual": 3.0 * 2 / 40, "rdist": 4.0 * 2 / 1}
    metrics = Objective(cfg, None).metrics({"ce": 5.0, "mdist_text": 0.0, "mdist_visual": 8.0, "rdist": 0.0}, counts)
    assert metrics == {"ce": 0.5, "mdist_visual": 0.2}  # CE always; the others when they were computed
    assert Objective(cfg, None).metrics({}, counts) == {"ce": 0.0}
    with pytest.raises(ValueError, match="world_size must be an int >= 1, got 0"):
        loss_scales(cfg, counts, 0)


def test_the_layout_types_a_decoded_samples_targets():
    """What the batch carries: the decoded sample's arrays, typed by the cache's target specs, with the teacher's
    vocabulary and the draws per row."""
    import numpy as np

    from kd_cache.codec import SampledRows, TargetLayout, concat_targets
    from kd_cache.format import TargetSpec

    layout = TargetLayout(TargetSpec("topk", k=2), TargetSpec("sampled", samples=5), vocab_size=99)
    sample = {"sample_id": "a", "text_topk_ids": np.array([[3, 1]]), "text_topk_logprobs": np.array([[-0.1, -2.0]]),
              "text_tail_logprob": np.array([-3.0]), "visual_sample_ids": np.array([4, 7, 2]),
              "visual_sample_counts": np.array([1, 4, 5]), "visual_sample_row_lengths": np.array([2, 1])}
    text, visual = layout.targets(sample, "text"), layout.targets(sample, "visual")
    assert isinstance(text, TopKRows) and text.vocab_size == 99 and text.n_rows == 1
    assert text.ids is sample["text_topk_ids"] and text.tail is sample["text_tail_logprob"]
    assert isinstance(visual, SampledRows) and visual.draws == 5 and visual.n_rows == 2
    both = concat_targets([visual, visual]).map(torch.as_tensor)
    assert both.draws == 5 and both.ids.tolist() == [4, 7, 2, 4, 7, 2] and both.row_lengths.tolist() == [2, 1, 2, 1]
    with pytest.raises(ValueError, match="holds no text_sample_ids.*not sampled targets"):
        TargetLayout(TargetSpec("sampled", samples=5), layout.visual, 99).targets(sample, "text")
    with pytest.raises(ValueError, match="must share the draws per row, got \\[5, 6\\]"):
        concat_targets([visual, SampledRows(visual.ids, visual.counts, visual.row_lengths, 6)])
