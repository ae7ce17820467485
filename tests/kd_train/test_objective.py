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
