"""Tests for kd_train.cross_losses: against TRL's GOLD code (`trl.experimental.gold.gold_trainer.ULDLoss`, run as
is) where the cache's top-k cover the whole tiny vocabulary, against naive dense loops, and properties."""

from __future__ import annotations

import math
import os
import warnings
from types import SimpleNamespace

import pytest
import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from kd_train.cross_losses import (
    MergeGroups,
    hybrid_loss,
    merge_group_logprobs,
    token_bytes,
    uld_loss,
    vocab_map,
)
from kd_train.losses import mdist_loss

F64 = dict(rtol=1e-9, atol=1e-12)


# --------------------------------------------------------------------------------------
# inputs
# --------------------------------------------------------------------------------------


def logits(n, v, seed, scale=2.0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, v, generator=g, dtype=torch.float64) * scale).to(dtype)


def cache_rows(teacher_logits, k):
    """The cache's top-k + tail of dense teacher logits (N, V): ids, log-probs (descending), tail log-mass."""
    lp = torch.log_softmax(teacher_logits, dim=-1)
    topk_lp, topk_ids = lp.topk(k, dim=-1)
    if k == lp.shape[1]:
        tail = torch.full((lp.shape[0],), float("-inf"), dtype=lp.dtype)
    else:
        tail = torch.log1p(-topk_lp.exp().sum(-1))
    return topk_ids, topk_lp, tail


def byte_level_tokenizer(tokens, specials=("<|endoftext|>",)):
    """A byte-level BPE tokenizer (GPT-2 / SmolLM2 style) holding exactly `tokens` (byte-level strings) + specials."""
    vocab = {t: i for i, t in enumerate(list(specials) + list(tokens))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=specials[0])


def metaspace_tokenizer(tokens, *, llama_decoder=True):
    """A sentencepiece-style BPE (Llama-2 / Mistral: `▁`, byte fallback) holding `tokens` after <unk>, <s>, </s>."""
    vocab = {t: i for i, t in enumerate(["<unk>", "<s>", "</s>"] + list(tokens))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], byte_fallback=True, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    if llama_decoder:  # Llama-2's tokenizer.json
        tok.decoder = decoders.Sequence(
            [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
        )
    else:
        tok.decoder = decoders.Metaspace()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )


def wordpiece_tokenizer(tokens):
    vocab = {t: i for i, t in enumerate(["[UNK]", "[SEP]"] + list(tokens))}
    tok = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", sep_token="[SEP]")


# Tiny teacher / student vocabularies for the TRL comparison: both byte-level, so GOLD's raw-string match and the
# byte match agree. Teacher: 1 special + 7 = 8 ids; student: 1 special + 9 = 10 ids; 5 strings shared.
TEACHER_TOKENS = ["a", "b", "Ġthe", "Ġcat", "ing", "xy", "Ġzz"]
STUDENT_TOKENS = ["b", "Ġthe", "ing", "Ġcat", "a", "q", "Ġdo", "gs", "Ġs"]


# --------------------------------------------------------------------------------------
# naive dense references (loops, float64, written from the papers' / GOLD's formulas)
# --------------------------------------------------------------------------------------


def naive_uld(p_student, p_teacher):
    """ULD per row: L1 of the two probability vectors sorted descending, the shorter padded with zeros."""
    out = []
    for q, p in zip(p_student, p_teacher):
        qs = sorted(q.tolist(), reverse=True)
        ps = sorted(p.tolist(), reverse=True)
        n = max(len(qs), len(ps))
        qs += [0.0] * (n - len(qs))
        ps += [0.0] * (n - len(ps))
        out.append(sum(abs(a - b) for a, b in zip(qs, ps)))
    return torch.tensor(out, dtype=torch.float64)


def naive_bucket_uld(p_student, known, tail, top):
    """Cached ULD per row: `top` sorted positions entry by entry, then the rest of each side as one bucket."""
    out = []
    for q, kn, tl in zip(p_student, known, tail):
        qs = sorted(q.tolist(), reverse=True)
        ps = sorted(kn.tolist(), reverse=True)
        m = min(top, len(ps))
        qs += [0.0] * max(0, m - len(qs))
        head = sum(abs(qs[j] - ps[j]) for j in range(m))
        out.append(head + abs(sum(qs[m:]) - (float(tl) + sum(ps[m:]))))
    return torch.tensor(out, dtype=torch.float64)


