"""What can the visual rows' MDist teach a student of another tokenizer? The measurement behind turning it off.

    python -m benchmarks.visual_rows          # after `python -m benchmarks.quality --setting X` (its teacher, data)

Across tokenizers the teacher's distributions cannot be compared token by token, only as ULD compares them: sorted
probabilities, token identities dropped. What ULD on a row can teach is then what the row's sorted profile says
about the input. This measures it on the teacher's exact (full-vocabulary) distributions over test records:

* `uld_const`: the mean ULD distance (sorted-probability L1, in [0, 2]) between each row's sorted profile and the
  best *image-agnostic* profile (the coordinate-wise median of the sorted profiles over records: the L1 optimum
  that ignores the input; per visual position for visual rows, one for all response rows). A student that ignores
  the image entirely is that far from the ULD target: the part of the ULD target that depends on the input.
* `uld_pairs`: the mean ULD distance between the same row of two different records (how much the profile moves).
* `kl_const`: for reference, what the same-tokenizer MDist (forward KL over token identities) can teach: the mean
  KL(p_i || mean over records of p) at each row: the image-specific information its targets carry.

The rows are the teacher's response rows (what the text MDist / ULD supervises) and its visual rows. Results:
benchmarks/results/visual_rows.json and a section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from kd_eval import report  # noqa: E402

MARK = ("<!-- visual_rows -->", "<!-- /visual_rows -->")


def _uld(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Sorted-probability L1 between rows of already sorted (descending) profiles: (..., V) -> (...)."""
    return (p - q).abs().sum(-1)


def measure(teacher_dir: Path, data: Path, images: Path, limit: int) -> dict:
    from kd_cache.data import RecordSource
    from kd_train.batch import encoder_for
    from kd_train.objective import RowLogits
    from kd_train.student import load_student

    teacher, proc = load_student(teacher_dir)
    teacher.eval()
    records = RecordSource(str(data))
    enc = encoder_for(proc, teacher.config, image_root=str(images), max_length=None)
    rows = RowLogits(teacher)
    visual, text = [], []  # per record: (Nv, V) and (Nt, V) log-probs
    for index in range(min(limit, len(records))):
        e = enc.encode(records[index], index)
        inputs = {**{k: torch.as_tensor(v) for k, v in e.model_inputs.items()}, "input_ids": torch.as_tensor(e.input_ids)[None]}
        pos = lambda p: torch.stack([torch.zeros(len(p), dtype=torch.long), torch.as_tensor(p)])  # noqa: E731
        with torch.no_grad():
            zt, zv, _ = rows(inputs, pos(e.text_positions), pos(e.visual_positions))
        visual.append(torch.log_softmax(zv.double(), -1))
        text.append(torch.log_softmax(zt.double(), -1))
    lv = torch.stack(visual)  # (R, Nv, V): every record has the same visual rows
    lt = torch.cat(text)  # (T, V): response rows pooled

    def stats(lp: torch.Tensor) -> dict:
        """lp: (R, ..., V) log-probs, records first; the image-agnostic optimum is taken over records."""
        p = lp.exp()
        srt = p.sort(-1, descending=True).values
        const = srt.median(0).values  # coordinate-wise median: the input-free L1 optimum
        uld_const = _uld(srt, const.expand_as(srt))
        perm = torch.roll(torch.arange(p.shape[0]), 1)  # each record against another one
        uld_pairs = _uld(srt, srt[perm])
        mix = p.mean(0, keepdim=True)
        kl_const = (p * (lp - mix.clamp_min(1e-300).log())).sum(-1)
        entropy = -(p * lp).sum(-1)
        return {"rows": int(uld_const.numel()), "uld_const": float(uld_const.mean()),
                "uld_pairs": float(uld_pairs.mean()), "kl_const": float(kl_const.mean()),
                "entropy": float(entropy.mean()), "top1_mass": float(srt[..., 0].mean())}

    return {"records": lv.shape[0], "visual_rows_per_record": lv.shape[1], "vocab": lv.shape[-1],
            "visual": stats(lv), "response": stats(lt)}


def markdown(payload: dict) -> str:
    m = payload["measured"]
    rows = [("response rows", m["response"]), ("visual rows", m["visual"])]
    lines = [MARK[0], "## Visual rows across tokenizers: what ULD could teach (issue 20)", "",
             f"* date: {payload['date']}; machine: {payload['machine']}; command: `{payload['command']}` "
             f"({payload['seconds']:.0f} s)",
             f"* teacher: `{payload['teacher']}` (setting X's), exact distributions over its {m['vocab']} tokens, "
             f"{m['records']} test records, {m['visual_rows_per_record']} visual rows each.",
             "* ULD compares sorted probabilities (token identities dropped): `ULD to the input-free profile` is how "
             "far a student that ignores the input stays from the ULD target, i.e. what ULD on these rows can teach "
             "about the input (in [0, 2]); `ULD between records` how much the profile moves from record to record; "
             "`KL to the mixture` what the same-tokenizer MDist carries about the input (nats).", "",
             "| rows | rows measured | entropy (nats) | top-1 mass | ULD to the input-free profile | ULD between "
             "records | KL to the mixture (same tokenizer) |", "|---|---:|---:|---:|---:|---:|---:|"]
    for name, s in rows:
        lines.append(f"| {name} | {s['rows']} | {s['entropy']:.3f} | {s['top1_mass']:.3f} | {s['uld_const']:.4f} | "
                     f"{s['uld_pairs']:.4f} | {s['kl_const']:.3f} |")
    lines += ["", MARK[1]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--study", default="bench-out/quality-X", help="setting X's working folder (its teacher, data)")
    ap.add_argument("--limit", type=int, default=200, help="test records measured")
    ap.add_argument("--results", default=str(ROOT / "benchmarks" / "results" / "visual_rows.json"))
    ap.add_argument("--docs", default=str(ROOT / "docs" / "benchmarks.md"))
    args = ap.parse_args(argv)
    study = Path(args.study)
    teacher = study / "teacher" / "sft" / "final"
    if not (teacher / "config.json").exists():
        raise SystemExit(f"no trained teacher at {teacher}: run `python -m benchmarks.quality --setting X` first")
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    measured = measure(teacher, study / "data" / "instruct_test.json", study / "data" / "images", args.limit)
    payload = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
               "machine": report.machine_description(),
               "command": "python -m benchmarks.visual_rows " + " ".join(sys.argv[1:] if argv is None else argv),
               "seconds": time.perf_counter() - t0, "teacher": str(teacher), "measured": measured}
    report.publish_benchmark(payload, args.results, args.docs, MARK, markdown(payload))
    print(json.dumps(measured, indent=1))


if __name__ == "__main__":
    main()
