"""`kd train` end to end on tiny models: stages, recipes, export, accumulation, resume, DDP, HTTP, refusals."""

from __future__ import annotations

import functools
import http.server
import json
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from kd_cache.build import BuildConfig, build
from kd_eval.tiny import make_tiny_dataset, make_tiny_teacher
from kd_train.train import TrainConfig, run

from tests.conftest import launcher_env, run_in_group
from tests.conftest import saved_weights as weights


def child_env() -> dict:
    # a rank stuck in a collective fails within minutes, not half an hour
    return launcher_env(KD_DIST_TIMEOUT="180")


@pytest.fixture(scope="module")
def student(tmp_path_factory) -> Path:
    """A smaller LLaVA than the teacher, sharing its tokenizer, chat template and image processor."""
    return make_tiny_teacher(tmp_path_factory.mktemp("student"), "llava", hidden_size=32, num_layers=1, seed=7)


@pytest.fixture(scope="module")
def caption(tmp_path_factory, llava_teacher):
    """(data, images, cache) of caption data, for DPT."""
    root = tmp_path_factory.mktemp("caption")
    data, images = make_tiny_dataset(root / "data", n=16, seed=3, kind="caption")
    build(BuildConfig(teacher=str(llava_teacher), data=str(data), images=str(images), out=str(root / "cache"),
                      shard_size=4, progress=False))
    return data, images, root / "cache"


def base_cfg(student, tiny_data, llava_cache, out, **kw) -> TrainConfig:
    data, images = tiny_data
    args = dict(student=str(student), out=str(out), stage="dft", cache=str(llava_cache), data=str(data),
                images=str(images), batch_size=2, lr=1e-3, progress=False, shuffle_buffer=4)
    args.update(kw)
    return TrainConfig(**args)


def metrics(out: Path) -> dict[int, dict]:
    """Last logged metrics per step (a resumed run may log a step twice)."""
    rows = {}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        d = json.loads(line)
        if d.get("step") is not None:
            rows[d["step"]] = d
    return rows


def part(ws: dict, key: str) -> dict:
    return {k: v for k, v in ws.items() if key in k}


def test_dft_trains_all_terms_and_exports_a_loadable_student(tmp_path, student, tiny_data, llava_cache):
    out = tmp_path / "dft"
    [final] = run(base_cfg(student, tiny_data, llava_cache, out))
    m = metrics(out)
    assert len(m) == 12 // 2  # one epoch of 12 cached samples at batch 2
    for row in m.values():
        assert {"ce", "mdist_text", "mdist_visual", "rdist", "lr", "tokens_per_second"} <= set(row)
        assert all(torch.isfinite(torch.tensor(row[k])) for k in ("ce", "mdist_text", "mdist_visual", "rdist"))
    before, after = weights(student), weights(Path(final))
    for k in part(before, "vision_tower"):
        assert torch.equal(before[k], after[k]), f"vision tower changed in DFT: {k}"
    assert any(not torch.equal(before[k], after[k]) for k in part(before, "multi_modal_projector"))
    assert any(not torch.equal(before[k], after[k]) for k in part(before, "language_model"))

    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(final)
    proc = AutoProcessor.from_pretrained(final)
    text = proc.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Colour?"}]}],
                                    add_generation_prompt=True)
    x = proc(text=[text], images=[Image.new("RGB", (40, 40), "red")], return_tensors="pt")
    gen = model.generate(**x, max_new_tokens=4, do_sample=False)
    assert gen.shape[1] > x["input_ids"].shape[1]


def test_dpt_trains_only_the_projector(tmp_path, student, caption):
    data, images, cache = caption
    out = tmp_path / "dpt"
    [final] = run(TrainConfig(student=str(student), out=str(out), stage="dpt", cache=str(cache), data=str(data),
                              images=str(images), batch_size=4, max_steps=2, progress=False,
                              trackers="jsonl,tensorboard"))
    assert list(out.rglob("events.out.tfevents*")), "tensorboard tracker wrote no event file"
    before, after = weights(student), weights(Path(final))
    for key in ("vision_tower", "language_model", "lm_head"):
        for k in part(before, key):
            assert torch.equal(before[k], after[k]), f"{k} changed in DPT"
    assert any(not torch.equal(before[k], after[k]) for k in part(before, "multi_modal_projector"))
    cfg = json.loads((out / "train_config.json").read_text())
    assert cfg["preset"]["lr"] == 1e-3 and cfg["loss"]["rdist_weight"] == 1.0


