"""Cached targets against a direct full-logit forward pass, for every teacher family, plus skips and refusals."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from kd_cache import format as fmt
from kd_cache import open_cache
from kd_cache.build import BuildConfig, build
from kd_cache.data import Encoder, RecordSource
from kd_cache.hf import load_processor_and_config
from kd_cache.data import image_token_id_of
from kd_cache.verify import info, verify
from tests.conftest import ALL_FAMILIES, save_image, write_records

# fp32 on CPU: batched (right-padded) forwards differ from a single forward by float rounding only.
LOGIT_ATOL = 1e-4
GRAM_TOLERANCE = 1e-4 + 1e-6  # the build's gram_tolerance, plus float noise


@functools.lru_cache(maxsize=4)
def _reference_model(teacher_dir: str):
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    config, processor, multimodal = load_processor_and_config(teacher_dir)
    cls = AutoModelForImageTextToText if multimodal else AutoModelForCausalLM
    tok = getattr(processor, "tokenizer", processor)
    return cls.from_pretrained(teacher_dir).eval(), processor, image_token_id_of(config, tok) if multimodal else None


def reference_forward(teacher_dir, record, index, images_root):
    """Full logits of one sample from a plain transformers forward (no kd code on the model path)."""
    model, processor, image_token_id = _reference_model(str(teacher_dir))
    s = Encoder(processor, image_token_id, image_root=str(images_root)).encode(record, index)
    inputs = {k: torch.from_numpy(v) for k, v in s.model_inputs.items()}
    inputs["input_ids"] = torch.from_numpy(s.input_ids)[None]
    with torch.no_grad():
        return s, model(**inputs).logits[0].float()


def assert_sampled_match(sample, prefix: str, logits: torch.Tensor, n_draws: int) -> float:
    """Sampled targets of the `prefix` rows against the full logits: layout, logsumexp, and draws that follow the
    teacher's distribution (their mean log-prob equals minus the entropy, within 4 standard errors). Returns the
    z-score."""
    rows = torch.tensor(sample[f"{prefix}_positions"], dtype=torch.long)
    n = len(rows)
    lengths = sample[f"{prefix}_sample_row_lengths"]
    ids, counts = sample[f"{prefix}_sample_ids"], sample[f"{prefix}_sample_counts"]
    assert lengths.shape == (n,) and lengths.sum() == len(ids) == len(counts)
    id_row = np.repeat(np.arange(n), lengths)
    assert (np.bincount(id_row, weights=counts, minlength=n) == n_draws).all()
    if n == 0:
        return 0.0
    for r in range(n):  # unique ids, ascending, within a row
        assert np.all(np.diff(ids[id_row == r]) > 0)
    z = logits[rows].double()
    assert torch.allclose(torch.tensor(sample[f"{prefix}_logsumexp"]).double(), torch.logsumexp(z, -1), atol=LOGIT_ATOL)
    lp = torch.log_softmax(z, -1)
    p = lp.exp()
    drawn = float((torch.from_numpy(counts).double() * lp[torch.from_numpy(id_row), torch.from_numpy(ids).long()]).sum())
    expected = float((p * lp).sum()) * n_draws  # E[sum of drawn log-probs] = -n_draws * sum of row entropies
    var = float(((p * lp * lp).sum(-1) - (p * lp).sum(-1) ** 2).sum()) * n_draws
    zscore = (drawn - expected) / max(var, 1e-12) ** 0.5
    assert abs(zscore) < 4, (prefix, drawn, expected, var)
    return zscore


def assert_targets_match(sample, ref_sample, logits, k_text, k_vis, n_draws: int = 50):
    assert np.array_equal(sample["input_ids"], ref_sample.input_ids)
    assert np.array_equal(sample["text_positions"], ref_sample.text_positions)
    assert np.array_equal(sample["visual_positions"], ref_sample.visual_positions)
    # format v3: the log-prob of the token observed next at every response row, inside the top-k or not
    tpos = torch.tensor(sample["text_positions"], dtype=torch.long)
    labels = torch.tensor(sample["input_ids"], dtype=torch.long)[tpos + 1]
    want = torch.log_softmax(logits[tpos].double(), -1).gather(1, labels[:, None])[:, 0]
    got = torch.tensor(sample["text_observed_logprob"]).double()
    assert got.shape == want.shape
    if len(tpos):
        assert (got - want.clamp(min=-31.875)).abs().max() <= fmt.LOGPROB_MAX_ABS_ERROR + LOGIT_ATOL
    for prefix, k in (("text", k_text), ("visual", k_vis)):
        rows = torch.tensor(sample[f"{prefix}_positions"])
        if f"{prefix}_sample_ids" in sample:
            assert f"{prefix}_topk_ids" not in sample
            assert_sampled_match(sample, prefix, logits, n_draws)
            continue
        if len(rows) == 0:
            assert sample[f"{prefix}_topk_ids"].shape == (0, k)
            continue
        z = logits[rows]
        lp = torch.log_softmax(z, -1)
        ids = torch.tensor(sample[f"{prefix}_topk_ids"])
        assert ids.shape == (len(rows), k)
        got_lp = torch.tensor(sample[f"{prefix}_topk_logprobs"])
        # ids are the top-k up to ties: the cached ids' true log-probs equal the true k best values
        true_top = torch.topk(lp, k, dim=-1).values
        assert torch.allclose(lp.gather(1, ids), true_top, atol=LOGIT_ATOL)
        # quantization bound of the format
        assert (got_lp - lp.gather(1, ids)).abs().max() <= fmt.LOGPROB_MAX_ABS_ERROR + LOGIT_ATOL
        lse = torch.logsumexp(z, -1)
        assert torch.allclose(torch.tensor(sample[f"{prefix}_logsumexp"]), lse, atol=LOGIT_ATOL)
        tail = torch.log1p(-lp.gather(1, ids).exp().sum(-1).clamp(max=1 - 1e-7))
        got_tail = torch.tensor(sample[f"{prefix}_tail_logprob"])
        finite = torch.isfinite(tail) & (tail > -15)  # beyond that, the naive 1 - sum reference itself cancels
        assert torch.allclose(got_tail[finite], tail[finite], atol=1e-3)
    zv = logits[torch.tensor(sample["visual_positions"])].double()
    assert sample["gram"].shape == (len(zv), len(zv))
    if len(zv):  # the format's guarantee: 1 - cos <= tolerance on the raw and on the row-centred Gram
        got = torch.tensor(sample["gram"]).double()
        m = zv.mean(-1)
        zc = zv - m[:, None]
        ref_c, got_c = zc @ zc.T, got - zv.shape[1] * torch.outer(m, m)
        cos = lambda a, b: float((a * b).sum() / (a.norm() * b.norm()))  # noqa: E731
        assert 1 - cos(got, zv @ zv.T) <= GRAM_TOLERANCE
        assert 1 - cos(got_c, ref_c) <= GRAM_TOLERANCE


@pytest.mark.parametrize("family,visual_targets", [
    *(pytest.param(f.values[0], "sampled", marks=f.marks, id=f.values[0]) for f in ALL_FAMILIES),
    pytest.param("llava", "topk", id="llava-visual-topk")])
def test_cached_targets_equal_direct_forward(tmp_path, teacher_factory, tiny_data, family, visual_targets):
    """The default build (top-k response rows, sampled visual rows) and a visual top-k build, row by row."""
    teacher = teacher_factory(family)
    data, images = tiny_data
    out = tmp_path / "cache"
    kw = {} if visual_targets == "sampled" else {"visual_targets": visual_targets}  # the default: sampled
    m = build(BuildConfig(teacher=str(teacher), data=str(data), images=str(images), out=str(out), top_k=8,
                          visual_top_k=5, batch_size=4, shard_size=4, progress=False, **kw))
    assert m["targets"]["visual"]["kind"] == visual_targets and m["targets"]["text"]["kind"] == "topk"
    assert m is not None and m["num_samples"] > 0
    assert verify(str(out)) == []
    records = RecordSource(str(data))
    cache = open_cache(str(out))
    assert len(cache) == m["num_samples"]
    seen = []
    for sample in cache:
        idx = sample["sample_index"]
        ref, logits = reference_forward(teacher, records[idx], idx, images)
        assert sample["sample_id"] == ref.sample_id
        assert_targets_match(sample, ref, logits, 8, 5)
        seen.append(idx)
    skipped = [s["index"] for s in m["skipped"]["samples"]]
    assert sorted(seen + skipped) == list(range(len(records)))
    if family == "causal-lm":  # a text-only teacher skips the image samples, with the reason counted
        assert set(m["skipped"]["by_reason"]) == {"model takes no images"}
        assert all(len(s["visual_positions"]) == 0 for s in cache)
    else:
        assert m["num_visual_rows"] > 0 and m["skipped"]["total"] == 0


def test_bad_inputs_are_counted_skips(tmp_path, llava_teacher):
    root = tmp_path / "img"
    for i in range(3):
        save_image(root / f"{i}.png", i)
    (root / "corrupt.png").write_bytes(b"\x89PNG broken")
    c = lambda q, a: [{"from": "human", "value": q}, {"from": "gpt", "value": a}]  # noqa: E731
    recs = [
        {"id": "ok-image", "image": "0.png", "conversations": c("<image>\nWhat?", "a red square")},
        {"id": "ok-text", "conversations": c("How many sides has a triangle?", "three")},
        {"id": "ok-noplaceholder", "image": "1.png", "conversations": c("What colour?", "blue")},
        {"id": "missing", "image": "nope.png", "conversations": c("<image>\nWhat?", "x")},
        {"id": "corrupt", "image": "corrupt.png", "conversations": c("<image>\nWhat?", "x")},
        {"id": "placeholders", "image": "0.png", "conversations": c("<image><image>\nWhat?", "x")},
        {"id": "two-images", "image": ["0.png", "1.png"], "conversations": c("<image><image>\nWhat?", "x")},
        {"id": "long", "image": "2.png", "conversations": c("<image>\n" + "why " * 200, "x")},
        {"id": "empty", "image": "0.png", "conversations": c("<image>\nWhat?", "")},
        {"id": "escape", "image": "../../etc/x.png", "conversations": c("<image>\nWhat?", "x")},
        {"id": "ok-truncated", "image": "2.png", "conversations": c("<image>\nSay.", "go " * 200)},
    ]
    data = write_records(tmp_path, recs, "d.jsonl")
    out = tmp_path / "cache"
    m = build(BuildConfig(teacher=str(llava_teacher), data=str(data), images=str(root), out=str(out), max_length=120,
                          batch_size=4, shard_size=3, progress=False))
    assert m["skipped"]["by_reason"] == {
        "corrupt image": 1, "empty answer": 1, "image path escapes image root": 1, "image placeholder mismatch": 1,
        "missing image": 1, "over max length": 1, "too many images": 1,
    }
    cache = open_cache(str(out))
    ids = {s["sample_id"]: s for s in cache}
    assert set(ids) == {"ok-image", "ok-text", "ok-noplaceholder", "ok-truncated"}
    assert len(ids["ok-truncated"]["input_ids"]) == 120 and len(ids["ok-truncated"]["visual_positions"]) == 16
    assert len(ids["ok-text"]["visual_positions"]) == 0 and ids["ok-text"]["gram"].shape == (0, 0)
    assert len(ids["ok-noplaceholder"]["visual_positions"]) == 16
    assert {s["sample_id"] for s in m["skipped"]["samples"]} == {
        "missing", "corrupt", "placeholders", "two-images", "long", "empty", "escape"}
    assert verify(str(out)) == []


def test_bad_arguments_fail_before_work(tmp_path, llava_teacher, tiny_data):
    data, images = tiny_data
    base = dict(teacher=str(llava_teacher), data=str(data), images=str(images), progress=False)
    with pytest.raises(ValueError, match="model folder .*no-such-model does not exist"):
        build(BuildConfig(**{**base, "teacher": str(tmp_path / "no-such-model")}, out=str(tmp_path / "a")))
    with pytest.raises(FileNotFoundError, match="data file not found"):
        build(BuildConfig(**{**base, "data": str(tmp_path / "none.json")}, out=str(tmp_path / "b")))
    with pytest.raises(ValueError, match="top_k must be a positive integer, got 0"):
        BuildConfig(**base, out=str(tmp_path / "c"), top_k=0)
    with pytest.raises(ValueError, match="images must be an existing folder"):
        BuildConfig(**{**base, "images": str(tmp_path / "nope")}, out=str(tmp_path / "c"))
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "file.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty and holds no kd cache"):
        build(BuildConfig(**base, out=str(junk)))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_rerun_same_config_is_a_no_op_and_other_config_is_refused(tmp_path, llava_cache, llava_teacher, tiny_data):
    data, images = tiny_data
    cfg = json.loads((llava_cache / fmt.CONFIG_NAME).read_text())
    before = (llava_cache / fmt.MANIFEST_NAME).read_bytes()
    same = BuildConfig(teacher=str(llava_teacher), data=str(data), images=str(images), out=str(llava_cache),
                       batch_size=1, shard_size=cfg["shard_size"], progress=False)
    assert build(same)["num_samples"] == json.loads(before)["num_samples"]
    assert (llava_cache / fmt.MANIFEST_NAME).read_bytes() == before
    other = BuildConfig(teacher=str(llava_teacher), data=str(data), images=str(images), out=str(llava_cache),
                        top_k=3, shard_size=cfg["shard_size"], progress=False)
    with pytest.raises(ValueError, match="top_k: cache has 64, this run asks 3"):
        build(other)


def test_info_reports_bytes_per_row(llava_cache):
    d = info(str(llava_cache))
    m = open_cache(str(llava_cache)).manifest.raw
    assert d["samples"] == m["num_samples"] and d["text_rows"] == m["num_text_rows"]
    assert d["bytes_per_text_row"] > 0 and d["bytes_per_visual_row"] > 0 and d["bytes_per_gram"] > 0
    # column bytes add up to (less than) the files: the rest is Parquet footers and page headers
    assert sum(d["column_bytes"].values()) <= m["total_bytes"]
    assert len(d["shards"]) == len(m["shards"]) > 1


def test_manifest_records_what_a_consumer_must_check(llava_cache):
    m = open_cache(str(llava_cache)).manifest.raw
    assert m["format_version"] == fmt.FORMAT_VERSION
    assert m["teacher"]["weights_sha256"] and m["teacher"]["fingerprint"]
    assert set(m["tokenizer"]) >= {"vocab_size", "vocab_sha256", "special_tokens", "chat_template_sha256", "fingerprint"}
    assert m["image_processor"]["size"] == {"height": 32, "width": 32}
    assert m["targets"]["text"] == {"kind": "topk", "k": 64, "logprob_encoding": "uint8-delta-step-1/8"}
    assert m["data"]["fingerprint"].startswith("sha256:")
    assert "teacher_seconds" in m["build"]["ranks"][0]
    for s in m["shards"]:
        assert set(s) >= {"name", "rows", "bytes", "sha256"}
    assert (llava_cache / fmt.CARD_NAME).read_text().startswith("---\n")


def test_the_cache_carries_the_teacher_tokenizer(tmp_path, llava_cache, llava_teacher):
    """Format v3 is self-contained: the teacher's tokenizer files (with the chat template) are in the cache, listed
    with their sha256, and load to a tokenizer with the teacher's fingerprint; verify checks them."""
    import shutil

    from transformers import AutoProcessor, AutoTokenizer

    from kd_cache.hf import tokenizer_fingerprint

    cache = open_cache(str(llava_cache))
    assert cache.manifest.self_contained and info(str(llava_cache))["self_contained"]
    names = {f.name for f in cache.manifest.tokenizer_files}
    assert f"{fmt.TOKENIZER_DIR}/tokenizer.json" in names and f"{fmt.TOKENIZER_DIR}/chat_template.jinja" in names
    tok = AutoTokenizer.from_pretrained(cache.teacher_tokenizer_folder())
    teacher = AutoProcessor.from_pretrained(str(llava_teacher))
    want = tokenizer_fingerprint(teacher)
    have = tokenizer_fingerprint(tok)
    assert have["vocab_sha256"] == want["vocab_sha256"] and have["special_tokens"] == want["special_tokens"]
    assert (Path(cache.teacher_tokenizer_folder()) / "chat_template.jinja").read_text() == teacher.chat_template
    copy = tmp_path / "copy"
    shutil.copytree(llava_cache, copy)
    assert open_cache(str(copy)).teacher_tokenizer_folder(dest=tmp_path / "elsewhere").startswith(str(tmp_path))
    with open(copy / fmt.TOKENIZER_DIR / "tokenizer.json", "a") as f:
        f.write(" ")
    assert any("tokenizer.json: size" in p for p in verify(str(copy)))
    with pytest.raises(ValueError, match="sha256"):
        open_cache(str(copy)).teacher_tokenizer_folder()


