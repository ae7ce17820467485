"""The stage plan: every setting of a stage worked out once, from the flags, the preset and the cache's manifest; a
recipe's later stage that cannot be served by its cache is refused before the first stage starts."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from kd_cache import open_cache
from kd_cli.main import app
from kd_train.config import TrainConfig
from kd_train.plan import plan_stage, stage_configs
from kd_train.stages import PRESETS

from tests.kd_train.test_preflight import no_model_loads, one_line  # noqa: F401 - the fixture is used by name


def config(tmp_path, **kw) -> TrainConfig:
    return TrainConfig(**({"student": "s", "out": str(tmp_path / "run"), "data": "d.json", "progress": False} | kw))


def test_the_plan_takes_the_caches_rules_and_the_flags_over_the_preset(tmp_path, llava_cache):
    manifest = open_cache(str(llava_cache)).manifest
    cfg = config(tmp_path, stage="dft", cache=str(llava_cache), max_length=7, lr=3e-4, train_vision=True)
    plan = plan_stage(cfg, PRESETS["dft"], manifest)
    assert plan.source == "cache" and plan.manifest is manifest
    assert plan.max_length == manifest.max_length and plan.append_eos == manifest.append_eos  # the cache's, not 7
    assert plan.lr == 3e-4 and plan.train_vision and plan.train_projector and plan.train_llm
    assert plan.loss == cfg.loss_config(PRESETS["dft"]) and plan.notes == ()
    sft = plan_stage(config(tmp_path, stage="sft", max_length=7), PRESETS["sft"], None)
    assert sft.source == "records" and sft.manifest is None and sft.max_length == 7 and sft.append_eos
    assert sft.lr == PRESETS["sft"].lr and not sft.train_vision
    no_kd = plan_stage(config(tmp_path, stage="dft", cache=str(llava_cache), mdist_text_weight=0.0,
                              mdist_visual_weight=0.0, rdist_weight=0.0), PRESETS["dft"], manifest)
    assert no_kd.source == "records" and no_kd.manifest is None  # no KD term: the cache is not read


def test_the_loss_chunk_size_defaults_to_the_training_devices(tmp_path, monkeypatch):
    """Unset: 96 rows on a CPU, 1024 on a GPU (96-row chunks doubled the DFT step on an H200); a given size, 0
    included, is kept on both."""
    import kd_train.plan as plan_module

    for cuda, default in ((False, 96), (True, 1024)):
        monkeypatch.setattr(plan_module, "_cuda", lambda cuda=cuda: cuda)
        assert plan_stage(config(tmp_path, stage="sft"), PRESETS["sft"], None).chunk_size == default
        for given in (0, 7):
            assert plan_stage(config(tmp_path, stage="sft", loss_chunk_size=given), PRESETS["sft"],
                              None).chunk_size == given


def test_a_cache_without_the_gram_turns_the_presets_rdist_off_with_a_note(tmp_path, llava_cache):
    import dataclasses

    manifest = dataclasses.replace(open_cache(str(llava_cache)).manifest, gram=False)
    plan = plan_stage(config(tmp_path, stage="dft", cache="c"), PRESETS["dft"], manifest)
    assert plan.loss.rdist_weight == 0.0 and len(plan.notes) == 1 and "--no-gram" in plan.notes[0]
    with pytest.raises(ValueError, match="rdist_weight=0.5 but the cache was built without the Gram"):
        plan_stage(config(tmp_path, stage="dft", cache="c", rdist_weight=0.5), PRESETS["dft"], manifest)


def test_recipe_stages_chain_their_students(tmp_path):
    cfg = config(tmp_path, recipe="llava-kd", cache="main", dpt_cache="captions", dpt_data="captions.json")
    stages = stage_configs(cfg)
    assert [p.name for p, _ in stages] == ["dpt", "sft", "dft"]
    assert [c.cache for _, c in stages] == ["captions", "main", "main"]
    assert [c.data for _, c in stages] == ["captions.json", "d.json", "d.json"]
    run = tmp_path / "run"
    assert [c.student for _, c in stages] == ["s", str(run / "dpt" / "final"), str(run / "sft" / "final")]
    assert [c.out for _, c in stages] == [str(run / n) for n in ("dpt", "sft", "dft")]


def test_a_conflict_with_the_dft_cache_is_refused_before_dpt_starts(tmp_path, llava_teacher, tiny_data, llava_cache,
                                                                     llava_topk_cache, no_model_loads):  # noqa: F811
    """DPT's cache (top-k visual rows) takes --visual-temperature; DFT's (sampled visual rows, the build default) does
    not: the recipe stops at once, naming the DFT stage, before any model loads or any stage writes."""
    data, images = tiny_data
    out = tmp_path / "run"
    r = CliRunner().invoke(app, [
        "train", "--recipe", "llava-kd", "--student", str(llava_teacher), "--data", str(data), "--images",
        str(images), "--dpt-cache", str(llava_topk_cache), "--cache", str(llava_cache), "--visual-temperature", "2",
        "--out", str(out)])
    assert r.exit_code == 2, r.output
    msg = one_line(r)
    assert "error: stage dft: --visual-temperature=2.0 but the cache's visual rows hold sampled targets" in msg
    assert not (out / "dpt").exists()


def test_kd_train_opens_each_cache_once_per_process(tmp_path, llava_teacher, tiny_data, llava_cache, monkeypatch):
    """The preflight opens the cache; the plan, the compatibility check, the data and every rank's share count use
    that one object (DataLoader workers would reopen it: none here)."""
    import kd_cache.reader
    from kd_eval.tiny import make_tiny_teacher
    from kd_train.train import run

    opened = []
    real_init = kd_cache.reader.Cache.__init__

    def counting(self, *a, **k):
        opened.append(a[0] if a else k.get("path_or_url"))
        real_init(self, *a, **k)

    monkeypatch.setattr(kd_cache.reader.Cache, "__init__", counting)
    student = make_tiny_teacher(tmp_path / "student", "llava", hidden_size=32, num_layers=1, seed=7)
    data, images = tiny_data
    run(TrainConfig(student=str(student), out=str(tmp_path / "run"), stage="dft", cache=str(llava_cache),
                    data=str(data), images=str(images), batch_size=4, max_steps=1, progress=False))
    assert opened == [str(llava_cache)]


def test_cross_tokenizer_plans_refuse_what_the_cache_cannot_give(tmp_path, llava_cache):
    import dataclasses

    manifest = open_cache(str(llava_cache)).manifest
    cfg = config(tmp_path, stage="dft", cache="c", cross_tokenizer="hybrid", max_length=99)
    plan = plan_stage(cfg, PRESETS["dft"], manifest)
    assert plan.cross_tokenizer == "hybrid" and plan.chunk_size == 0 and plan.max_length == 99  # the student's own
    assert plan.loss.mdist_visual_weight == 0.0 and any("visual rows' MDist is off" in n for n in plan.notes)
    old = dataclasses.replace(manifest, tokenizer_files=())  # a cache from before format v3
    with pytest.raises(ValueError, match="pass teacher_tokenizer"):
        plan_stage(cfg, PRESETS["dft"], old)
    assert plan_stage(config(tmp_path, stage="dft", cache="c", cross_tokenizer="uld", teacher_tokenizer="t"),
                      PRESETS["dft"], old).cross_tokenizer == "uld"
    sampled = dataclasses.replace(manifest, text=dataclasses.replace(manifest.text, kind="sampled", samples=50))
    with pytest.raises(ValueError, match="reads top-k response rows"):
        plan_stage(cfg, PRESETS["dft"], sampled)
    assert plan_stage(config(tmp_path, stage="sft", cross_tokenizer="uld"), PRESETS["sft"], None).cross_tokenizer == "off"
