"""`kd demo`: the whole offline LLaVA-KD pipeline on a procedural dataset, on a CPU, with a report.

1. `kd data synth`: caption + instruction data about coloured shapes (`kd_eval.synth`), and a test split.
2. A teacher MLLM trained from a random init with the trainer's SFT stage (projector + LLM trained, on all the
   caption and instruction training data).
3. `kd cache build` with that teacher over the student's (smaller) caption and instruction data.
4. A clearly smaller student (`kd student compose`: the teacher's vision tower + a fresh projector + a small
   random-init LLM) trained twice from the same init, with the same data, steps and seed: `--recipe baseline`
   (DPT -> SFT -> DFT with CE only) and `--recipe llava-kd` (DPT and DFT distilled from the cache).
5. `kd eval` of teacher, baseline and distilled student on the test split; a table and a report folder
   (markdown, accuracy chart, loss curves per stage, results.json).

Every step goes through the same library calls as the CLI commands, and a finished step is reused when the
demo is rerun into the same folder. `--quick` is a smoke run of the same pipeline (minutes, tiny data, few
steps): its numbers are not meaningful and its report says so.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import safe_open
from transformers.utils import logging as hf_logging

from kd_cache.build import BuildConfig, build
from kd_eval import report, synth
from kd_eval.evaluate import evaluate, format_table
from kd_eval.tiny import make_tiny_teacher
from kd_train.student import compose_student, parameter_part
from kd_train.train import TrainConfig, run as run_training

__all__ = ["DemoResult", "DemoSettings", "FULL", "QUICK", "run_demo", "settings_for"]

MODELS = ("teacher", "baseline", "llava-kd")
# The students' LM starts from random weights (there is no pretrained small LM offline), so every stage trains
# it, DPT included (`kd train --train-llm`); the paper's DPT freezes a *pretrained* LM. Same for both recipes.
STUDENT_OVERRIDES: dict[str, Any] = {"train_llm": True}


@dataclass(frozen=True)
class DemoSettings:
    """Everything that decides what the demo computes (sizes, data, steps). Saved as `<out>/demo.json`."""

    mode: str
    # data (kd_eval.synth); the student trains on the first `student_caption` / `student_train` records
    n_caption: int
    n_train: int
    n_test: int
    student_caption: int
    student_train: int
    image_size: int = 64
    # teacher: a tiny LLaVA (SigLIP tower + Qwen2 LM), trained from its random init
    teacher_hidden: int = 128
    teacher_layers: int = 3
    patch_size: int = 32
    vocab_size: int = 512
    # All parts train, the SigLIP tower included, so the students inherit a tower that already separates colours
    # and shapes. At lr 1e-3 the random-init tower's features collapse and the model never learns to read
    # colours; 3e-4 is stable (see docs/results.md).
    teacher_lr: float = 3e-4
    teacher_steps: int = 1000
    teacher_train_vision: bool = True
    # student: the teacher's vision tower + fresh projector + a smaller random-init Qwen2 LM
    student_hidden: int = 64
    student_layers: int = 2
    student_lr: float = 1e-3
    student_steps: int = 300  # per stage (DPT, SFT, DFT)
    batch_size: int = 16
    # cache and evaluation
    top_k: int = 64
    visual_top_k: int = 64
    max_new_tokens: int = 32  # the longest caption is 31 tokens
    eval_batch_size: int = 50
    # CPU: torch threads and DataLoader workers (1 + 1 uses both cores of a 2-core machine)
    threads: int = 1
    num_workers: int = 1
    # what the data asks (kd_eval.synth): the quality study's setting B uses the ambiguous types
    question_types: tuple[str, ...] = synth.QUESTION_TYPES
    caption_type: str = "describe"

    def corpus(self) -> list[str]:
        """The tokenizer corpus of these questions (the ambiguous types add their prompts)."""
        return synth.corpus(ambiguous=any(t in synth.AMBIGUOUS_TYPES for t in self.question_types)
                            or self.caption_type != "describe")

    def to_dict(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self)))  # JSON types (lists), as demo.json reads back


# The students see 200 caption + 200 instruction records for 300 steps per stage: labels are scarce for the
# schedule, which is where distillation measurably helps (docs/results.md, setting A); with 1000 the edge vanishes.
FULL = DemoSettings(mode="full", n_caption=2000, n_train=3000, n_test=300, student_caption=200,
                    student_train=200)
QUICK = DemoSettings(mode="quick", n_caption=96, n_train=160, n_test=60, student_caption=48, student_train=64,
                     teacher_hidden=64, teacher_layers=2, teacher_steps=30, student_hidden=32, student_layers=1,
                     student_steps=8, max_new_tokens=24, eval_batch_size=30)


def settings_for(quick: bool) -> DemoSettings:
    return QUICK if quick else FULL


@dataclass
class DemoResult:
    """What `run_demo` produced: the printed table, the report's files, per-model results and step timings."""

    out: Path
    settings: DemoSettings
    table: str
    results: dict[str, dict]  # model name -> `evaluate` result (with predictions)
    models: dict[str, str]  # model name -> folder
    timings: dict[str, dict]  # step -> {"seconds": s, "reused": bool}
    gap_recovered: float | None
    report: Path
    files: list[Path] = field(default_factory=list)

    @property
    def wall_seconds(self) -> float:
        return sum(t["seconds"] for t in self.timings.values())

    @property
    def nll_gap_recovered(self) -> float | None:
        """(baseline − llava-kd) / (baseline − teacher) of the held-out answer NLL; None without a gap."""
        nll = {k: r.get("overall", {}).get("answer_nll") for k, r in self.results.items()}
        t, b, k = nll.get("teacher"), nll.get("baseline"), nll.get("llava-kd")
        if None in (t, b, k) or b - t < 1e-3:
            return None
        return (b - k) / (b - t)


