"""Tables, charts and numbers shared by `kd demo` and the quality study (`benchmarks/quality.py`).

Inputs are `kd_eval.evaluate.evaluate` results (one per model) or, for several seeds, lists of them; training
curves come from the `metrics.jsonl` each `kd train` stage writes. Charts need matplotlib (the `dev` extra,
installed by `scripts/setup.sh`); without it the reports are written without images and say so.
"""

from __future__ import annotations

import json
import math
import os
import platform
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

__all__ = [
    "LOSS_TERMS",
    "accuracy",
    "format_seed_table",
    "gap_recovered",
    "machine_description",
    "markdown_accuracy_table",
    "mean_spread",
    "plot_accuracy",
    "plot_losses",
    "question_types",
    "read_metrics",
    "summary",
    "t_interval",
]

LOSS_TERMS = ("ce", "mdist_text", "mdist_visual", "rdist", "loss")
OVERALL = "overall"


# --------------------------------------------------------------------------------------------- numbers


def question_types(results: Iterable[Mapping]) -> list[str]:
    """Question types present in any result, sorted, then 'overall'."""
    types = sorted({t for r in results for t in r.get("per_type", {})})
    return [*types, OVERALL]


def accuracy(result: Mapping, qtype: str = OVERALL) -> float | None:
    """Accuracy in [0, 1] of one result for a question type (or overall); None when it has no such records."""
    stats = result.get("overall") if qtype == OVERALL else result.get("per_type", {}).get(qtype)
    if not stats or not stats.get("n"):
        return None
    return stats.get("score", stats["correct"]) / stats["n"]  # set-F1 / membership scores for ambiguous types


def summary(result: Mapping) -> dict:
    """A result without its predictions: accuracy per type and overall, counts, skips, seconds."""
    return {k: v for k, v in result.items() if k != "predictions"}


def mean_spread(values: Sequence[float | None]) -> dict:
    """{mean, sd, min, max, n} of the values that are not None; sd is the sample standard deviation (ddof 1)."""
    xs = [float(v) for v in values if v is not None]
    if not xs:
        return {"mean": None, "sd": None, "min": None, "max": None, "n": 0}
    mean = sum(xs) / len(xs)
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return {"mean": mean, "sd": sd, "min": min(xs), "max": max(xs), "n": len(xs)}


def gap_recovered(teacher: float | None, baseline: float | None, student: float | None,
                  min_gap: float = 0.02) -> float | None:
    """(student - baseline) / (teacher - baseline); None when the teacher is not at least `min_gap` above the
    baseline (then there is no gap to recover and the ratio would only amplify noise)."""
    if teacher is None or baseline is None or student is None or teacher - baseline < min_gap:
        return None
    return (student - baseline) / (teacher - baseline)


# Two-sided 95 % quantiles of Student's t for 1..30 degrees of freedom (the standard table).
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def _t975(df: int) -> float:
    if df <= len(_T975):
        return _T975[df - 1]
    z = 1.959964  # Cornish-Fisher expansion around the normal quantile: within 1e-4 of the table beyond 30
    return z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)


def t_interval(values: Sequence[float]) -> dict:
    """Mean of `values` with its 95 % Student-t interval: {mean, lo, hi, sd, n} (lo/hi None for one value).

    For paired seeds pass the per-seed differences. With a handful of seeds the t interval is the honest one: a
    bootstrap over 5 values is too narrow (it cannot see beyond the 5 it has)."""
    xs = [float(v) for v in values]
    if not xs:
        raise ValueError("t_interval needs at least one value")
    ms = mean_spread(xs)
    if len(xs) < 2:
        return {"mean": ms["mean"], "lo": None, "hi": None, "sd": None, "n": 1}
    half = _t975(len(xs) - 1) * ms["sd"] / math.sqrt(len(xs))
    return {"mean": ms["mean"], "lo": ms["mean"] - half, "hi": ms["mean"] + half, "sd": ms["sd"], "n": len(xs)}