def test_recipes_run_three_stages_each_from_the_previous(tmp_path, student, tiny_data, llava_cache, caption):
    data, images = tiny_data
    cdata, cimages, ccache = caption
    common = dict(student=str(student), cache=str(llava_cache), data=str(data), images=str(images),
                  dpt_cache=str(ccache), dpt_data=str(cdata), dpt_images=str(cimages), batch_size=4, max_steps=2,
                  progress=False)
    kd = run(TrainConfig(out=str(tmp_path / "kd"), recipe="llava-kd", **common))
    base = run(TrainConfig(out=str(tmp_path / "base"), recipe="baseline", **common))
    assert [Path(p).parent.name for p in kd] == ["dpt", "sft", "dft"] == [Path(p).parent.name for p in base]
    for stage in ("dpt", "dft"):
        assert "mdist_visual" in next(iter(metrics(tmp_path / "kd" / stage).values()))
        assert "mdist_visual" not in next(iter(metrics(tmp_path / "base" / stage).values()))
    sft_cfg = json.loads((tmp_path / "kd" / "sft" / "train_config.json").read_text())
    assert sft_cfg["config"]["student"] == kd[0]  # SFT starts from DPT's output
    # rerunning a finished recipe is a no-op
    again = run(TrainConfig(out=str(tmp_path / "kd"), recipe="llava-kd", **common))
    assert again == kd


def test_grad_accumulation_matches_one_big_batch(tmp_path, student, tiny_data, llava_cache):
    one = run(base_cfg(student, tiny_data, llava_cache, tmp_path / "b4", batch_size=4, grad_accum=1, max_steps=1,
                       max_grad_norm=None))
    two = run(base_cfg(student, tiny_data, llava_cache, tmp_path / "b2x2", batch_size=2, grad_accum=2, max_steps=1,
                       max_grad_norm=None))
    a, b = weights(Path(one[0])), weights(Path(two[0]))
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6, rtol=1e-5), k
    ma, mb = metrics(tmp_path / "b4")[1], metrics(tmp_path / "b2x2")[1]
    for k in ("ce", "mdist_text", "mdist_visual", "rdist", "loss"):
        # sampled terms are logged as cross-entropy minus the cached entropy: a KL near 0, so the float rounding of
        # the ~6-nat cross-entropy (1e-6 relative) is an absolute error there
        assert ma[k] == pytest.approx(mb[k], rel=1e-5, abs=2e-6)


def train_cmd(student, tiny_data, cache, out, *extra):
    data, images = tiny_data
    return [sys.executable, "-m", "kd_cli.main", "train", "--stage", "dft", "--student", str(student), "--cache",
            str(cache), "--data", str(data), "--images", str(images), "--out", str(out), "--batch-size", "1",
            "--lr", "1e-3", "--shuffle-buffer", "4", "--quiet", *extra]


@pytest.mark.slow
def test_killed_run_resumes_onto_the_uninterrupted_loss_curve(tmp_path, student, tiny_data, llava_cache):
    ref_out, out = tmp_path / "ref", tmp_path / "killed"
    subprocess.run(train_cmd(student, tiny_data, llava_cache, ref_out, "--checkpoint-every", "3"), check=True,
                   env=child_env(), capture_output=True)
    proc = subprocess.Popen(train_cmd(student, tiny_data, llava_cache, out, "--checkpoint-every", "3"),
                            env=child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = out / "checkpoints" / "step-00000006"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not (ckpt / "trainer_state.json").exists():
        time.sleep(0.002)
    killed = proc.poll() is None
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert killed, "the run ended before it could be killed"
    assert not (out / "final").exists()
    subprocess.run(train_cmd(student, tiny_data, llava_cache, out, "--checkpoint-every", "3"), check=True,
                   env=child_env(), capture_output=True)
    ref, res = metrics(ref_out), metrics(out)
    assert sorted(ref) == sorted(res) == list(range(1, 13))
    for step in ref:  # CPU fp32, same order and state: equal up to float noise
        terms = [k for k in ("loss", "ce", "mdist_text", "mdist_visual", "rdist", "text_rows") if k in ref[step]]
        assert terms == [k for k in ("loss", "ce", "mdist_text", "mdist_visual", "rdist", "text_rows") if k in res[step]]
        for k in terms:
            assert res[step][k] == pytest.approx(ref[step][k], rel=1e-5, abs=1e-6), (step, k)
    a, b = weights(ref_out / "final"), weights(out / "final")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def ddp_train_cmd(student, tiny_data, cache, out, *extra) -> list[str]:
    """`kd train --stage dft` under `accelerate launch` with 2 CPU (gloo) processes."""
    data, images = tiny_data
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "kd_cli.main", "train",
            "--stage", "dft", "--student", str(student), "--cache", str(cache), "--data", str(data), "--images",
            str(images), "--out", str(out), "--batch-size", "2", "--quiet", *extra]