# --------------------------------------------------------------------------------------------- steps


@dataclass(frozen=True)
class DemoData:
    root: Path
    images: Path
    teacher_train: Path  # caption + instruction training records (the teacher's data)
    student_caption: Path  # the student's DPT data (a subset)
    student_train: Path  # the student's SFT/DFT data (a subset)
    test: Path


def prepare_data(root: str | os.PathLike, s: DemoSettings, seed: int = 0) -> DemoData:
    """`kd data synth` into `root` (skipped when it already holds this dataset) plus the training subsets."""
    root = Path(root)
    meta = root / "synth.json"
    want = {"caption": s.n_caption, "train": s.n_train, "val": 0, "test": s.n_test}
    have = json.loads(meta.read_text()) if meta.exists() else {}
    if have.get("counts") != want or have.get("seed") != seed or have.get("image_size") != s.image_size:
        paths = synth.generate(root, n_caption=s.n_caption, n_train=s.n_train, n_val=0, n_test=s.n_test, seed=seed,
                               image_size=s.image_size)
    else:
        paths = synth.SynthPaths(root, root / "images", root / "caption_train.json", root / "instruct_train.json",
                                 root / "instruct_val.json", root / "instruct_test.json", meta, have["counts"])
    caption = json.loads(paths.caption_train.read_text(encoding="utf-8"))
    train = json.loads(paths.instruct_train.read_text(encoding="utf-8"))
    data = DemoData(root, paths.image_root, root / "teacher_train.json", root / "student_caption.json",
                    root / "student_train.json", paths.instruct_test)
    for path, records in ((data.teacher_train, caption + train), (data.student_caption, caption[:s.student_caption]),
                          (data.student_train, train[:s.student_train])):
        text = json.dumps(records, ensure_ascii=False) + "\n"
        if not path.exists() or path.read_text(encoding="utf-8") != text:
            _atomic_write(path, text)
    return data


def train_teacher(root: str | os.PathLike, s: DemoSettings, data: DemoData, *, seed: int = 0,
                  progress: bool = False) -> Path:
    """A random-init tiny LLaVA trained with `kd train --stage sft` on all the training data; returns its folder."""

    root = Path(root)
    init = root / "init"
    if not (init / "config.json").exists():
        make_tiny_teacher(init, "llava", hidden_size=s.teacher_hidden, num_layers=s.teacher_layers,
                          image_size=s.image_size, patch_size=s.patch_size, seed=seed, vocab_size=s.vocab_size,
                          corpus=s.corpus())
    n = _count_records(data.teacher_train)
    cfg = TrainConfig(student=str(init), out=str(root / "sft"), stage="sft", data=str(data.teacher_train),
                      images=str(data.images), train_vision=s.teacher_train_vision, train_projector=True,
                      train_llm=True, lr=s.teacher_lr, epochs=_epochs(s.teacher_steps, s.batch_size, n),
                      max_steps=s.teacher_steps, batch_size=s.batch_size, seed=seed, num_workers=s.num_workers,
                      progress=progress)
    return Path(run_training(cfg)[0])


