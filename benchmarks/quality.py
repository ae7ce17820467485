"""Quality study: does distilling from the cache make a better student than training on labels alone?

Pre-registered setting A ("scarce labels, long schedule": where the teacher's targets can add most). Run from the
repository root:

    python -m benchmarks.quality                      # setting A: 5 seeds, N = 200 (all arms) and 1000 (CE, KD)
    python -m benchmarks.quality --setting B          # then B and C (each ~20-40 min on 2 cores)
    python -m benchmarks.quality --setting all        # A, B and C in one command (about two hours)
    python -m benchmarks.quality --setting X          # students of another tokenizer from the same cache (~45 min)
    python -m benchmarks.quality --seeds 0 1 --n 200  # a subset (finished runs are reused on a rerun)
    python -m benchmarks.quality --quick              # a smoke run of the same code paths (numbers meaningless)

What runs (each student run is a separate single-thread process; `--jobs` of them at once, since on a small CPU
two one-thread processes are far faster than one two-thread process):
* data: `kd_eval.synth` shapes dataset (caption, train, val, test >= 1200 records).
* teacher: one tiny LLaVA trained once from random init (`kd train --stage sft`, 2500 steps), shared by all
  seeds, then evaluated on the test split. **Teacher gate** (declared before any student runs): the primary
  metrics use only the question types on which the teacher reaches >= 90 % exact match.
* students: per seed, the teacher's vision tower + a fresh projector + a small random-init LM (the seed sets the
  init and the data order), trained DPT -> SFT -> DFT with the same steps on the first N caption and N
  instruction records (N = 200: labels scarce for the steps, every arm; N = 1000: as many as the earlier study,
  CE and KD only, to see whether the edge stays). Arms, all from the same init per seed:
    ce        `--recipe baseline` (CE only)
    ce-es     ce with early stopping: `--val-data` (val split) `--val-every 25 --keep-best`
    ce-ls     ce with `--label-smoothing 0.1`
    kd        `--recipe llava-kd` from the default cache (format v2: top-64 + tail with 1/16-nat codes on the
              response rows, 50 sampled draws on the visual rows, low-rank Gram)
    kd-topk64 the same from a cache with top-64 + tail on the visual rows too (`--visual-targets topk`, the
              default before the gradient measurements of benchmarks/target_fidelity.py)
    kd-exact  `--recipe llava-kd --online-teacher` with full-vocabulary targets (`--online-top-k 0`) and exact Gram:
              what the cache would give if it lost nothing
    kd-sampled / kd-topk-eq  sampled targets (50 draws) vs the top-k whose text row costs the same bytes
Settings B, C and X: see SETTING_B / SETTING_C / SETTING_X below.
* metrics (`kd eval` on the test split): task score = exact match over the gated types; held-out
  teacher-forced answer NLL (nats/token) over the gated types. Per seed: arm - ce; mean over seeds with a 95 %
  bootstrap interval (seeds resampled); gap recovered = (arm - ce) / (teacher - ce) as a ratio of means with a
  bootstrap interval.

Outputs: benchmarks/results/quality_A.json (every number) and docs/results.md (regenerated from the JSON).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import datetime
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from kd_eval import demo, report, synth  # noqa: E402

ARMS = ("ce", "ce-es", "ce-ls", "kd", "kd-topk64", "kd-exact", "kd-sampled", "kd-topk-eq")
LABELS = {"ce": "CE (baseline)", "ce-es": "CE + early stopping", "ce-ls": "CE + label smoothing 0.1",
          "kd": "LLaVA-KD from the cache (defaults)", "kd-topk64": "LLaVA-KD, top-64 cache on the visual rows too",
          "kd-exact": "LLaVA-KD, exact online targets",
          "kd-sampled": "LLaVA-KD, sampled targets (50 draws)", "kd-topk-eq": "LLaVA-KD, top-k at the sampled bytes",
          "kd-text": "CE + response MDist", "kd-visual": "CE + visual MDist", "kd-rdist": "CE + RDist",
          "kd-full": "LLaVA-KD (all terms)",
          "x-ce": "other tokenizer: CE (baseline)", "x-uld": "other tokenizer: LLaVA-KD, ULD",
          "x-hybrid": "other tokenizer: LLaVA-KD, hybrid (GOLD-style)"}
ALL_ARMS = tuple(LABELS)  # every arm of every setting, in report order (CE first)
SAMPLES = 50  # draws per row of the sampled cache
TOPK_CANDIDATES = (4, 6, 8, 12, 16, 24, 32)  # the equal-bytes top-k is the one whose text row is closest in bytes
GATE = 0.90  # the teacher's accuracy a question type needs to count in the primary metrics
N_BOOT = 10_000
# The study's teacher: the demo's full setting trained 2.5x longer at a higher lr (it then masters colour and
# description); 1200 test records; a val split for early stopping.
SETTING_A = dataclasses.replace(demo.FULL, mode="study-A", teacher_steps=2500, teacher_lr=5e-4, n_test=1200,
                                eval_batch_size=100, num_workers=0)
QUICK = dataclasses.replace(demo.QUICK, mode="study-quick", n_test=60, num_workers=0)
# Setting B ("ambiguity, one pass"): answers with several right forms (kd_eval.synth's ambiguous types); the
# teacher trains on the first 2000 caption + 3000 instruction records, each student on the next B_POOL of each,
# seen once per stage (300 steps x batch 16).
B_POOL = 4800
SETTING_B = dataclasses.replace(SETTING_A, mode="study-B", question_types=synth.AMBIGUOUS_TYPES,
                                caption_type="describe-any", n_caption=2000 + B_POOL, n_train=3000 + B_POOL)
QUICK_B = dataclasses.replace(QUICK, mode="study-quick-B", question_types=synth.AMBIGUOUS_TYPES,
                              caption_type="describe-any", n_caption=96 + 64, n_train=160 + 64)
# Setting C ("visual terms that carry signal"): 16 visual tokens per image (patch 16 at 64 px), a student LM
# pretrained on the data's text (images removed) and frozen in DPT as in the paper; ablation of the KD terms.
SETTING_C = dataclasses.replace(SETTING_A, mode="study-C", patch_size=16)
QUICK_C = dataclasses.replace(QUICK, mode="study-quick-C", patch_size=16)
LM_PRETRAIN_STEPS = {"study-C": 600, "study-quick-C": 8}
ARMS_C = ("ce", "kd-text", "kd-visual", "kd-rdist", "kd-full")
N_VAL = {"study-A": 200, "study-quick": 16, "study-B": 200, "study-quick-B": 16, "study-C": 200, "study-quick-C": 16,
         "study-X": 200, "study-quick-X": 16}
TEACHER_SHARE = {"study-B": (2000, 3000), "study-quick-B": (96, 160)}  # (caption, instruct) records of the teacher
ARMS_B = ("ce", "kd")
# Setting X ("one cache, students of another tokenizer"): setting A's teacher, data and schedule; besides the
# same-tokenizer CE and KD students (the reference), students whose LM reads its own byte-level BPE tokenizer
# trained on the same text with X_VOCAB entries instead of 512 (fewer merges: the same answer in more, shorter
# tokens) and learn from the same cache with `--cross-tokenizer uld|hybrid`, against their own CE baseline.
SETTING_X = dataclasses.replace(SETTING_A, mode="study-X")
QUICK_X = dataclasses.replace(QUICK, mode="study-quick-X")
X_VOCAB = 384
ARMS_X = ("ce", "kd", "x-ce", "x-uld", "x-hybrid")
# an arm is compared with the CE student of its own tokenizer (x-ce is a baseline, not compared with ce)
BASELINE_OF = {"x-ce": "x-ce", "x-uld": "x-ce", "x-hybrid": "x-ce"}


# --------------------------------------------------------------------------------------------- shared steps


def prepare(out: Path, s: demo.DemoSettings, ns: list[int], progress: bool, arms: list[str]) -> dict:
    """Data (with a val split), the teacher and its evaluation, the gate, and the cache pairs of each N."""
    from kd_eval import synth

    data_root = out / "data"
    meta = data_root / "synth.json"
    want = {"caption": s.n_caption, "train": s.n_train, "val": N_VAL[s.mode], "test": s.n_test}
    if not meta.exists() or json.loads(meta.read_text())["counts"] != want:
        synth.generate(data_root, n_caption=s.n_caption, n_train=s.n_train, n_val=N_VAL[s.mode], n_test=s.n_test,
                       seed=0, image_size=s.image_size, question_types=s.question_types,
                       multi_turn=0.1 if s.caption_type == "describe" else 0.0, caption_type=s.caption_type)
    caption = json.loads((data_root / "caption_train.json").read_text())
    train = json.loads((data_root / "instruct_train.json").read_text())
    pool_caption, pool_train = caption, train  # setting A: the students' records are a subset of the teacher's
    if s.mode in TEACHER_SHARE:  # setting B: disjoint pools, so every student record is fresh to both
        c, t = TEACHER_SHARE[s.mode]
        caption, train, pool_caption, pool_train = caption[:c], train[:t], caption[c:], train[t:]
    teacher_data = demo.DemoData(data_root, data_root / "images", data_root / "teacher_train.json",
                                 data_root / "caption_train.json", data_root / "instruct_train.json",
                                 data_root / "instruct_test.json")
    demo._atomic_write(teacher_data.teacher_train, json.dumps(caption + train) + "\n")
    teacher = demo.train_teacher(out / "teacher", s, teacher_data, seed=0, progress=progress)
    # its training time, from its own log (a rerun reuses the trained teacher)
    teacher_seconds = sum(r.get("step_seconds", 0.0) for r in report.read_metrics(out / "teacher" / "sft" / "metrics.jsonl"))
    teacher_eval = demo.evaluate_model(teacher, teacher_data, s, out / "eval" / "teacher.json")
    gated = sorted(t for t, st in teacher_eval["per_type"].items() if st["accuracy"] >= GATE)
    if s.mode.startswith("study-quick"):  # the smoke run's 30-step teacher passes no gate; every type counts there
        gated = sorted(teacher_eval["per_type"])
    if not gated:
        raise SystemExit(f"the teacher reaches {GATE:.0%} on no question type: {teacher_eval['per_type']}")
    gate_path = out / "gate.json"  # declared once, before the first student run; a rerun must agree
    if gate_path.exists() and json.loads(gate_path.read_text())["gated_types"] != gated:
        raise SystemExit(f"{gate_path} declares other gated types than this teacher's evaluation gives")
    demo._atomic_write(gate_path, json.dumps({"gate": GATE, "gated_types": gated,
                                              "teacher_per_type": teacher_eval["per_type"]}, indent=1) + "\n")
    subsets = {}
    for n in ns:
        d = demo.DemoData(data_root, data_root / "images", teacher_data.teacher_train,
                          data_root / f"student_caption_{n}.json", data_root / f"student_train_{n}.json",
                          teacher_data.test)
        demo._atomic_write(d.student_caption, json.dumps(pool_caption[:n]) + "\n")
        demo._atomic_write(d.student_train, json.dumps(pool_train[:n]) + "\n")
        caches = {"default": demo.build_caches(out / f"cache-{n}", s, teacher, d, progress=progress)}
        if "kd-topk64" in arms:
            caches["vtopk"] = demo.build_caches(out / f"cache-{n}-vtopk", s, teacher, d, progress=progress,
                                                visual_targets="topk")
        if n == min(ns) and {"kd-sampled", "kd-topk-eq"} & set(arms):  # top-k vs sampled at equal bytes
            caches.update(equal_bytes_caches(out / f"cache-{n}", s, teacher, d))
        subsets[n] = {"data": d, "caches": caches}
    llm = pretrain_llm(out / "student-llm", s, caption + train, teacher) if s.mode in LM_PRETRAIN_STEPS else None
    entropy = cached_entropy(subsets[max(ns)]["caches"]["default"][1], subsets[max(ns)]["data"].student_train)
    return {"teacher": teacher, "teacher_eval": teacher_eval, "gated": gated, "subsets": subsets,
            "val": data_root / "instruct_val.json", "teacher_seconds": teacher_seconds, "entropy": entropy,
            "pretrained_llm": llm}


def pretrain_llm(root: Path, s: demo.DemoSettings, records: list[dict], teacher: Path) -> str:
    """Setting C's student LM: the demo's small random-init LM trained (`kd train --stage sft`) on the teacher's
    training conversations with the images removed: the data's words and answer formats, no vision. It reads the
    teacher's tokenizer and chat template from the start, so its embeddings mean the ids the student will see
    (with its own tokenizer, 509 of 512 ids would land on other rows once composed with the teacher's)."""
    from transformers import AutoModelForCausalLM, AutoProcessor

    from kd_eval.tiny import make_tiny_teacher
    from kd_train.train import TrainConfig, run

    final = root / "sft" / "final"
    if (final / "config.json").exists():
        return str(final)
    text = [{"id": r["id"], "conversations": [{"from": t["from"], "value": t["value"].replace("<image>\n", "")}
                                              for t in r["conversations"]]} for r in records]
    path = root / "text.json"
    demo._atomic_write(path, json.dumps(text) + "\n")
    init = root / "init"
    if not (init / "config.json").exists():
        make_tiny_teacher(init, "causal-lm", hidden_size=s.student_hidden, num_layers=s.student_layers, seed=0,
                          vocab_size=s.vocab_size, corpus=s.corpus())
        proc = AutoProcessor.from_pretrained(teacher)
        tok = proc.tokenizer
        tok.chat_template = proc.chat_template
        lm = AutoModelForCausalLM.from_pretrained(init)
        lm.resize_token_embeddings(len(tok))
        lm.save_pretrained(init)
        tok.save_pretrained(init)
    steps = LM_PRETRAIN_STEPS[s.mode]
    run(TrainConfig(student=str(init), out=str(root / "sft"), stage="sft", data=str(path), lr=s.student_lr,
                    max_steps=steps, epochs=demo._epochs(steps, s.batch_size, len(text)), batch_size=s.batch_size,
                    num_workers=0, progress=False))
    return str(final)


def cache_targets(cache: Path) -> dict:
    """What a cache holds per kind of row, in words ("top-64 + tail", "50 sampled draws")."""
    from kd_cache import open_cache

    m = open_cache(str(cache)).manifest
    return {rows: f"{spec.samples} sampled draws" if spec.kind == "sampled" else f"top-{spec.k} + tail"
            for rows, spec in (("response", m.text), ("visual", m.visual))}


def cached_entropy(cache: Path, records_path: Path) -> dict:
    """Per question type: the mean entropy (nats) of the cached teacher distribution at the answer's first slot row
    (top-k buckets + tail), beside log(number of right words there) a calibrated teacher would show. The slot is
    the first answer token, or the second for describe-any (after its article "a"); the synth vocabulary keeps
    those words one token each (a colour's first piece). Checks that the cache carries the ambiguity the data has
    (setting B) and not only the labels."""
    import math

    import numpy as np

    from kd_cache import open_cache

    records = json.loads(Path(records_path).read_text())
    acc: dict[str, list[tuple[float, float]]] = {}
    for sample in open_cache(str(cache)):
        rec = records[sample["sample_index"]]
        slot = 1 if rec["question_type"] == "describe-any" else 0
        lp = np.concatenate([sample["text_topk_logprobs"][slot], [sample["text_tail_logprob"][slot]]]).astype(np.float64)
        p = np.exp(lp - np.logaddexp.reduce(lp))
        h = float(-(p * np.log(np.clip(p, 1e-30, None))).sum())
        forms = rec.get("valid_answers") or rec.get("answer_items") or [rec["conversations"][1]["value"]]
        firsts = {f.split()[slot] if len(f.split()) > slot else f for f in forms}
        acc.setdefault(rec["question_type"], []).append((h, math.log(len(firsts))))
    return {t: {"records": len(v), "mean_entropy": sum(h for h, _ in v) / len(v),
                "mean_log_right_first_words": sum(x for _, x in v) / len(v)} for t, v in sorted(acc.items())}


def equal_bytes_caches(root: Path, s: demo.DemoSettings, teacher: Path, d: demo.DemoData) -> dict:
    """A sampled-target cache (SAMPLES draws per row) and the top-k cache whose bytes per text row are closest to
    it (k measured from TOPK_CANDIDATES with `kd cache info`), both for the caption and the instruction data."""
    from kd_cache.build import BuildConfig, build
    from kd_cache.verify import info

    def pair(name: str, **kw) -> tuple[Path, Path]:
        out = []
        for part, path in (("caption", d.student_caption), ("instruct", d.student_train)):
            folder = root / name / part
            build(BuildConfig(teacher=str(teacher), data=str(path), images=str(d.images), out=str(folder),
                              batch_size=32, progress=False, **kw))
            out.append(folder)
        return out[0], out[1]

    sampled = pair("sampled", targets="sampled", samples=SAMPLES)
    want = info(str(sampled[1]))["bytes_per_text_row"]
    sizes = {}
    for k in TOPK_CANDIDATES:
        # top-k on every row against sampled on every row
        sizes[k] = info(str(pair(f"top{k}", top_k=k, visual_top_k=k, visual_targets="topk")[1]))["bytes_per_text_row"]
    k = min(sizes, key=lambda k: abs(sizes[k] - want))
    EQUAL_BYTES.update({"sampled_bytes_per_text_row": want, "topk_bytes_per_text_row": sizes, "chosen_k": k})
    return {"sampled": sampled, "topk-eq": (root / f"top{k}" / "caption", root / f"top{k}" / "instruct")}


EQUAL_BYTES: dict = {}  # what equal_bytes_caches measured, for the results JSON


def arm_overrides(arm: str, val: Path) -> tuple[str, dict, bool]:
    """(recipe, TrainConfig overrides, online) of an arm."""
    return {
        "ce": ("baseline", {}, False),
        "ce-es": ("baseline", {"val_data": str(val), "val_every": 25, "keep_best": True}, False),
        "ce-ls": ("baseline", {"label_smoothing": 0.1}, False),
        "kd": ("llava-kd", {}, False),
        "kd-topk64": ("llava-kd", {}, False),
        "kd-exact": ("llava-kd", {"online_top_k": 0, "online_visual_top_k": 0}, True),
        "kd-sampled": ("llava-kd", {}, False),
        "kd-topk-eq": ("llava-kd", {}, False),
        # setting C: the stage presets decide what trains (DPT freezes the pretrained LM), one KD term at a time
        "kd-text": ("llava-kd", {"mdist_visual_weight": 0.0, "rdist_weight": 0.0}, False),
        "kd-visual": ("llava-kd", {"mdist_text_weight": 0.0, "rdist_weight": 0.0}, False),
        "kd-rdist": ("llava-kd", {"mdist_text_weight": 0.0, "mdist_visual_weight": 0.0}, False),
        "kd-full": ("llava-kd", {}, False),
        # setting X: the same cache, a student of another tokenizer
        "x-ce": ("baseline", {}, False),
        "x-uld": ("llava-kd", {"cross_tokenizer": "uld"}, False),
        "x-hybrid": ("llava-kd", {"cross_tokenizer": "hybrid"}, False),
    }[arm]


CACHE_OF_ARM = {"kd-sampled": "sampled", "kd-topk-eq": "topk-eq", "kd-topk64": "vtopk"}  # others: the default


def run_one(spec: dict) -> dict:
    """One student: compose (per seed, shared by the arms), train the arm's recipe, evaluate. In its own process."""
    import torch

    torch.set_num_threads(1)
    s = demo.DemoSettings(**spec["settings"])
    out, seed, arm, n = Path(spec["out"]), spec["seed"], spec["arm"], spec["n"]
    data = demo.DemoData(*[Path(p) for p in spec["data"]])
    chosen = spec["caches"] if isinstance(spec["caches"], list) else spec["caches"][CACHE_OF_ARM.get(arm, "default")]
    caches = tuple(Path(p) for p in chosen)
    recipe, overrides, online = arm_overrides(arm, Path(spec["val"]))
    make_init = _other_tokenizer_student if arm.startswith("x-") else _student_init
    if spec.get("pretrained_llm"):  # setting C: the presets decide what trains (not the demo's train_llm=True)
        overrides = {"train_llm": None, **overrides}
    run_dir = out / f"N{n}" / f"seed-{seed}" / arm
    result_path = run_dir / "result.json"
    if result_path.exists():
        return json.loads(result_path.read_text())
    t0 = time.perf_counter()
    with demo._quiet_transformers():
        student = make_init(out / ("students-x" if arm.startswith("x-") else "students") / f"seed-{seed}", s,
                            Path(spec["teacher"]), seed, spec.get("pretrained_llm"))
        finals = demo.train_student(run_dir / "train", recipe, s, student, data, None if online else caches,
                                    seed=seed, online_teacher=spec["teacher"] if online else None, **overrides)
        train_seconds = time.perf_counter() - t0
        r = demo.evaluate_model(finals[-1], data, s, run_dir / "eval.json")
        r_dpt = demo.evaluate_model(finals[0], data, s, run_dir / "eval_dpt.json") if spec.get("eval_dpt") else None
    res = {"arm": arm, "n": n, "seed": seed, "train_seconds": round(train_seconds, 1),
           "eval_seconds": round(time.perf_counter() - t0 - train_seconds, 1), "eval": report.summary(r),
           "eval_dpt": report.summary(r_dpt) if r_dpt is not None else None,
           "kept_steps": {p.parent.name: json.loads((p / "kd_stage.json").read_text()).get("kept_step")
                          for p in finals}}
    demo._atomic_write(result_path, json.dumps(res, indent=1) + "\n")
    return res


def _student_init(root: Path, s: demo.DemoSettings, teacher: Path, seed: int, llm: str | None = None) -> Path:
    """The seed's student init, composed once (a lock-free race between arms is settled by an atomic rename):
    the teacher's tower + a fresh projector + a random-init LM, or the given pretrained `llm`."""
    from kd_train.student import compose_student

    init = root / "init"
    if (init / "config.json").exists():
        return init
    tmp = root.with_name(f"{root.name}.tmp.{os.getpid()}")
    if llm is None:
        made = demo.make_student(tmp, s, teacher, seed=seed)
    else:
        made = compose_student(tmp / "init", vision=str(teacher), llm=llm, processor_from=str(teacher), seed=seed)
    return _settle(made, init, tmp)


def _settle(made: Path, init: Path, tmp: Path) -> Path:
    """Move a composed init into place; another arm of this seed that got there first made an identical one."""
    init.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.rename(made, init)
    except OSError:
        pass
    shutil.rmtree(tmp, ignore_errors=True)
    return init


def _other_tokenizer_student(root: Path, s: demo.DemoSettings, teacher: Path, seed: int,
                             llm: str | None = None) -> Path:
    """Setting X's student init (once per seed, settled by an atomic rename like `_student_init`): the teacher's
    tower + a fresh projector + the same small random-init LM as the other students, but reading its own tokenizer:
    byte-level BPE trained on the same text with X_VOCAB entries, whose chat template places the image token.
    `kd student compose --processor-from` takes that tokenizer from a tiny LLaVA of that vocabulary (only its
    tokenizer is used; the LM's random embeddings mean nothing yet either way)."""
    from kd_eval.tiny import make_tiny_teacher
    from kd_train.student import compose_student

    if llm is not None:
        raise ValueError("setting X composes its own student LM")
    init = root / "init"
    if (init / "config.json").exists():
        return init
    tmp = root.with_name(f"{root.name}.tmp.{os.getpid()}")
    lm = make_tiny_teacher(tmp / "llm", "causal-lm", hidden_size=s.student_hidden, num_layers=s.student_layers,
                           seed=seed, vocab_size=X_VOCAB, corpus=s.corpus())
    tokenizer_from = make_tiny_teacher(tmp / "tokenizer", "llava", hidden_size=16, num_layers=1, seed=0,
                                       vocab_size=X_VOCAB, corpus=s.corpus())
    made = compose_student(tmp / "init", vision=str(teacher), llm=str(lm), processor_from=str(tokenizer_from),
                           seed=seed)
    return _settle(made, init, tmp)


def run_all(specs: list[dict], jobs: int) -> list[dict]:
    """Each spec in a fresh single-thread process, `jobs` at a time; prints one line per finished run."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "KD_PROGRESS": "lines", "KD_PROGRESS_INTERVAL": "600"}

    def launch(spec: dict) -> dict:
        log = Path(spec["out"]) / "logs" / f"N{spec['n']}-seed{spec['seed']}-{spec['arm']}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "w") as f:
            p = subprocess.run([sys.executable, "-m", "benchmarks.quality", "--run-one", json.dumps(spec)],
                               cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
        if p.returncode != 0:
            raise RuntimeError(f"run {spec['arm']} N={spec['n']} seed {spec['seed']} failed; see {log}")
        return json.loads((Path(spec["out"]) / f"N{spec['n']}" / f"seed-{spec['seed']}" / spec["arm"]
                           / "result.json").read_text())

    results = []
    with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
        futures = {pool.submit(launch, s): s for s in specs}
        for fut in concurrent.futures.as_completed(futures):
            r = fut.result()
            results.append(r)
            print(f"[quality] N={r['n']} seed {r['seed']} {r['arm']}: train {r['train_seconds']:.0f} s, "
                  f"overall {100 * r['eval']['overall']['accuracy']:.1f} %, NLL "
                  f"{r['eval']['overall']['answer_nll']:.3f} ({len(results)}/{len(specs)})", flush=True)
    return results


# --------------------------------------------------------------------------------------------- statistics


def task_score(ev: dict, types: list[str]) -> float:
    """Exact match over the gated types (records pooled)."""
    n = sum(ev["per_type"][t]["n"] for t in types)
    return sum(ev["per_type"][t].get("score", ev["per_type"][t]["correct"]) for t in types) / n


def gated_nll(ev: dict, types: list[str]) -> float:
    """Teacher-forced answer NLL (nats/token) over the gated types (tokens pooled)."""
    tok = sum(ev["per_type"][t]["answer_tokens"] for t in types)
    return sum(ev["per_type"][t]["answer_nll"] * ev["per_type"][t]["answer_tokens"] for t in types) / tok


def answer_nats(ev: dict, types: list[str]) -> float:
    """Teacher-forced NLL of the answers in nats per answer over the gated types: the sum over an answer's tokens of
    -log p is -log p(answer text) whatever the tokenizer, so it compares students of different tokenizers (the
    per-token NLL does not: another tokenizer spreads the same answer over another number of tokens)."""
    nats = sum(ev["per_type"][t]["answer_nll"] * ev["per_type"][t]["answer_tokens"] for t in types)
    return nats / sum(ev["per_type"][t]["n"] for t in types)


def bootstrap_mean(xs: list[float], rng: random.Random, n_boot: int = N_BOOT) -> tuple[float, float, float]:
    """(mean, 2.5 %, 97.5 %) of the mean, seeds resampled with replacement."""
    m = sum(xs) / len(xs)
    boots = sorted(sum(rng.choices(xs, k=len(xs))) / len(xs) for _ in range(n_boot))
    return m, boots[int(0.025 * n_boot)], boots[int(0.975 * n_boot) - 1]


def bootstrap_gap(arm: list[float], ce: list[float], teacher: float, rng: random.Random,
                  n_boot: int = N_BOOT) -> tuple[float | None, float | None, float | None]:
    """Gap recovered as a ratio of means, (mean(arm) - mean(ce)) / (teacher - mean(ce)), with a bootstrap interval
    (paired: the same resampled seeds for both); None where the teacher is not beyond the baseline."""
    def ratio(idx: list[int]) -> float | None:
        a = sum(arm[i] for i in idx) / len(idx)
        c = sum(ce[i] for i in idx) / len(idx)
        return None if abs(teacher - c) < 1e-9 else (a - c) / (teacher - c)

    k = len(arm)
    point = ratio(list(range(k)))
    boots = sorted(r for r in (ratio([rng.randrange(k) for _ in range(k)]) for _ in range(n_boot)) if r is not None)
    if point is None or not boots:
        return None, None, None
    return point, boots[int(0.025 * len(boots))], boots[int(0.975 * len(boots)) - 1]


def summarise(results: list[dict], teacher_eval: dict, gated: list[str], seed_list: list[int]) -> dict:
    rng = random.Random(0)
    teacher = {"task": task_score(teacher_eval, gated), "nll": gated_nll(teacher_eval, gated),
               "nats": answer_nats(teacher_eval, gated), "overall": teacher_eval["overall"]["accuracy"]}
    by = {(r["n"], r["arm"], r["seed"]): r for r in results}
    out: dict[str, Any] = {"teacher": teacher, "by_n": {}}
    for n in sorted({r["n"] for r in results}):
        arms = [a for a in ALL_ARMS if any((n, a, s) in by for s in seed_list)]
        table, vs_ce = {}, {}
        for arm in arms:
            seeds = [s for s in seed_list if (n, arm, s) in by]
            task = [task_score(by[(n, arm, s)]["eval"], gated) for s in seeds]
            nll = [gated_nll(by[(n, arm, s)]["eval"], gated) for s in seeds]
            overall = [by[(n, arm, s)]["eval"]["overall"]["accuracy"] for s in seeds]
            nats = [answer_nats(by[(n, arm, s)]["eval"], gated) for s in seeds]
            table[arm] = {"seeds": seeds, "task": task, "nll": nll, "nats": nats, "overall": overall,
                          "nats_mean_sd": report.mean_spread(nats),
                          "task_mean_sd": report.mean_spread(task), "nll_mean_sd": report.mean_spread(nll),
                          "per_type": {t: report.mean_spread([by[(n, arm, s)]["eval"]["per_type"][t]["accuracy"]
                                                              for s in seeds])
                                       for t in by[(n, arm, seeds[0])]["eval"]["per_type"]},
                          "train_seconds": report.mean_spread([by[(n, arm, s)]["train_seconds"] for s in seeds])}
            if all(by[(n, arm, s)].get("eval_dpt") for s in seeds):  # setting C: also scored right after DPT
                dpt = [task_score(by[(n, arm, s)]["eval_dpt"], gated) for s in seeds]
                table[arm]["task_after_dpt"] = dpt
                table[arm]["task_after_dpt_mean_sd"] = report.mean_spread(dpt)
                table[arm]["nll_after_dpt_mean_sd"] = report.mean_spread(
                    [gated_nll(by[(n, arm, s)]["eval_dpt"], gated) for s in seeds])
        for arm in arms:
            base = BASELINE_OF.get(arm, "ce")
            if arm == base or base not in table:
                continue
            seeds = [s for s in table[arm]["seeds"] if s in table[base]["seeds"]]
            if len(seeds) < 2:
                continue
            pick = lambda a, key: [table[a][key][table[a]["seeds"].index(s)] for s in seeds]  # noqa: E731
            d_task = [x - y for x, y in zip(pick(arm, "task"), pick(base, "task"))]
            d_nll = [x - y for x, y in zip(pick(arm, "nll"), pick(base, "nll"))]
            d_nats = [x - y for x, y in zip(pick(arm, "nats"), pick(base, "nats"))]
            vs_ce[arm] = {
                "baseline": base, "seeds": seeds, "task_diff_per_seed": d_task, "nll_diff_per_seed": d_nll,
                "nats_diff_per_seed": d_nats, "nats_diff": bootstrap_mean(d_nats, rng),
                "task_diff": bootstrap_mean(d_task, rng), "nll_diff": bootstrap_mean(d_nll, rng),
                "task_gap": bootstrap_gap(pick(arm, "task"), pick(base, "task"), teacher["task"], rng),
                "nll_gap": bootstrap_gap(pick(arm, "nll"), pick(base, "nll"), teacher["nll"], rng)}
        cache_vs_exact = _paired(table, "kd", "kd-exact", rng)
        out["by_n"][str(n)] = {"table": table, "vs_ce": vs_ce, "cache_vs_exact": cache_vs_exact,
                               "sampled_vs_topk": _paired(table, "kd-sampled", "kd-topk-eq", rng),
                               "sampled_vs_exact": _paired(table, "kd-sampled", "kd-exact", rng),
                               "topk64_vs_exact": _paired(table, "kd-topk64", "kd-exact", rng),
                               "cross_vs_same": {arm: r for arm, base in BASELINE_OF.items()
                                                 if arm != base and (r := _gain_ratio(table, arm, rng)) is not None}}
    return out


def _gain_ratio(table: dict, arm: str, rng: random.Random) -> dict | None:
    """Setting X's second target: the cross-tokenizer gain over its own CE student as a share of the same-tokenizer
    gain (kd − ce), on the task score and on the answer NLL in nats per answer (tokenizer-independent): a ratio of
    mean gains, with a bootstrap interval over the seeds all four arms ran (resampled jointly)."""
    base, need = BASELINE_OF[arm], (arm, BASELINE_OF[arm], "kd", "ce")
    if any(a not in table for a in need):
        return None
    seeds = [s for s in table["ce"]["seeds"] if all(s in table[a]["seeds"] for a in need)]
    if len(seeds) < 2:
        return None
    pick = lambda a, key: [table[a][key][table[a]["seeds"].index(s)] for s in seeds]  # noqa: E731
    out = {"seeds": seeds}
    for key in ("task", "nats"):
        cross = [x - y for x, y in zip(pick(arm, key), pick(base, key))]
        same = [x - y for x, y in zip(pick("kd", key), pick("ce", key))]

        def ratio(idx: list[int]) -> float | None:
            s_ = sum(same[i] for i in idx)
            return None if abs(s_) < 1e-12 else sum(cross[i] for i in idx) / s_

        k = len(seeds)
        boots = sorted(r for r in (ratio([rng.randrange(k) for _ in range(k)]) for _ in range(N_BOOT)) if r is not None)
        point = ratio(list(range(k)))
        out[key] = (None, None, None) if point is None or not boots else (
            point, boots[int(0.025 * len(boots))], boots[int(0.975 * len(boots)) - 1])
        out[f"{key}_same_gain"] = sum(same) / k
        out[f"{key}_cross_gain"] = sum(cross) / k
    return out


def _paired(table: dict, a: str, b: str, rng: random.Random) -> dict | None:
    """a − b per seed (both arms ran), task score and NLL, with bootstrap intervals; None with < 2 common seeds."""
    if a not in table or b not in table:
        return None
    seeds = [s for s in table[a]["seeds"] if s in table[b]["seeds"]]
    if len(seeds) < 2:
        return None
    pick = lambda arm, key: [table[arm][key][table[arm]["seeds"].index(s)] for s in seeds]  # noqa: E731
    return {"seeds": seeds,
            "task_diff": bootstrap_mean([x - y for x, y in zip(pick(a, "task"), pick(b, "task"))], rng),
            "nll_diff": bootstrap_mean([x - y for x, y in zip(pick(a, "nll"), pick(b, "nll"))], rng)}


# --------------------------------------------------------------------------------------------- report


def _ci(t: tuple | list | None, scale: float = 100.0, digits: int = 1) -> str:
    if not t or t[0] is None:
        return "–"
    m, lo, hi = t
    return f"{scale * m:+.{digits}f} [{scale * lo:+.{digits}f}, {scale * hi:+.{digits}f}]"


def _ms(d: dict, scale: float = 100.0, digits: int = 1) -> str:
    return "–" if d["mean"] is None else f"{scale * d['mean']:.{digits}f} ± {scale * d['sd']:.{digits}f}"


TITLES = {"A": "Setting A: scarce labels, long schedule", "B": "Setting B: ambiguous answers, one pass over fresh records",
          "C": "Setting C: visual terms that carry signal (16 visual tokens, text-pretrained student LM)",
          "X": "Setting X: one cache, students of another tokenizer"}
DISCUSSION = ("<!-- discussion (kept when benchmarks/quality.py rewrites this file) -->", "<!-- /discussion -->")


def markdown(payloads: list[dict]) -> str:
    """docs/results.md from the settings' result files (each section regenerated from its JSON)."""
    lines = ["# Results: does distilling from the cache make a better student?", "",
             "Pre-registered studies (issue 11; setting X: issue 20), run by `python -m benchmarks.quality --setting "
             "A|B|C|X|all` (every number below is read from `benchmarks/results/quality_<setting>.json`).", "", *DISCUSSION, ""]
    for payload in payloads:
        lines += section(payload)
    return "\n".join(lines)


def section(payload: dict) -> list[str]:
    sm, gated, setting = payload["summary"], payload["gated_types"], payload.get("setting", "A")
    t, st = sm["teacher"], payload["settings"]
    metric = "exact match (set-F1 / membership for answers with several right forms)"
    lines = [f"## {TITLES[setting]}", "",
             f"* date: {payload['date']}; machine: {payload['machine']}",
             f"* command: `{payload['command']}` ({payload['wall_minutes']:.0f} min wall for this invocation, which "
             f"reuses finished runs; the student runs took {_compute_minutes(payload):.0f} min of single-thread "
             f"compute, {payload['jobs']} processes at a time); raw numbers: "
             f"[`benchmarks/results/quality_{setting}.json`](../benchmarks/results/quality_{setting}.json)",
             f"* teacher: tiny LLaVA trained once from random init ({st['teacher_steps']} steps, "
             f"{payload['teacher_seconds']:.0f} s of optimizer steps); test split of "
             f"{payload['teacher_eval']['overall']['n']} records.",
             f"* **teacher gate** (declared before any student ran): question types where the teacher reaches "
             f"≥ {GATE:.0%}: **{', '.join(gated)}**. The primary metrics use these types only. Teacher per type: "
             + ", ".join(f"{k} {100 * v['accuracy']:.0f} %" for k, v in sorted(payload['teacher_eval']['per_type'].items()))
             + ".",
             f"* teacher on the gated types: task score {100 * t['task']:.1f} %, answer NLL {t['nll']:.3f} nats/token.",
             f"* students: per seed (seeds {', '.join(map(str, payload['seeds']))}) one init shared by every arm; DPT → "
             f"SFT → DFT, {st['student_steps']} steps each, batch {st['batch_size']}, lr {st['student_lr']:g}, on N "
             "caption and N instruction records"
             + (" (a pool disjoint from the teacher's: every record fresh, seen once per stage)." if setting == "B"
                else " (the first N of the teacher's)."),
             "* arms: " + "; ".join(f"`{a}` {LABELS[a]}" for a in sm["by_n"][next(iter(sm["by_n"]))]["table"]) + ".",
             # results written before the visual-row default changed carry no cache_targets: top-64 on every row
             "* the cache the KD arms read by default: " + ", ".join(
                 f"{rows} rows {kind}" for rows, kind in payload.get(
                     "cache_targets", {"response": "top-64 + tail", "visual": "top-64 + tail (the default then)"}).items())
             + ".",
             f"* metrics: task score = {metric} over the gated types; NLL = held-out teacher-forced answer NLL over the "
             "gated types (lower is better). Differences are arm − CE per seed; brackets are 95 % bootstrap intervals "
             "over seeds. Gap recovered = (arm − CE) / (teacher − CE), ratio of the means.", ""]
    if setting == "X":
        lines[-1:-1] = [
            f"* other-tokenizer students (`x-*` arms): the same tower, projector and LM sizes and seeds, but the LM reads "
            f"its own byte-level BPE tokenizer trained on the same text with {payload.get('x_vocab', X_VOCAB)} entries "
            f"(the teacher's has {st['vocab_size']}), so the same answer is split into other, shorter tokens; they "
            "train from the very same cache with `--cross-tokenizer uld` or `hybrid`, and are compared with the CE "
            "student of their own tokenizer.",
            "* answer NLL in nats per answer (the per-token NLL summed over each answer's tokens, averaged over "
            "answers) is the one NLL that compares students of different tokenizers; the per-token column is "
            "comparable only within one tokenizer.",
            "* pre-registered targets: (1) x-KD − x-CE 95 % interval above zero (NLL: below zero) on the answer NLL "
            "and on the task score; (2) the cross-tokenizer gain at least half the same-tokenizer gain (kd − ce) on "
            "both."]
    ent = payload.get("cached_entropy")
    if ent:
        lines += ["Entropy of the cached teacher distribution at the answer's first slot (the first answer token; "
                  "describe-any: the size word after its article), per question type, in nats. A teacher calibrated "
                  "to the data's ambiguity shows about log of the number of right words there:",
                  "", "| type | records | mean cached entropy | mean log(right words at the slot) |",
                  "|---|---:|---:|---:|"]
        lines += [f"| {k} | {v['records']} | {v['mean_entropy']:.3f} | {v['mean_log_right_first_words']:.3f} |"
                  for k, v in ent.items()]
        lines.append("")
    for n, block in sm["by_n"].items():
        lines += [f"### N = {n} records per stage", "",
                  "| arm | task score % (mean ± sd) | answer NLL (mean ± sd) | overall score % | train s/run |",
                  "|---|---:|---:|---:|---:|"]
        nats = setting == "X"
        if nats:
            lines[-2:] = ["| arm | task score % (mean ± sd) | answer NLL, nats/token (mean ± sd) | answer NLL, nats/answer "
                          "(mean ± sd) | overall score % | train s/run |", "|---|---:|---:|---:|---:|---:|"]
        for arm, row in block["table"].items():
            lines.append(f"| {LABELS[arm]} | {_ms(row['task_mean_sd'])} | {_ms(row['nll_mean_sd'], 1, 3)} | "
                         + (f"{_ms(row['nats_mean_sd'], 1, 3)} | " if nats else "")
                         + f"{_ms(report.mean_spread(row['overall']))} | {row['train_seconds']['mean']:.0f} |")
        lines += ["", "| arm − CE | task score, points [95 % CI] | gap recovered (task) [95 % CI] | "
                  "answer NLL [95 % CI] | gap recovered (NLL) [95 % CI] |"
                  + (" answer NLL, nats/answer [95 % CI] |" if nats else ""),
                  "|---|---:|---:|---:|---:|" + ("---:|" if nats else "")]
        for arm, d in block["vs_ce"].items():
            base = d.get("baseline", "ce")
            name = LABELS[arm] + ("" if base == "ce" else f" (− {LABELS[base]})")
            lines.append(f"| {name} | {_ci(d['task_diff'])} | {_ci(d['task_gap'], 100, 0)} % | "
                         f"{_ci(d['nll_diff'], 1, 3)} | {_ci(d['nll_gap'], 100, 0)} % |"
                         + (f" {_ci(d['nats_diff'], 1, 3)} |" if nats else ""))
        for arm, g in (block.get("cross_vs_same") or {}).items():
            d = block["vs_ce"][arm]
            met1 = d["task_diff"][1] > 0 and d["nats_diff"][2] < 0
            met2 = all(g[k][0] is not None and g[k][0] >= 0.5 for k in ("task", "nats"))
            lines += ["", f"**{LABELS[arm]}** (paired over seeds {g['seeds']}): cross-tokenizer gain over its CE "
                      f"{100 * g['task_cross_gain']:+.1f} points of task score and {g['nats_cross_gain']:+.3f} nats per "
                      f"answer, against the same-tokenizer gain {100 * g['task_same_gain']:+.1f} points and "
                      f"{g['nats_same_gain']:+.3f} nats: a share of {_ci(g['task'], 100, 0)} % (task) and "
                      f"{_ci(g['nats'], 100, 0)} % (NLL). Target 1 (x-KD − x-CE above zero on both): "
                      f"**{'met' if met1 else 'missed'}**; target 2 (share ≥ 50 % on both): "
                      f"**{'met' if met2 else 'missed'}** (point estimates; the intervals are above)."]
        if all("task_after_dpt_mean_sd" in row for row in block["table"].values()):
            lines += ["", "Right after DPT (the projector alone trained; the pretrained LM frozen):", "",
                      "| arm | task score % after DPT | answer NLL after DPT |", "|---|---:|---:|"]
            lines += [f"| {LABELS[a]} | {_ms(row['task_after_dpt_mean_sd'])} | {_ms(row['nll_after_dpt_mean_sd'], 1, 3)} |"
                      for a, row in block["table"].items()]
        if block.get("sampled_vs_topk"):
            c, eb = block["sampled_vs_topk"], payload.get("equal_bytes", {})
            sizes = {str(k): v for k, v in eb.get("topk_bytes_per_text_row", {}).items()}
            lines += ["", f"Top-k vs sampled at equal bytes (paired over seeds {c['seeds']}): sampled ({SAMPLES} draws, "
                      f"{eb.get('sampled_bytes_per_text_row')} B per text row) − top-{eb.get('chosen_k')} "
                      f"({sizes.get(str(eb.get('chosen_k')))} B; candidates {sizes}): task score "
                      f"{_ci(c['task_diff'])} points, answer NLL {_ci(c['nll_diff'], 1, 3)}."]
        for key, what in (("cache_vs_exact", "Cache with the default targets − exact online targets"),
                          ("topk64_vs_exact", "Cache with top-64 on the visual rows too − exact online targets"),
                          ("sampled_vs_exact", "Cache with sampled targets − exact online targets")):
            if block.get(key):
                c = block[key]
                lines += ["", f"{what} (paired over seeds {c['seeds']}): task score {_ci(c['task_diff'])} points, "
                          f"answer NLL {_ci(c['nll_diff'], 1, 3)}."]
        lines += ["", "Per question type, score % (mean ± sd over seeds):", "",
                  "| type | " + " | ".join(LABELS[a] for a in block["table"]) + " |",
                  "|---|" + "---:|" * len(block["table"])]
        types = sorted(next(iter(block["table"].values()))["per_type"])
        for ty in types:
            lines.append(f"| {ty}{' (gated)' if ty in gated else ''} | "
                         + " | ".join(_ms(block["table"][a]["per_type"][ty]) for a in block["table"]) + " |")
        lines.append("")
    return lines


def _compute_minutes(payload: dict) -> float:
    return sum(r.get("train_seconds", 0) + r.get("eval_seconds", 0) for r in payload.get("runs", [])) / 60


def write_docs(results: list[Path], docs_md: Path) -> None:
    """Regenerate docs_md from the result files that exist, keeping its hand-written discussion."""
    payloads = [json.loads(p.read_text(encoding="utf-8")) for p in results if p.exists()]
    text = markdown(payloads)
    if docs_md.exists():
        old = docs_md.read_text(encoding="utf-8")
        a, b = old.find(DISCUSSION[0]), old.find(DISCUSSION[1])
        if 0 <= a < b:
            text = text.replace("\n".join(DISCUSSION), old[a:b + len(DISCUSSION[1])])
    docs_md.write_text(text, encoding="utf-8")


# --------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--setting", choices=("A", "B", "C", "X", "all"), default="A",
                    help="A: scarce labels, long schedule; B: ambiguous answers, one pass over fresh records; "
                         "C: 16 visual tokens, a text-pretrained student LM frozen in DPT, KD terms one at a time; "
                         "X: students of another tokenizer from the same cache (--cross-tokenizer); "
                         "all: A, B, then C (about two hours on 2 cores)")
    ap.add_argument("--out", help="working folder (reused on a rerun) [default: bench-out/quality-<setting>]")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--n", type=int, nargs="+", help="records per stage [default: A 200 1000; B 4800]")
    ap.add_argument("--arms", nargs="+", choices=ALL_ARMS, help="[default: every arm of the setting]")
    ap.add_argument("--large-n-arms", nargs="+", choices=ALL_ARMS, default=["ce", "kd", "kd-topk64"],
                    help="arms run at the N values above the smallest (the controls matter where labels are scarce)")
    ap.add_argument("--jobs", type=int, default=2, help="single-thread processes at a time")
    ap.add_argument("--threads", type=int, default=2,
                    help="torch threads for the shared steps (teacher, caches); 1 on a machine busy with other work, "
                         "where two threads run many times slower per step")
    ap.add_argument("--quick", action="store_true", help="smoke run: tiny sizes, numbers meaningless")
    ap.add_argument("--results", help="[default: benchmarks/results/quality_<setting>.json]")
    ap.add_argument("--docs", default=str(ROOT / "docs" / "results.md"))
    ap.add_argument("--run-one", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.setting == "all":  # each setting in turn, with the same options; each reuses its finished runs
        rest = [a for a in (sys.argv[1:] if argv is None else argv)]
        i = rest.index("--setting")
        for setting in ("A", "B", "C"):
            one = rest[:i] + ["--setting", setting] + rest[i + 2:]
            if args.out:  # one working folder per setting below the given one
                j = one.index("--out")
                one[j + 1] = str(Path(args.out) / setting)
            main(one)
        return
    if args.run_one:
        run_one(json.loads(args.run_one))
        return
    t0 = time.perf_counter()
    b = args.setting == "B"
    s = {"A": (SETTING_A, QUICK), "B": (SETTING_B, QUICK_B), "C": (SETTING_C, QUICK_C),
         "X": (SETTING_X, QUICK_X)}[args.setting][args.quick]
    out = Path(args.out or ("bench-out/quality" if args.setting == "A" else f"bench-out/quality-{args.setting}"))
    args.n = args.n or ([64] if args.quick and b else [B_POOL] if b else [200] if args.setting in "CX" else [200, 1000])
    args.arms = args.arms or list({"A": ARMS, "B": ARMS_B, "C": ARMS_C, "X": ARMS_X}[args.setting])
    default_results = str(ROOT / "benchmarks" / "results" / f"quality_{args.setting}.json")
    args.results = args.results or default_results
    with demo._cpu_threads(args.threads):
        shared = prepare(out, s, args.n, progress=False, arms=args.arms)
    print(f"[quality] teacher ready; gated types: {shared['gated']}", flush=True)
    specs = [{"settings": s.to_dict(), "out": str(out), "seed": seed, "arm": arm, "n": n,
              "teacher": str(shared["teacher"]), "val": str(shared["val"]),
              "data": [str(p) for p in dataclasses.astuple(shared["subsets"][n]["data"])],
              "caches": {k: [str(p) for p in v] for k, v in shared["subsets"][n]["caches"].items()},
              "pretrained_llm": shared["pretrained_llm"], "eval_dpt": args.setting == "C"}
             for n in args.n for seed in args.seeds for arm in args.arms
             if n == min(args.n) or arm in args.large_n_arms]
    results = run_all(specs, args.jobs)
    summary = summarise(results, shared["teacher_eval"], shared["gated"], args.seeds)
    payload = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
               "machine": report.machine_description(), "command": "python -m benchmarks.quality "
               + " ".join(sys.argv[1:] if argv is None else argv),
               "wall_minutes": (time.perf_counter() - t0) / 60, "jobs": args.jobs, "seeds": args.seeds,
               "settings": s.to_dict(), "gated_types": shared["gated"], "teacher_seconds": shared["teacher_seconds"],
               "teacher_eval": report.summary(shared["teacher_eval"]), "summary": summary,
               "equal_bytes": EQUAL_BYTES, "setting": args.setting, "cached_entropy": shared["entropy"],
               "x_vocab": X_VOCAB if args.setting == "X" else None,
               "cache_targets": cache_targets(shared["subsets"][min(args.n)]["caches"]["default"][1]),
               "runs": sorted(results, key=lambda r: (r["n"], r["seed"], ALL_ARMS.index(r["arm"])))}
    if args.quick and args.results == default_results:  # a smoke run never overwrites the published study
        args.results, args.docs = str(out / "quality_quick.json"), str(out / "results_quick.md")
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    Path(args.results).write_text(json.dumps(payload, indent=1) + "\n", encoding="utf-8")
    published = [ROOT / "benchmarks" / "results" / f"quality_{x}.json" for x in ("A", "B", "C", "X")]
    write_docs([Path(args.results)] if args.results not in map(str, published) else published, Path(args.docs))
    print(f"[quality] wrote {args.results} and {args.docs} ({payload['wall_minutes']:.0f} min)")


if __name__ == "__main__":
    main()