def format_seed_table(teacher: Mapping, students: Mapping[str, Sequence[Mapping]]) -> str:
    """Plain-text table: accuracy (%) per question type and overall, then answer NLL (nats/token); one column for
    the teacher's result and one per student recipe, as mean ± sample sd over its seeds."""
    cols = {"teacher": [teacher], **{name: list(rs) for name, rs in students.items()}}
    heads = ["teacher"] + [f"{name} ({len(rs)} seed{'s' if len(rs) != 1 else ''})" for name, rs in students.items()]

    def cell(vals: list[float | None], scale: float, digits: int) -> str:
        ms = mean_spread(vals)
        if ms["mean"] is None:
            return "-"
        mean = f"{scale * ms['mean']:.{digits}f}"
        return mean if ms["n"] < 2 else f"{mean} ± {scale * ms['sd']:.{digits}f}"

    types = question_types([r for rs in cols.values() for r in rs])
    rows = [["question type", *heads]]
    for t in types:
        n = next((r.get("per_type", {}).get(t, {}).get("n") for r in cols["teacher"] if t != OVERALL), None)
        n = cols["teacher"][0].get("overall", {}).get("n") if t == OVERALL else n
        rows.append([f"{t} (n={n})", *(cell([accuracy(r, t) for r in rs], 100, 1) for rs in cols.values())])
    rows.append(["answer NLL (nats/token)",
                 *(cell([r.get("overall", {}).get("answer_nll") for r in rs], 1, 3) for rs in cols.values())])
    widths = [max(len(row[c]) for row in rows) for c in range(len(heads) + 1)]
    lines = ["  ".join(cell.ljust(w) if c == 0 else cell.rjust(w) for c, (cell, w) in enumerate(zip(row, widths)))
             .rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _pct(x: float | None, digits: int = 1) -> str:
    return "–" if x is None else f"{100 * x:.{digits}f}"


def markdown_accuracy_table(columns: Mapping[str, Any], *, spread: bool = False) -> str:
    """Markdown table: one row per question type (+ overall), one column per model, accuracy in %.

    `columns` maps a model name to one `evaluate` result, or (with `spread=True`) to a list of results over
    seeds, shown as mean ± sample sd.
    """
    if not columns:
        raise ValueError("columns must name at least one model")
    flat = [r for v in columns.values() for r in (v if spread else [v])]
    types = question_types(flat)
    head = "| question type | " + " | ".join(columns) + " |"
    rule = "|---|" + "---:|" * len(columns)
    lines = [head, rule]
    for t in types:
        cells = []
        for v in columns.values():
            if spread:
                ms = mean_spread([accuracy(r, t) for r in v])
                cells.append("–" if ms["mean"] is None else _pct(ms["mean"]) if ms["n"] < 2
                             else f"{_pct(ms['mean'])} ± {_pct(ms['sd'])}")
            else:
                cells.append(_pct(accuracy(v, t)))
        name = f"**{t}**" if t == OVERALL else t
        n = next((r.get("per_type", {}).get(t, {}).get("n") for r in flat if t != OVERALL), None)
        n = n if t != OVERALL else flat[0].get("overall", {}).get("n")
        lines.append(f"| {name} (n={n}) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def machine_description() -> str:
    """'2-core CPU (x86_64, Linux ...), no GPU; torch X, transformers Y' for reports."""
    import torch  # deferred: reports are written by torch-free tools too (benchmarks' summaries)
    import transformers

    cores = os.cpu_count() or 0
    gpu = "no GPU"
    if torch.cuda.is_available():
        gpu = f"GPU {torch.cuda.get_device_name(0)}"
    return (f"{cores}-core CPU ({platform.machine()}, {platform.system()} {platform.release()}), {gpu}; "
            f"Python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}")


# --------------------------------------------------------------------------------------------- curves


def replace_marked_block(path: str | os.PathLike, marks: tuple[str, str], block: str) -> None:
    """Put `block` (which starts with marks[0] and ends with marks[1]) in place of the marked block of a markdown
    file, or append it when the file has none: how benchmarks keep their section of a shared docs page current."""
    path = Path(path)
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    a, b = text.find(marks[0]), text.find(marks[1])
    text = text[:a] + block + text[b + len(marks[1]):] if 0 <= a < b else text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text, encoding="utf-8")


def publish_benchmark(payload: dict, results: str | os.PathLike, docs: str | os.PathLike, marks: tuple[str, str],
                      block: str) -> None:
    """A benchmark's raw results (JSON) and its section of a docs page (the marked `block`), then the section on
    stdout."""
    Path(results).write_text(json.dumps(payload, indent=1) + "\n", encoding="utf-8")
    replace_marked_block(docs, marks, block)
    print(block)


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """Logged steps of the last run in a stage's `metrics.jsonl` (a restarted run appends after a new header)."""
    p = Path(path)
    if not p.exists():
        return []
    rows: list[dict] = []
    for line in p.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            d = json.loads(line)
        except json.JSONDecodeError:
            continue  # a torn last line of a killed run
        if "config" in d and "run" in d:
            rows = []
        elif d.get("step") is not None:
            rows.append(d)
    return rows


def _smooth(ys: list[float], window: int) -> list[float]:
    out, acc = [], 0.0
    for i, y in enumerate(ys):
        acc += y
        if i >= window:
            acc -= ys[i - window]
        out.append(acc / min(i + 1, window))
    return out


def _pyplot():
    try:
        import matplotlib  # optional (the dev extra): charts are skipped without it

        matplotlib.use("Agg", force=True)
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def _plot_terms(ax, rows: list[dict], title: str) -> None:
    steps = [r["step"] for r in rows]
    window = max(1, len(rows) // 25)
    plotted: list[float] = []
    for term in LOSS_TERMS:
        ys = [r.get(term) for r in rows]
        if all(y is None for y in ys) or (term == "loss" and not any(t in rows[0] for t in LOSS_TERMS[1:4])):
            continue  # 'loss' equals 'ce' in CE-only stages: one line is enough
        ys = _smooth([float("nan") if y is None else float(y) for y in ys], window)
        plotted += [y for y in ys if y == y]
        ax.plot(steps, ys, label=term, linewidth=1.4 if term == "loss" else 1.0)
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("optimizer step", fontsize=8)
    lo, hi = (min(plotted), max(plotted)) if plotted else (0.0, 0.0)
    if lo > 0 and hi / lo > 10:  # log only when the curves span more than a decade
        from matplotlib.ticker import FuncFormatter

        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if f"{v:.0e}"[0] in "25" else ""))
    ax.tick_params(labelsize=7, which="both")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def plot_losses(curves: Mapping[str, Mapping[str, list[dict]]], out_dir: str | os.PathLike) -> list[Path]:
    """One PNG per (run, stage), `loss_<run>_<stage>.png`, plus `losses.png` with all of them as subplots.

    `curves` maps a run name to {stage: rows from `read_metrics`}. Returns the files written ([] without
    matplotlib). Curves are smoothed with a running mean over ~4 % of the steps; the y axis is logarithmic when they
    span more than a decade.
    """
    plt = _pyplot()
    if plt is None:
        return []
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    panels = [(run, stage, rows) for run, stages in curves.items() for stage, rows in stages.items() if rows]
    for run, stage, rows in panels:
        fig, ax = plt.subplots(figsize=(5, 3.2))
        _plot_terms(ax, rows, f"{run}: {stage}")
        fig.tight_layout()
        path = out / f"loss_{run}_{stage}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    if panels:
        runs = list(dict.fromkeys(p[0] for p in panels))
        order = {"dpt": 0, "sft": 1, "dft": 2}
        stages = sorted(dict.fromkeys(p[1] for p in panels), key=lambda st: order.get(st, len(order)))
        fig, axes = plt.subplots(len(runs), len(stages), figsize=(4 * len(stages), 2.8 * len(runs)), squeeze=False)
        for i, run in enumerate(runs):
            for j, stage in enumerate(stages):
                rows = curves.get(run, {}).get(stage) or []
                if rows:
                    _plot_terms(axes[i][j], rows, f"{run}: {stage}")
                else:
                    axes[i][j].axis("off")
        fig.tight_layout()
        path = out / "losses.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