def make_student(root: str | os.PathLike, s: DemoSettings, teacher: str | os.PathLike, *, seed: int = 0) -> Path:
    """`kd student compose`: the teacher's vision tower + a fresh projector + a small random-init Qwen2 LM.

    The LM is built with the same tokenizer corpus and vocabulary size as the teacher (the tokenizer is a
    deterministic function of both), and the processor comes from the teacher, so the student reads the
    cache's token ids."""

    root = Path(root)
    llm, init = root / "llm", root / "init"
    if not (init / "config.json").exists():
        if not (llm / "config.json").exists():
            make_tiny_teacher(llm, "causal-lm", hidden_size=s.student_hidden, num_layers=s.student_layers,
                              seed=seed, vocab_size=s.vocab_size, corpus=s.corpus())
        with _quiet_logger("kd_train"):
            compose_student(init, vision=str(teacher), llm=str(llm), processor_from=str(teacher), seed=seed)
    return init


def build_caches(root: str | os.PathLike, s: DemoSettings, teacher: str | os.PathLike, data: DemoData, *,
                 progress: bool = False, **options: Any) -> tuple[Path, Path]:
    """`kd cache build` over the student's caption and instruction data; returns (caption cache, instruct cache).
    `options`: other BuildConfig fields. A complete cache is reused as it is (the builder checks that its
    configuration matches)."""

    root = Path(root)
    outs = []
    for name, path in (("caption", data.student_caption), ("instruct", data.student_train)):
        out = root / name
        build(BuildConfig(teacher=str(teacher), data=str(path), images=str(data.images), out=str(out),
                          top_k=s.top_k, visual_top_k=s.visual_top_k, batch_size=32, progress=progress,
                          **options))
        outs.append(out)
    return outs[0], outs[1]


def train_student(out: str | os.PathLike, recipe: str, s: DemoSettings, student: str | os.PathLike,
                  data: DemoData, caches: tuple[Path, Path] | None = None, *, seed: int = 0,
                  progress: bool = False, online_teacher: str | os.PathLike | None = None,
                  **overrides: Any) -> list[Path]:
    """`kd train --recipe <recipe>` (DPT -> SFT -> DFT) from `student`; returns each stage's final folder.

    Both recipes get the same data, steps per stage, batch size, learning rate and seed. `caches` (caption,
    instruct) feed llava-kd; `online_teacher` runs the teacher every step instead (the reference mode).
    `overrides` are further `TrainConfig` fields (e.g. loss weights for ablations)."""

    kd = recipe == "llava-kd"
    n = min(_count_records(data.student_caption), _count_records(data.student_train))
    cfg = TrainConfig(student=str(student), out=str(out), recipe=recipe, data=str(data.student_train),
                      images=str(data.images), dpt_data=str(data.student_caption), dpt_images=str(data.images),
                      # The baseline reads no cache (its stages are CE only), but TrainConfig validates each recipe
                      # stage like a lone `--stage dpt/dft`, which asks for one: pass it, it stays unread.
                      cache=str(caches[1]) if caches and online_teacher is None else None,
                      dpt_cache=str(caches[0]) if caches and online_teacher is None else None,
                      online_teacher=str(online_teacher) if kd and online_teacher is not None else None,
                      lr=s.student_lr, epochs=_epochs(s.student_steps, s.batch_size, n), max_steps=s.student_steps,
                      batch_size=s.batch_size, seed=seed, num_workers=s.num_workers, progress=progress,
                      **{**STUDENT_OVERRIDES, **overrides})
    return [Path(p) for p in run_training(cfg)]


def evaluate_model(model: str | os.PathLike, data: DemoData, s: DemoSettings, out_json: str | os.PathLike, *,
                   progress: bool = False) -> dict:
    """`kd eval` on the test split; the result is saved to `out_json` and reused while the model is unchanged."""

    out_json = Path(out_json)
    stamp = _model_stamp(model)
    if out_json.exists():
        saved = json.loads(out_json.read_text(encoding="utf-8"))
        if saved.get("model_stamp") == stamp and saved.get("data") == str(data.test):
            return saved
    result = evaluate(model, str(data.test), str(data.images), batch_size=s.eval_batch_size,
                      max_new_tokens=s.max_new_tokens, progress=progress)
    result["model_stamp"] = stamp
    out_json.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(out_json, json.dumps(result, indent=1, ensure_ascii=False) + "\n")
    return result