def test_observed_logprobs_cost_at_most_two_bytes_per_text_row(tmp_path, llava_teacher, tiny_data):
    """The v3 column's compressed bytes per response row, on one shard (tiny shards pay a page header each)."""
    data, images = tiny_data
    build(BuildConfig(teacher=str(llava_teacher), data=str(data), images=str(images), out=str(tmp_path / "c"),
                      shard_size=100, progress=False))
    d = info(str(tmp_path / "c"))
    per_row = d["column_bytes"][f"text_{fmt.OBSERVED_COLUMN}"] / d["text_rows"]
    assert per_row <= 2.0, per_row


def test_target_options_clamp_k_to_the_vocabulary_and_default_like_the_build(tmp_path):
    from kd_cache.targets import TargetOptions

    cfg = BuildConfig(teacher="t", data="d", out=str(tmp_path / "o"), top_k=500, visual_top_k=8,
                      visual_targets="topk", gram_encoding="dense", seed=3)
    opts = TargetOptions.from_config(cfg, vocab_size=100)
    assert (opts.text_k, opts.visual_k, opts.vocab_size) == (100, 8, 100)  # clamped where the options are made
    assert (opts.text_kind, opts.visual_kind, opts.gram_lowrank, opts.seed) == ("topk", "topk", False, 3)
    # the settings a caller may leave out take `kd cache build`'s defaults
    default = BuildConfig(teacher="t", data="d", out=str(tmp_path / "o"))
    assert TargetOptions(text_kind="topk", text_k=64, visual_kind="sampled", visual_k=64, vocab_size=1000) == \
        TargetOptions.from_config(default, vocab_size=1000)


def test_max_images_rule():
    from types import SimpleNamespace

    from kd_cache.data import max_images_for

    assert max_images_for(SimpleNamespace(model_type="llava")) == 1  # LLaVA-1.5: one image per sample
    assert max_images_for(SimpleNamespace(model_type="llava"), 3) == 3  # --max-images wins
    assert max_images_for(SimpleNamespace(model_type="qwen2_vl")) is None


def test_a_folder_another_rank_is_setting_up_counts_as_new(tmp_path):
    """The ranks of one launch check the folder while rank 0 writes build_config.json (through its temporary file):
    that file, locks and empty `_progress/` / `shards/` are what a build creates first; anything else is refused."""
    from kd_cache import format as fmt
    from kd_cache.build import _check_out_dir

    out = tmp_path / "cache"
    (out / fmt.SHARD_DIR).mkdir(parents=True)
    (out / fmt.PROGRESS_DIR).mkdir()
    (out / ".lock-r00000-of-00002").write_text("{}")
    (out / f"{fmt.CONFIG_NAME}.tmp.4242.host").write_text('{"teacher": "t"')  # half written
    assert _check_out_dir(str(out), {}) == "new"
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="is not empty and holds no kd cache"):
        _check_out_dir(str(out), {})
