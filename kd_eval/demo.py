"""`kd demo`: the whole offline LLaVA-KD pipeline on a procedural dataset, on a CPU, with a report.

1. `kd data synth`: caption + instruction data about coloured shapes (`kd_eval.synth`), and a test split.
2. A teacher MLLM trained from a random init with the trainer's SFT stage (projector + LLM trained, on all the
   caption and instruction training data).
3. `kd cache build` with that teacher over the student's (smaller) caption and instruction data.
4. A clearly smaller student (`kd student compose`: the teacher's vision tower + a fresh projector + a small
   random-init LLM) trained with `--recipe baseline` (DPT -> SFT -> DFT with CE only) and with `--recipe llava-kd`
   (DPT and DFT distilled from the cache), on several **paired seeds**: per seed both recipes start from the same
   init and see the same data in the same order for the same steps. Each run is its own single-thread process,
   `jobs` at a time (on a small CPU two one-thread processes are far faster than one two-thread process).
5. `kd eval` of the teacher and of every student on the test split; the table (mean ± sd over seeds), the paired
   difference llava-kd − baseline with its 95 % interval for the task score and the held-out answer NLL, and a
   report folder (markdown, accuracy chart, loss curves per stage, results.json).

One seed of a small student is noise on the task score (a rerun on another machine moved one seed's "gap
recovered" from 49 % to -3 %); the paired difference over seeds, with its interval, is the claim that survives a
rerun. Every step goes through the same library calls as the CLI commands, and a finished step (or student run)
is reused when the demo is rerun into the same folder. `--quick` is a smoke run of the same pipeline (tiny data,
few steps): its numbers are not meaningful and its report says so.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import logging
import os
import subprocess
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
from kd_eval.evaluate import evaluate
from kd_eval.tiny import make_tiny_teacher
from kd_train.student import compose_student, parameter_part
from kd_train.train import TrainConfig, run as run_training

__all__ = ["DemoResult", "DemoSettings", "FULL", "QUICK", "RECIPES", "StudentRunError", "run_demo", "settings_for", "student_run_main"]

RECIPES = ("baseline", "llava-kd")
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
    # paired seeds of the students (both recipes per seed); the seed of the data and the teacher is the first
    seeds: int = 5
    # CPU: torch threads and DataLoader workers of the teacher (1 + 1 uses both cores of a 2-core machine); the
    # students run as single-thread processes without workers, `kd demo --jobs` at a time
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

    @classmethod
    def from_dict(cls, d: dict) -> "DemoSettings":
        return cls(**{**d, "question_types": tuple(d.get("question_types", synth.QUESTION_TYPES))})


# The students see 200 caption + 200 instruction records for 300 steps per stage: labels are scarce for the
# schedule, which is where distillation measurably helps (docs/results.md, setting A); with 1000 the edge vanishes.
# 1200 test records (200 per type): with 300 the binomial noise of one model's accuracy alone is ~3 points.
FULL = DemoSettings(mode="full", n_caption=2000, n_train=3000, n_test=1200, student_caption=200,
                    student_train=200, eval_batch_size=100)
QUICK = DemoSettings(mode="quick", n_caption=96, n_train=160, n_test=60, student_caption=48, student_train=64,
                     teacher_hidden=64, teacher_layers=2, teacher_steps=30, student_hidden=32, student_layers=1,
                     student_steps=8, max_new_tokens=24, eval_batch_size=30, seeds=2)


def settings_for(quick: bool) -> DemoSettings:
    return QUICK if quick else FULL


@dataclass
class DemoResult:
    """What `run_demo` produced: the printed table and comparison, the report's files, results and step timings."""

    out: Path
    settings: DemoSettings
    seeds: list[int]  # the students' paired seeds
    table: str
    comparison: dict  # llava-kd - baseline over the paired seeds (see `compare`)
    results: dict[str, Any]  # "teacher" -> `evaluate` result; each recipe -> one result summary per seed
    models: dict[str, Any]  # "teacher" -> folder; each recipe -> one final folder per seed
    timings: dict[str, dict]  # step -> {"seconds": s, "reused": bool}
    report: Path
    files: list[Path] = field(default_factory=list)

    @property
    def wall_seconds(self) -> float:
        return sum(t["seconds"] for t in self.timings.values())

    @property
    def headline(self) -> list[str]:
        """The lines `kd demo` prints under the table (also in the report)."""
        return headline_lines(self.comparison, self.settings.mode)


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