# --------------------------------------------------------------------------------------------- the demo


def run_demo(out: str | os.PathLike, *, quick: bool = False, seed: int = 0, progress: bool = True,
             echo: Callable[[str], None] | None = None) -> DemoResult:
    """Run (or finish) the demo in `out`; returns the comparison, also written to `<out>/report/`.

    Rerunning into the same folder reuses every finished step. A folder holding a demo with other settings
    (e.g. `--quick` and full) is refused rather than mixed."""
    s = settings_for(quick)
    out = Path(out)
    say = echo if echo is not None else (lambda msg: print(msg, file=sys.stderr, flush=True))
    if not progress:
        say = lambda msg: None  # noqa: E731
    _claim_folder(out, s, seed)
    timings: dict[str, dict] = {}

    def step(name: str, done: bool, what: str, fn: Callable[[], Any]) -> Any:
        say(f"[kd demo] {name}: {'reusing ' if done else ''}{what}")
        t0 = time.perf_counter()
        value = fn()
        timings[name] = {"seconds": round(time.perf_counter() - t0, 2), "reused": done}
        return value

    with _cpu_threads(s.threads), _quiet_transformers():
        data = step("data", (out / "data" / "synth.json").exists(),
                    f"kd data synth ({s.n_caption} caption, {s.n_train} train, {s.n_test} test records)",
                    lambda: prepare_data(out / "data", s, seed))
        teacher_final = out / "teacher" / "sft" / "final"
        teacher = step("teacher", _done(teacher_final),
                       f"teacher (hidden {s.teacher_hidden}, {s.teacher_layers} layers) trained from scratch, "
                       f"kd train --stage sft, {s.teacher_steps} steps",
                       lambda: train_teacher(out / "teacher", s, data, seed=seed, progress=progress))
        student = step("student", _done(out / "student" / "init"),
                       f"kd student compose (teacher's vision tower + fresh projector + hidden {s.student_hidden}, "
                       f"{s.student_layers}-layer LM)", lambda: make_student(out / "student", s, teacher, seed=seed))
        caches = step("cache", all((out / "cache" / n / "manifest.json").exists() for n in ("caption", "instruct")),
                      "kd cache build (caption + instruct data of the student)",
                      lambda: build_caches(out / "cache", s, teacher, data, progress=progress))
        runs = {}
        for recipe in ("baseline", "llava-kd"):
            runs[recipe] = step(recipe, _done(out / "runs" / recipe / "dft" / "final"),
                                f"kd train --recipe {recipe} ({s.student_steps} steps per stage)",
                                lambda r=recipe: train_student(out / "runs" / r, r, s, student, data, caches,
                                                               seed=seed, progress=progress))
        models = {"teacher": str(teacher), "baseline": str(runs["baseline"][-1]), "llava-kd": str(runs["llava-kd"][-1])}
        results = {}
        for name, path in models.items():
            results[name] = step(f"eval {name}", _eval_done(out / "eval" / f"{name}.json", path),
                                 f"kd eval {name} on {s.n_test} test records",
                                 lambda n=name, p=path: evaluate_model(p, data, s, out / "eval" / f"{n}.json",
                                                                       progress=progress))
        t0 = time.perf_counter()
        say("[kd demo] report")
        result = _write_report(out, s, seed, data, models, results, timings, teacher, student)
        timings["report"] = {"seconds": round(time.perf_counter() - t0, 2), "reused": False}
        _rewrite_timings(result)
    return result


# --------------------------------------------------------------------------------------------- report


def labelled(results: dict[str, dict]) -> list[dict]:
    """Results renamed to their model names, for `format_table` (every model folder is called 'final')."""
    return [{**r, "model": name} for name, r in results.items()]