def plot_accuracy(columns: Mapping[str, Any], path: str | os.PathLike, *, spread: bool = False,
                  title: str = "accuracy per question type") -> Path | None:
    """Grouped bars: accuracy (%) per question type and overall, one bar per model (mean ± sd with `spread`).

    Returns the PNG path, or None without matplotlib.
    """
    plt = _pyplot()
    if plt is None:
        return None
    flat = [r for v in columns.values() for r in (v if spread else [v])]
    types = question_types(flat)
    names = list(columns)
    width = 0.8 / max(1, len(names))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(types) * max(1, len(names)) / 2.5), 3.6))
    for i, name in enumerate(names):
        means, errs = [], []
        for t in types:
            if spread:
                ms = mean_spread([accuracy(r, t) for r in columns[name]])
                means.append(100 * (ms["mean"] or 0.0))
                errs.append(100 * (ms["sd"] or 0.0))
            else:
                means.append(100 * (accuracy(columns[name], t) or 0.0))
        xs = [k + (i - (len(names) - 1) / 2) * width for k in range(len(types))]
        ax.bar(xs, means, width, label=name, yerr=errs if spread else None, capsize=2 if spread else 0)
    ax.set_xticks(range(len(types)))
    ax.set_xticklabels(types, fontsize=8)
    ax.set_ylabel("exact-match accuracy (%)", fontsize=8)
    ax.set_ylim(0, 100)
    ax.set_title(title, fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, ncol=min(len(names), 4))
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