def run_demo(out: str | os.PathLike, *, quick: bool = False, seed: int = 0, seeds: int | None = None,
             jobs: int | None = None, progress: bool = True,
             echo: Callable[[str], None] | None = None) -> DemoResult:
    """Run (or finish) the demo in `out`; returns the comparison, also written to `<out>/report/`.

    `seed` seeds the data and the teacher and is the first of the students' `seeds` paired seeds (default: the
    settings' 5, or 2 with `quick`); `jobs` student runs go at once, each a single-thread process (default: one
    per CPU core). Rerunning into the same folder reuses every finished step and student run, so asking for more
    seeds later only trains the new ones. A folder holding a demo with other settings (e.g. `--quick` and full)
    is refused rather than mixed."""
    s = settings_for(quick)
    if seeds is not None:
        if seeds < 1:
            raise ValueError(f"seeds must be >= 1, got {seeds}")
        s = dataclasses.replace(s, seeds=seeds)
    if jobs is not None and jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}")
    out = Path(out)
    say = echo if echo is not None else (lambda msg: print(msg, file=sys.stderr, flush=True))
    if not progress:
        say = lambda msg: None  # noqa: E731
    _claim_folder(out, s, seed)
    seed_list = [seed + k for k in range(s.seeds)]
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
        caches = step("cache", all((out / "cache" / n / "manifest.json").exists() for n in ("caption", "instruct")),
                      "kd cache build (caption + instruct data of the student)",
                      lambda: build_caches(out / "cache", s, teacher, data, progress=progress))
        teacher_eval = step("eval teacher", _eval_done(out / "eval" / "teacher.json", str(teacher)),
                            f"kd eval teacher on {s.n_test} test records",
                            lambda: evaluate_model(teacher, data, s, out / "eval" / "teacher.json",
                                                   progress=progress))
        inits = step("students", all(_done(_student_root(out, k) / "init") for k in seed_list),
                     f"kd student compose for seeds {_seed_range(seed_list)} (teacher's vision tower + fresh "
                     f"projector + hidden {s.student_hidden}, {s.student_layers}-layer LM)",
                     lambda: {k: make_student(_student_root(out, k), s, teacher, seed=k) for k in seed_list})
        specs = [_run_spec(out, s, data, teacher, caches, inits[k], k, recipe) for k in seed_list for recipe in RECIPES]
        n_jobs = min(jobs or _cpu_cores(), len(specs))
        runs = step("train + eval students", all(_run_done(sp) for sp in specs),
                    f"kd train --recipe baseline / llava-kd, {s.student_steps} steps per stage, then kd eval: "
                    f"{len(specs)} runs ({len(seed_list)} paired seeds), {n_jobs} single-thread process(es) at a time",
                    lambda: run_students(specs, n_jobs, say))
        t0 = time.perf_counter()
        say("[kd demo] report")
        result = _write_report(out, s, seed, seed_list, data, teacher, teacher_eval, runs, timings, inits[seed])
        timings["report"] = {"seconds": round(time.perf_counter() - t0, 2), "reused": False}
        _rewrite_timings(result)
    return result


def _student_root(out: Path, seed: int) -> Path:
    return out / "students" / f"seed-{seed}"


def _seed_range(seeds: list[int]) -> str:
    return str(seeds[0]) if len(seeds) == 1 else f"{seeds[0]}-{seeds[-1]}"


def _cpu_cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


# --------------------------------------------------------------------------------------------- student runs


def _run_spec(out: Path, s: DemoSettings, data: DemoData, teacher: Path, caches: tuple[Path, Path], init: Path,
              seed: int, recipe: str) -> dict:
    """Everything one student run needs, as JSON (it is passed to a fresh process)."""
    run = out / "runs" / f"seed-{seed}" / recipe
    return {"settings": s.to_dict(), "data": [str(p) for p in dataclasses.astuple(data)], "teacher": str(teacher),
            "caches": [str(p) for p in caches], "init": str(init), "seed": seed, "recipe": recipe, "run": str(run)}


def _run_done(spec: dict) -> bool:
    """A finished run: its result names weights that are still the ones it evaluated."""
    path = Path(spec["run"]) / "result.json"
    try:
        res = json.loads(path.read_text(encoding="utf-8"))
        return res.get("model_stamp") == _model_stamp(res["model"]) and bool(res["model_stamp"])
    except (OSError, KeyError, TypeError, json.JSONDecodeError):
        return False


