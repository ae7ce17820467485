"""The student's row-only forward and the exact cheap Gram used by RDist."""

from __future__ import annotations

import pytest
import torch

from kd_train.losses import gram
from kd_train.objective import RowLogits, StudentGram
from kd_train.student import load_student


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