def naive_hybrid(p_student, p_teacher, mapping, *, beta, w_matched, w_unmatched):
    """GOLD's hybrid per row on full distributions: generalised JSD (GOLD's beta) over the matched ids, ULD over
    the unmatched ids of each side."""
    out = []
    t_matched = [i for i in range(len(mapping)) if mapping[i] >= 0]
    s_matched = {int(mapping[i]) for i in t_matched}
    for q, p in zip(p_student, p_teacher):
        d = 0.0
        for i in t_matched:
            pt, ps = float(p[i]), float(q[int(mapping[i])])
            if beta == 0:
                d += pt * math.log(pt / ps)
            elif beta == 1:
                d += ps * math.log(ps / pt)
            else:
                m = beta * pt + (1 - beta) * ps
                d += beta * pt * math.log(pt / m) + (1 - beta) * ps * math.log(ps / m)
        pu = torch.tensor([float(p[i]) for i in range(len(p)) if mapping[i] < 0], dtype=torch.float64)
        qu = torch.tensor([float(q[j]) for j in range(len(q)) if j not in s_matched], dtype=torch.float64)
        u = float(naive_uld(qu[None], pu[None])[0])
        out.append(w_matched * d + w_unmatched * u)
    return torch.tensor(out, dtype=torch.float64)


# --------------------------------------------------------------------------------------
# 1. against TRL's GOLD (ULDLoss), top-k = the whole tiny vocabulary
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trl_uld():
    """TRL's `ULDLoss` class (trl.experimental.gold.gold_trainer), imported as is."""
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    pytest.importorskip("trl", reason="trl is in the dev extra (pip install 'trl==1.16.0')")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from trl.experimental.gold.gold_trainer import ULDLoss
    return ULDLoss


@pytest.fixture(scope="module")
def tokenizer_pair():
    return byte_level_tokenizer(TEACHER_TOKENS), byte_level_tokenizer(STUDENT_TOKENS)


def gold(ULDLoss, teacher_tok, student_tok, *, hybrid=False, beta=0.5, weights=(None, None), extended=False,
         strategy="observed"):
    """GOLD's ULD loss object configured for distillation only (no CE, temperature 1, EOS kept)."""
    config = SimpleNamespace(
        uld_crossentropy_weight=0.0, uld_distillation_weight=1.0, uld_student_temperature=1.0,
        uld_teacher_temperature=1.0, uld_skip_student_eos=False, uld_skip_teacher_eos=False,
        use_extended_uld=extended, uld_token_merge_strategy=strategy, uld_use_hybrid_loss=hybrid,
        uld_hybrid_matched_weight=weights[0], uld_hybrid_unmatched_weight=weights[1], beta=beta,
    )
    return ULDLoss(config, student_tokenizer=student_tok, teacher_tokenizer=teacher_tok)


def one_to_one_batch(n_prompt=2, n_answer=5, seed=0):
    """A batch of one sample: teacher and student logits (1, T, V), labels with the prompt masked, ids."""
    v_t, v_s = 8, 10
    t = n_prompt + n_answer
    teacher = logits(t, v_t, seed)[None]
    student = logits(t, v_s, seed + 1, scale=1.5)[None].requires_grad_(True)
    labels = torch.full((1, t), -100, dtype=torch.long)
    labels[0, n_prompt:] = 1
    ids = torch.ones(1, t, dtype=torch.long)
    return teacher, student, labels, ids, slice(n_prompt, t)


def test_vocab_map_equals_gold_mapping_on_byte_level_pair(trl_uld, tokenizer_pair):
    teacher_tok, student_tok = tokenizer_pair
    g = gold(trl_uld, teacher_tok, student_tok, hybrid=True)
    ours = vocab_map(teacher_tok, student_tok)
    expected = torch.full((len(teacher_tok),), -1, dtype=torch.long)
    for t_id, s_id in g._vocab_mapping.items():
        expected[t_id] = s_id
    assert torch.equal(ours, expected)
    assert int((ours >= 0).sum()) == 6  # 5 shared strings + <|endoftext|> (special in both)


