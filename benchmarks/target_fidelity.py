"""Does the cache lose gradient that matters? Cosine between the MDist / RDist gradients a student gets from
cached targets and from the exact teacher, at the loss levels DFT actually trains at (where a gradient that
disagrees would cost the student quality).

    python -m benchmarks.target_fidelity                 # after `python -m benchmarks.quality` (setting A)

For each cache option (top-k for MDist; the Gram encoding and tolerance for RDist) a real cache is built with
`kd cache build` over the same records and read back with `kd_cache.open_cache`. For students taken at the start
of DFT (the SFT output) and at its end, per sample:
* MDist: d/dz of the forward KL on the response rows, from the cached top-k + tail targets (kd_train.losses.
  mdist_loss) vs from the exact full-vocabulary teacher distribution (dense KL); also on the visual rows;
* RDist: d/dz of 1 − cos(R_S, R_T) with R_T decoded from the cache vs the exact R_T = Z_T Z_Tᵀ.
The cosine between the two gradients (flattened over the sample's rows) is summarised by its median and 10th
percentile, with the loss value at which it was measured, and the bytes per row / per Gram each option costs
(`kd cache info`). For the visual rows, also the cosine of the gradient w.r.t. the student's parameters summed over
a step's samples (BATCH) and over all measured samples: the quantity the optimizer integrates, where the
unbiased but noisy sampled targets (the build's default on visual rows) are judged fairly. Results: benchmarks/results/target_fidelity.json and a section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import datetime
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from kd_eval import report  # noqa: E402

TOPK = (16, 64, 256)
SAMPLES = 50  # draws per row of the sampled cache (the build default)
BATCH = 16  # samples per optimizer step for the parameter-gradient cosine (the quality study's batch)
GRAMS = (("lowrank", 1e-4), ("lowrank", 1e-6), ("dense", 1e-4))
MARK = ("<!-- target_fidelity -->", "<!-- /target_fidelity -->")


def build_caches(out: Path, teacher: Path, data: Path, images: Path) -> dict[str, Path]:
    from kd_cache.build import BuildConfig, build

    caches = {}
    for k in TOPK:
        caches[f"top{k}"] = out / f"top{k}"
        build(BuildConfig(teacher=str(teacher), data=str(data), images=str(images), out=str(caches[f"top{k}"]),
                          top_k=k, visual_top_k=k, visual_targets="topk", gram=False, batch_size=32,
                          progress=False))
    caches["sampled"] = out / "sampled"  # SAMPLES draws on every row (the default does this on the visual rows)
    build(BuildConfig(teacher=str(teacher), data=str(data), images=str(images), out=str(caches["sampled"]),
                      targets="sampled", visual_targets="sampled", samples=SAMPLES, gram=False, batch_size=32,
                      progress=False))
    for enc, tol in GRAMS:
        name = f"gram-{enc}-{tol:g}"
        caches[name] = out / name
        build(BuildConfig(teacher=str(teacher), data=str(data), images=str(images), out=str(caches[name]),
                          top_k=4, visual_top_k=4, visual_targets="topk", gram_encoding=enc, gram_tolerance=tol, batch_size=32,
                          progress=False))
    return caches


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0))


def measure(student_dir: Path, teacher_dir: Path, caches: dict[str, Path], data: Path, images: Path,
            limit: int) -> dict:
    """Gradient cosines (cached vs exact targets) of one student over the first `limit` cached samples."""
    from kd_cache import open_cache
    from kd_cache.data import RecordSource
    from kd_cache.targets import topk_targets
    from kd_train.batch import encoder_for
    from kd_train.losses import gram, mdist_loss, rdist_loss, sampled_kd_loss
    from kd_train.objective import RowLogits
    from kd_train.sources import cache_target_layout
    from kd_train.student import load_student

    student, proc = load_student(student_dir)
    teacher, tproc = load_student(teacher_dir)
    student.eval()
    teacher.eval()
    records = RecordSource(str(data))
    enc_s = encoder_for(proc, student.config, image_root=str(images), max_length=None)
    enc_t = encoder_for(tproc, teacher.config, image_root=str(images), max_length=None)
    rows_s, rows_t = RowLogits(student), RowLogits(teacher)
    opened = {name: open_cache(str(path)) for name, path in caches.items()}
    layouts = {name: cache_target_layout(cache) for name, cache in opened.items()}
    cached = {name: {s["sample_index"]: s for _, s in zip(range(limit), cache)} for name, cache in opened.items()}
    out: dict[str, dict[str, list[float]]] = {}
    params = [p for p in student.parameters() if p.requires_grad]
    # MDist on the visual rows, as the optimizer sees it: the gradient w.r.t. the student's parameters summed over
    # a step's samples (sampled targets are unbiased per row but noisy; the noise averages over rows and samples)
    visual_variants = ["exact", *(f"top{k}" for k in TOPK), "sampled"]
    step_sum = {v: None for v in visual_variants}
    total_sum = {v: None for v in visual_variants}
    step_cos: dict[str, list[float]] = {v: [] for v in visual_variants[1:]}

    def add(name: str, key: str, value: float) -> None:
        out.setdefault(name, {}).setdefault(key, []).append(value)

    def flat_grad(z: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        gs = torch.autograd.grad(z, params, grad_outputs=g.to(z.dtype), retain_graph=True, allow_unused=True)
        return torch.cat([(x if x is not None else torch.zeros_like(p)).flatten().double() for x, p in zip(gs, params)])

    def sampled_grad(c: dict, rows: str, z_s: torch.Tensor) -> torch.Tensor:
        t = layouts["sampled"].targets(c, rows)
        loss = sampled_kd_loss(z_s, torch.as_tensor(np.asarray(t.ids)).long(),
                               torch.as_tensor(np.asarray(t.counts)).long(),
                               torch.as_tensor(np.asarray(t.row_lengths)).long(), t.draws)
        return torch.autograd.grad(loss, z_s)[0]

    indices = list(cached["top64"])[:limit]
    for i, index in enumerate(indices):
        rec = records[index]
        e_s, e_t = enc_s.encode(rec, index), enc_t.encode(rec, index)
        inputs = lambda e: ({**{k: torch.as_tensor(v) for k, v in e.model_inputs.items()},  # noqa: E731
                             "input_ids": torch.as_tensor(e.input_ids)[None]})
        pos = lambda p: torch.stack([torch.zeros(len(p), dtype=torch.long), torch.as_tensor(p)])  # noqa: E731
        with torch.no_grad():
            zt_t, zv_t, _ = rows_t(inputs(e_t), pos(e_t.text_positions), pos(e_t.visual_positions))
        zt_s0, zv_s0, _ = rows_s(inputs(e_s), pos(e_s.text_positions), pos(e_s.visual_positions))  # with grad
        visual_grads = {}
        for rows, z_t, z_s0 in (("text", zt_t, zt_s0), ("visual", zv_t, zv_s0)):
            z_s = z_s0.detach().double().requires_grad_(True)
            p_t = torch.softmax(z_t.double(), -1)
            exact = (p_t * (torch.log_softmax(z_t.double(), -1) - torch.log_softmax(z_s, -1))).sum()
            g_exact, = torch.autograd.grad(exact, z_s)
            if rows == "visual":
                visual_grads["exact"] = g_exact
            for k in TOPK:
                t = layouts[f"top{k}"].targets(cached[f"top{k}"][index], rows)
                loss = mdist_loss(z_s, torch.as_tensor(np.array(t.ids)).long(),
                                  torch.as_tensor(np.array(t.logprobs)).double(),
                                  torch.as_tensor(np.array(t.tail)).double())
                g, = torch.autograd.grad(loss, z_s)
                add(f"mdist-{rows}-top{k}", "cos", _cos(g, g_exact))
                add(f"mdist-{rows}-top{k}", "loss", float(exact.detach()) / len(z_s))
                if rows == "visual":
                    visual_grads[f"top{k}"] = g
            g = sampled_grad(cached["sampled"][index], rows, z_s)
            add(f"mdist-{rows}-sampled{SAMPLES}", "cos", _cos(g, g_exact))
            add(f"mdist-{rows}-sampled{SAMPLES}", "loss", float(exact.detach()) / len(z_s))
            if rows == "visual":
                visual_grads["sampled"] = g
            # the same top-64 + tail unquantized (from the exact logits): separates truncation from quantization
            t = topk_targets(z_t.double(), 64)
            g, = torch.autograd.grad(mdist_loss(z_s, t.topk_ids, t.topk_logprobs, t.tail_logprob), z_s)
            add(f"mdist-{rows}-top64-unquantized", "cos", _cos(g, g_exact))
            add(f"mdist-{rows}-top64-unquantized", "loss", float(exact.detach()) / len(z_s))
        for v in visual_variants:
            pg = flat_grad(zv_s0, visual_grads[v])
            step_sum[v] = pg if step_sum[v] is None else step_sum[v] + pg
            total_sum[v] = pg if total_sum[v] is None else total_sum[v] + pg
        if (i + 1) % BATCH == 0 or i + 1 == len(indices):
            for v in visual_variants[1:]:
                step_cos[v].append(_cos(step_sum[v], step_sum["exact"]))
            step_sum = {v: None for v in visual_variants}
        z_s = zv_s0.detach().double().requires_grad_(True)
        r_exact = gram(zv_t.double())
        l_exact = rdist_loss(gram(z_s), r_exact, is_gram=True)
        g_exact, = torch.autograd.grad(l_exact, z_s)
        for enc, tol in GRAMS:
            name = f"gram-{enc}-{tol:g}"
            r_c = torch.as_tensor(np.asarray(cached[name][index]["gram"]), dtype=torch.float64)
            g, = torch.autograd.grad(rdist_loss(gram(z_s), r_c, is_gram=True), z_s)
            add(f"rdist-{enc}-{tol:g}", "cos", _cos(g, g_exact))
            add(f"rdist-{enc}-{tol:g}", "loss", float(l_exact.detach()))
    rows_out = {name: {"median_cos": float(np.median(v["cos"])), "p10_cos": float(np.percentile(v["cos"], 10)),
                       "min_cos": float(np.min(v["cos"])), "mean_loss": float(np.mean(v["loss"])),
                       "samples": len(v["cos"])} for name, v in out.items()}
    steps_out = {f"mdist-visual-{v}": {"median_step_cos": float(np.median(step_cos[v])),
                                        "min_step_cos": float(np.min(step_cos[v])), "steps": len(step_cos[v]),
                                        "all_samples_cos": _cos(total_sum[v], total_sum["exact"])}
                 for v in visual_variants[1:]}
    return {"rows": rows_out, "parameter_gradient": steps_out}


def markdown(payload: dict) -> str:
    lines = [MARK[0], "## Cached vs exact targets: gradient cosine where DFT trains (issue 11)", "",
             f"{payload['date']}, {payload['machine']}; `{payload['command']}` ({payload['seconds']:.0f} s). Raw: "
             "[`benchmarks/results/target_fidelity.json`](../benchmarks/results/target_fidelity.json).", "",
             "Teacher and students of the quality study (setting A, N = 200, seed 0, the `kd` arm: trained from the "
             "default cache). Cosine between the gradient "
             "w.r.t. the student's logits from the cached targets and from the exact teacher (full-vocabulary "
             "forward KL; exact Gram), per sample, over the sample's rows; the loss is the exact one at that state.",
             "", "| target | bytes | student | loss (exact) | median cos | 10th pct cos | min cos |",
             "|---|---:|---|---:|---:|---:|---:|"]
    for state, res in payload["students"].items():
        for name, r in res["rows"].items():
            lines.append(f"| {name} | {payload['bytes'].get(name, '–')} | {state} | {r['mean_loss']:.4g} | "
                         f"{r['median_cos']:.4f} | {r['p10_cos']:.4f} | {r['min_cos']:.4f} |")
    lines += ["", "Bytes: per response / visual row for MDist (`kd cache info`), per sample's Gram for RDist. "
              f"Sampled targets ({SAMPLES} draws) are unbiased but noisy per row, so their per-sample cosine is low "
              "by construction; what the optimizer integrates is the parameter gradient over many rows:", "",
              f"Visual-row MDist, gradient w.r.t. all student parameters: cosine to the exact one per step of "
              f"{payload.get('batch', BATCH)} samples (median, min over the steps) and over all measured samples.",
              "", "| visual targets | bytes per visual row | student | median step cos | min step cos | "
              "all-samples cos |", "|---|---:|---|---:|---:|---:|"]
    for state, res in payload["students"].items():
        for name, r in res["parameter_gradient"].items():
            lines.append(f"| {name} | {payload['bytes'].get(name, '–')} | {state} | {r['median_step_cos']:.4f} | "
                         f"{r['min_step_cos']:.4f} | {r['all_samples_cos']:.4f} |")
    lines += ["", MARK[1]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    from kd_cache.verify import info

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--study", default="bench-out/quality", help="the quality study's working folder (setting A)")
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--limit", type=int, default=100, help="samples measured")
    ap.add_argument("--out", default="bench-out/target_fidelity")
    ap.add_argument("--results", default=str(ROOT / "benchmarks" / "results" / "target_fidelity.json"))
    ap.add_argument("--docs", default=str(ROOT / "docs" / "benchmarks.md"))
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    torch.set_num_threads(2)
    study = Path(args.study)
    teacher = study / "teacher" / "sft" / "final"
    data, images = study / "data" / f"student_train_{args.n}.json", study / "data" / "images"
    run = study / f"N{args.n}" / f"seed-{args.seed}" / "kd" / "train"
    caches = build_caches(Path(args.out), teacher, data, images)
    sizes = {}
    for name, path in caches.items():
        d = info(str(path))
        if name.startswith("top") or name == "sampled":
            label = name if name != "sampled" else f"sampled{SAMPLES}"
            sizes[f"mdist-text-{label}"] = d["bytes_per_text_row"]
            sizes[f"mdist-visual-{label}"] = d["bytes_per_visual_row"]
            sizes[f"mdist-visual-{name}"] = d["bytes_per_visual_row"]  # the parameter-gradient table's names
        else:
            sizes["rdist-" + name[len("gram-"):]] = d["bytes_per_gram"]
    students = {"start of DFT (SFT output)": run / "sft" / "final", "end of DFT": run / "dft" / "final"}
    payload = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
               "machine": report.machine_description(),
               "command": "python -m benchmarks.target_fidelity " + " ".join(sys.argv[1:] if argv is None else argv),
               "bytes": sizes, "batch": BATCH,
               "students": {state: measure(path, teacher, caches, data, images, args.limit)
                            for state, path in students.items()}}
    payload["seconds"] = time.perf_counter() - t0
    report.publish_benchmark(payload, args.results, args.docs, MARK, markdown(payload))


if __name__ == "__main__":
    main()