def run_student(spec: dict) -> dict:
    """One student run (`_run_spec`): train the recipe from the seed's init, evaluate it, write `result.json`.
    Meant for a fresh single-thread process (`student_run_main`); finished runs are reused."""
    run = Path(spec["run"])
    if _run_done(spec):
        return json.loads((run / "result.json").read_text(encoding="utf-8"))
    s = DemoSettings.from_dict(spec["settings"])
    data = DemoData(*[Path(p) for p in spec["data"]])
    t0 = time.perf_counter()
    # no DataLoader worker: the other core runs the next student
    finals = train_student(run, spec["recipe"], dataclasses.replace(s, num_workers=0), Path(spec["init"]), data,
                           (Path(spec["caches"][0]), Path(spec["caches"][1])), seed=spec["seed"])
    train_seconds = time.perf_counter() - t0
    ev = evaluate_model(finals[-1], data, s, run / "eval.json")
    res = {"seed": spec["seed"], "recipe": spec["recipe"], "run": str(run), "model": str(finals[-1]),
           "model_stamp": _model_stamp(finals[-1]), "train_seconds": round(train_seconds, 1),
           "eval_seconds": round(time.perf_counter() - t0 - train_seconds, 1), "eval": report.summary(ev)}
    _atomic_write(run / "result.json", json.dumps(res, indent=1) + "\n")
    return res


def student_run_main() -> None:
    """Process entry of one student run: `python -c '...student_run_main()' <spec JSON>` (see `run_students`)."""
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    with _quiet_transformers(), _quiet_logger("kd_train"):
        run_student(json.loads(sys.argv[1]))


class StudentRunError(RuntimeError):
    """A student run's process failed; the message names its log and ends with the log's last lines."""


_RUN_CODE = "from kd_eval.demo import student_run_main; student_run_main()"


