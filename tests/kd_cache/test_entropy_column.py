"""Format v4's teacher-entropy column of sampled rows, and the divergence the trainer logs from it: a sampled MDist
term is a Monte-Carlo cross-entropy H(p_T) + KL(p_T‖q_S); minus the stored H(p_T) it estimates the KL, as the top-k
rows' MDist reads."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from kd_cache import format as fmt
from kd_cache.build import BuildConfig, build
from kd_cache.codec import SampledRows, TopKRows, concat_targets, decode_entropy, encode_entropy
from kd_cache.targets import sampled_targets, topk_targets
from kd_cache.verify import info, verify
from kd_train.losses import KDLossConfig, mdist_loss, sampled_kd_loss
from kd_train.objective import Objective, StepCounts

# ------------------------------------------------------------------------------------------------- codec / targets


def exact_entropy(z: torch.Tensor) -> torch.Tensor:
    lp = torch.log_softmax(z.double(), -1)
    return -torch.where(lp.isinf(), 0.0, lp.exp() * lp).sum(-1)


def test_sampled_targets_carry_the_exact_teacher_entropy_and_its_code_rounds_within_1_32_nat():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(37, 500, generator=g) * 3
    z[0, 5:] = float("-inf")  # a row with 5 possible ids: a -inf logit contributes 0, not nan
    t = sampled_targets(z, 16, generator=torch.Generator().manual_seed(1))
    want = exact_entropy(z)
    assert torch.allclose(t.entropy.double(), want, atol=1e-4) and float(t.entropy[0]) <= math.log(5) + 1e-5
    codes = encode_entropy(t.entropy.numpy())
    assert codes.dtype == np.uint8 and codes.shape == (37,)
    assert np.abs(decode_entropy(codes) - want.numpy()).max() <= 1 / 32 + 1e-6
    assert decode_entropy(encode_entropy(np.array([100.0])))[0] == pytest.approx(255 / 16)  # clamped, not wrapped
    assert sampled_targets(torch.zeros(0, 9), 4).entropy.shape == (0,)


def test_row_columns_add_the_entropy_to_sampled_rows_from_v4_only():
    for v in (2, 3):
        assert not any(c.endswith(fmt.ENTROPY_COLUMN) for c in fmt.row_columns("visual", "sampled", v))
    assert "visual_" + fmt.ENTROPY_COLUMN in fmt.row_columns("visual", "sampled", 4)
    assert "text_" + fmt.ENTROPY_COLUMN in fmt.row_columns("text", "sampled", 4)
    assert not any(c.endswith(fmt.ENTROPY_COLUMN) for c in fmt.row_columns("text", "topk", 4))
    assert fmt.FORMAT_VERSION == 4 and set(fmt.SUPPORTED_VERSIONS) >= {1, 2, 3, 4}


def test_concat_keeps_the_entropy_only_when_every_part_has_it():
    a = SampledRows(np.array([1, 2]), np.array([3, 1]), np.array([2]), 4, np.array([0.5], np.float32))
    b = SampledRows(np.array([7]), np.array([4]), np.array([1]), 4, np.array([1.5], np.float32))
    assert concat_targets([a, b]).entropy.tolist() == [0.5, 1.5]
    assert concat_targets([a, SampledRows(b.ids, b.counts, b.row_lengths, 4)]).entropy is None
    assert a.map(torch.as_tensor).entropy.dtype == torch.float32


# ------------------------------------------------------------------------------------------------- the objective


def _objective(mdist_visual_weight=1.0) -> Objective:
    cfg = KDLossConfig(ce_weight=1.0, mdist_text_weight=0.0, mdist_visual_weight=mdist_visual_weight, rdist_weight=0.0)
    return Objective(cfg, head=None)


def _batch(nv: int, visual, nt: int = 3, v: int = 50):
    from types import SimpleNamespace

    return SimpleNamespace(text_labels=torch.zeros(nt, dtype=torch.long), text_targets=None, visual_targets=visual,
                           n_visual=nv, has_targets=False, grams=[], visual_splits=[nv])


def test_objective_logs_sampled_mdist_as_kl_with_the_same_gradient():
    g = torch.Generator().manual_seed(3)
    nv, v, draws = 64, 40, 4096
    zt = torch.randn(nv, v, generator=g) * 2
    zs = torch.randn(nv, v, generator=g)
    t = sampled_targets(zt, draws, generator=torch.Generator().manual_seed(4))
    with_h = SampledRows(t.ids, t.counts, t.row_lengths, draws, t.entropy)
    without = SampledRows(t.ids, t.counts, t.row_lengths, draws)
    counts = StepCounts(text=3, visual=nv, gram=0)
    obj = _objective()
    text = torch.zeros(3, v)
    out = {}
    for name, targets in (("kl", with_h), ("ce", without)):
        z = zs.clone().requires_grad_(True)
        loss, sums = obj(text, z, None, _batch(nv, targets), counts, 1)
        loss.backward()
        out[name] = (float(loss.detach()), sums["mdist_visual"] / nv, z.grad)
    ce = float(sampled_kd_loss(zs, t.ids, t.counts, t.row_lengths, draws)) / nv
    h = float(t.entropy.sum()) / nv
    assert out["ce"][1] == pytest.approx(ce, rel=1e-6)  # without the entropy: the cross-entropy, as before
    assert out["kl"][1] == pytest.approx(ce - h, rel=1e-5, abs=1e-6)
    assert out["kl"][0] == pytest.approx(out["ce"][0] - h, rel=1e-5)  # the value returned: the same constant shift
    assert torch.equal(out["kl"][2], out["ce"][2])  # ... and exactly the same gradient
    lt, ls = torch.log_softmax(zt.double(), -1), torch.log_softmax(zs.double(), -1)
    kl = float((lt.exp() * (lt - ls)).sum(-1).mean())
    var = float(((lt.exp() * ls ** 2).sum(-1) - (lt.exp() * ls).sum(-1) ** 2).mean())  # Var_pT(log q_S) per row
    assert abs(out["kl"][1] - kl) <= 4 * math.sqrt(var / (draws * nv)) + 1e-4, (out["kl"][1], kl)


def test_objective_leaves_topk_mdist_unchanged():
    g = torch.Generator().manual_seed(5)
    nv, v = 16, 30
    zt, zs = torch.randn(nv, v, generator=g), torch.randn(nv, v, generator=g)
    t = topk_targets(zt, 8)
    targets = TopKRows(t.topk_ids, t.topk_logprobs, t.tail_logprob, v)
    obj = _objective()
    loss, sums = obj(torch.zeros(3, v), zs, None, _batch(nv, targets), StepCounts(text=3, visual=nv, gram=0), 1)
    want = float(mdist_loss(zs, t.topk_ids, t.topk_logprobs, t.tail_logprob,
                            **(obj.cfg.mdist_kwargs("visual") | {"teacher_vocab_size": v})))
    assert sums["mdist_visual"] == pytest.approx(want, rel=1e-6)


def test_a_cache_without_the_entropy_logs_the_cross_entropy_and_says_so_once(caplog):
    g = torch.Generator().manual_seed(6)
    t = sampled_targets(torch.randn(4, 20, generator=g), 8, generator=g)
    old = SampledRows(t.ids, t.counts, t.row_lengths, 8)
    obj = _objective()
    with caplog.at_level("WARNING", logger="kd_train"):
        for _ in range(3):
            obj(torch.zeros(3, 20), torch.randn(4, 20), None, _batch(4, old), StepCounts(3, 4, 0), 1)
    msgs = [r.getMessage() for r in caplog.records if "cross-entropy" in r.getMessage()]
    assert msgs == ["mdist_visual is a cross-entropy (the cache has no teacher entropy: format < 4)"]


# ------------------------------------------------------------------------------------------------- a built cache


@pytest.fixture(scope="module")
def sampled_cache(tmp_path_factory, llava_teacher, tiny_data) -> Path:
    """The tiny dataset with sampled rows of both kinds (text and visual), one shard."""
    out = tmp_path_factory.mktemp("sampled") / "c"
    data, images = tiny_data
    build(BuildConfig(teacher=str(llava_teacher), data=str(data), images=str(images), out=str(out), targets="sampled",
                      visual_targets="sampled", samples=64, shard_size=100, progress=False))
    return out


def test_the_build_stores_the_entropy_per_sampled_row_and_verify_checks_it(sampled_cache):
    from kd_cache import open_cache

    assert verify(str(sampled_cache)) == []
    d = info(str(sampled_cache))
    assert d["format_version"] == 4
    for rows in ("text", "visual"):
        per_row = d["column_bytes"][f"{rows}_{fmt.ENTROPY_COLUMN}"] / d[f"{rows}_rows"]
        assert per_row <= 2.0, (rows, per_row)  # one uint8 code per row before compression
    n = 0
    for s in open_cache(str(sampled_cache)):
        for rows in ("text", "visual"):
            h = s[f"{rows}_entropy"]
            assert h.dtype == np.float32 and h.shape == (len(s[f"{rows}_positions"]),)
            assert (h >= 0).all() and (h <= math.log(1000) + 1).all()
        n += 1
    assert n == d["samples"]


def test_logged_visual_mdist_is_the_kl_of_a_direct_teacher_forward(tmp_path, llava_teacher, tiny_data, sampled_cache):
    """One DFT step over every sample (batch = the dataset): the logged mdist_visual (sampled rows, 64 draws) is
    within Monte-Carlo noise of the exact KL(p_T‖q_S) at the visual rows, computed here from the teacher's and the
    (untrained) student's logits; the stored entropy matches the teacher's to 1/32 nat."""
    from typer.testing import CliRunner

    from kd_cache import open_cache
    from kd_cache.data import RecordSource
    from kd_cache.hf import pad_token_id, tokenizer_of
    from kd_cli.main import app
    from kd_eval.tiny import make_tiny_teacher
    from kd_train.batch import encoder_for, make_batch, training_example
    from kd_train.objective import RowLogits
    from kd_train.sources import cache_target_layout
    from kd_train.student import load_student

    data, images = tiny_data
    student = make_tiny_teacher(tmp_path / "student", "llava", hidden_size=32, num_layers=1, seed=7)
    n = len(json.loads(Path(data).read_text()))
    out = tmp_path / "dft"
    r = CliRunner().invoke(app, ["train", "--stage", "dft", "--student", str(student), "--cache", str(sampled_cache),
                                 "--data", str(data), "--images", str(images), "--out", str(out), "--batch-size",
                                 str(n), "--max-steps", "1", "--lr", "1e-5", "--quiet"])
    assert r.exit_code == 0, r.output
    [logged] = [d for d in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if d.get("step") == 1]

    cache = open_cache(str(sampled_cache))
    layout = cache_target_layout(cache)
    records = RecordSource(str(data))
    teacher, tproc = load_student(str(llava_teacher))
    smodel, sproc = load_student(str(student))
    encoder = encoder_for(sproc, smodel.config, image_root=str(images), max_length=None)
    kl, var, rows, h_err, hsum = 0.0, 0.0, 0, 0.0, 0.0
    with torch.no_grad():
        for s in cache:
            ex = training_example(encoder.encode(records[s["sample_index"]], s["sample_index"]), s, layout)
            b = make_batch([ex], pad_token_id(tokenizer_of(sproc)))
            if not b.n_visual:
                continue
            zt = RowLogits(teacher)(b.model_inputs, b.text_rows, b.visual_rows)[1].double()
            zs = RowLogits(smodel)(b.model_inputs, b.text_rows, b.visual_rows)[1].double()
            lt, ls = torch.log_softmax(zt, -1), torch.log_softmax(zs, -1)
            pt = lt.exp()
            kl += float((pt * (lt - ls)).sum())
            var += float(((pt * ls ** 2).sum(-1) - (pt * ls).sum(-1) ** 2).sum())
            rows += zt.shape[0]
            hsum += float(s["visual_entropy"].sum())
            h_err = max(h_err, float((torch.from_numpy(s["visual_entropy"]).double() + (pt * lt).sum(-1)).abs().max()))
    assert rows == logged["visual_rows"] and rows > 0
    kl /= rows
    tol = 4 * math.sqrt(var / rows / (64 * rows)) + 1 / 32  # 4 sigma of the 64-draw mean, plus the code's rounding
    print(f"\nlogged mdist_visual {logged['mdist_visual']:.4f} (the cross-entropy before v4: "
          f"{logged['mdist_visual'] + hsum / rows:.4f}), exact KL {kl:.4f}, tolerance {tol:.4f}, rows {rows}, "
          f"loss {logged['loss']:.4f}, ce {logged['ce']:.4f}, mdist_text {logged.get('mdist_text')}")
    assert h_err <= 1 / 32 + 1e-4
    assert logged["mdist_visual"] >= -tol
    assert abs(logged["mdist_visual"] - kl) <= tol, (logged["mdist_visual"], kl, tol)
    # the loss line reads as the weighted sum of the logged terms (all weights 1 here, no RDist on a tiny cache?)
    terms = sum(logged.get(k, 0.0) for k in ("ce", "mdist_text", "mdist_visual", "rdist"))
    assert logged["loss"] == pytest.approx(terms, rel=1e-4)
