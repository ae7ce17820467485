"""Where the cache builder's Gram time goes: `kd_cache.targets.gram_factors` on one batch of LLaVA-sized visual
logits, against its parts (the Gram products, the float64 `eigh` per sample, batched, in float32, on the host), and
optionally against another version of the function (an older `kd_cache/targets.py`), outputs compared exactly.

    python -m benchmarks.gram_factors [--baseline OLD_TARGETS.py] [--out FILE.json]
    git show 2d191da:kd_cache/targets.py > /tmp/old_targets.py   # the per-rank binary search (before 2026-12-04)

Logits: B = 16 samples of Nv = 576 rows (llava-1.5's visual tokens) over V = 32,064, low-rank (rank 256) plus
per-row offsets and noise, bf16 as a bf16 teacher emits them. On a CPU the sizes shrink (Nv 64, V 2,000, B 2) so
the script stays a smoke run; its numbers mean nothing there. Measured on an H200: docs/benchmarks.md, GPU check.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

import torch


def _load(path: str):
    spec = importlib.util.spec_from_file_location("baseline_targets", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is created
    spec.loader.exec_module(module)
    return module


def _same(a, b) -> bool:
    if a.dense is not None or b.dense is not None:
        return a.dense is not None and b.dense is not None and torch.equal(a.dense, b.dense)
    return a.rank == b.rank and all(torch.equal(getattr(a, k), getattr(b, k))
                                    for k in ("mean", "eigvals", "scales", "eigvecs"))


def main(argv: list[str] | None = None) -> dict:
    from kd_cache.targets import gram_factors

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--baseline", help="another kd_cache/targets.py whose gram_factors is timed beside this one")
    ap.add_argument("--out", help="write the results here (JSON)")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)

    cuda = torch.cuda.is_available()
    dev = "cuda" if cuda else "cpu"
    n, v, d, b = (576, 32064, 256, 16) if cuda else (64, 2000, 32, 2)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    g = torch.Generator(device=dev).manual_seed(0)
    zs = []
    for _ in range(b):
        z = (torch.randn(n, d, device=dev, generator=g) @ torch.randn(v, d, device=dev, generator=g).T) * 0.2
        z = z + torch.randn(n, 1, device=dev, generator=g) * 4 + 0.05 * torch.randn(n, v, device=dev, generator=g)
        zs.append(z.to(torch.bfloat16))

    def timed(fn, repeats=args.repeats) -> float:
        fn()
        sync()
        ts = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            sync()
            ts.append(time.perf_counter() - t0)
        return sorted(ts)[len(ts) // 2]

    res: dict = {"device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
                 "samples": b, "rows": n, "vocab": v, "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    res["gram_factors_seconds"] = timed(lambda: [gram_factors(z) for z in zs])
    res["ranks"] = [gram_factors(z).rank for z in zs]
    if args.baseline:
        old = _load(args.baseline).gram_factors
        res["baseline_seconds"] = timed(lambda: [old(z) for z in zs])
        res["identical_to_baseline"] = all(_same(old(z), gram_factors(z)) for z in zs)
    rcs = []
    for z in zs:
        zc = z.float() - z.float().mean(-1, keepdim=True)
        rcs.append((zc @ zc.T).double())
    stacked = torch.stack(rcs)
    res["gram_products_seconds"] = timed(lambda: [z.float() @ z.float().T for z in zs])
    res["eigh_float64_each_seconds"] = timed(lambda: [torch.linalg.eigh(r) for r in rcs])
    res["eigh_float64_batched_seconds"] = timed(lambda: torch.linalg.eigh(stacked))
    res["eigh_float32_each_seconds"] = timed(lambda: [torch.linalg.eigh(r.float()) for r in rcs])
    res["eigh_float64_on_host_seconds"] = timed(lambda: [torch.linalg.eigh(r.cpu()) for r in rcs], repeats=1)
    print(json.dumps(res, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1) + "\n")
    return res


if __name__ == "__main__":
    main()
