"""Student-side costs of `kd train` on CPU: DFT vs SFT step time, offline (cache) vs online teacher speed and
memory, shard-loader throughput, streaming memory over 50K samples, and the student RDist Gram.

Run from the repository root (about 6-7 minutes on this shared 2-core CPU; `--quick` about 2 minutes):

    python -m benchmarks.train_cost [--quick] [--only direct,runs,loader,stream,rdist]

Models: tiny LLaVA built from config by `kd_eval.tiny.make_tiny_teacher` (random weights, one shared tokenizer of
512 ids, SigLIP tower as wide and deep as the LM, 64x64 images in 8x8 patches = 64 visual tokens per image):
student hidden 512 x 6 layers (29.5M parameters, 12.7M of them the frozen tower), teacher hidden 1024 x 6 layers
(116.7M, 3.95x). Data: `make_tiny_dataset(48, kind="instruct")` (1 in 8 samples text-only). The cache is built
from the teacher by `kd_cache.build.build` (top-k 64, low-rank Gram). Batch size 4, fp32.

Threads: one torch thread for everything timed except the RDist matmuls (`--threads`). On a 2-core machine
shared with other jobs, two OpenMP threads wait for each other at every parallel region whenever the other core
is taken; with the tiny models' many small ops that made step times swing 10x (0.4 s to 11 s, CPU time equal to
wall time, i.e. spinning). One thread keeps the ratios repeatable; they compare work, not parallel scaling.

* (a) DFT vs SFT step, same student weights and same micro-batch: one `kd_train.engine.StageRunner` per stage;
  the online runner's first micro-batch, the same samples joined with their cached targets and collated as the
  DFT loader does (`training_example` + `make_batch`), and that batch without targets for SFT (what SFT's own loader
  builds). Each timed call is the engine's `_optimizer_step` (student forward at the loss rows, objective,
  backward, clipping, AdamW, scheduler). SFT, DFT and online are alternated (order reversed every round),
  medians over rounds.
* (b) Offline KD (DFT from the cache) vs the online-teacher reference (`TrainConfig(online_teacher=...)`): the
  same-batch engine steps of (a), and separate `kd_train.train.run` processes (`max_steps`), each reporting the
  median `step_seconds` from metrics.jsonl after 2 warm-up steps (these include data loading) and its peak RSS
  (`resource.getrusage(RUSAGE_SELF).ru_maxrss`; the process is forked by a small shell so that Linux does not
  carry this process's RSS over into it). The RSS of a process that only imports the stack is the runtime
  baseline.
* (c) Loader throughput: the trainer's own data path (`engine.CacheData`: `CacheStream` + the trainer's
  transform, which re-encodes each record and loads its image, + the `make_batch` collate, through its
  DataLoader, num_workers=0), whole epochs for >= 4 s, vs the samples/s a DFT step consumes (batch size / the
  DFT engine step time of (a)).
* (d) Streaming memory: a text-only cache of 50K synthetic samples (random top-k targets, 32 tokens, 16 response
  rows, k=32) written with the real `kd_cache.writer.ShardWriter` and finalized by `kd_cache.manifest.
  try_finalize` (header from a real tiny causal-LM build), then `CacheStream` (shuffle buffer 256) iterated over
  1K and over 50K samples in separate processes; peak RSS compared.
* RDist: `kd_train.losses.gram(Z)` with Z = H Wᵀ given vs `gram_from_hidden(H, W, wtw)` with WᵀW precomputed,
  and with WᵀW's cost per step amortized over 8 samples; Nv = 728, V = 151,936, D = 896 and 2048, fp32, random
  H and W (W scaled by D^-1/2); values compared with each other and with a float64 reference (first size).

Quick mode: student 256 x 4, teacher 512 x 4, 32x32 images, 5K streamed samples, D = 896 only, fewer repeats.
Writes `benchmarks/results/train_cost.json` (or `--out`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

RESULTS = Path(__file__).parent / "results"
TARGETS = {"dft_over_sft": 1.15, "online_over_offline": 2.0, "offline_rss_over_online": 0.6,
           "loader_over_training": 20.0, "stream_rss_growth": 0.10, "rdist_speedup": 10.0}
FULL = dict(student=(512, 6), teacher=(1024, 6), image_size=64, n_data=48, batch_size=4, steps=10, run_repeats=2,
            direct_repeats=10, stream_small=1_000, stream_large=50_000, rdist_dims=(896, 2048), rdist_ref=True)
QUICK = dict(student=(256, 4), teacher=(512, 4), image_size=32, n_data=24, batch_size=4, steps=5, run_repeats=1,
             direct_repeats=3, stream_small=1_000, stream_large=5_000, rdist_dims=(896,), rdist_ref=False)
PATCH = 8
NV, VOCAB_BIG = 728, 151_936


def median(xs):
    return statistics.median(xs) if xs else None


THREADS = 1  # set by main(): torch threads of every timed part except the RDist matmuls


def child_env() -> dict:
    env = dict(os.environ)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    env["TQDM_DISABLE"] = "1"
    env["OMP_NUM_THREADS"] = str(THREADS)
    return env


def maxrss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: kilobytes


def vmhwm_bytes() -> int | None:
    """Peak RSS of this process's current address space (/proc/self/status VmHWM), a cross-check."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def child(kind: str, payload: dict, timeout: float = 900) -> dict:
    """Run `python -m benchmarks.train_cost --child KIND JSON` and return the JSON it prints last.

    Linux carries a process's ru_maxrss over fork + exec: a child forked straight from this (large) process
    would report this process's RSS as its own peak. So the child is started by a small shell that forks it
    (`; exit $?` keeps the shell from exec-ing it in place), and its ru_maxrss is its own."""
    cmd = ["/bin/sh", "-c", '"$0" "$@"; exit $?', sys.executable, "-m", "benchmarks.train_cost", "--child", kind,
           json.dumps(payload)]
    r = subprocess.run(cmd, env=child_env(), capture_output=True, text=True, timeout=timeout,
                       cwd=str(Path(__file__).resolve().parent.parent))
    if r.returncode != 0:
        raise RuntimeError(f"child {kind} failed:\n{r.stderr[-4000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------------ children


def _child_run(cfg: dict) -> dict:
    """One `kd train` stage in this process: step times from metrics.jsonl and the peak RSS."""
    from kd_train.train import TrainConfig, run

    t0 = time.perf_counter()
    run(TrainConfig(**cfg))
    wall = time.perf_counter() - t0
    steps = []
    with open(os.path.join(cfg["out"], "metrics.jsonl")) as f:
        for line in f:
            d = json.loads(line)
            if d.get("step") is not None and "step_seconds" in d:
                steps.append(d["step_seconds"])
    return {"step_seconds": steps, "maxrss_bytes": maxrss_bytes(), "vmhwm_bytes": vmhwm_bytes(),
            "wall_seconds": round(wall, 2)}


def _child_baseline(_: dict) -> dict:
    """The runtime alone: everything `kd train` imports, no model."""
    import accelerate  # noqa: F401
    import pyarrow.parquet  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401
    from transformers import AutoModelForImageTextToText  # noqa: F401

    import kd_train.engine  # noqa: F401
    import kd_train.train  # noqa: F401

    return {"maxrss_bytes": maxrss_bytes(), "vmhwm_bytes": vmhwm_bytes()}


def _child_stream(p: dict) -> dict:
    """Iterate `n` samples of a cache through CacheStream (raw decode + shuffle buffer); peak RSS."""
    import numpy as np

    from kd_train.stream import CacheStream

    stream = CacheStream(p["cache"], shuffle_buffer=p.get("shuffle_buffer", 256), seed=0)
    n, rows, epoch = 0, 0, 0
    t0 = time.perf_counter()
    while n < p["n"]:
        stream.set_epoch(epoch)
        for s in stream:
            rows += int(np.asarray(s["text_topk_ids"]).shape[0])
            n += 1
            if n >= p["n"]:
                break
        epoch += 1
    dt = time.perf_counter() - t0
    return {"samples": n, "rows": rows, "seconds": round(dt, 3), "samples_per_second": round(n / dt, 1),
            "maxrss_bytes": maxrss_bytes(), "vmhwm_bytes": vmhwm_bytes()}


CHILDREN = {"run": _child_run, "baseline": _child_baseline, "stream": _child_stream}


# ------------------------------------------------------------------------------------------------ setup


def make_models(work: Path, conf: dict) -> dict:
    from kd_cache.build import BuildConfig, build
    from kd_eval.tiny import make_tiny_dataset, make_tiny_teacher

    t0 = time.perf_counter()
    (hs, ls), (ht, lt) = conf["student"], conf["teacher"]
    student = make_tiny_teacher(work / "student", "llava", hidden_size=hs, num_layers=ls, image_size=conf["image_size"],
                                patch_size=PATCH, seed=7)
    teacher = make_tiny_teacher(work / "teacher", "llava", hidden_size=ht, num_layers=lt, image_size=conf["image_size"],
                                patch_size=PATCH, seed=0)
    data, images = make_tiny_dataset(work / "data", n=conf["n_data"], seed=0, image_size=max(48, conf["image_size"]),
                                      kind="instruct")
    t1 = time.perf_counter()
    manifest = build(BuildConfig(teacher=str(teacher), data=str(data), images=str(images), out=str(work / "cache"),
                                 batch_size=8, shard_size=16, progress=False))
    build_s = time.perf_counter() - t1
    return {"student": student, "teacher": teacher, "data": data, "images": images, "cache": work / "cache",
            "params": {"student": _params(student), "teacher": _params(teacher)},
            "cache_samples": manifest["num_samples"], "build_seconds": round(build_s, 2),
            "setup_seconds": round(time.perf_counter() - t0, 2)}


def _params(folder: Path) -> dict:
    from safetensors import safe_open

    total = vision = 0
    for f in folder.glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            for k in st.keys():
                n = st.get_slice(k).get_shape()
                c = 1
                for d in n:
                    c *= d
                total += c
                vision += c if "vision" in k else 0
    return {"total": total, "vision": vision}


# ------------------------------------------------------------------------------------------------ (a) direct


def direct_steps(m: dict, work: Path, conf: dict) -> dict:
    """SFT, DFT (cache) and online-teacher engine steps on the same student weights and the same samples,
    alternated so that load changes on the shared machine hit all three alike."""
    import torch

    from kd_cache import open_cache
    from kd_train.batch import make_batch, training_example
    from kd_train.sources import cache_target_layout
    from kd_train.train import TrainConfig, stage_runner

    common = dict(student=str(m["student"]), data=str(m["data"]), images=str(m["images"]),
                  batch_size=conf["batch_size"], progress=False, shuffle_buffer=16, max_steps=1000)
    cfgs = {"sft": dict(stage="sft"), "dft": dict(stage="dft", cache=str(m["cache"])),
            "online": dict(stage="dft", online_teacher=str(m["teacher"]))}
    runners = {}
    for name, kw in cfgs.items():
        out = str(work / f"direct-{name}")
        runners[name] = stage_runner(TrainConfig(out=out, **kw, **common))
        runners[name].data.mark = lambda tags: None  # the same micro-batch is reused: keep the data state out of it
    # the online runner's first micro-batch (student + teacher encodings of each record) ...
    items, otags = next(iter(runners["online"].data.loader(0)))
    # ... and the same samples with their cached targets, collated as the DFT loader does (engine.CacheData)
    opened = open_cache(str(m["cache"]))
    cache, layout = {s["sample_id"]: s for s in opened}, cache_target_layout(opened)
    tok = getattr(runners["dft"].processor, "tokenizer", runners["dft"].processor)
    batch = make_batch([training_example(it["encoded"], cache[it["encoded"].sample_id], layout) for it in items],
                       tok.pad_token_id)
    groups = {"sft": [(dataclasses.replace(batch, text_targets=None, visual_targets=None, grams=None),
                       {"n": len(items), "skipped": 0})],
              "dft": [(batch, {})], "online": [(items, otags)]}
    times = {k: [] for k in runners}
    cpu = {k: [] for k in runners}
    for name in runners:  # warm-up: allocator, kernels, AdamW state
        for _ in range(2):
            runners[name]._optimizer_step(groups[name])
    names = list(runners)
    for r in range(conf["direct_repeats"]):
        for name in (names if r % 2 == 0 else names[::-1]):
            t0, c0 = time.perf_counter(), time.process_time()
            runners[name]._optimizer_step(groups[name])
            times[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    med = {k: median(v) for k, v in times.items()}
    cmed = {k: median(v) for k, v in cpu.items()}
    out = {"step_seconds": {k: [round(t, 4) for t in v] for k, v in times.items()},
           "median_step_seconds": med,
           "dft_over_sft": med["dft"] / med["sft"], "online_over_dft": med["online"] / med["dft"],
           "dft_over_sft_pairs_median": median([d / s for d, s in zip(times["dft"], times["sft"])]),
           "online_over_dft_pairs_median": median([o / d for o, d in zip(times["online"], times["dft"])]),
           # process CPU time (both threads): less sensitive than wall time to other processes on the cores
           "cpu_step_seconds": {k: [round(t, 4) for t in v] for k, v in cpu.items()}, "median_cpu_seconds": cmed,
           "cpu_dft_over_sft": cmed["dft"] / cmed["sft"], "cpu_online_over_dft": cmed["online"] / cmed["dft"],
           "batch": {"samples": len(items), "tokens": batch.n_tokens, "text_rows": batch.n_text,
                     "visual_rows": batch.n_visual, "gram_samples": batch.n_gram},
           "torch_threads": torch.get_num_threads()}
    del runners
    return out


# ------------------------------------------------------------------------------------------------ (b) runs


def separate_runs(m: dict, work: Path, conf: dict) -> dict:
    common = dict(student=str(m["student"]), data=str(m["data"]), images=str(m["images"]), stage=None,
                  batch_size=conf["batch_size"], max_steps=conf["steps"], progress=False, shuffle_buffer=16)
    cfgs = {"sft": dict(common, stage="sft"), "dft": dict(common, stage="dft", cache=str(m["cache"])),
            "online": dict(common, stage="dft", online_teacher=str(m["teacher"]))}
    order = ["dft", "online", "sft"]
    seq = []
    for r in range(conf["run_repeats"]):
        seq += order if r % 2 == 0 else order[::-1]
    runs = {k: [] for k in cfgs}
    for i, name in enumerate(seq):
        cfg = dict(cfgs[name], out=str(work / f"run-{i}-{name}"))
        res = child("run", cfg)
        res["measured_steps"] = res["step_seconds"][2:]
        res["median_step_seconds"] = median(res["measured_steps"])
        runs[name].append(res)
        print(f"  run {name}: median step {res['median_step_seconds']:.3f}s, peak RSS "
              f"{res['maxrss_bytes'] / 2**20:.0f} MiB", flush=True)
        shutil.rmtree(cfg["out"], ignore_errors=True)
    base = child("baseline", {})["maxrss_bytes"]
    summary = {name: {"median_step_seconds": median([x for r in rs for x in r["measured_steps"]]),
                      "maxrss_bytes": max(r["maxrss_bytes"] for r in rs)} for name, rs in runs.items()}
    s = {"runs": runs, "per_config": summary, "runtime_baseline_maxrss_bytes": base}
    s["dft_over_sft_end_to_end"] = summary["dft"]["median_step_seconds"] / summary["sft"]["median_step_seconds"]
    s["online_over_offline"] = summary["online"]["median_step_seconds"] / summary["dft"]["median_step_seconds"]
    s["offline_rss_over_online"] = summary["dft"]["maxrss_bytes"] / summary["online"]["maxrss_bytes"]
    s["offline_rss_over_online_above_baseline"] = ((summary["dft"]["maxrss_bytes"] - base)
                                                   / (summary["online"]["maxrss_bytes"] - base))
    return s


# ------------------------------------------------------------------------------------------------ (c) loader


def loader_throughput(m: dict, conf: dict, min_seconds: float = 4.0) -> dict:
    """The trainer's cache data path (engine.CacheData) iterated for whole epochs."""
    from kd_cache import open_cache
    from kd_train.batch import encoder_for
    from kd_train.engine import CacheData
    from kd_train.student import load_student
    from kd_train.train import TrainConfig

    model, processor = load_student(str(m["student"]))
    cfg = TrainConfig(student=str(m["student"]), out="unused", stage="dft", cache=str(m["cache"]), data=str(m["data"]),
                      images=str(m["images"]), batch_size=conf["batch_size"], progress=False, shuffle_buffer=256)
    max_length = open_cache(str(m["cache"])).manifest.max_length
    encoder = encoder_for(processor, model.config, image_root=cfg.images, max_length=max_length)
    tok = getattr(processor, "tokenizer", processor)
    data = CacheData(cfg, encoder, SimpleNamespace(num_processes=1, process_index=0), tok.pad_token_id)
    del model
    n = epoch = 0
    t0, c0 = time.perf_counter(), time.process_time()
    while time.perf_counter() - t0 < min_seconds or epoch < 2:
        for batch, tags in data.loader(epoch):
            data.mark(tags)
            n += len(batch.visual_splits)
        epoch += 1
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"samples": n, "epochs": epoch, "seconds": round(dt, 3), "cpu_seconds": round(cpu, 3),
            "samples_per_second": n / dt, "samples_per_cpu_second": n / cpu}


# ------------------------------------------------------------------------------------------------ (d) stream RSS


def synthetic_cache(work: Path, n: int, *, length: int = 32, rows: int = 16, k: int = 32, seed: int = 0) -> dict:
    """A text-only cache of n random top-k samples, written by kd's ShardWriter and finalized by kd's manifest."""
    import numpy as np

    from kd_cache import format as fmt
    from kd_cache.build import BuildConfig, build
    from kd_cache.manifest import done_path, try_finalize
    from kd_cache.codec import SampleTargets
    from kd_eval.tiny import make_tiny_teacher
    from kd_cache.writer import ShardWriter
    from kd_cache.files import atomic_write_text

    t0 = time.perf_counter()
    # header (teacher, tokenizer, targets, config): from a real build with a tiny causal LM
    llm = make_tiny_teacher(work / "tiny-llm", "causal-lm", hidden_size=16, num_layers=1)
    recs = [{"id": f"q{i}", "conversations": [{"from": "human", "value": "How many sides does a square have?"},
                                              {"from": "gpt", "value": "four"}]} for i in range(4)]
    (work / "tiny.json").write_text(json.dumps(recs))
    real = build(BuildConfig(teacher=str(llm), data=str(work / "tiny.json"), out=str(work / "tiny-cache"),
                             top_k=k, visual_top_k=k, progress=False))
    computed = ("format_version", "num_samples", "num_text_rows", "num_visual_rows", "num_gram_samples",
                "total_bytes", "shards", "skipped", "build")
    header = {key: v for key, v in real.items() if key not in computed}
    vocab = int(header["vocab_size"])
    out = work / "stream-cache"
    os.makedirs(out / fmt.PROGRESS_DIR, exist_ok=True)
    writer = ShardWriter(str(out), 0, 1, start=0, shard_size=1024, teacher_fingerprint=header["teacher"]["fingerprint"],
                         targets=header["targets"], schema=fmt.schema("topk", "topk", vocab))
    rng = np.random.default_rng(seed)
    tpos = np.arange(length - rows - 1, length - 1, dtype=np.int64)
    empty_i, empty_f = np.zeros((0, k), np.int64), np.zeros((0, k), np.float32)
    visual = {"topk_ids": empty_i, "topk_logprobs": empty_f, "tail_logprob": np.zeros(0, np.float32),
              "logsumexp": np.zeros(0, np.float32)}
    for i in range(n):
        ids = rng.integers(0, vocab, size=(rows, k))
        lp = -np.sort(rng.exponential(2.0, size=(rows, k)).astype(np.float32), axis=1)
        writer.add(i, result=SampleTargets(
            sample_index=i, sample_id=f"s{i}", input_ids=rng.integers(0, vocab, size=length),
            text_positions=tpos, visual_positions=np.zeros(0, np.int64),
            text={"topk_ids": ids, "topk_logprobs": lp, "tail_logprob": np.full(rows, -3.0, np.float32),
                  "logsumexp": rng.normal(5, 1, rows).astype(np.float32)},
            visual=visual, gram=None))
    writer.close()
    atomic_write_text(done_path(str(out), 0, 1), json.dumps({
        "rank": 0, "samples_this_run": n, "wall_seconds": round(time.perf_counter() - t0, 3),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "device": "cpu"}))
    manifest = try_finalize(str(out), 1, header)
    return {"cache": str(out), "samples": manifest["num_samples"], "shards": len(manifest["shards"]),
            "bytes": manifest["total_bytes"], "seconds": round(time.perf_counter() - t0, 2),
            "sample": {"tokens": length, "text_rows": rows, "k": k}}


def stream_memory(work: Path, conf: dict) -> dict:
    syn = synthetic_cache(work, conf["stream_large"])
    res = {}
    for n in (conf["stream_small"], conf["stream_large"]):
        res[str(n)] = child("stream", {"cache": syn["cache"], "n": n, "shuffle_buffer": 256})
        print(f"  stream {n}: peak RSS {res[str(n)]['maxrss_bytes'] / 2**20:.0f} MiB, "
              f"{res[str(n)]['samples_per_second']:.0f} samples/s", flush=True)
    small, large = res[str(conf["stream_small"])], res[str(conf["stream_large"])]
    shutil.rmtree(syn["cache"], ignore_errors=True)
    return {"cache": syn, "runs": res, "small": conf["stream_small"], "large": conf["stream_large"],
            "growth": large["maxrss_bytes"] / small["maxrss_bytes"] - 1}


# ------------------------------------------------------------------------------------------------ RDist


def rdist_gram(dims, ref: bool, repeats: int = 2, amortize: int = 8, seed: int = 0) -> list[dict]:
    """Times and values of the student Gram both ways; the float64 reference for the first size only (`ref`)."""
    import torch

    from kd_train.losses import gram, gram_from_hidden

    out = []
    for d in dims:
        g = torch.Generator().manual_seed(seed)
        w = torch.randn(VOCAB_BIG, d, generator=g) * d ** -0.5
        h = torch.randn(NV, d, generator=g)
        with torch.no_grad():
            t0 = time.perf_counter()
            z = h @ w.T
            z_s = time.perf_counter() - t0
            t_gram, t_fast = [], []
            r_gram = r_fast = None
            t0 = time.perf_counter()
            wtw = w.T @ w
            wtw_s = time.perf_counter() - t0
            for _ in range(repeats):
                t0 = time.perf_counter()
                r_gram = gram(z)
                t_gram.append(time.perf_counter() - t0)
                for _ in range(3):
                    t0 = time.perf_counter()
                    r_fast = gram_from_hidden(h, w, wtw)
                    t_fast.append(time.perf_counter() - t0)
            del z
            rel = float((r_fast - r_gram).norm() / r_gram.norm())
            row = {"D": d, "Nv": NV, "V": VOCAB_BIG, "form_Z_seconds": z_s, "gram_Z_seconds": median(t_gram),
                   "gram_from_hidden_seconds": median(t_fast), "wtw_seconds": wtw_s,
                   "amortize_samples": amortize, "rel_err_fast_vs_gram": rel,
                   "gram_Z_all": t_gram, "gram_from_hidden_all": t_fast}
            row["fast_with_wtw_amortized_seconds"] = row["gram_from_hidden_seconds"] + wtw_s / amortize
            row["speedup_precomputed"] = row["gram_Z_seconds"] / row["gram_from_hidden_seconds"]
            row["speedup_amortized"] = row["gram_Z_seconds"] / row["fast_with_wtw_amortized_seconds"]
            # samples per W^T W needed for a 10x speed-up (from the measured times)
            gap = row["gram_Z_seconds"] / TARGETS["rdist_speedup"] - row["gram_from_hidden_seconds"]
            row["samples_needed_for_10x_amortized"] = (wtw_s / gap) if gap > 0 else None
            if ref and d == dims[0]:  # float64 reference R = (H W^T)(H W^T)^T, accumulated over vocabulary chunks
                t0 = time.perf_counter()
                h64, r64 = h.double(), torch.zeros(NV, NV, dtype=torch.float64)
                for s in range(0, VOCAB_BIG, 16384):
                    zc = h64 @ w[s: s + 16384].double().T
                    r64 += zc @ zc.T
                row["rel_err_gram_vs_fp64"] = float((r_gram.double() - r64).norm() / r64.norm())
                row["rel_err_fast_vs_fp64"] = float((r_fast.double() - r64).norm() / r64.norm())
                row["ref_seconds"] = time.perf_counter() - t0
                del r64, h64
        del w, wtw
        out.append(row)
        print(f"  rdist D={d}: gram(Z) {row['gram_Z_seconds']:.3f}s, gram_from_hidden {row['gram_from_hidden_seconds']:.4f}s"
              f" (x{row['speedup_precomputed']:.0f}), W^T W {wtw_s:.2f}s -> amortized over {amortize}: "
              f"x{row['speedup_amortized']:.2f}; rel err {rel:.1e}", flush=True)
    return out


# ------------------------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smaller models, fewer steps, 5K streamed, D=896 only")
    ap.add_argument("--only", default="direct,runs,loader,stream,rdist",
                    help="comma list of parts: direct, runs, loader, stream, rdist")
    ap.add_argument("--work", default=None, help="folder for models and caches (default: a temporary folder)")
    ap.add_argument("--out", default=str(RESULTS / "train_cost.json"))
    ap.add_argument("--student", default=None, help="hidden,layers of the student (default 512,6; quick 256,4)")
    ap.add_argument("--teacher", default=None, help="hidden,layers of the teacher (default 1024,6; quick 512,4)")
    ap.add_argument("--image-size", type=int, default=None, help="image side (8x8 patches; default 32)")
    ap.add_argument("--steps", type=int, default=None, help="max_steps of each kd train run (2 are warm-up)")
    ap.add_argument("--run-repeats", type=int, default=None, help="kd train runs per configuration")
    ap.add_argument("--stream-samples", type=int, default=None, help="the large streaming run (default 50000)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads for the training parts (default 1: see the module docstring); the RDist "
                         "matmuls use all cores")
    ap.add_argument("--child", nargs=2, metavar=("KIND", "JSON"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    os.environ.setdefault("TQDM_DISABLE", "1")
    if args.child:
        import logging

        import torch

        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
        logging.disable(logging.WARNING)
        res = CHILDREN[args.child[0]](json.loads(args.child[1]))
        print(json.dumps(res))
        return res

    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    global THREADS
    THREADS = args.threads
    all_cores = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    conf = dict(QUICK if args.quick else FULL)
    for name in ("student", "teacher"):
        if getattr(args, name):
            conf[name] = tuple(int(x) for x in getattr(args, name).split(","))
    for name, key in (("image_size", "image_size"), ("steps", "steps"), ("run_repeats", "run_repeats"),
                      ("stream_samples", "stream_large")):
        if getattr(args, name) is not None:
            conf[key] = getattr(args, name)
    parts = {p.strip() for p in args.only.split(",") if p.strip()}
    t_start = time.time()
    work_ctx = tempfile.TemporaryDirectory(prefix="kd-train-cost-") if args.work is None else None
    work = Path(args.work or work_ctx.name)
    work.mkdir(parents=True, exist_ok=True)
    result: dict = {"meta": {"quick": args.quick, "config": {k: v for k, v in conf.items()}, "device": "cpu",
                             "torch_threads": THREADS, "rdist_torch_threads": all_cores,
                             "python": platform.python_version(),
                             "torch": torch.__version__, "targets": TARGETS}}
    timings = {}
    try:
        if parts & {"direct", "runs", "loader"}:
            t0 = time.time()
            m = make_models(work, conf)
            timings["setup"] = time.time() - t0
            result["models"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in m.items()}
            print(f"models: student {m['params']['student']['total'] / 1e6:.1f}M, teacher "
                  f"{m['params']['teacher']['total'] / 1e6:.1f}M params; cache of {m['cache_samples']} samples "
                  f"built in {m['build_seconds']:.1f}s", flush=True)
        if "direct" in parts:
            t0 = time.time()
            result["direct"] = direct_steps(m, work, conf)
            timings["direct"] = time.time() - t0
            d = result["direct"]
            ms = d["median_step_seconds"]
            print(f"(a) engine step, same batch: SFT {ms['sft']:.3f}s, DFT {ms['dft']:.3f}s, online {ms['online']:.3f}s;"
                  f" DFT/SFT {d['dft_over_sft']:.3f}, online/DFT {d['online_over_dft']:.2f} (CPU time: "
                  f"{d['cpu_dft_over_sft']:.3f}, {d['cpu_online_over_dft']:.2f})", flush=True)
        if "runs" in parts:
            t0 = time.time()
            result["runs"] = separate_runs(m, work, conf)
            timings["runs"] = time.time() - t0
            r = result["runs"]
            print(f"(b) online / offline step time {r['online_over_offline']:.2f}x; offline / online peak RSS "
                  f"{r['offline_rss_over_online']:.3f} ({r['offline_rss_over_online_above_baseline']:.3f} above the "
                  f"runtime baseline)", flush=True)
        if "loader" in parts:
            t0 = time.time()
            result["loader"] = loader_throughput(m, conf)
            timings["loader"] = time.time() - t0
            lo = result["loader"]
            step = (result.get("direct") or {}).get("median_step_seconds", {}).get("dft")
            if step is None and "runs" in result:
                step = result["runs"]["per_config"]["dft"]["median_step_seconds"]
            if step:
                lo["training_samples_per_second"] = conf["batch_size"] / step
                lo["ratio"] = lo["samples_per_second"] / lo["training_samples_per_second"]
                cstep = (result.get("direct") or {}).get("median_cpu_seconds", {}).get("dft")
                if cstep:
                    lo["cpu_ratio"] = lo["samples_per_cpu_second"] / (conf["batch_size"] / cstep)
                print(f"(c) loader {lo['samples_per_second']:.0f} samples/s vs training "
                      f"{lo['training_samples_per_second']:.1f} samples/s: {lo['ratio']:.0f}x", flush=True)
        if "stream" in parts:
            t0 = time.time()
            result["stream"] = stream_memory(work, conf)
            timings["stream"] = time.time() - t0
            print(f"(d) peak RSS growth {conf['stream_small']} -> {conf['stream_large']} samples: "
                  f"{100 * result['stream']['growth']:+.1f}%", flush=True)
        if "rdist" in parts:
            t0 = time.time()
            torch.set_num_threads(all_cores)  # large matmuls: they keep both cores busy without fine-grained sync
            result["rdist"] = rdist_gram(conf["rdist_dims"], conf["rdist_ref"])
            torch.set_num_threads(THREADS)
            timings["rdist"] = time.time() - t0
    finally:
        if work_ctx is not None:
            work_ctx.cleanup()
    result["summary"] = summarize(result)
    result["meta"]["timings"] = {k: round(v, 1) for k, v in timings.items()}
    result["meta"]["seconds_total"] = round(time.time() - t_start, 1)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1, default=str)
    for row in result["summary"]:
        print(f"{row['target']:<58} {row['measured']:<28} {'met' if row['met'] else 'NOT met'}")
    print(f"wrote {args.out}")
    return result


def summarize(r: dict) -> list[dict]:
    rows = []

    def add(name, measured, target, met, **kw):
        rows.append({"target": name, "measured": measured, "goal": target, "met": bool(met), **kw})

    if "direct" in r:
        x = r["direct"]["dft_over_sft"]
        add("(a) DFT step / SFT step (same batch, engine step)", f"{x:.3f}x", f"<= {TARGETS['dft_over_sft']}x",
            x <= TARGETS["dft_over_sft"], value=x, cpu_value=r["direct"]["cpu_dft_over_sft"])
        x = r["direct"]["online_over_dft"]
        add("(b) online-teacher step / DFT-from-cache step (same batch)", f"{x:.2f}x",
            f">= {TARGETS['online_over_offline']}x", x >= TARGETS["online_over_offline"], value=x,
            cpu_value=r["direct"]["cpu_online_over_dft"])
    if "runs" in r:
        x = r["runs"]["dft_over_sft_end_to_end"]
        add("(a') DFT / SFT step, separate kd train runs (incl. data)", f"{x:.3f}x",
            f"<= {TARGETS['dft_over_sft']}x", x <= TARGETS["dft_over_sft"], value=x)
        x = r["runs"]["online_over_offline"]
        add("(b') online / offline step, separate kd train runs (incl. data)", f"{x:.2f}x",
            f">= {TARGETS['online_over_offline']}x",
            x >= TARGETS["online_over_offline"], value=x)
        x = r["runs"]["offline_rss_over_online"]
        y = r["runs"]["offline_rss_over_online_above_baseline"]
        add("(b) offline peak RSS / online peak RSS", f"{x:.3f} ({y:.3f} above runtime)",
            f"<= {TARGETS['offline_rss_over_online']}", x <= TARGETS["offline_rss_over_online"], value=x,
            above_baseline=y)
    if "loader" in r and "ratio" in r["loader"]:
        x = r["loader"]["ratio"]
        add("(c) loader samples/s / training samples/s", f"{x:.1f}x", f">= {TARGETS['loader_over_training']}x",
            x >= TARGETS["loader_over_training"], value=x, cpu_value=r["loader"].get("cpu_ratio"))
    if "stream" in r:
        x = r["stream"]["growth"]
        n0, n1 = r["stream"]["small"], r["stream"]["large"]
        add(f"(d) peak RSS growth, {n0 // 1000}K -> {n1 // 1000}K streamed samples", f"{100 * x:+.1f}%",
            f"<= {100 * TARGETS['stream_rss_growth']:.0f}%", x <= TARGETS["stream_rss_growth"], value=x)
    for row in r.get("rdist", []):
        x, y = row["speedup_precomputed"], row["speedup_amortized"]
        add(f"RDist gram(Z) / gram_from_hidden, D={row['D']}, W^T W precomputed", f"{x:.0f}x",
            f">= {TARGETS['rdist_speedup']}x", x >= TARGETS["rdist_speedup"], value=x)
        add(f"RDist gram(Z) / gram_from_hidden, D={row['D']}, W^T W amortized over {row['amortize_samples']}",
            f"{y:.2f}x", f">= {TARGETS['rdist_speedup']}x", y >= TARGETS["rdist_speedup"], value=y)
    return rows


if __name__ == "__main__":
    main()
