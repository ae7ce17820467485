"""kd_train.chunked: the row-chunked head + loss equals the unchunked head(hidden) -> losses, in value and gradients,
and never holds more than one chunk of logits; the objective's row functions (kd_train.objective) through it."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from kd_cache.codec import SampledRows, TopKRows
from kd_cache.targets import sampled_targets, topk_targets
from kd_train.chunked import chunked_row_loss, concat_row_fns
from kd_train.losses import KDLossConfig, ce_loss, mdist_loss, sampled_kd_loss
from kd_train.objective import Objective, StepCounts, loss_scales, text_rows_fn, visual_rows_fn

N, D, V, K, DRAWS = 23, 8, 50, 5, 20
CHUNKS = (1, 5, N + 4)  # one row, a non-divisor of N, more than N


def softcap(z: torch.Tensor) -> torch.Tensor:
    return torch.tanh(z / 4.0) * 4.0


def make(n=N, *, seed=0, bias=False, v=V, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, D, generator=g, dtype=dtype).requires_grad_(True)
    head = torch.nn.Linear(D, v, bias=bias, dtype=dtype)
    with torch.no_grad():
        head.weight.copy_(torch.randn(v, D, generator=g) * 0.7)
        if bias:
            head.bias.copy_(torch.randn(v, generator=g))
    labels = torch.randint(0, v, (n,), generator=g)
    if n > 3:
        labels[2] = -100  # an ignored row
    return hidden, head, labels, g


def teacher_targets(n: int, g: torch.Generator, *, sampled=False, vocab=V, teacher_vocab=None, draws=DRAWS):
    logits = torch.randn(n, vocab, generator=g) * 3
    if sampled:
        t = sampled_targets(logits, DRAWS, generator=g)
        return SampledRows(t.ids, t.counts, t.row_lengths, draws)
    t = topk_targets(logits, K)
    return TopKRows(t.topk_ids, t.topk_logprobs, t.tail_logprob, teacher_vocab)


def reference_mdist(z, targets, rows, cfg):
    """The MDist term over all rows at once, straight from kd_train.losses."""
    if isinstance(targets, SampledRows):
        return sampled_kd_loss(z, targets.ids, targets.counts, targets.row_lengths, DRAWS)
    return mdist_loss(z, targets.ids, targets.logprobs, targets.tail, **cfg.mdist_kwargs(rows),
                      teacher_vocab_size=targets.vocab_size)


def params(hidden, head):
    return [p for p in (hidden, head.weight, head.bias) if p is not None and p.requires_grad]


def grads(loss, xs):
    return torch.autograd.grad(loss, xs)


CASES = {
    "ce": dict(cfg={}, targets=None),
    "ce-label-smoothing": dict(cfg={"label_smoothing": 0.1}, targets=None),
    "forward_kl": dict(cfg={}, targets="topk"),
    "reverse_kl": dict(cfg={"kind": "reverse_kl"}, targets="topk"),
    "jsd": dict(cfg={"kind": "jsd", "jsd_beta": 0.3}, targets="topk"),
    "temperature": dict(cfg={"temperature": 2.0}, targets="topk"),
    "no-tail": dict(cfg={"use_tail": False, "temperature": 0.7}, targets="topk"),
    "teacher-vocab<V": dict(cfg={"temperature": 2.0}, targets="topk", teacher_vocab=V - 7),
    "sampled": dict(cfg={"mdist_text_weight": 0.5}, targets="sampled"),
    "softcap+bias": dict(cfg={"kind": "jsd"}, targets="topk", transform=softcap, bias=True),
}


@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("case", list(CASES))
def test_text_rows_match_unchunked_fp32(case, chunk):
    c = CASES[case]
    hidden, head, labels, g = make(bias=c.get("bias", False), seed=len(case))
    tv = c.get("teacher_vocab")
    # the student's extra rows (ids >= teacher vocab) are never teacher top-k ids
    targets = None if c["targets"] is None else teacher_targets(N, g, sampled=c["targets"] == "sampled",
                                                                  vocab=tv or V, teacher_vocab=tv)
    cfg = KDLossConfig(**c["cfg"])
    scales = loss_scales(cfg, SimpleNamespace(text=N + 9, visual=0, gram=0), 2)
    transform = c.get("transform")
    fn = text_rows_fn(labels, targets, cfg, scales)
    loss, terms = chunked_row_loss(hidden, head, fn, chunk_size=chunk, transform=transform)

    z = head(hidden)
    z = (transform(z) if transform else z).float()
    ref_terms = {"ce": ce_loss(z, labels, label_smoothing=cfg.label_smoothing)}
    if targets is not None:
        ref_terms["mdist_text"] = reference_mdist(z, targets, "text", cfg)
    ref = sum(scales[k] * v for k, v in ref_terms.items())

    assert set(terms) == set(ref_terms)
    for k, v in ref_terms.items():
        assert terms[k] == pytest.approx(float(v.detach()), rel=1e-5, abs=1e-6)
    torch.testing.assert_close(loss, ref.detach(), rtol=1e-5, atol=1e-6)
    xs = params(hidden, head)
    for a, b in zip(grads(loss, xs), grads(ref, xs)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("sampled", [False, True])
def test_visual_rows_match_unchunked_with_visual_temperature(sampled):
    hidden, head, _, g = make(seed=3)
    cfg = KDLossConfig(temperature=1.0, visual_temperature=1.5, kind="reverse_kl")
    targets = teacher_targets(N, g, sampled=sampled)
    scales = loss_scales(cfg, SimpleNamespace(text=4, visual=N, gram=1), 1)
    fn = visual_rows_fn(N, targets, cfg, scales)
    loss, terms = chunked_row_loss(hidden, head, fn, chunk_size=5)
    ref_sum = reference_mdist(head(hidden).float(), targets, "visual", cfg)
    ref = scales["mdist_visual"] * ref_sum
    assert terms["mdist_visual"] == pytest.approx(float(ref_sum.detach()), rel=1e-5)
    torch.testing.assert_close(loss, ref.detach(), rtol=1e-5, atol=1e-6)
    for a, b in zip(grads(loss, params(hidden, head)), grads(ref, params(hidden, head))):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_objective_chunked_equals_unchunked_and_the_losses():
    """Text rows then visual rows in one pass (chunks straddle the boundary) == the same row functions over all
    rows at once == the weighted sums of the losses themselves."""
    nt, nv = 9, 14
    hidden, head, labels, g = make(nt + nv, seed=7, bias=True)
    labels = labels[:nt]
    text, visual = teacher_targets(nt, g, teacher_vocab=V), teacher_targets(nv, g, sampled=True)
    cfg = KDLossConfig(ce_weight=0.5, mdist_text_weight=2.0, mdist_visual_weight=0.7, rdist_weight=0.0,
                       temperature=1.5, label_smoothing=0.05)
    batch = SimpleNamespace(text_labels=labels, text_targets=text, visual_targets=visual, n_text=nt, n_visual=nv,
                            visual_splits=[nv], grams=None, has_targets=False)
    counts = StepCounts(text=3 * nt, visual=2 * nv, gram=2)
    chunked = Objective(cfg, head, softcap, chunk_size=4)
    loss, parts = chunked(hidden[:nt], None, hidden[nt:], batch, counts, 4)
    assert list(parts) == ["ce", "mdist_text", "mdist_visual"]

    z = softcap(head(hidden))
    ref, ref_parts = Objective(cfg, head, softcap)(z[:nt], z[nt:], hidden[nt:], batch, counts, 4)
    scales = loss_scales(cfg, counts, 4)
    sums = {"ce": ce_loss(z[:nt].float(), labels, label_smoothing=0.05),
            "mdist_text": reference_mdist(z[:nt].float(), text, "text", cfg),
            "mdist_visual": reference_mdist(z[nt:].float(), visual, "visual", cfg)}
    direct = sum(scales[k] * v for k, v in sums.items())
    assert parts.keys() == ref_parts.keys() == sums.keys()
    for k in parts:
        assert parts[k] == pytest.approx(ref_parts[k], rel=1e-5)
        assert ref_parts[k] == pytest.approx(float(sums[k].detach()), rel=1e-6)
    torch.testing.assert_close(loss, ref.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ref, direct, rtol=1e-6, atol=1e-7)
    for a, b in zip(grads(loss, params(hidden, head)), grads(ref, params(hidden, head))):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_concat_reports_terms_of_a_part_with_no_rows():
    hidden, head, _, g = make(6, seed=2)
    cfg = KDLossConfig()
    scales = loss_scales(cfg, SimpleNamespace(text=1, visual=6, gram=0), 1)
    targets = teacher_targets(6, g)
    fn = concat_row_fns(text_rows_fn(torch.zeros(0, dtype=torch.long), targets, cfg, scales),
                        visual_rows_fn(6, targets, cfg, scales))
    loss, terms = chunked_row_loss(hidden, head, fn, chunk_size=4)
    assert terms["ce"] == 0.0 and "mdist_text" not in terms  # as over all rows: CE always, MDist only with rows
    ref = scales["mdist_visual"] * reference_mdist(head(hidden), targets, "visual", cfg)
    torch.testing.assert_close(loss, ref.detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("transform", [None, softcap])
def test_bf16_autocast_matches_unchunked_within_bf16_tolerance(transform):
    hidden, head, labels, g = make(seed=11, bias=True)
    targets = teacher_targets(N, g)
    cfg = KDLossConfig(kind="jsd")
    scales = loss_scales(cfg, SimpleNamespace(text=N, visual=0, gram=0), 1)
    fn = text_rows_fn(labels, targets, cfg, scales)
    xs = params(hidden, head)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = chunked_row_loss(hidden, head, fn, chunk_size=5, transform=transform)  # amp_dtype="auto"
        z = head(hidden)
        z = transform(z) if transform else z
    assert z.dtype == torch.bfloat16
    z = z.float()
    ref = scales["ce"] * ce_loss(z, labels) + scales["mdist_text"] * reference_mdist(z, targets, "text", cfg)
    # the same computation outside autocast with amp_dtype forced (how the engine may call it)
    loss2, _ = chunked_row_loss(hidden, head, fn, chunk_size=N, transform=transform, amp_dtype=torch.bfloat16)
    torch.testing.assert_close(loss, ref.detach(), rtol=1e-2, atol=1e-3)
    torch.testing.assert_close(loss2, ref.detach(), rtol=1e-2, atol=1e-3)
    for a, b in zip(grads(loss, xs), grads(ref, xs)):
        assert a.dtype == b.dtype == torch.float32
        assert float((a - b).norm() / b.norm()) < 2e-2
    # and bf16 really is used: the fp32 loss differs
    loss32, _ = chunked_row_loss(hidden, head, fn, chunk_size=5, transform=transform, amp_dtype=None)
    assert float(loss32.detach()) != float(loss.detach())


def test_frozen_weight_gets_no_gradient_and_hidden_gradient_matches():
    hidden, head, labels, g = make(seed=5)
    head.weight.requires_grad_(False)
    targets = teacher_targets(N, g)
    cfg = KDLossConfig()
    scales = loss_scales(cfg, SimpleNamespace(text=N, visual=0, gram=0), 1)
    loss, _ = chunked_row_loss(hidden, head, text_rows_fn(labels, targets, cfg, scales), chunk_size=5)
    loss.backward()
    assert head.weight.grad is None
    gh = hidden.grad.clone()
    hidden.grad = None
    z = head(hidden)
    ref = scales["ce"] * ce_loss(z, labels) + scales["mdist_text"] * reference_mdist(z, targets, "text", cfg)
    ref.backward()
    torch.testing.assert_close(gh, hidden.grad, rtol=1e-5, atol=1e-6)
    assert head.weight.grad is None


def test_zero_rows():
    hidden, head, labels, g = make(0, seed=1, bias=True)
    cfg = KDLossConfig()
    scales = loss_scales(cfg, SimpleNamespace(text=0, visual=0, gram=0), 1)
    fn = text_rows_fn(labels, teacher_targets(0, g), cfg, scales)
    loss, terms = chunked_row_loss(hidden, head, fn, chunk_size=4)
    assert float(loss.detach()) == 0.0 and terms == {"ce": 0.0}  # no rows: no MDist term, as over all rows
    loss.backward()
    assert hidden.grad.shape == (0, D)
    assert torch.count_nonzero(head.weight.grad) == 0 and torch.count_nonzero(head.bias.grad) == 0


def test_backward_scales_by_the_incoming_gradient_and_runs_once():
    hidden, head, labels, _ = make(seed=4)
    fn = text_rows_fn(labels, None, KDLossConfig(), {"ce": 1.0})
    loss, _ = chunked_row_loss(hidden, head, fn, chunk_size=5)
    (3.0 * loss).backward(retain_graph=True)
    ref = 3.0 * ce_loss(head(hidden), labels)
    gh, gw = torch.autograd.grad(ref, [hidden, head.weight])
    torch.testing.assert_close(hidden.grad, gh, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(head.weight.grad, gw, rtol=1e-5, atol=1e-6)
    with pytest.raises(RuntimeError, match="one backward"):
        loss.backward()


def test_memory_never_holds_all_rows_of_logits():
    n, d, v, chunk = 40, 6, 50, 4  # n*v = 2000 exceeds every allowed size below
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, d, generator=g).requires_grad_(True)
    head = torch.nn.Linear(d, v, bias=False)
    labels = torch.randint(0, v, (n,), generator=g)
    targets = teacher_targets(n, g, vocab=v)
    cfg = KDLossConfig(temperature=2.0)
    fn = text_rows_fn(labels, targets, cfg, loss_scales(cfg, SimpleNamespace(text=n, visual=0, gram=0), 1))
    seen_rows = []

    def spy(z, s, e):
        seen_rows.append(z.shape[0])
        return fn(z, s, e)

    saved = []

    def pack(t):
        saved.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss, _ = chunked_row_loss(hidden, head, spy, chunk_size=chunk)
        loss.backward()
    assert max(seen_rows) <= chunk and sum(seen_rows) == n
    bound = max(chunk * v, v * d, n * d)
    assert bound < n * v
    sizes = [torch.Size(s).numel() for s in saved]
    assert sizes and max(sizes) <= bound, saved
    # what the outer graph keeps between forward and backward: gradient buffers of hidden's and weight's sizes
    loss, _ = chunked_row_loss(hidden, head, fn, chunk_size=chunk)
    kept = [tuple(t.shape) for t in loss.grad_fn.grads if t is not None]
    assert kept == [(n, d), (v, d)]
    # the hook does see the unchunked path's (n, v) logits
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        ce_loss(head(hidden), labels).backward()
    assert max(torch.Size(s).numel() for s in saved) >= n * v


def test_invalid_arguments_raise_value_error():
    hidden, head, labels, _ = make(seed=0)
    fn = text_rows_fn(labels, None, KDLossConfig(), {"ce": 1.0})
    with pytest.raises(ValueError, match="chunk_size.*got 0"):
        chunked_row_loss(hidden, head, fn, chunk_size=0)
    with pytest.raises(ValueError, match="hidden.*got"):
        chunked_row_loss(hidden[0], head, fn, chunk_size=4)
    with pytest.raises(ValueError, match="rows.*got"):
        chunked_row_loss(hidden[:5], head, fn, chunk_size=4)
    with pytest.raises(ValueError, match="0-dim.*got"):
        chunked_row_loss(hidden, head, lambda z, s, e: (z.sum(-1), {}), chunk_size=4)
    with pytest.raises(ValueError, match="amp_dtype.*got"):
        chunked_row_loss(hidden, head, fn, chunk_size=4, amp_dtype="bf16")
    with pytest.raises(ValueError, match="draws.*got 0"):
        text_rows_fn(labels, teacher_targets(N, torch.Generator(), sampled=True, draws=0), KDLossConfig(),
                     {"ce": 1.0, "mdist_text": 1.0})
    with pytest.raises(ValueError, match="Nt=.*got"):
        text_rows_fn(labels[:4], teacher_targets(N, torch.Generator()), KDLossConfig(),
                     {"ce": 1.0, "mdist_text": 1.0})
    with pytest.raises(ValueError, match="plain linear LM head, got Sequential"):
        Objective(KDLossConfig(), torch.nn.Sequential(head), chunk_size=4)