def run_students(specs: list[dict], jobs: int, say: Callable[[str], None]) -> list[dict]:
    """Each unfinished run in its own single-thread process, `jobs` at a time, output to `<run>/log.txt`; one
    line per finished run. A failed run stops the others (terminated, then waited for) and raises with its log's
    tail. The processes share the caller's process group, so Ctrl-C reaches them too."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    results: dict[str, dict] = {}
    pending = []
    for sp in specs:
        if _run_done(sp):
            results[sp["run"]] = json.loads((Path(sp["run"]) / "result.json").read_text(encoding="utf-8"))
        else:
            pending.append(sp)
    running: dict[subprocess.Popen, tuple[dict, Any]] = {}
    done = len(results)
    try:
        while pending or running:
            while pending and len(running) < jobs:
                sp = pending.pop(0)
                Path(sp["run"]).mkdir(parents=True, exist_ok=True)
                log = open(Path(sp["run"]) / "log.txt", "w", encoding="utf-8")
                proc = subprocess.Popen([sys.executable, "-c", _RUN_CODE, json.dumps(sp)], env=env, stdout=log,
                                        stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
                running[proc] = (sp, log)
            time.sleep(0.2)
            for proc in [p for p in running if p.poll() is not None]:
                sp, log = running.pop(proc)
                log.close()
                if proc.returncode != 0:
                    tail = (Path(sp["run"]) / "log.txt").read_text(encoding="utf-8", errors="replace")
                    tail = "\n".join(tail.strip().splitlines()[-15:])
                    raise StudentRunError(f"student run seed {sp['seed']} {sp['recipe']} failed (exit "
                                       f"{proc.returncode}); log: {Path(sp['run']) / 'log.txt'}\n{tail}")
                res = json.loads((Path(sp["run"]) / "result.json").read_text(encoding="utf-8"))
                results[sp["run"]] = res
                done += 1
                ov = res["eval"]["overall"]
                say(f"[kd demo] seed {res['seed']} {res['recipe']}: trained in {res['train_seconds']:.0f} s, "
                    f"accuracy {100 * report.accuracy(res['eval']):.1f} %, answer NLL {ov['answer_nll']:.3f} "
                    f"({done}/{len(specs)} runs)")
    finally:
        for proc in running:
            proc.terminate()
        for proc, (_, log) in running.items():
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            log.close()
    return [results[sp["run"]] for sp in specs]


# --------------------------------------------------------------------------------------------- comparison


def compare(teacher: dict, baseline: list[dict], kd: list[dict], seeds: list[int]) -> dict:
    """llava-kd - baseline per paired seed, for accuracy (overall, in [0, 1]) and the held-out answer NLL
    (nats/token), each with its mean and 95 % t interval (`report.t_interval`), and the gap recovered as a ratio
    of the means ((kd - baseline) / (teacher - baseline); None where the teacher is not beyond the baseline)."""

    def nll(r: dict) -> float:
        return r["overall"]["answer_nll"]

    out: dict[str, Any] = {"seeds": seeds, "interval": "95 % Student-t over the paired per-seed differences"}
    for key, get in (("accuracy", report.accuracy), ("answer_nll", nll)):
        b, k = [get(r) for r in baseline], [get(r) for r in kd]
        diffs = [x - y for x, y in zip(k, b)]
        t, mb, mk = get(teacher), sum(b) / len(b), sum(k) / len(k)
        gap = report.gap_recovered(t, mb, mk) if key == "accuracy" else (
            None if mb - t < 1e-3 else (mb - mk) / (mb - t))
        out[key] = {"teacher": t, "baseline": b, "llava-kd": k, "per_seed": diffs, **report.t_interval(diffs),
                    "gap_recovered": gap}
    return out


def _verdict(c: dict, lower_is_better: bool) -> str:
    lo, hi = c["lo"], c["hi"]
    if lo is None:
        return "one seed: no interval"
    better, worse = (hi < 0, lo > 0) if lower_is_better else (lo > 0, hi < 0)
    return "llava-kd better" if better else "llava-kd worse" if worse else "no difference shown (spans 0)"


def headline_lines(c: dict, mode: str) -> list[str]:
    """The comparison as printed by `kd demo` and written at the top of the report."""
    n = len(c["seeds"])
    rows = []
    for name, x, scale, fmt, unit, lower in (("accuracy", c["accuracy"], 100, "+.1f", "points", False),
                                             ("answer NLL", c["answer_nll"], 1, "+.3f", "nats/token", True)):
        ci = "" if x["lo"] is None else f"[{scale * x['lo']:{fmt}}, {scale * x['hi']:{fmt}}]"
        rows.append([f"  {name}", f"{scale * x['mean']:{fmt}} {unit}", ci, _verdict(x, lower),
                     "per seed " + " ".join(f"{scale * d:{fmt}}" for d in x["per_seed"])])
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = [f"llava-kd - baseline over {n} paired seed{'s' if n != 1 else ''} (per seed: same init, data order and "
             "steps); mean, 95 % t-interval:"]
    lines += ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)) + "  " + r[4] for r in rows]
    a, l = c["accuracy"], c["answer_nll"]
    gaps = [f"{name} {100 * x['gap_recovered']:.0f} %" for name, x in (("accuracy", a), ("answer NLL", l))
            if x["gap_recovered"] is not None]
    lines.append("  gap recovered (share of teacher - baseline, ratio of the means): "
                 + (", ".join(gaps) if gaps else "n/a (the teacher is not beyond the baseline)"))
    if mode == "quick":
        lines.append("(--quick is a smoke run: tiny data and few steps, the numbers are not meaningful)")
    return lines


# --------------------------------------------------------------------------------------------- report


def _write_report(out: Path, s: DemoSettings, seed: int, seeds: list[int], data: DemoData, teacher: Path,
                  teacher_eval: dict, runs: list[dict], timings: dict, student_init: Path) -> DemoResult:
    rdir = out / "report"
    rdir.mkdir(parents=True, exist_ok=True)
    for old in rdir.glob("*.png"):
        old.unlink()
    by = {(r["recipe"], r["seed"]): r for r in runs}
    students = {recipe: [by[(recipe, k)]["eval"] for k in seeds] for recipe in RECIPES}
    comparison = compare(teacher_eval, students["baseline"], students["llava-kd"], seeds)
    table = report.format_seed_table(teacher_eval, students)
    files: list[Path] = []
    chart = report.plot_accuracy({"teacher": [teacher_eval], **students}, rdir / "accuracy.png", spread=True,
                                 title=f"kd demo ({s.mode}): exact-match accuracy on the test split "
                                       f"(students: mean ± sd over {len(seeds)} seeds)")
    if chart is not None:
        files.append(chart)
    first = out / "runs" / f"seed-{seeds[0]}"
    curves = {"teacher": {"sft": report.read_metrics(out / "teacher" / "sft" / "metrics.jsonl")}}
    for recipe in RECIPES:
        curves[recipe] = {st: report.read_metrics(first / recipe / st / "metrics.jsonl") for st in ("dpt", "sft", "dft")}
    files += report.plot_losses(curves, rdir)
    models = {"teacher": str(teacher), **{recipe: [by[(recipe, k)]["model"] for k in seeds] for recipe in RECIPES}}
    payload = {
        "mode": s.mode,
        "seed": seed,
        "seeds": seeds,
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": report.machine_description(),
        "settings": s.to_dict(),
        "models": models,
        "parameters": {"teacher": _param_counts(teacher), "student": _param_counts(student_init)},
        "data": {"test": str(data.test), "teacher_train_records": _count_records(data.teacher_train),
                 "student_caption_records": _count_records(data.student_caption),
                 "student_train_records": _count_records(data.student_train)},
        "comparison": comparison,
        "accuracy": {"teacher": {t: report.accuracy(teacher_eval, t) for t in report.question_types([teacher_eval])},
                     **{recipe: {t: report.mean_spread([report.accuracy(r, t) for r in rs])
                                 for t in report.question_types(rs)} for recipe, rs in students.items()}},
        "results": {"teacher": report.summary(teacher_eval), **students},
        "runs": [{k: v for k, v in r.items() if k != "eval"} for r in runs],
        "final_losses": {run: {st: _final_terms(rows) for st, rows in stages.items() if rows}
                         for run, stages in curves.items()},
        "timings": timings,
        "files": [f.name for f in files],
    }
    result = DemoResult(out=out, settings=s, seeds=seeds, table=table, comparison=comparison,
                        results={"teacher": teacher_eval, **students}, models=models, timings=timings,
                        report=rdir / "report.md", files=files)
    _atomic_write(rdir / "results.json", json.dumps(payload, indent=1, ensure_ascii=False) + "\n")
    examples = {"teacher": teacher_eval,
                **{recipe: _load(Path(by[(recipe, seeds[0])]["run"]) / "eval.json") for recipe in RECIPES}}
    _atomic_write(rdir / "report.md", _markdown(result, payload, curves, examples))
    return result


def _load(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


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


def _markdown(result: DemoResult, payload: dict, curves: dict, examples: dict[str, dict]) -> str:
    s = result.settings
    sizes = payload["parameters"]
    n = len(result.seeds)
    lines = [f"# kd demo report ({s.mode})", ""]
    if s.mode == "quick":
        lines += ["> **Smoke run (`--quick`).** The same pipeline as the full demo on tiny data with a handful of "
                  "steps, to check that every step works end to end in about two minutes. The teacher has not "
                  "learned the task, so the accuracies below say nothing about distillation. Run `kd demo` "
                  "without `--quick` for the real comparison.", ""]
    lines += [f"* date: {payload['date']}", f"* machine: {payload['machine']}",
              f"* seeds: data and teacher {payload['seed']}; students {', '.join(map(str, result.seeds))} (paired: "
              "per seed both recipes start from the same init and see the same data in the same order); each "
              "student run a single-thread process", ""]
    lines += ["## Result", "", "```", *result.headline, "```", "",
              f"Exact-match accuracy (%) on the test split (greedy decoding, `kd eval`); students: mean ± sample sd "
              f"over {n} seed(s):", "",
              report.markdown_accuracy_table({"teacher": [result.results["teacher"]],
                                              **{r: result.results[r] for r in RECIPES}}, spread=True), ""]
    c = result.comparison
    lines += ["Per seed (llava-kd − baseline):", "", "| seed | baseline acc. | llava-kd acc. | Δ points | "
              "baseline NLL | llava-kd NLL | Δ NLL |", "|---:|---:|---:|---:|---:|---:|---:|"]
    for i, k in enumerate(result.seeds):
        a, l = c["accuracy"], c["answer_nll"]
        lines.append(f"| {k} | {100 * a['baseline'][i]:.1f} | {100 * a['llava-kd'][i]:.1f} | "
                     f"{100 * a['per_seed'][i]:+.1f} | {l['baseline'][i]:.3f} | {l['llava-kd'][i]:.3f} | "
                     f"{l['per_seed'][i]:+.3f} |")
    lines += ["", "The interval is Student's t over the per-seed differences (n − 1 degrees of freedom): with a "
              "handful of seeds it is wide, and honest about it. One seed says little: on the task score two "
              "machines can disagree by more than the effect.", ""]
    if "accuracy.png" in payload["files"]:
        lines += ["![accuracy per model and question type](accuracy.png)", ""]
    lines += ["## Setting", "",
              "| | teacher | students (baseline, llava-kd) |", "|---|---|---|",
              f"| model | tiny LLaVA: SigLIP tower + Qwen2 LM, hidden {s.teacher_hidden}, {s.teacher_layers} LM layers | "
              f"teacher's vision tower + fresh MLP projector + Qwen2 LM, hidden {s.student_hidden}, "
              f"{s.student_layers} LM layer(s) |",
              f"| parameters | {_fmt_params(sizes['teacher'])} | {_fmt_params(sizes['student'])} |",
              f"| init | random (vision tower {'trained too' if s.teacher_train_vision else 'kept at its random init'}) | "
              "vision tower copied from the teacher (frozen), projector and LM random (one init per seed); the LM "
              "trains in every stage (`--train-llm`, DPT included: it has no pretraining) |",
              f"| training data | {payload['data']['teacher_train_records']} records (caption + instruction) | "
              f"{payload['data']['student_caption_records']} caption (DPT) + "
              f"{payload['data']['student_train_records']} instruction records (SFT, DFT) |",
              f"| schedule | `kd train --stage sft`, {s.teacher_steps} steps, lr {s.teacher_lr:g}, batch {s.batch_size} | "
              f"`kd train --recipe baseline` / `--recipe llava-kd`: DPT, SFT, DFT × {s.student_steps} steps, "
              f"lr {s.student_lr:g}, batch {s.batch_size}, same init and seed per pair |",
              "", f"Images {s.image_size} px, {(s.image_size // s.patch_size) ** 2} visual tokens per image; "
              f"vocabulary {s.vocab_size}; cache: top-{s.top_k} + tail on the response rows, sampled draws on the "
              f"visual rows (the build's defaults), Gram matrices for RDist; evaluation: greedy, up to "
              f"{s.max_new_tokens} new tokens, {payload['results']['teacher']['n']} test records.", ""]
    lines += ["## Wall time", "", _timings_md(result.timings) + "<!-- /timings -->", ""]
    lines += ["## Training curves", "", f"Seed {result.seeds[0]}. Running mean of each logged term per optimizer "
              "step; `ce` is the cross-entropy on answer tokens, `mdist_*` / `rdist` the distillation terms "
              "(KD terms are logged as divergences).", ""]
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
    lines += ["", "## Examples", "", f"First test record of each question type (students: seed {result.seeds[0]}):",
              "", "| type | question | reference | " + " | ".join(examples) + " |",
              "|---|---|---|" + "---|" * len(examples)]
    preds = {name: {p["id"]: p for p in r.get("predictions", [])} for name, r in examples.items()}
    seen: set[str] = set()
    questions = _questions(payload["data"]["test"])
    for p in examples["teacher"].get("predictions", []):
        if p["question_type"] in seen:
            continue
        seen.add(p["question_type"])
        cells = []
        for name in examples:
            q = preds[name].get(p["id"])
            cells.append("–" if q is None else f"{_md(q['prediction'])} {'✓' if q['correct'] else '✗'}")
        lines.append(f"| {p['question_type']} | {_md(questions.get(p['id'], ''))} | {_md(p['reference'])} | "
                     + " | ".join(cells) + " |")
    lines += ["", "## Files", "",
              "* `results.json`: settings, every seed's accuracies, the comparison, timings, final losses",
              "* `../eval/teacher.json`, `../runs/seed-<k>/<recipe>/eval.json`: every prediction",
              "* `../runs/seed-<k>/<recipe>/<stage>/final`, `../teacher/sft/final`: the models (transformers "
              "folders); `../runs/seed-<k>/<recipe>/log.txt`: each student run's output", ""]
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
    # the number of seeds is not a setting of the folder: a rerun with more seeds reuses the finished ones
    want = {"settings": {k: v for k, v in s.to_dict().items() if k != "seeds"}, "seed": seed}
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
