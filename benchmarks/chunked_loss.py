"""Peak memory and step time of the row-chunked KD loss vs the unchunked one (the measurement behind the
`--loss-chunk-size` default).

    python -m benchmarks.chunked_loss                # ~5 min on one core, < 4 GB RSS per worker
    python -m benchmarks.chunked_loss --quick        # smoke run at V = 8192 (numbers mean nothing)

One DFT micro-batch loss, forward + backward through the LM head and the loss only (the hidden states are a leaf
tensor): Nv = 576 visual rows + Nt = 150 response rows, V = 152,064 (Qwen2), D = 896 (Qwen2-0.5B's head), fp32 on
the CPU, CE + top-64 + tail MDist on the response rows and MDist on the visual rows from 50 sampled draws (the
cache default) or from top-64 + tail.  RDist is left out (it never needs the logits in its exact form).

* unchunked: `zt = head(h_text)`, `zv = head(h_visual)` -> `kd_train.objective.Objective` without a chunk size
  (the row functions over all rows at once), the engine's path with `--loss-chunk-size 0`;
* chunked: the same `Objective` with a chunk size (`kd_train.chunked.chunked_row_loss` over the same row
  functions) at several chunk sizes.

Every configuration runs in its own fresh single-thread subprocess (`torch.set_num_threads(1)`, glibc's mmap
threshold fixed at 128 KiB so that freed buffers leave the RSS), one after the other in this invocation, so the
ratios are comparable.  Per worker: inputs and targets are built, one warm-up step runs, the kernel's RSS
high-water mark is reset (`/proc/self/clear_refs`) and the baseline RSS read; then REPEATS timed steps; peak =
`getrusage().ru_maxrss`.  The peak RSS increase includes the gradients the step produces (`weight.grad`,
V·D fp32 = 545 MB, and `hidden.grad`), which every path must produce; the loss's *activation* memory is the
increase minus those.  Step time is the median of the repeats.  Results: benchmarks/results/chunked_loss.json and
a section of docs/benchmarks.md.  Goal: activation memory <= 1/4 of the unchunked path's at <= 1.10x its step
time, so that the loss no longer dominates a small GPU's memory (docs/training.md, "Training on small GPUs").
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

NV, NT, V, D = 576, 150, 152_064, 896
K, DRAWS = 64, 50
CHUNKS = (64, 96, 128, 256)
VISUAL = ("sampled50", "top64")
REPEATS = 3
MARK = ("<!-- chunked_loss -->", "<!-- /chunked_loss -->")
MEMORY_GOAL, TIME_GOAL = 0.25, 1.10


# --------------------------------------------------------------------------------------------- worker


def _rss(field: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"{field}:\s+(\d+) kB", text).group(1)) * 1024


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM and ru_maxrss (Linux >= 4.0)
        return True
    except OSError:
        return False


def predicted_activation_bytes(rows: int, text_rows: int) -> int:
    """Lower-bound model of the loss's activation peak, in bytes: (rows, V) fp32 buffers that must be alive.

    Saved by the forward: the logits (rows), CE's log-softmax (text), text MDist's copy with the top-k masked
    (text), the visual rows' log-softmax (sampled targets) or masked copy (top-k) (rows - text); at the start of
    backward the logits' gradient (rows) joins them: 3 * rows + text_rows buffers.  The per-op gradients that
    backward creates on the way (one or two more (rows, V) buffers of the part being differentiated) are not
    counted, so the measured peak is higher.  The chunked path holds this for one chunk (the worst chunk is the
    one with the most text rows); (rows, k) bucket tensors are negligible.  The head's gradient buffers are
    gradients, not activations, and are not counted.
    """
    return (3 * rows + text_rows) * V * 4


def worker(path: str, chunk: int, visual: str, repeats: int) -> dict:
    import torch

    torch.set_num_threads(1)
    from types import SimpleNamespace

    from kd_cache.codec import SampledRows, TopKRows
    from kd_cache.targets import sampled_targets, topk_targets
    from kd_train.losses import KDLossConfig
    from kd_train.objective import Objective, StepCounts

    g = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(D, V, bias=False)
    with torch.no_grad():
        head.weight.normal_(0.0, 0.02, generator=g)
    hidden = torch.randn(NT + NV, D, generator=g).requires_grad_(True)
    labels = torch.randint(0, V, (NT,), generator=g)

    def teacher(n: int, kind: str):
        parts = []
        for s in range(0, n, 64):  # teacher logits a few rows at a time: no (N, V) tensor before the baseline
            z = torch.randn(min(64, n - s), V, generator=g) * 2.0
            parts.append(topk_targets(z, K) if kind == "topk" else sampled_targets(z, DRAWS, generator=g))
        if kind == "topk":
            return TopKRows(torch.cat([p.topk_ids for p in parts]), torch.cat([p.topk_logprobs for p in parts]),
                            torch.cat([p.tail_logprob for p in parts]), V)
        return SampledRows(torch.cat([p.ids for p in parts]), torch.cat([p.counts for p in parts]),
                           torch.cat([p.row_lengths for p in parts]), DRAWS)

    cfg = KDLossConfig(rdist_weight=0.0)
    batch = SimpleNamespace(text_labels=labels, text_targets=teacher(NT, "topk"),
                            visual_targets=teacher(NV, "topk" if visual == "top64" else "sampled"), n_text=NT,
                            n_visual=NV, visual_splits=[NV], grams=None, has_targets=True)
    counts = StepCounts(text=NT, visual=NV, gram=1)
    objective = Objective(cfg, head, chunk_size=0 if path == "unchunked" else chunk)

    def step() -> float:
        head.weight.grad = hidden.grad = None
        # the forward's outputs stay referenced through backward, as in the engine's step
        rows = (head(hidden[:NT]), head(hidden[NT:])) if path == "unchunked" else (hidden[:NT], None)
        loss, _ = objective(*rows, hidden[NT:], batch, counts, 1)
        loss.backward()
        return float(loss.detach())

    value = step()  # warm-up: lazy library initialisation, page cache of the code
    head.weight.grad = hidden.grad = None
    reset = _reset_peak()
    base = _rss("VmRSS")
    base_maxrss = _maxrss()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        value = step()
        times.append(time.perf_counter() - t0)
    peak = _maxrss()
    grad_bytes = head.weight.grad.numel() * 4 + hidden.grad.numel() * 4
    rows = NT + NV if path == "unchunked" else min(chunk, NT + NV)
    return {"path": path, "chunk": chunk if path != "unchunked" else None, "visual": visual, "loss": value,
            "step_seconds": statistics.median(times), "step_seconds_all": times, "baseline_rss": base,
            "peak_rss": peak, "peak_increase_bytes": peak - base, "gradient_bytes": grad_bytes,
            "activation_bytes": peak - base - grad_bytes, "hwm_reset": reset,
            "baseline_maxrss_before_steps": base_maxrss,
            "predicted_activation_bytes": predicted_activation_bytes(rows, min(rows, NT))}


def _maxrss() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# --------------------------------------------------------------------------------------------- driver


def run_worker(path: str, chunk: int, visual: str, repeats: int, quick: bool) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", MALLOC_MMAP_THRESHOLD_="131072",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "benchmarks.chunked_loss", "--worker", path, "--chunk", str(chunk), "--visual",
           visual, "--repeats", str(repeats)] + (["--quick"] if quick else [])
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"worker {path} chunk={chunk} {visual} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def summarise(results: list[dict]) -> dict:
    """Ratios to the unchunked path of the same visual targets; the goal; the recommended chunk size."""
    base = {r["visual"]: r for r in results if r["path"] == "unchunked"}
    for r in results:
        b = base[r["visual"]]
        r["activation_ratio"] = r["activation_bytes"] / b["activation_bytes"]
        r["peak_increase_ratio"] = r["peak_increase_bytes"] / b["peak_increase_bytes"]
        r["time_ratio"] = r["step_seconds"] / b["step_seconds"]
        r["loss_rel_diff"] = abs(r["loss"] - b["loss"]) / abs(b["loss"])
        r["meets_goal"] = r["activation_ratio"] <= MEMORY_GOAL and r["time_ratio"] <= TIME_GOAL
    chunks = sorted({r["chunk"] for r in results if r["chunk"] is not None})
    meeting = [c for c in chunks if all(r["meets_goal"] for r in results if r["chunk"] == c)]
    # the largest chunk that meets the goal everywhere: fewest, largest GEMMs (what a GPU prefers)
    return {"chunks_meeting_goal": meeting, "recommended_chunk": max(meeting) if meeting else None}


def _mb(x: float) -> str:
    return f"{x / 2**20:,.0f}"


def markdown(payload: dict) -> str:
    s, z = payload["summary"], payload["sizes"]
    lines = [MARK[0], "## Chunked KD loss: peak memory and step time (`python -m benchmarks.chunked_loss`)", "",
             f"Machine: {payload['machine']}. Date: {payload['date']}. Command: `{payload['command'].strip()}`; wall "
             f"{payload['seconds']:.0f} s.", "",
             f"One DFT micro-batch loss, forward + backward through the LM head and the loss only (hidden states "
             f"given as a leaf): Nv = {z['Nv']} visual + Nt = {z['Nt']} response rows, V = {z['V']:,}, D = {z['D']}, fp32, one CPU "
             f"thread per configuration, each in a fresh process. Text rows: CE + top-{z['k']} + tail MDist; visual "
             f"rows: MDist from {z['draws']} sampled draws (the cache default) or top-{z['k']} + tail. *Peak* is the RSS "
             f"increase over the step; *activation* is that minus the gradients every path produces "
             f"(`weight.grad` + `hidden.grad`, {_mb(payload['results'][0]['gradient_bytes'])} MB); *predicted* "
             f"is a lower bound: the (rows, V) fp32 buffers the forward saves plus the logits' gradient "
             f"((3·rows + text rows)·V·4, `predicted_activation_bytes`; backward's transient per-op gradients come "
             f"on top). Step time: median of {payload['repeats']} steps after a warm-up; timings share the machine "
             f"with other jobs, so time ratios carry about ±0.1 of noise (the memory is deterministic).", "",
             "| visual targets | path | peak RSS increase (MB) | activation (MB) | predicted, lower bound (MB) | activation vs "
             "unchunked | peak vs unchunked | step (s) | time vs unchunked | loss rel. diff | goal (≤ 0.25× activation, "
             "≤ 1.10× time) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in payload["results"]:
        name = "unchunked" if r["chunk"] is None else f"chunked, {r['chunk']} rows"
        goal = "–" if r["chunk"] is None else ("met" if r["meets_goal"] else "**not met**")
        lines.append(f"| {r['visual']} | {name} | {_mb(r['peak_increase_bytes'])} | {_mb(r['activation_bytes'])} | "
                     f"{_mb(r['predicted_activation_bytes'])} | {r['activation_ratio']:.3f} | {r['peak_increase_ratio']:.3f} | "
                     f"{r['step_seconds']:.2f} | {r['time_ratio']:.3f} | {r['loss_rel_diff']:.1e} | {goal} |")
    if s["recommended_chunk"] is not None:
        verdict = (f"**Goal met** at chunk sizes {', '.join(map(str, s['chunks_meeting_goal']))} (both visual target "
                   f"kinds). Default chunk size: **{s['recommended_chunk']}** (`kd_train.chunked.DEFAULT_CHUNK_SIZE`), "
                   "the largest that meets the goal: fewest and largest matmuls, which GPUs prefer.")
    else:
        verdict = "**Goal not met** at any measured chunk size (see the ratios above)."
    rec = [r for r in payload["results"] if r["chunk"] is not None and r["chunk"] == s["recommended_chunk"]]
    if rec:
        verdict += (f" Counting the gradients too, the peak RSS increase at {s['recommended_chunk']} rows is "
                    f"{max(r['peak_increase_ratio'] for r in rec):.2f}x the unchunked one: once the logits are "
                    "chunked, the head's fp32 weight gradient (V·D) dominates; a frozen head (DPT) has none.")
    verdict += (" Not measured on a GPU: there every chunk also reads and writes the fp32 weight-gradient buffer "
                "(2·V·D·4 bytes, 1.1 GB here), a cost that favours larger chunks; check the default there.")
    lines += ["", verdict, "", MARK[1]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    global V
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--worker", choices=("unchunked", "chunked"), help=argparse.SUPPRESS)
    ap.add_argument("--chunk", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--visual", choices=VISUAL, default=VISUAL[0], help=argparse.SUPPRESS)
    ap.add_argument("--repeats", type=int, default=REPEATS)
    ap.add_argument("--chunks", default=",".join(map(str, CHUNKS)), help="chunk sizes, comma separated")
    ap.add_argument("--quick", action="store_true", help="V = 8192, one repeat: a smoke run")
    ap.add_argument("--render-only", action="store_true", help="rewrite the docs block from the results JSON")
    ap.add_argument("--results", default=str(ROOT / "benchmarks" / "results" / "chunked_loss.json"))
    ap.add_argument("--docs", default=str(ROOT / "docs" / "benchmarks.md"))
    args = ap.parse_args(argv)
    if args.quick:
        V = 8192
    if args.worker:
        print(json.dumps(worker(args.worker, args.chunk, args.visual, args.repeats)))
        return
    if args.render_only:
        write_docs(Path(args.docs), json.loads(Path(args.results).read_text(encoding="utf-8")))
        return
    if args.quick:
        args.repeats = 1
        if args.results == ap.get_default("results") or args.docs == ap.get_default("docs"):
            raise SystemExit("--quick writes nowhere by default: pass --results and --docs (e.g. under /tmp)")
    t0 = time.perf_counter()
    chunks = [int(c) for c in args.chunks.split(",") if c]
    results = []
    for visual in VISUAL:
        for path, chunk in [("unchunked", 0)] + [("chunked", c) for c in chunks]:
            r = run_worker(path, chunk, visual, args.repeats, args.quick)
            print(f"{visual:10s} {path:9s} chunk={chunk:<4d} peak +{_mb(r['peak_increase_bytes'])} MB "
                  f"activation {_mb(r['activation_bytes'])} MB step {r['step_seconds']:.2f} s", flush=True)
            results.append(r)
    summary = summarise(results)
    from kd_eval import report  # after the workers: the driver stays small while they run

    payload = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
               "machine": report.machine_description(),
               "command": "python -m benchmarks.chunked_loss " + " ".join(sys.argv[1:] if argv is None else argv),
               "sizes": {"Nv": NV, "Nt": NT, "V": V, "D": D, "k": K, "draws": DRAWS}, "repeats": args.repeats,
               "goal": {"activation_ratio_max": MEMORY_GOAL, "time_ratio_max": TIME_GOAL},
               "results": results, "summary": summary}
    payload["seconds"] = time.perf_counter() - t0
    Path(args.results).write_text(json.dumps(payload, indent=1) + "\n", encoding="utf-8")
    write_docs(Path(args.docs), payload)


def write_docs(docs: Path, payload: dict) -> None:
    """Replace the marked block of docs/benchmarks.md (append it when absent)."""
    from kd_eval import report  # the driver stays small while the workers run (see main)

    block = markdown(payload)
    report.replace_marked_block(docs, MARK, block)
    print(block)


if __name__ == "__main__":
    main()