def test_uld_matches_trl_one_to_one(trl_uld, tokenizer_pair):
    teacher, student, labels, ids, rows = one_to_one_batch()
    loss_ref = gold(trl_uld, *tokenizer_pair)(student, teacher, labels, labels, ids, ids)
    (g_ref,) = torch.autograd.grad(loss_ref, student)

    topk_ids, topk_lp, tail = cache_rows(teacher[0, rows], k=teacher.shape[-1])
    ours = uld_loss(student[0, rows], topk_lp, tail, reduction="mean")
    (g_ours,) = torch.autograd.grad(ours, student)
    torch.testing.assert_close(ours, loss_ref.to(ours.dtype), **F64)
    torch.testing.assert_close(g_ours, g_ref, **F64)
    assert float(ours.detach()) > 0.1


@pytest.mark.parametrize(("beta", "kind"), [(0.0, "forward_kl"), (0.5, "jsd"), (1.0, "reverse_kl"), (0.3, "jsd")])
@pytest.mark.parametrize("weights", [(None, None), (0.7, 0.4)])
def test_hybrid_matches_trl_one_to_one(trl_uld, tokenizer_pair, beta, kind, weights):
    teacher, student, labels, ids, rows = one_to_one_batch(seed=3)
    loss_ref = gold(trl_uld, *tokenizer_pair, hybrid=True, beta=beta, weights=weights)(
        student, teacher, labels, labels, ids, ids)
    (g_ref,) = torch.autograd.grad(loss_ref, student)

    mapping = vocab_map(*tokenizer_pair)
    topk_ids, topk_lp, tail = cache_rows(teacher[0, rows], k=teacher.shape[-1])
    ours = hybrid_loss(student[0, rows], topk_ids, topk_lp, tail, mapping, kind=kind,
                       jsd_beta=beta if kind == "jsd" else 0.5, matched_weight=weights[0],
                       unmatched_weight=weights[1], reduction="mean")
    (g_ours,) = torch.autograd.grad(ours, student)
    torch.testing.assert_close(ours, loss_ref.to(ours.dtype), **F64)
    torch.testing.assert_close(g_ours, g_ref, **F64)


def merged_batch(seed=5):
    """One sample whose answer bytes 'abcdef' the two tokenizers split differently:

    teacher tokens [0,1) [1,2) [2,4) [4,6); student tokens [0,2) [2,3) [3,4) [4,6): groups (teacher rows, student
    rows) = ([0, 1], [0]) many-to-one, ([2], [1, 2]) one-to-many, ([3], [3]) one-to-one.
    """
    n_prompt, v_t, v_s = 2, 8, 10
    t_off = [(0, 1), (1, 2), (2, 4), (4, 6)]
    s_off = [(0, 2), (2, 3), (3, 4), (4, 6)]
    t_len, s_len = n_prompt + len(t_off), n_prompt + len(s_off)
    teacher = logits(t_len, v_t, seed)[None]
    student = logits(s_len, v_s, seed + 1, scale=1.5)[None].requires_grad_(True)
    g = torch.Generator().manual_seed(seed + 2)
    t_ids = torch.randint(1, v_t, (1, t_len), generator=g)
    s_ids = torch.randint(1, v_s, (1, s_len), generator=g)

    def labels_and_offsets(n, offs):
        labels = torch.full((1, n), -100, dtype=torch.long)
        labels[0, n_prompt:] = 1
        offsets = torch.zeros(1, n, 2, dtype=torch.long)
        offsets[0, n_prompt:] = torch.tensor(offs)
        return labels, offsets

    t_labels, t_offsets = labels_and_offsets(t_len, t_off)
    s_labels, s_offsets = labels_and_offsets(s_len, s_off)
    return dict(teacher=teacher, student=student, t_ids=t_ids, s_ids=s_ids, t_labels=t_labels,
                s_labels=s_labels, t_offsets=t_offsets, s_offsets=s_offsets, n_prompt=n_prompt)