def _write_report(out: Path, s: DemoSettings, seed: int, data: DemoData, models: dict[str, str],
                  results: dict[str, dict], timings: dict, teacher: Path, student: Path) -> DemoResult:
    rdir = out / "report"
    rdir.mkdir(parents=True, exist_ok=True)
    for old in rdir.glob("*.png"):
        old.unlink()
    acc = {name: report.accuracy(r) for name, r in results.items()}
    gap = report.gap_recovered(acc["teacher"], acc["baseline"], acc["llava-kd"])
    table = format_table(labelled(results))
    files: list[Path] = []
    chart = report.plot_accuracy(results, rdir / "accuracy.png",
                                 title=f"kd demo ({s.mode}): exact-match accuracy on the test split")
    if chart is not None:
        files.append(chart)
    curves = {"teacher": {"sft": report.read_metrics(out / "teacher" / "sft" / "metrics.jsonl")}}
    for recipe in ("baseline", "llava-kd"):
        curves[recipe] = {st: report.read_metrics(out / "runs" / recipe / st / "metrics.jsonl")
                          for st in ("dpt", "sft", "dft")}
    files += report.plot_losses(curves, rdir)
    sizes = {"teacher": _param_counts(teacher), "student": _param_counts(student)}
    payload = {
        "mode": s.mode,
        "seed": seed,
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": report.machine_description(),
        "settings": s.to_dict(),
        "models": models,
        "parameters": sizes,
        "data": {"test": str(data.test), "teacher_train_records": _count_records(data.teacher_train),
                 "student_caption_records": _count_records(data.student_caption),
                 "student_train_records": _count_records(data.student_train)},
        "accuracy": {name: {t: report.accuracy(r, t) for t in report.question_types([r])}
                     for name, r in results.items()},
        "gap_recovered": gap,
        "results": {name: report.summary(r) for name, r in results.items()},
        "final_losses": {run: {st: _final_terms(rows) for st, rows in stages.items() if rows}
                         for run, stages in curves.items()},
        "timings": timings,
        "files": [f.name for f in files],
    }
    result = DemoResult(out=out, settings=s, table=table, results=results, models=models, timings=timings,
                        gap_recovered=gap, report=rdir / "report.md", files=files)
    _atomic_write(rdir / "results.json", json.dumps(payload, indent=1, ensure_ascii=False) + "\n")
    _atomic_write(rdir / "report.md", _markdown(result, payload, curves))
    return result


def _rewrite_timings(result: DemoResult) -> None:
    """Put the report step's own time into results.json and report.md after the fact."""
    path = result.report.parent / "results.json"
    payload = json.loads(path.read_text(encoding="utf-8"))
    payload["timings"] = result.timings
    payload["wall_seconds"] = round(result.wall_seconds, 1)
    _atomic_write(path, json.dumps(payload, indent=1, ensure_ascii=False) + "\n")
    md = result.report.read_text(encoding="utf-8")
    start, end = md.find("<!-- timings -->"), md.find("<!-- /timings -->")
    if start >= 0 and end > start:
        md = md[:start] + _timings_md(result.timings) + md[end:]
        _atomic_write(result.report, md)


def _timings_md(timings: dict) -> str:
    lines = ["<!-- timings -->", "| step | seconds | |", "|---|---:|---|"]
    for name, t in timings.items():
        lines.append(f"| {name} | {t['seconds']:.1f} | {'reused from an earlier run' if t['reused'] else ''} |")
    total = sum(t["seconds"] for t in timings.values())
    fresh = all(not t["reused"] for t in timings.values())
    lines.append(f"| **total** | **{total:.1f}** | {'one fresh run' if fresh else 'this invocation only'} |")
    return "\n".join(lines) + "\n"


