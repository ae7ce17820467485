"""Tests for kd_train.losses against naive, independently written dense references."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from kd_train.losses import (
    KINDS,
    TEACHER_LOGPROB_FLOOR,
    KDLossConfig,
    _student_bucket_logprobs,
    ce_loss,
    gram,
    gram_from_hidden,
    mdist_loss,
    rdist_loss,
)

F64 = dict(rtol=1e-9, atol=1e-11)  # float64 value/gradient comparisons
V = 11
N = 3


# --------------------------------------------------------------------------------------
# naive dense reference (probability space, explicit loops, float64)
# --------------------------------------------------------------------------------------


def make_teacher(n, v, k, seed, *, zero_tail=False, scale=2.0):
    """Cache-style teacher targets from random dense teacher logits (float64)."""
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(n, v, generator=g, dtype=torch.float64) * scale
    lp = torch.log_softmax(t, dim=-1)
    topk_lp, topk_ids = lp.topk(k, dim=-1)
    if k == v or zero_tail:
        topk_lp = torch.log_softmax(topk_lp, dim=-1)  # top-k hold all the mass
        tail = torch.full((n,), float("-inf"), dtype=torch.float64)
    else:
        tail = torch.log1p(-topk_lp.exp().sum(-1))
    return topk_ids, topk_lp, tail


def make_student(n, v, seed, dtype=torch.float64, scale=1.5):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, v, generator=g, dtype=torch.float64) * scale).to(dtype)


def dense_teacher_probs(topk_ids, topk_lp, tail_lp, v, teacher_vocab=None):
    """(N, v) teacher probs: top-k ids get their probs, tail mass spread uniformly over
    the other ids < teacher_vocab (ids >= teacher_vocab get 0)."""
    teacher_vocab = v if teacher_vocab is None else teacher_vocab
    n, _ = topk_ids.shape
    p = torch.zeros(n, v, dtype=torch.float64)
    for r in range(n):
        ids = [int(i) for i in topk_ids[r]]
        for j, i in enumerate(ids):
            p[r, i] = math.exp(float(topk_lp[r, j]))
        others = [i for i in range(teacher_vocab) if i not in ids]
        for i in others:
            p[r, i] = math.exp(float(tail_lp[r])) / len(others)
    return p


def collapse(p, topk_ids, with_tail):
    """Collapse dense (N, v) probs to buckets with plain loops / sums (differentiable)."""
    n, v = p.shape
    rows = []
    for r in range(n):
        ids = [int(i) for i in topk_ids[r]]
        buckets = [p[r, i] for i in ids]
        if with_tail:
            tail = p.new_zeros(())
            for i in range(v):
                if i not in ids:
                    tail = tail + p[r, i]
            buckets.append(tail)
        b = torch.stack(buckets)
        if not with_tail:
            b = b / b.sum()
        rows.append(b)
    return rows


def kl_probs(p, q):
    """KL(p || q) with 0 log 0 = 0, probability space."""
    out = p.new_zeros(())
    for pi, qi in zip(p, q):
        if float(pi.detach()) > 0.0:
            out = out + pi * (torch.log(pi) - torch.log(qi))
    return out


def reference_mdist(
    s, topk_ids, topk_lp, tail_lp, *, kind, temperature, use_tail, beta=0.5,
    teacher_vocab=None,
):
    """Per-row reference loss (N,) built from dense distributions."""
    n, v = s.shape
    k = topk_ids.shape[1]
    pt_dense = dense_teacher_probs(topk_ids, topk_lp, tail_lp, v, teacher_vocab)
    # tempered teacher: dense logits log p (+ a per-row constant) divided by T
    pt_dense = torch.softmax(torch.log(pt_dense) / temperature, dim=-1)
    ps_dense = torch.softmax(s / temperature, dim=-1)
    with_tail = use_tail and k < v
    pts = collapse(pt_dense, topk_ids, with_tail)
    pss = collapse(ps_dense, topk_ids, with_tail)
    out = []
    for pt, ps in zip(pts, pss):
        if kind == "forward_kl":
            d = kl_probs(pt, ps)
        elif kind == "reverse_kl":
            # zero teacher mass is floored (documented in losses.py) -> finite reverse KL
            lt = torch.log(pt).clamp(min=TEACHER_LOGPROB_FLOOR)
            d = (ps * (torch.log(ps) - lt)).sum()
        else:
            m = beta * pt + (1 - beta) * ps
            d = beta * kl_probs(pt, m) + (1 - beta) * kl_probs(ps, m)
        out.append(d * temperature**2)
    return torch.stack(out)


def dense_exact(s, t, *, kind, temperature, beta=0.5):
    """Exact dense divergence between full softmaxes of student s and teacher t."""
    ls = torch.log_softmax(s / temperature, dim=-1)
    lt = torch.log_softmax(t / temperature, dim=-1)
    if kind == "forward_kl":
        d = (lt.exp() * (lt - ls)).sum(-1)
    elif kind == "reverse_kl":
        d = (ls.exp() * (ls - lt)).sum(-1)
    else:
        m = beta * lt.exp() + (1 - beta) * ls.exp()
        d = beta * (lt.exp() * (lt - m.log())).sum(-1) + (1 - beta) * (
            ls.exp() * (ls - m.log())
        ).sum(-1)
    return d * temperature**2


def value_and_grad(fn, x):
    x = x.detach().clone().requires_grad_(True)
    y = fn(x)
    (g,) = torch.autograd.grad(y.sum(), x)
    return y.detach(), g


# --------------------------------------------------------------------------------------
# mdist_loss
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("use_tail", [True, False])
@pytest.mark.parametrize("k", [1, 4, V - 1, V])
@pytest.mark.parametrize("kind", KINDS)
def test_mdist_matches_dense_bucket_reference(kind, k, use_tail, temperature):
    ids, tlp, tail = make_teacher(N, V, k, seed=10 + k)
    s0 = make_student(N, V, seed=100 + k)
    beta = 0.3
    kw = dict(kind=kind, temperature=temperature, use_tail=use_tail)

    got, g_got = value_and_grad(
        lambda s: mdist_loss(s, ids, tlp, tail, jsd_beta=beta, reduction="none", **kw), s0
    )
    ref, g_ref = value_and_grad(
        lambda s: reference_mdist(s, ids, tlp, tail, beta=beta, **kw), s0
    )
    assert got.dtype == torch.float64 and got.shape == (N,)
    torch.testing.assert_close(got, ref, **F64)
    torch.testing.assert_close(g_got, g_ref, **F64)
    # "sum" is the sum of the per-row values
    total = mdist_loss(s0, ids, tlp, tail, jsd_beta=beta, **kw)
    assert total.shape == ()
    torch.testing.assert_close(total, got.sum(), **F64)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("use_tail", [True, False])
@pytest.mark.parametrize("kind", KINDS)
def test_mdist_full_vocab_topk_equals_exact_dense(kind, use_tail, temperature):
    g = torch.Generator().manual_seed(3)
    t = torch.randn(N, V, generator=g, dtype=torch.float64) * 2
    s0 = make_student(N, V, seed=4)
    lp = torch.log_softmax(t, -1)
    tlp, ids = lp.topk(V, dim=-1)  # all ids, sorted by teacher prob
    tail = torch.full((N,), float("-inf"), dtype=torch.float64)
    kw = dict(kind=kind, temperature=temperature, use_tail=use_tail, jsd_beta=0.7)

    got, g_got = value_and_grad(lambda s: mdist_loss(s, ids, tlp, tail, reduction="none", **kw), s0)
    ref, g_ref = value_and_grad(
        lambda s: dense_exact(s, t, kind=kind, temperature=temperature, beta=0.7), s0
    )
    torch.testing.assert_close(got, ref, **F64)
    torch.testing.assert_close(g_got, g_ref, **F64)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("use_tail", [True, False])
@pytest.mark.parametrize("kind", KINDS)
def test_mdist_minus_inf_tail_no_nan(kind, use_tail, temperature):
    ids, tlp, tail = make_teacher(N, V, 4, seed=5, zero_tail=True)
    assert torch.isneginf(tail).all()
    kw = dict(kind=kind, temperature=temperature, use_tail=use_tail)
    for dtype in (torch.float64, torch.float32):
        s0 = make_student(N, V, seed=6, dtype=dtype)
        got, g_got = value_and_grad(
            lambda s: mdist_loss(s, ids, tlp.to(dtype), tail.to(dtype), reduction="none", **kw),
            s0,
        )
        assert torch.isfinite(got).all() and torch.isfinite(g_got).all()
        ref, g_ref = value_and_grad(lambda s: reference_mdist(s, ids, tlp, tail, **kw), s0.double())
        tol = F64 if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(got.double(), ref, **tol)
        torch.testing.assert_close(g_got.double(), g_ref, **tol)


def test_mdist_forward_kl_minus_inf_tail_is_zero_log_zero():
    """Forward KL with zero teacher tail equals the KL with the tail term simply absent."""
    ids, tlp, tail = make_teacher(N, V, 4, seed=7, zero_tail=True)
    s = make_student(N, V, seed=8)
    got = mdist_loss(s, ids, tlp, tail, reduction="none")
    ls = torch.log_softmax(s, -1).gather(-1, ids)
    expected = (tlp.exp() * (tlp - ls)).sum(-1)
    torch.testing.assert_close(got, expected, **F64)


def test_mdist_teacher_vocab_size_padded_student():
    """Student logits padded past the teacher vocab: the T!=1 tail spread uses Vt - k ids."""
    vt, vs, k = 9, 13, 3
    ids, tlp, tail = make_teacher(N, vt, k, seed=9)
    s0 = make_student(N, vs, seed=10)
    for kind in KINDS:
        kw = dict(kind=kind, temperature=2.0, use_tail=True)
        got, g_got = value_and_grad(
            lambda s: mdist_loss(s, ids, tlp, tail, reduction="none", teacher_vocab_size=vt, **kw),
            s0,
        )
        ref, g_ref = value_and_grad(
            lambda s: reference_mdist(s, ids, tlp, tail, teacher_vocab=vt, **kw), s0
        )
        torch.testing.assert_close(got, ref, **F64)
        torch.testing.assert_close(g_got, g_ref, **F64)


def test_student_tail_is_stable_in_float32():
    """Top-k hold all but ~1e-12 of the student mass: log(1 - sum) would give -inf."""
    vs, k = 50, 4
    s64 = torch.zeros(2, vs, dtype=torch.float64)
    ids = torch.tensor([[0, 1, 2, 3], [10, 20, 30, 40]])
    s64.scatter_(1, ids, 30.0)
    exact_tail = torch.logsumexp(s64.scatter(1, ids, float("-inf")), -1) - torch.logsumexp(s64, -1)
    naive = torch.log1p(-torch.softmax(s64.float(), -1).gather(1, ids).sum(-1))
    assert torch.isneginf(naive).all()  # the cancelling formula fails in float32
    lp = _student_bucket_logprobs(s64.float(), ids, True)
    torch.testing.assert_close(lp[:, -1].double(), exact_tail, rtol=1e-6, atol=0)

    tlp = torch.log(torch.full((2, k), 0.2499, dtype=torch.float64))
    tail = torch.log(torch.full((2,), 1 - 4 * 0.2499, dtype=torch.float64))
    for kind in KINDS:
        l32 = mdist_loss(s64.float(), ids, tlp.float(), tail.float(), kind=kind)
        l64 = mdist_loss(s64, ids, tlp, tail, kind=kind)
        assert torch.isfinite(l32)
        torch.testing.assert_close(l32.double(), l64, rtol=1e-5, atol=1e-6)


def test_mdist_bf16_input_computed_in_fp32():
    ids, tlp, tail = make_teacher(N, V, 4, seed=11)
    s = make_student(N, V, seed=12, dtype=torch.bfloat16).requires_grad_(True)
    loss = mdist_loss(s, ids, tlp.float(), tail.float(), kind="jsd", temperature=2.0)
    assert loss.dtype == torch.float32
    (g,) = torch.autograd.grad(loss, s)
    assert g.dtype == torch.bfloat16 and torch.isfinite(g.float()).all()
    ref = mdist_loss(s.detach().float(), ids, tlp.float(), tail.float(), kind="jsd", temperature=2.0)
    torch.testing.assert_close(loss.detach(), ref, rtol=1e-6, atol=1e-7)


def test_mdist_row_weight_and_chunk_additivity():
    ids, tlp, tail = make_teacher(6, V, 4, seed=13)
    s = make_student(6, V, seed=14)
    w = torch.tensor([1.0, 0.0, 2.0, 0.5, 1.0, 3.0], dtype=torch.float64)
    per_row = mdist_loss(s, ids, tlp, tail, reduction="none", kind="reverse_kl")
    weighted = mdist_loss(s, ids, tlp, tail, row_weight=w, kind="reverse_kl")
    torch.testing.assert_close(weighted, (per_row * w).sum(), **F64)
    chunks = sum(
        mdist_loss(s[a:b], ids[a:b], tlp[a:b], tail[a:b], kind="reverse_kl")
        for a, b in ((0, 2), (2, 3), (3, 6))
    )
    torch.testing.assert_close(chunks, per_row.sum(), **F64)


def test_mdist_zero_when_student_matches_teacher():
    g = torch.Generator().manual_seed(15)
    t = torch.randn(N, V, generator=g, dtype=torch.float64)
    tlp, ids = torch.log_softmax(t, -1).topk(4, dim=-1)
    tail = torch.log1p(-tlp.exp().sum(-1))
    for kind in KINDS:
        loss = mdist_loss(t + 3.0, ids, tlp, tail, kind=kind)  # per-row shift is irrelevant
        torch.testing.assert_close(loss, torch.zeros((), dtype=torch.float64), rtol=0, atol=1e-12)


def test_mdist_gradcheck():
    ids, tlp, tail = make_teacher(2, 7, 3, seed=16)
    s = make_student(2, 7, seed=17).requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda x: mdist_loss(x, ids, tlp, tail, kind="jsd", temperature=1.5, reduction="none"), (s,)
    )


def test_mdist_empty_rows():
    s = torch.zeros(0, V, requires_grad=True)
    loss = mdist_loss(s, torch.zeros(0, 3, dtype=torch.long), torch.zeros(0, 3), torch.zeros(0))
    assert loss.item() == 0.0
    loss.backward()


def _mdist_args():
    ids, tlp, tail = make_teacher(N, V, 4, seed=18)
    return make_student(N, V, seed=19), ids, tlp, tail


@pytest.mark.parametrize(
    "mutate",
    [
        lambda a, kw: kw.update(kind="kl"),
        lambda a, kw: kw.update(temperature=0.0),
        lambda a, kw: kw.update(temperature=float("nan")),
        lambda a, kw: kw.update(jsd_beta=1.0),
        lambda a, kw: kw.update(reduction="mean"),
        lambda a, kw: kw.update(use_tail=1),
        lambda a, kw: kw.update(row_weight=torch.ones(N + 1)),
        lambda a, kw: kw.update(teacher_vocab_size=2),
        lambda a, kw: a.__setitem__(0, a[0][0]),
        lambda a, kw: a.__setitem__(1, a[1].float()),
        lambda a, kw: a.__setitem__(1, a[1][:2]),
        lambda a, kw: a.__setitem__(1, torch.zeros(N, V + 1, dtype=torch.long)),
        lambda a, kw: a.__setitem__(2, a[2][:, :2]),
        lambda a, kw: a.__setitem__(3, a[3][:2]),
    ],
)
def test_mdist_validation(mutate):
    args, kw = list(_mdist_args()), {}
    mutate(args, kw)
    with pytest.raises(ValueError, match="got"):
        mdist_loss(*args, **kw)


# --------------------------------------------------------------------------------------
# rdist / gram
# --------------------------------------------------------------------------------------


def naive_rdist(z, rt):
    nv = z.shape[0]
    rs = torch.stack(
        [torch.stack([(z[i] * z[j]).sum() for j in range(nv)]) for i in range(nv)]
    )
    dot = (rs * rt).sum()
    return 1 - dot / (torch.sqrt((rs * rs).sum()) * torch.sqrt((rt * rt).sum()))


def test_rdist_matches_naive_value_and_grad():
    g = torch.Generator().manual_seed(20)
    zs = torch.randn(5, 7, generator=g, dtype=torch.float64)
    zt = torch.randn(5, 9, generator=g, dtype=torch.float64)
    rt = zt @ zt.T
    got, g_got = value_and_grad(lambda z: rdist_loss(z, rt), zs)
    ref, g_ref = value_and_grad(lambda z: naive_rdist(z, rt), zs)
    torch.testing.assert_close(got, ref, **F64)
    torch.testing.assert_close(g_got, g_ref, **F64)
    # same loss from a precomputed student Gram
    torch.testing.assert_close(rdist_loss(gram(zs), rt), ref, **F64)
    assert 0.0 <= float(got) <= 2.0


def test_rdist_properties():
    g = torch.Generator().manual_seed(21)
    z = torch.randn(4, 6, generator=g, dtype=torch.float64)
    r = gram(z)
    torch.testing.assert_close(rdist_loss(z, r), torch.zeros((), dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(rdist_loss(3.0 * z, 0.5 * r), torch.zeros((), dtype=torch.float64), rtol=0, atol=1e-12)
    # bf16 student + fp16 teacher gram -> computed and returned in fp32
    loss = rdist_loss(z.to(torch.bfloat16), r.to(torch.float16))
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    # ambiguous shape (V == Nv): explicit is_gram decides
    zq = torch.randn(4, 4, generator=g, dtype=torch.float64)
    torch.testing.assert_close(rdist_loss(zq, r, is_gram=False), naive_rdist(zq, r), **F64)
    # zero student gram: finite, no NaN gradient
    zz = torch.zeros(4, 6, dtype=torch.float64, requires_grad=True)
    lz = rdist_loss(zz, r)
    (gz,) = torch.autograd.grad(lz, zz)
    assert torch.isfinite(lz) and torch.isfinite(gz).all()


def test_gram_from_hidden_equals_logits_gram_fp32():
    g = torch.Generator().manual_seed(22)
    h = torch.randn(16, 32, generator=g)
    w = torch.randn(1000, 32, generator=g) * 0.1
    truth = (h.double() @ w.double().T) @ (h.double() @ w.double().T).T
    direct = gram(h @ w.T)
    via_hidden = gram_from_hidden(h, w)
    via_wtw = gram_from_hidden(h, w, wtw=w.T @ w)
    scale = truth.abs().max().item()
    for r in (direct, via_hidden, via_wtw):
        assert r.dtype == torch.float32 and r.shape == (16, 16)
        torch.testing.assert_close(r.double(), truth, rtol=1e-5, atol=1e-5 * scale)
    torch.testing.assert_close(via_hidden, direct, rtol=1e-4, atol=1e-5 * scale)
    torch.testing.assert_close(via_wtw, direct, rtol=1e-4, atol=1e-5 * scale)


def test_gram_from_hidden_gradients_match_logits_route():
    g = torch.Generator().manual_seed(23)
    h0 = torch.randn(5, 8, generator=g, dtype=torch.float64)
    w0 = torch.randn(20, 8, generator=g, dtype=torch.float64)
    rt = gram(torch.randn(5, 12, generator=g, dtype=torch.float64))

    def grads(route):
        h = h0.clone().requires_grad_(True)
        w = w0.clone().requires_grad_(True)
        loss = route(h, w)
        return (loss, *torch.autograd.grad(loss, (h, w)))

    a = grads(lambda h, w: rdist_loss(h @ w.T, rt))
    b = grads(lambda h, w: rdist_loss(gram_from_hidden(h, w), rt, is_gram=True))
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, **F64)


@pytest.mark.parametrize(
    "call",
    [
        lambda: rdist_loss(torch.zeros(3, 5), torch.zeros(3, 4)),
        lambda: rdist_loss(torch.zeros(2, 5), torch.zeros(3, 3)),
        lambda: rdist_loss(torch.zeros(0, 5), torch.zeros(0, 0)),
        lambda: rdist_loss(torch.zeros(3, 5), torch.zeros(3, 3), eps=0.0),
        lambda: rdist_loss(torch.zeros(3, 5), torch.zeros(3, 3), is_gram=True),
        lambda: gram(torch.zeros(3)),
        lambda: gram_from_hidden(torch.zeros(3, 4), torch.zeros(7, 5)),
        lambda: gram_from_hidden(torch.zeros(3, 4), torch.zeros(7, 4), wtw=torch.zeros(4, 5)),
    ],
)
def test_rdist_gram_validation(call):
    with pytest.raises(ValueError, match="got"):
        call()


# --------------------------------------------------------------------------------------
# ce_loss
# --------------------------------------------------------------------------------------


def test_ce_loss_matches_manual_sum():
    g = torch.Generator().manual_seed(24)
    logits = torch.randn(6, V, generator=g, dtype=torch.float64)
    labels = torch.tensor([1, -100, 3, 10, -100, 0])
    got, g_got = value_and_grad(lambda x: ce_loss(x, labels), logits)

    def manual(x):
        out = x.new_zeros(())
        for r in range(6):
            if int(labels[r]) != -100:
                out = out - torch.log_softmax(x[r], -1)[labels[r]]
        return out

    ref, g_ref = value_and_grad(manual, logits)
    torch.testing.assert_close(got, ref, **F64)
    torch.testing.assert_close(g_got, g_ref, **F64)
    per_row = ce_loss(logits, labels, reduction="none")
    assert per_row.shape == (6,) and per_row[1] == 0 and per_row[4] == 0
    torch.testing.assert_close(per_row.sum(), ref, **F64)
    # (B, T, V) / (B, T) inputs; custom ignore_index
    torch.testing.assert_close(ce_loss(logits.view(2, 3, V), labels.view(2, 3)), ref, **F64)
    lab2 = labels.masked_fill(labels == -100, 7)
    torch.testing.assert_close(ce_loss(logits, lab2, ignore_index=7), ref, **F64)


def test_ce_loss_all_ignored_and_bf16():
    x = torch.randn(4, V, dtype=torch.bfloat16, requires_grad=True)
    loss = ce_loss(x, torch.full((4,), -100))
    assert loss.dtype == torch.float32 and loss.item() == 0.0
    (g,) = torch.autograd.grad(loss, x)
    assert torch.isfinite(g.float()).all()


@pytest.mark.parametrize(
    "call",
    [
        lambda: ce_loss(torch.zeros(3, V), torch.zeros(4, dtype=torch.long)),
        lambda: ce_loss(torch.zeros(3, V), torch.zeros(3)),
        lambda: ce_loss(torch.zeros(3, V), torch.zeros(3, dtype=torch.long), reduction="mean"),
        lambda: ce_loss(torch.zeros(3, V, dtype=torch.long), torch.zeros(3, dtype=torch.long)),
    ],
)
def test_ce_loss_validation(call):
    with pytest.raises(ValueError, match="got"):
        call()


# --------------------------------------------------------------------------------------
# KDLossConfig
# --------------------------------------------------------------------------------------


def test_kd_loss_config_defaults_and_kwargs():
    cfg = KDLossConfig()
    assert (cfg.ce_weight, cfg.mdist_text_weight, cfg.mdist_visual_weight, cfg.rdist_weight) == (
        1.0, 1.0, 1.0, 1.0,
    )
    assert cfg.kind == "forward_kl" and cfg.temperature == 1.0 and cfg.use_tail is True
    assert cfg.jsd_beta == 0.5
    cfg2 = dataclasses.replace(cfg, kind="jsd", temperature=2, jsd_beta=0.25, rdist_weight=0)
    assert isinstance(cfg2.temperature, float) and cfg2.rdist_weight == 0.0
    args = _mdist_args()
    torch.testing.assert_close(
        mdist_loss(*args, **cfg2.mdist_kwargs()),
        mdist_loss(*args, kind="jsd", temperature=2.0, jsd_beta=0.25, use_tail=True),
    )
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.kind = "jsd"  # type: ignore[misc]


@pytest.mark.parametrize(
    "kw",
    [
        dict(ce_weight=-1.0),
        dict(rdist_weight=float("inf")),
        dict(mdist_text_weight="1"),
        dict(mdist_visual_weight=True),
        dict(ce_weight=0, mdist_text_weight=0, mdist_visual_weight=0, rdist_weight=0),
        dict(kind="tvd"),
        dict(temperature=-2.0),
        dict(use_tail="yes"),
        dict(jsd_beta=0.0),
        dict(jsd_beta=1.5),
    ],
)
def test_kd_loss_config_validation(kw):
    with pytest.raises(ValueError, match="got"):
        KDLossConfig(**kw)


# ---------------------------------------------------------------------------------- random-sampling KD


def test_sampled_kd_gradient_is_unbiased_for_the_forward_kl_gradient():
    from kd_cache.targets import sampled_targets
    from kd_train.losses import sampled_kd_loss

    torch.manual_seed(0)
    n, v, draws = 4, 40, 50
    teacher = torch.randn(n, v, dtype=torch.float64) * 2
    student = torch.randn(n, v, dtype=torch.float64, requires_grad=True)
    p = torch.softmax(teacher, -1)
    full = (p * (torch.log(p) - torch.log_softmax(student, -1))).sum()
    g_full = torch.autograd.grad(full, student)[0]
    gen = torch.Generator().manual_seed(1)
    trials = 1000
    g_mean = torch.zeros_like(g_full)
    for _ in range(trials):
        t = sampled_targets(teacher, draws, generator=gen)
        loss = sampled_kd_loss(student, t.ids, t.counts, t.row_lengths, draws)
        g = torch.autograd.grad(loss, student)[0]
        # for one draw the gradient is exactly softmax(z_S) - q: linear in q, so E[g] = softmax(z_S) - p
        q = torch.zeros(n, v, dtype=torch.float64)
        q[torch.repeat_interleave(torch.arange(n), t.row_lengths), t.ids] = t.counts.double() / draws
        assert torch.allclose(g, torch.softmax(student.detach(), -1) - q, atol=1e-12)
        g_mean += g / trials
    # Monte-Carlo error of the mean: sd(q) / sqrt(draws * trials) <= 0.5 / sqrt(5e4) ~ 2.2e-3; allow 5 sd
    assert (g_mean - g_full).abs().max() < 1.2e-2


def test_sampled_kd_rejects_inconsistent_rows():
    from kd_train.losses import sampled_kd_loss

    z = torch.zeros(2, 5)
    with pytest.raises(ValueError, match="row_lengths"):
        sampled_kd_loss(z, torch.tensor([1, 2]), torch.tensor([3, 4]), torch.tensor([1, 2]), 7)
    with pytest.raises(ValueError, match="n_draws"):
        sampled_kd_loss(z, torch.tensor([1, 2]), torch.tensor([3, 4]), torch.tensor([1, 1]), 0)


def test_ce_label_smoothing_matches_a_dense_reference():
    torch.manual_seed(0)
    z = torch.randn(5, 11, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([3, -100, 0, 10, 7])
    eps = 0.2
    got = ce_loss(z, y, label_smoothing=eps)
    keep = y != -100
    logp = torch.log_softmax(z[keep], -1)
    target = torch.full_like(logp, eps / 11)
    target[torch.arange(int(keep.sum())), y[keep]] += 1 - eps
    want = -(target * logp).sum()
    assert torch.allclose(got, want)
    g1, = torch.autograd.grad(got, z)
    g2, = torch.autograd.grad(want, z)
    assert torch.allclose(g1, g2)
    assert torch.allclose(ce_loss(z, y, label_smoothing=0.0), ce_loss(z, y))
    with pytest.raises(ValueError, match=r"label_smoothing must be in \[0, 1\), got 1.0"):
        ce_loss(z, y, label_smoothing=1.0)


def test_visual_temperature_applies_to_visual_rows_only():
    cfg = KDLossConfig(temperature=2.0, visual_temperature=4.0)
    assert cfg.mdist_kwargs("text")["temperature"] == 2.0 and cfg.mdist_kwargs("visual")["temperature"] == 4.0
    assert KDLossConfig(temperature=3.0).mdist_kwargs("visual")["temperature"] == 3.0
    with pytest.raises(ValueError, match="temperature must be > 0"):
        KDLossConfig(visual_temperature=0.0)