def our_merged_inputs(b):
    """Our rows for GOLD's "bayesian" layout: row j (logits at position start-1+j) predicts answer token j."""
    p = b["n_prompt"]
    s_rows = b["student"][0, p - 1: -1]
    t_rows = b["teacher"][0, p - 1: -1]
    t_tokens = b["t_ids"][0, p:]
    s_tokens = b["s_ids"][0, p:]
    t_lp = torch.log_softmax(t_rows, -1)
    groups = MergeGroups(
        student_sizes=torch.tensor([1, 2, 1]), teacher_sizes=torch.tensor([2, 1, 1]),
        student_token_ids=s_tokens, teacher_observed_logprob=t_lp.gather(1, t_tokens[:, None])[:, 0],
    )
    return s_rows, t_rows, groups


@pytest.mark.parametrize("hybrid", [False, True])
def test_merged_groups_match_trl(trl_uld, tokenizer_pair, hybrid):
    b = merged_batch()
    g = gold(trl_uld, *tokenizer_pair, hybrid=hybrid, beta=0.0, extended=True, strategy="bayesian")
    s_groups, t_groups = g._align_by_byte_offsets(b["s_offsets"][0, 2:].tolist(), b["t_offsets"][0, 2:].tolist())
    assert (s_groups, t_groups) == ([[0], [1, 2], [3]], [[0, 1], [2], [3]])
    loss_ref = g(b["student"], b["teacher"], b["s_labels"], b["t_labels"], b["s_ids"], b["t_ids"],
                 student_byte_offsets=b["s_offsets"], teacher_byte_offsets=b["t_offsets"])
    (g_ref,) = torch.autograd.grad(loss_ref, b["student"])

    s_rows, t_rows, groups = our_merged_inputs(b)
    topk_ids, topk_lp, tail = cache_rows(t_rows, k=t_rows.shape[-1])
    if hybrid:
        ours = hybrid_loss(s_rows, topk_ids, topk_lp, tail, vocab_map(*tokenizer_pair), groups=groups,
                           reduction="mean")
    else:
        ours = uld_loss(s_rows, topk_lp, tail, groups=groups, reduction="mean")
    (g_ours,) = torch.autograd.grad(ours, b["student"])
    torch.testing.assert_close(ours, loss_ref.to(ours.dtype), **F64)
    torch.testing.assert_close(g_ours, g_ref, **F64)


# --------------------------------------------------------------------------------------
# 2. against naive dense references
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("v_s", "v_t"), [(9, 6), (5, 8), (7, 7)])
def test_uld_full_topk_equals_dense_sorted_l1(v_s, v_t):
    z = logits(4, v_s, 10)
    t = logits(4, v_t, 11)
    _, topk_lp, tail = cache_rows(t, k=v_t)
    got = uld_loss(z, topk_lp, tail, reduction="none")
    torch.testing.assert_close(got, naive_uld(z.softmax(-1), t.softmax(-1)), **F64)


@pytest.mark.parametrize(("k", "top"), [(4, None), (4, 2), (6, 6), (3, 10)])
def test_uld_topk_tail_is_the_bucket_formula_and_a_lower_bound(k, top):
    z = logits(5, 9, 20)
    t = logits(5, 12, 21)
    _, topk_lp, tail = cache_rows(t, k=k)
    got = uld_loss(z, topk_lp, tail, top=top, reduction="none")
    expected = naive_bucket_uld(z.softmax(-1), topk_lp.exp(), tail.exp(), k if top is None else top)
    torch.testing.assert_close(got, expected, **F64)
    exact = naive_uld(z.softmax(-1), t.softmax(-1))
    assert bool((got <= exact + 1e-12).all())


