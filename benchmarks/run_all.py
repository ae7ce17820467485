"""Run every kd benchmark and write its JSON results: cache size vs fidelity, build speed, training cost.

    python -m benchmarks.run_all            # about 15 minutes on 2 CPU cores; writes benchmarks/results/*.json
    python -m benchmarks.run_all --quick    # a few minutes; smaller everything; writes to a temporary folder

Each benchmark's `main(argv)` is called in turn (`benchmarks.cache_size`, `benchmarks.build_speed`,
`benchmarks.train_cost`); a failing one is reported and the others still run (exit status 1 at the end).
Quick mode writes to `$TMPDIR/kd-benchmarks-quick/` unless `--out-dir` is given, so it never overwrites the
recorded results. See docs/benchmarks.md for what each one measures and the latest numbers.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
BENCHMARKS = ("cache_size", "build_speed", "train_cost")


def argv_for(name: str, quick: bool, out: Path) -> list[str]:
    args = ["--out", str(out)]
    if name == "cache_size":
        # cache_size has no quick mode of its own: fewer rows, one Gram window, no tiny-teacher part
        return args + (["--rows", "128", "--gram-windows", "1", "--no-tiny"] if quick else [])
    return args + (["--quick"] if quick else [])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smaller runs (a few minutes)")
    ap.add_argument("--only", default=",".join(BENCHMARKS), help=f"comma list of {', '.join(BENCHMARKS)}")
    ap.add_argument("--out-dir", default=None,
                    help="folder for the JSON results (default benchmarks/results; quick: $TMPDIR/kd-benchmarks-quick)")
    args = ap.parse_args(argv)
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = sorted(set(names) - set(BENCHMARKS))
    if unknown:
        ap.error(f"unknown benchmarks {unknown}; choose from {', '.join(BENCHMARKS)}")
    out_dir = Path(args.out_dir) if args.out_dir else (
        Path(tempfile.gettempdir()) / "kd-benchmarks-quick" if args.quick else RESULTS)
    out_dir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TQDM_DISABLE", "1")
    t_all = time.time()
    status: dict[str, dict] = {}
    for name in names:
        out = out_dir / f"{name}.json"
        print(f"\n=== {name} -> {out}", flush=True)
        t0 = time.time()
        try:
            importlib.import_module(f"benchmarks.{name}").main(argv_for(name, args.quick, out))
            status[name] = {"ok": True, "seconds": round(time.time() - t0, 1), "out": str(out)}
        except (Exception, SystemExit) as e:  # noqa: BLE001 - report and go on with the next benchmark
            traceback.print_exc()
            status[name] = {"ok": False, "seconds": round(time.time() - t0, 1), "error": f"{type(e).__name__}: {e}"}
    total = time.time() - t_all
    print("\n=== summary")
    for name, st in status.items():
        print(f"{name:<12} {'ok' if st['ok'] else 'FAILED':<7} {st['seconds']:>7.1f}s  {st.get('out') or st['error']}")
        if st["ok"] and name == "build_speed":
            s = json.loads(Path(st["out"]).read_text())["summary"]
            print(f"  build / forward-only {s['ratio_median']:.3f} (<= {s['target_ratio']}): "
                  f"{'met' if s['met'] else 'NOT met'}")
        if st["ok"] and name == "train_cost":
            for row in json.loads(Path(st["out"]).read_text())["summary"]:
                print(f"  {row['target']:<64} {row['measured']:<26} {'met' if row['met'] else 'NOT met'}")
    print(f"total {total / 60:.1f} min; results in {out_dir}")
    return 0 if all(st["ok"] for st in status.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