def _markdown(result: DemoResult, payload: dict, curves: dict) -> str:
    s = result.settings
    acc = payload["accuracy"]
    sizes = payload["parameters"]
    lines = [f"# kd demo report ({s.mode})", ""]
    if s.mode == "quick":
        lines += ["> **Smoke run (`--quick`).** The same pipeline as the full demo on tiny data with a handful of "
                  "steps, to check that every step works end to end in about two minutes. The teacher has not "
                  "learned the task, so the accuracies below say nothing about distillation. Run `kd demo` "
                  "without `--quick` for the real comparison.", ""]
    lines += [f"* date: {payload['date']}", f"* machine: {payload['machine']}",
              f"* seed: {payload['seed']}; CPU threads {s.threads} + {s.num_workers} DataLoader worker(s)", ""]
    lines += ["## Result", "", "Exact-match accuracy (%) on the test split (greedy decoding, `kd eval`):", "",
              report.markdown_accuracy_table(result.results), ""]
    t, b, k = acc["teacher"]["overall"], acc["baseline"]["overall"], acc["llava-kd"]["overall"]
    if result.gap_recovered is None:
        lines += [f"Gap recovered: n/a — the teacher ({100 * t:.1f} %) is not at least 2 points above the baseline "
                  f"({100 * b:.1f} %), so there is no gap to recover.", ""]
    else:
        lines += [f"**Gap recovered** by LLaVA-KD = (llava-kd − baseline) / (teacher − baseline) = "
                  f"({100 * k:.1f} − {100 * b:.1f}) / ({100 * t:.1f} − {100 * b:.1f}) = "
                  f"**{100 * result.gap_recovered:.0f} %** (one seed; see docs/results.md for the 5-seed study).",
                  ""]
    if result.nll_gap_recovered is not None:
        lines += [f"Held-out answer NLL (nats/token, teacher-forced): LLaVA-KD recovers "
                  f"**{100 * result.nll_gap_recovered:.0f} %** of (baseline − teacher).", ""]
    if "accuracy.png" in payload["files"]:
        lines += ["![accuracy per model and question type](accuracy.png)", ""]
    lines += ["## Setting", "",
              "| | teacher | students (baseline, llava-kd) |", "|---|---|---|",
              f"| model | tiny LLaVA: SigLIP tower + Qwen2 LM, hidden {s.teacher_hidden}, {s.teacher_layers} LM layers | "
              f"teacher's vision tower + fresh MLP projector + Qwen2 LM, hidden {s.student_hidden}, "
              f"{s.student_layers} LM layer(s) |",
              f"| parameters | {_fmt_params(sizes['teacher'])} | {_fmt_params(sizes['student'])} |",
              f"| init | random (vision tower {'trained too' if s.teacher_train_vision else 'kept at its random init'}) | "
              "vision tower copied from the teacher (frozen), projector and LM random; the LM trains in every stage "
              "(`--train-llm`, DPT included: it has no pretraining) |",
              f"| training data | {payload['data']['teacher_train_records']} records (caption + instruction) | "
              f"{payload['data']['student_caption_records']} caption (DPT) + "
              f"{payload['data']['student_train_records']} instruction records (SFT, DFT) |",
              f"| schedule | `kd train --stage sft`, {s.teacher_steps} steps, lr {s.teacher_lr:g}, batch {s.batch_size} | "
              f"`kd train --recipe baseline` / `--recipe llava-kd`: DPT, SFT, DFT × {s.student_steps} steps, "
              f"lr {s.student_lr:g}, batch {s.batch_size}, same init and seed |",
              "", f"Images {s.image_size} px, {(s.image_size // s.patch_size) ** 2} visual tokens per image; "
              f"vocabulary {s.vocab_size}; cache: top-{s.top_k} + tail on the response rows, sampled draws on the "
              f"visual rows (the build's defaults), Gram matrices for RDist; evaluation: greedy, up to {s.max_new_tokens} new tokens, "
              f"{payload['results']['teacher']['n']} test records.", ""]
    lines += ["## Wall time", "", _timings_md(result.timings) + "<!-- /timings -->", ""]
    lines += ["## Training curves", "", "Running mean of each logged term per optimizer step (log scale); "
              "`ce` is the cross-entropy on answer tokens, `mdist_*` / `rdist` the distillation terms.", ""]
    for run, stages in curves.items():
        for st, rows in stages.items():
            name = f"loss_{run}_{st}.png"
            if name in payload["files"]:
                lines.append(f"![{run} {st}]({name})")
    lines += ["", "Final logged values (mean of the last 10 % of steps):", "",
              "| run | stage | " + " | ".join(report.LOSS_TERMS) + " |", "|---|---|" + "---:|" * len(report.LOSS_TERMS)]
    for run, stages in payload["final_losses"].items():
        for st, terms in stages.items():
            cells = ["–" if terms.get(x) is None else f"{terms[x]:.3f}" for x in report.LOSS_TERMS]
            lines.append(f"| {run} | {st} | " + " | ".join(cells) + " |")
    lines += ["", "## Examples", "", "First test record of each question type:", "",
              "| type | question | reference | " + " | ".join(result.results) + " |",
              "|---|---|---|" + "---|" * len(result.results)]
    preds = {name: {p["id"]: p for p in r.get("predictions", [])} for name, r in result.results.items()}
    seen: set[str] = set()
    questions = _questions(payload["data"]["test"])
    for p in result.results["teacher"].get("predictions", []):
        if p["question_type"] in seen:
            continue
        seen.add(p["question_type"])
        cells = []
        for name in result.results:
            q = preds[name].get(p["id"])
            cells.append("–" if q is None else f"{_md(q['prediction'])} {'✓' if q['correct'] else '✗'}")
        lines.append(f"| {p['question_type']} | {_md(questions.get(p['id'], ''))} | {_md(p['reference'])} | "
                     + " | ".join(cells) + " |")
    lines += ["", "## Files", "",
              "* `results.json`: settings, accuracies, gap, timings, final losses (machine-readable)",
              "* `../eval/<model>.json`: every prediction", "* `../runs/<recipe>/<stage>/final`, "
              "`../teacher/sft/final`: the models (transformers folders)", ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------- helpers


def _final_terms(rows: list[dict]) -> dict:
    tail = rows[-max(1, len(rows) // 10):]
    out = {}
    for term in report.LOSS_TERMS:
        vals = [r[term] for r in tail if r.get(term) is not None]
        out[term] = sum(vals) / len(vals) if vals else None
    return out


def _questions(test_path: str) -> dict[str, str]:
    records = json.loads(Path(test_path).read_text(encoding="utf-8"))
    return {r["id"]: r["conversations"][0]["value"].replace("<image>\n", "") for r in records}


def _md(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _param_counts(folder: str | os.PathLike) -> dict[str, int]:
    """Parameters per part (vision, projector, llm) from the safetensors headers, without loading weights."""

    counts = {"vision": 0, "projector": 0, "llm": 0}
    for f in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            for key in st.keys():
                n = 1
                for d in st.get_slice(key).get_shape():
                    n *= d
                try:
                    part = parameter_part(None, key)
                except (ValueError, AttributeError):  # a name outside the three parts
                    part = "llm"
                counts[part] += n
    counts["total"] = sum(counts.values())
    return counts


def _fmt_params(c: dict) -> str:
    m = lambda n: f"{n / 1e6:.2f} M"  # noqa: E731
    return f"{m(c['total'])} (vision {m(c['vision'])}, projector {m(c['projector'])}, LM {m(c['llm'])})"


def _count_records(path: str | os.PathLike) -> int:
    return len(json.loads(Path(path).read_text(encoding="utf-8")))


def _epochs(steps: int, batch: int, n: int) -> int:
    per_epoch = max(1, n // batch)
    return max(1, -(-steps // per_epoch))


def _done(final: Path) -> bool:
    return (final / "config.json").exists()


def _model_stamp(model: str | os.PathLike) -> list:
    files = sorted(Path(model).glob("*.safetensors"))
    return [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files]


def _eval_done(path: Path, model: str) -> bool:
    if not path.exists() or not Path(model).exists():
        return False
    try:
        return json.loads(path.read_text(encoding="utf-8")).get("model_stamp") == _model_stamp(model)
    except (OSError, json.JSONDecodeError):
        return False


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _claim_folder(out: Path, s: DemoSettings, seed: int) -> None:
    """Record the settings in `<out>/demo.json`; refuse a folder that holds a demo with other settings."""
    path = out / "demo.json"
    want = {"settings": s.to_dict(), "seed": seed}
    if path.exists():
        have = json.loads(path.read_text(encoding="utf-8"))
        if have != want:
            diff = sorted(k for k in set(have.get("settings", {})) | set(want["settings"])
                          if have.get("settings", {}).get(k) != want["settings"].get(k))
            if have.get("seed") != seed:
                diff.append("seed")
            raise ValueError(f"{out} holds a kd demo run with other settings (differing: {', '.join(diff)}; "
                             f"it was a {have.get('settings', {}).get('mode')} run); use another --out or delete it")
        return
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{out} is not empty and holds no kd demo; choose an empty or new folder")
    _atomic_write(path, json.dumps(want, indent=1) + "\n")


@contextlib.contextmanager
def _cpu_threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def _quiet_transformers():
    """No per-file 'Loading weights' bars from transformers while the demo loads a dozen tiny models."""

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


@contextlib.contextmanager
def _quiet_logger(name: str):
    """Silence one logger's warnings (compose warns that the tiny LM's own tokenizer differs from the
    teacher's: expected here, the student uses the teacher's)."""

    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)