def test_hybrid_full_topk_equals_dense_gold_formula_with_partial_map():
    v_t, v_s = 7, 9
    mapping = torch.tensor([3, -1, 0, -1, 8, 5, -1])
    z = logits(4, v_s, 30)
    t = logits(4, v_t, 31)
    ids, lp, tail = cache_rows(t, k=v_t)
    for beta, kind in [(0.0, "forward_kl"), (1.0, "reverse_kl"), (0.4, "jsd")]:
        got = hybrid_loss(z, ids, lp, tail, mapping, kind=kind, jsd_beta=0.4, reduction="none")
        w = 4 / 7
        ref = naive_hybrid(z.softmax(-1), t.softmax(-1), mapping, beta=beta, w_matched=w, w_unmatched=1 - w)
        torch.testing.assert_close(got, ref, **F64)


def test_hybrid_topk_tail_reference():
    """k < V_t: matched part over the top-k's matched ids only; ULD part: unmatched top-k + tail vs the
    student's ids outside this row's matched images, tail as a bucket."""
    v_t, v_s, k = 10, 8, 4
    mapping = torch.tensor([2, -1, 0, 5, -1, 7, 1, -1, -1, 4])
    z = logits(6, v_s, 40)
    t = logits(6, v_t, 41)
    ids, lp, tail = cache_rows(t, k=k)
    got = hybrid_loss(z, ids, lp, tail, mapping, matched_weight=1.0, unmatched_weight=0.5, reduction="none")
    q = z.softmax(-1)
    expected = []
    for r in range(6):
        matched = [(float(lp[r, j].exp()), int(mapping[ids[r, j]])) for j in range(k) if mapping[ids[r, j]] >= 0]
        kl = sum(p * math.log(p / float(q[r, s])) for p, s in matched)
        images = {s for _, s in matched}
        known = torch.tensor([float(lp[r, j].exp()) for j in range(k) if mapping[ids[r, j]] < 0],
                             dtype=torch.float64)
        qu = torch.tensor([float(q[r, s]) for s in range(v_s) if s not in images], dtype=torch.float64)
        u = naive_bucket_uld(qu[None], known[None], tail[r:r + 1].exp(), k)[0]
        expected.append(kl + 0.5 * float(u))
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64), **F64)


def test_hybrid_identity_map_full_topk_is_the_exact_kl():
    z = logits(5, 6, 50)
    t = logits(5, 6, 51)
    ids, lp, tail = cache_rows(t, k=6)
    got = hybrid_loss(z, ids, lp, tail, torch.arange(6), reduction="none")
    ref = mdist_loss(z, ids, lp, tail, reduction="none")
    torch.testing.assert_close(got, ref, **F64)


def test_hybrid_without_matches_is_uld():
    z = logits(4, 9, 60)
    t = logits(4, 11, 61)
    ids, lp, tail = cache_rows(t, k=5)
    mapping = torch.full((11,), -1)
    for top in (None, 3):
        got = hybrid_loss(z, ids, lp, tail, mapping, top=top, reduction="none")  # adaptive weights: 0 and 1
        torch.testing.assert_close(got, uld_loss(z, lp, tail, top=top, reduction="none"), **F64)


# --------------------------------------------------------------------------------------
# 3. properties
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [3, 7])
def test_zero_when_student_equals_teacher(k):
    z = logits(4, 7, 70)
    ids, lp, tail = cache_rows(z, k=k)
    assert float(uld_loss(z, lp, tail)) == pytest.approx(0.0, abs=1e-12)
    for kind in ("forward_kl", "reverse_kl", "jsd"):
        for generalized in (False, True):
            got = hybrid_loss(z, ids, lp, tail, torch.arange(7), kind=kind, generalized=generalized,
                              matched_weight=1.0, unmatched_weight=1.0)
            assert float(got) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gradients_flow_and_dtypes(dtype):
    z = logits(6, 50, 80, dtype=dtype).requires_grad_(True)
    t = logits(6, 40, 81)
    ids, lp, tail = cache_rows(t, k=8)
    mapping = torch.where(torch.arange(40) % 3 == 0, (torch.arange(40) * 7) % 50, -1)
    for loss in (uld_loss(z, lp.float(), tail.float()),
                 hybrid_loss(z, ids, lp.float(), tail.float(), mapping, kind="jsd")):
        assert loss.dtype == torch.float32
        (g,) = torch.autograd.grad(loss, z)
        assert g.dtype == dtype and bool(torch.isfinite(g.float()).all()) and float(g.float().abs().sum()) > 0