@pytest.mark.slow
def test_two_process_ddp_run(tmp_path, student, tiny_data, llava_cache):
    out = tmp_path / "ddp"
    cmd = ddp_train_cmd(student, tiny_data, llava_cache, out, "--checkpoint-every", "1")
    r = run_in_group(cmd, env=child_env(), timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    m = metrics(out)
    assert len(m) >= 2 and all(row["text_rows"] > 0 for row in m.values())
    state = json.loads(next((out / "checkpoints").glob("step-*/trainer_state.json")).read_text())
    assert len(state["data"]) == 2  # each rank's stream position is checkpointed
    assert (out / "final" / "config.json").exists()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def test_trains_from_a_cache_served_over_http(tmp_path, student, tiny_data, llava_cache):
    handler = functools.partial(_QuietHandler, directory=str(llava_cache.parent))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/{llava_cache.name}"
        out = tmp_path / "http"
        run(base_cfg(student, tiny_data, url, out, max_steps=2, shuffle_buffer=0))
        local = tmp_path / "local"
        run(base_cfg(student, tiny_data, llava_cache, local, max_steps=2, shuffle_buffer=0))
    finally:
        server.shutdown()
    assert metrics(out)[2]["loss"] == pytest.approx(metrics(local)[2]["loss"], rel=1e-6)


def test_incompatible_student_is_refused_before_training(tmp_path, tiny_data, llava_cache):
    other = make_tiny_teacher(tmp_path / "other", "llava", hidden_size=32, vocab_size=600)
    with pytest.raises(ValueError, match="tokenizer vocabulary differs"):
        run(base_cfg(other, tiny_data, llava_cache, tmp_path / "o"))
    assert not (tmp_path / "o" / "metrics.jsonl").exists()
    bigger = make_tiny_teacher(tmp_path / "img", "llava", hidden_size=32, image_size=48)
    with pytest.raises(ValueError, match="visual tokens"):
        run(base_cfg(bigger, tiny_data, llava_cache, tmp_path / "i"))


def test_bad_caches_and_data(tmp_path, student, tiny_data, llava_cache):
    from kd_train.stream import CorruptShardError, MissingImageError

    # a corrupted shard met mid-training: named, or skipped and counted with the flag
    bad = tmp_path / "corrupt"
    shutil.copytree(llava_cache, bad)
    m = json.loads((bad / "manifest.json").read_text())
    victim = bad / m["shards"][1]["name"]
    raw = bytearray(victim.read_bytes())
    raw[len(raw) // 3: len(raw) // 3 + 200] = b"\0" * 200
    victim.write_bytes(bytes(raw))
    with pytest.raises(CorruptShardError, match=m["shards"][1]["name"].split("/")[-1]):
        run(base_cfg(student, tiny_data, bad, tmp_path / "c1", shuffle_buffer=0))
    run(base_cfg(student, tiny_data, bad, tmp_path / "c2", skip_corrupt_shards=True, shuffle_buffer=0, max_steps=2))
    stats = json.loads((tmp_path / "c2" / "final" / "kd_stage.json").read_text())["data_stats"]
    assert stats["corrupt_shards"] >= 1

    # a cached sample whose image is gone from the dataset
    data, images = tiny_data
    img2 = tmp_path / "images"
    shutil.copytree(images, img2)
    recs = json.loads(Path(data).read_text())
    gone = next(r for r in recs if r.get("image"))
    (img2 / gone["image"]).unlink()
    with pytest.raises(MissingImageError, match=gone["id"]):
        run(base_cfg(student, (data, img2), llava_cache, tmp_path / "m1"))
    run(base_cfg(student, (data, img2), llava_cache, tmp_path / "m2", skip_missing_images=True))
    stats = json.loads((tmp_path / "m2" / "final" / "kd_stage.json").read_text())["data_stats"]
    assert stats["skipped_missing_image"] == 1

    # an empty cache: a clear refusal
    empty_data = tmp_path / "empty.json"
    empty_data.write_text(json.dumps([{"id": "x", "image": "nope.png", "conversations": [
        {"from": "human", "value": "<image>\nQ?"}, {"from": "gpt", "value": "A"}]}]))
    teacher = Path(json.loads((llava_cache / "manifest.json").read_text())["teacher"]["id"])
    build(BuildConfig(teacher=str(teacher), data=str(empty_data), images=str(images), out=str(tmp_path / "ec"),
                      progress=False))
    with pytest.raises(ValueError, match="holds no samples"):
        run(base_cfg(student, (empty_data, images), tmp_path / "ec", tmp_path / "e1"))


def test_config_validation_messages():
    with pytest.raises(ValueError, match="exactly one of stage"):
        TrainConfig(student="s", out="o", data="d")
    with pytest.raises(ValueError, match="stage dft distils from a cache"):
        TrainConfig(student="s", out="o", data="d", stage="dft")
    with pytest.raises(ValueError, match="batch_size must be a positive integer, got 0"):
        TrainConfig(student="s", out="o", data="d", stage="sft", batch_size=0)
    with pytest.raises(ValueError, match="kind"):
        TrainConfig(student="s", out="o", data="d", stage="sft", kind="kl")


RSS_SCRIPT = """
import resource, sys
from kd_train.train import TrainConfig, run
cfg = TrainConfig(**__import__("json").loads(sys.argv[1]))
run(cfg)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""


@pytest.mark.slow
def test_dft_memory_holds_no_teacher(tmp_path, tiny_data, student):
    """Peak RSS of DFT ~ SFT on the same student, although the cache came from a teacher far larger than both."""
    data, images = tiny_data
    big = make_tiny_teacher(tmp_path / "big", "llava", hidden_size=512, num_layers=6)
    teacher_bytes = sum(f.stat().st_size for f in big.glob("*.safetensors"))
    cache = tmp_path / "cache"
    build(BuildConfig(teacher=str(big), data=str(data), images=str(images), out=str(cache), progress=False))
    peaks = {}
    for stage in ("sft", "dft"):
        cfg = dict(student=str(student), out=str(tmp_path / stage), stage=stage, data=str(data), images=str(images),
                   cache=str(cache), batch_size=2, max_steps=3, progress=False)
        r = subprocess.run([sys.executable, "-c", RSS_SCRIPT, json.dumps(cfg)], env=child_env(), capture_output=True,
                           text=True, check=True)
        peaks[stage] = int(r.stdout.strip().splitlines()[-1])
    assert teacher_bytes > 50e6
    assert peaks["dft"] - peaks["sft"] < 0.25 * teacher_bytes, (peaks, teacher_bytes)


def test_online_teacher_reference_matches_the_cache(tmp_path, student, tiny_data, llava_topk_cache, llava_teacher):
    """One step over the whole dataset: the online teacher's loss equals the cached one (top-k on every row) up to
    quantization."""
    data, images = tiny_data
    common = dict(student=str(student), stage="dft", data=str(data), images=str(images), batch_size=12,
                  max_steps=1, progress=False)
    run(TrainConfig(out=str(tmp_path / "cached"), cache=str(llava_topk_cache), **common))
    run(TrainConfig(out=str(tmp_path / "online"), online_teacher=str(llava_teacher), **common))
    cached, online = metrics(tmp_path / "cached")[1], metrics(tmp_path / "online")[1]
    assert cached["text_rows"] == online["text_rows"] and cached["visual_rows"] == online["visual_rows"]
    assert online["ce"] == pytest.approx(cached["ce"], rel=1e-6)
    for k in ("mdist_text", "mdist_visual"):  # log-probs are cached to 1/512 nat
        assert online[k] == pytest.approx(cached[k], abs=2e-3)
    # the Gram is stored with 1 - cos <= 1e-4 (angle <= sqrt(2e-4)); RDist = 1 - cos(R_T, R_S) can move by at
    # most ~ sin(angle(R_T, R_S)) * that angle
    bound = (2e-4) ** 0.5 * (2 * cached["rdist"]) ** 0.5 + 1e-4
    assert online["rdist"] == pytest.approx(cached["rdist"], abs=bound)
    with pytest.raises(ValueError, match="either a cache or online_teacher"):
        TrainConfig(out="o", cache=str(llava_topk_cache), online_teacher=str(llava_teacher), **common)