def test_gradient_matches_finite_differences():
    z = logits(3, 6, 90).requires_grad_(True)
    t = logits(3, 9, 91)
    ids, lp, tail = cache_rows(t, k=4)
    mapping = torch.tensor([0, -1, 2, -1, 5, -1, 1, -1, -1])

    def f(x):
        return uld_loss(x, lp, tail) + hybrid_loss(x, ids, lp, tail, mapping, generalized=True)

    torch.autograd.gradcheck(f, (z,), eps=1e-6, atol=1e-6)


def test_generalized_kl_is_nonnegative_and_gold_kl_can_be_negative():
    """The matched sub-distribution KL: GOLD's form rewards moving student mass onto matched ids."""
    t = logits(200, 6, 100)
    ids, lp, tail = cache_rows(t, k=6)
    mapping = torch.tensor([0, 1, 2, -1, -1, -1])
    z = torch.log_softmax(t, -1).clone()
    z[:, :3] += 1.0  # the student puts more mass than the teacher on the matched ids
    gold_kl = hybrid_loss(z, ids, lp, tail, mapping, matched_weight=1.0, unmatched_weight=0.0, reduction="none")
    gen_kl = hybrid_loss(z, ids, lp, tail, mapping, matched_weight=1.0, unmatched_weight=0.0, generalized=True,
                         reduction="none")
    assert bool((gold_kl < 0).all()) and bool((gen_kl > 0).all())


def test_tail_bucket_when_topk_smaller_than_vocab():
    """k < V: moving student mass within its tail (below its top-k) leaves ULD unchanged; moving mass between
    the head and the tail changes it by the mass moved."""
    t = torch.log(torch.tensor([[0.5, 0.2, 0.1, 0.1, 0.05, 0.05]], dtype=torch.float64))
    _, lp, tail = cache_rows(t, k=2)  # tail mass 0.3
    q1 = torch.tensor([[0.5, 0.2, 0.2, 0.1, 0.0, 0.0]], dtype=torch.float64)
    q2 = torch.tensor([[0.5, 0.2, 0.1, 0.1, 0.05, 0.05]], dtype=torch.float64)
    q3 = torch.tensor([[0.6, 0.2, 0.1, 0.05, 0.05, 0.0]], dtype=torch.float64)
    val = [float(uld_loss(torch.log(q.clamp(min=1e-300)), lp, tail)) for q in (q1, q2, q3)]
    assert val[0] == pytest.approx(0.0, abs=1e-12)
    assert val[1] == pytest.approx(0.0, abs=1e-12)
    assert val[2] == pytest.approx(0.2, abs=1e-12)  # |0.6 - 0.5| + |0.2 - 0.3|


def test_unmatched_tokens_only_in_the_uld_part():
    """Teacher top-2 = ids 0 (matched to student 1) and 1 (unmatched), tail 0.1; student vocab 3."""
    t = torch.log(torch.tensor([[0.6, 0.3, 0.1]], dtype=torch.float64))
    ids, lp, tail = cache_rows(t, k=2)
    mapping = torch.tensor([1, -1, -1])
    q = torch.tensor([[0.25, 0.5, 0.25]], dtype=torch.float64)
    z = torch.log(q)
    matched = float(hybrid_loss(z, ids, lp, tail, mapping, matched_weight=1.0, unmatched_weight=0.0))
    assert matched == pytest.approx(0.6 * math.log(0.6 / 0.5), abs=1e-12)
    unmatched = float(hybrid_loss(z, ids, lp, tail, mapping, matched_weight=0.0, unmatched_weight=1.0))
    # teacher unmatched: [0.3] + tail 0.1; student unmatched (ids 0, 2): [0.25, 0.25] -> |0.25-0.3| + |0.25-0.1|
    assert unmatched == pytest.approx(0.05 + 0.15, abs=1e-12)
    adaptive = float(hybrid_loss(z, ids, lp, tail, mapping))  # 1 of 3 teacher ids matched
    assert adaptive == pytest.approx(matched / 3 + 2 * unmatched / 3, abs=1e-12)


def test_merge_is_the_chain_rule_on_a_hand_example():
    """Two student rows cover one teacher token: P(t1 = 1, t2 = v) = p_1(1) * p_2(v | t1 = 1)."""
    p1 = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    p2 = torch.tensor([0.1, 0.6, 0.3], dtype=torch.float64)
    p3 = torch.tensor([0.7, 0.2, 0.1], dtype=torch.float64)
    lp = torch.log(torch.stack([p1, p2, p3]))
    observed = torch.log(torch.tensor([0.3, 0.6, 0.7], dtype=torch.float64))  # p1(1), p2(1), p3(0)
    merged = merge_group_logprobs(lp, observed, torch.tensor([2, 1])).exp()
    torch.testing.assert_close(merged, torch.stack([0.3 * p2, p3]), **F64)

    # the same through the loss: student rows (p1, p2) vs a teacher row holding exactly the merged probabilities
    z = lp[:2]
    t_lp = torch.log(torch.tensor([[0.18, 0.09, 0.03]], dtype=torch.float64))
    t_tail = torch.full((1,), float("-inf"), dtype=torch.float64)
    groups = MergeGroups(torch.tensor([2]), torch.tensor([1]), student_token_ids=torch.tensor([1, 0]))
    assert float(uld_loss(z, t_lp, t_tail, groups=groups)) == pytest.approx(0.0, abs=1e-12)
    # teacher side merged too: two teacher rows, observed log-prob of the first
    groups2 = MergeGroups(torch.tensor([2]), torch.tensor([2]), student_token_ids=torch.tensor([1, 0]),
                          teacher_observed_logprob=torch.log(torch.tensor([0.3, 0.0], dtype=torch.float64)))
    t2 = torch.log(torch.tensor([[0.9, 0.05, 0.05], [0.6, 0.3, 0.1]], dtype=torch.float64))
    t2_tail = torch.full((2,), float("-inf"), dtype=torch.float64)
    assert float(uld_loss(z, t2, t2_tail, groups=groups2)) == pytest.approx(0.0, abs=1e-12)


def test_reductions_and_row_weight():
    z = logits(5, 8, 110)
    t = logits(5, 6, 111)
    ids, lp, tail = cache_rows(t, k=3)
    rows = uld_loss(z, lp, tail, reduction="none")
    assert rows.shape == (5,)
    torch.testing.assert_close(uld_loss(z, lp, tail), rows.sum(), **F64)
    torch.testing.assert_close(uld_loss(z, lp, tail, reduction="mean"), rows.mean(), **F64)
    w = torch.linspace(0, 1, 5, dtype=torch.float64)
    torch.testing.assert_close(uld_loss(z, lp, tail, row_weight=w), (rows * w).sum(), **F64)
    empty = uld_loss(z[:0], lp[:0], tail[:0], reduction="mean")
    assert float(empty) == 0.0


def test_invalid_arguments_raise_value_error():
    z = logits(3, 6, 120)
    ids, lp, tail = cache_rows(logits(3, 5, 121), k=3)
    mapping = torch.tensor([0, 1, 2, -1, -1])
    bad = [
        lambda: uld_loss(z, lp, tail, reduction="batchmean"),
        lambda: uld_loss(z, lp, tail, top=0),
        lambda: uld_loss(z[:2], lp, tail),
        lambda: uld_loss(z, lp, tail[:2]),
        lambda: hybrid_loss(z, ids, lp, tail, mapping, matched_weight=0.5),
        lambda: hybrid_loss(z, ids, lp, tail, torch.tensor([0, 0, 0, 0, 0])),  # not injective
        lambda: hybrid_loss(z, ids, lp, tail, torch.tensor([0, 1, 6, -1, -1])),  # student id >= V_s
        lambda: hybrid_loss(z, ids, lp, tail, mapping[:2]),  # teacher ids out of range
        lambda: hybrid_loss(z, ids, lp, tail, mapping, kind="kl"),
        lambda: uld_loss(z, lp, tail, groups=MergeGroups(torch.tensor([3]), torch.tensor([1, 2]))),
        lambda: uld_loss(z, lp, tail, groups=MergeGroups(torch.tensor([1, 2]), torch.tensor([2, 1]),
                                                          student_token_ids=torch.tensor([0, 1, 2]))),
        lambda: uld_loss(z, lp, tail, groups=MergeGroups(torch.tensor([1, 2]), torch.tensor([1, 2]))),
        lambda: merge_group_logprobs(lp, lp[:, 0], torch.tensor([2, 2])),
    ]
    for call in bad:
        with pytest.raises(ValueError):
            call()


# --------------------------------------------------------------------------------------
# vocabulary map across tokenizer kinds
# --------------------------------------------------------------------------------------


def test_token_bytes_per_tokenizer_kind():
    bl = byte_level_tokenizer(["Ġthe", "ing", "Ã©", "Ã", "ðŁĺ"])
    assert token_bytes(bl)[1:] == [b" the", b"ing", "é".encode(), b"\xc3", "😀".encode()[:3]]
    assert token_bytes(bl)[0] is None  # special
    for llama in (True, False):
        ms = metaspace_tokenizer(["▁the", "ing", "é", "<0xC3>", "▁"], llama_decoder=llama)
        assert token_bytes(ms)[3:] == [b" the", b"ing", "é".encode(), b"\xc3", b" "]
    wp = wordpiece_tokenizer(["the", "##ing", ","])
    assert token_bytes(wp)[2:] == [b" the", b"ing", b","]


def test_vocab_map_across_byte_level_metaspace_and_wordpiece():
    bl = byte_level_tokenizer(["Ġthe", "ing", "Ã©", "Ã", "A", "Ġcat", "zz"])  # ids 1..7
    ms = metaspace_tokenizer(["<0x41>", "▁the", "A", "é", "<0xC3>", "ing", "▁dog"])  # ids 3..9
    m = vocab_map(bl, ms)
    # <|endoftext|> is special with no counterpart; Ġthe->▁the, ing->ing, Ã©->é, Ã-><0xC3>, A->A (not <0x41>)
    assert m.tolist() == [-1, 4, 8, 6, 7, 5, -1, -1]
    back = vocab_map(ms, bl)
    assert back.tolist() == [-1, -1, -1, -1, 1, 5, 3, 4, 2, -1]  # <0x41> loses to A: -1
    wp = wordpiece_tokenizer(["the", "##ing", "cat", "##zz"])  # ids 2..5
    assert vocab_map(bl, wp).tolist() == [-1, 2, 3, -1, -1, -1, 4, 5]
    # extra pairs (end-of-answer markers) win, keeping the map injective: Ġthe loses ▁the to <|endoftext|>
    m2 = vocab_map(bl, ms, extra_pairs={0: 4}, teacher_size=10)
    assert m2.tolist() == [4, -1, 8, 6, 7, 5, -1, -1, -1, -1]
    with pytest.raises(ValueError):
        vocab_map(bl, ms, teacher_size=3)


def test_vocab_map_identity_on_the_same_tokenizer():
    ms = metaspace_tokenizer(["▁the", "ing", "é", "▁"])
    assert vocab_map(ms, ms).tolist() == list(range(len(ms)))


def test_real_byte_level_tokenizer_bytes_concatenate_to_the_text(smollm2_tokenizer):
    """SmolLM2's real byte-level BPE: the tokens' bytes of an answer are its UTF-8 bytes (split characters
    included), the map of a tokenizer to itself is the identity, and `Ġthe` meets a sentencepiece `▁the`."""
    tok = smollm2_tokenizer
    text = " Héllo wörld 😀 日本語, naïve code: x = 1 + 2  "
    data = token_bytes(tok)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert b"".join(data[i] for i in ids) == text.encode("utf-8")
    assert torch.equal(vocab_map(tok, tok), torch.arange(len(tok)))
    ms = metaspace_tokenizer(["▁the", "ing", "é"])
    m = vocab_map(ms, tok)
    assert m[3:].tolist() == tok.convert_tokens_to_ids(["Ġthe", "ing", "Ã©"])
