"""Seeded fuzzing of everything that reads a cache back: `kd cache verify`, `open_cache`, the training stream (with
and without `skip_corrupt_shards`) and the resume of `kd cache build` (journals, done files, saved configuration).

One small real cache (the tiny llava teacher, 12 samples in 3 shards) is copied once per case and damaged once:
flipped bytes, truncations, zeroed ranges, swapped, duplicated or deleted files among the shards; flipped bytes,
truncations, swapped or duplicated entries and values of the wrong type or range in the manifest; the same in the
progress journal, the done file and the saved build configuration (read by the resume of `kd cache build`, which
then writes the manifest). The oracle, per case:

* nothing hangs (a per-case timer; a faulthandler watchdog for a hang in native code) and nothing leaks a traceback:
  every command ends with exit 0, or exit 1 / 2 and `error:` / `FAIL` lines only;
* the readers either decode or raise one of the project's errors with a one-line message (CorruptShardError,
  ManifestError, ProgressFileError, FileNotFoundError, DataError...), never KeyError / IndexError / arrow internals;
* when `kd cache verify` says OK, every decoded sample equals the clean cache's, from every reader;
* the stream with `skip_corrupt_shards` and `verify_checksums` yields only samples equal to the clean cache's, and
  counts a skipped shard for whatever it leaves out.

The counts by outcome go to `<tmp>/fuzz_outcomes.json` and are printed (`pytest -s`).
"""

from __future__ import annotations

import faulthandler
import json
import logging
import os
import random
import shutil
import signal
import time
import traceback
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from kd_cache import format as fmt
from kd_cache import open_cache
from kd_cache.data import RecordSource
from kd_cache.errors import DataError
from kd_cache.format import ManifestError, ProgressFileError
from kd_cache.shards import CorruptShardError
from kd_cli.main import app
from kd_train.stream import CacheStream, DataMismatchError

pytestmark = pytest.mark.slow

SEED = 20260521
N_CASES = int(os.environ.get("KD_FUZZ_CASES", 520))  # shards : manifest : resume files = 200 : 200 : 120
CASE_SECONDS = 30  # a case past this is a hang
CLEAR = (CorruptShardError, ManifestError, ProgressFileError, FileNotFoundError, DataError, DataMismatchError)
JOURNAL = f"{fmt.PROGRESS_DIR}/rank-00000-of-00001.jsonl"
DONE = f"{fmt.PROGRESS_DIR}/rank-00000-of-00001.done.json"

runner = CliRunner()


class CaseTimeout(BaseException):
    """Raised by the per-case timer (a BaseException: no `except Exception` in the code under test swallows it)."""


# --------------------------------------------------------------------------------------------- mutations
WRONG_VALUES = [None, -1, 0, 1, 2**63, 2**70, 1.5, float("nan"), "", "x", True, False, [], {}, [1, 2], {"a": 1},
                "../manifest.json", "/etc/passwd", "s3://bucket/x.parquet", "shards/../../x.parquet",
                "shards/missing.parquet", "a" * 300, "shards/x\x00.parquet", "0" * 64, "A" * 64]


def flip_bytes(data: bytes, rng: random.Random, tail: int | None = None) -> bytes:
    b = bytearray(data)
    if not b:
        return b"\x01"
    lo = max(0, len(b) - tail) if tail else 0
    for _ in range(rng.randint(1, 4)):
        i = rng.randrange(lo, len(b))
        b[i] ^= 1 << rng.randrange(8) if rng.random() < 0.7 else rng.randrange(1, 256)
    return bytes(b)


def truncate(data: bytes, rng: random.Random) -> bytes:
    return data[:rng.randrange(0, max(1, len(data)))]


def zero_range(data: bytes, rng: random.Random) -> bytes:
    if not data:
        return data
    i = rng.randrange(len(data))
    n = rng.choice([1, 4, 16, 64, 512, 4096])
    return data[:i] + b"\x00" * min(n, len(data) - i) + data[i + n:]


def byte_mutation(data: bytes, rng: random.Random, kind: str) -> bytes:
    if kind == "flip":
        return flip_bytes(data, rng)
    if kind == "flip-tail":  # the Parquet footer (thrift metadata) or the end of a JSON file
        return flip_bytes(data, rng, tail=2048)
    if kind == "truncate":
        return truncate(data, rng)
    if kind == "zero":
        return zero_range(data, rng)
    if kind == "append":
        return data + bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
    raise AssertionError(kind)


BYTE_KINDS = ["flip", "flip-tail", "truncate", "zero", "append"]


def nodes(obj, path=()):
    """Every (path, value) of a JSON tree, the root excluded."""
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    for k, v in items:
        yield path + (k,), v
        yield from nodes(v, path + (k,))


def set_at(obj, path, value):
    for k in path[:-1]:
        obj = obj[k]
    obj[path[-1]] = value


def del_at(obj, path):
    for k in path[:-1]:
        obj = obj[k]
    del obj[path[-1]]


def json_mutation(obj, rng: random.Random, kind: str):
    """A JSON value (a copy) damaged by `kind`: a value replaced by one of another type or range, a key deleted."""
    obj = json.loads(json.dumps(obj))
    paths = [p for p, _ in nodes(obj)]
    if not paths:
        return rng.choice(WRONG_VALUES)
    path = rng.choice(paths)
    if kind == "value":
        set_at(obj, path, rng.choice(WRONG_VALUES))
    elif kind == "nudge":  # a plausible wrong number: +-1 on an integer
        ints = [p for p, v in nodes(obj) if type(v) is int]
        if ints:
            p = rng.choice(ints)
            v = obj
            for k in p:
                v = v[k]
            set_at(obj, p, v + rng.choice([-1, 1]))
    elif kind == "delete":
        del_at(obj, path)
    else:
        raise AssertionError(kind)
    return obj


def dumps(obj) -> bytes:
    return json.dumps(obj, indent=1, sort_keys=True).encode()


def mutate_shards(d: Path, rng: random.Random) -> str:
    shards = sorted((d / fmt.SHARD_DIR).glob("*.parquet"))
    a, b = rng.sample(shards, 2)
    kind = rng.choice(BYTE_KINDS * 3 + ["swap", "copy-over", "delete"])
    if kind == "swap":
        ta, tb = a.read_bytes(), b.read_bytes()
        a.write_bytes(tb)
        b.write_bytes(ta)
    elif kind == "copy-over":
        b.write_bytes(a.read_bytes())
    elif kind == "delete":
        a.unlink()
    else:
        a.write_bytes(byte_mutation(a.read_bytes(), rng, kind))
    return f"shard:{kind}"


def mutate_manifest(d: Path, rng: random.Random) -> str:
    path = d / fmt.MANIFEST_NAME
    m = json.loads(path.read_text())
    kind = rng.choice(BYTE_KINDS + ["value"] * 4 + ["nudge"] * 2 + ["delete"] * 2 + ["shard-value"] * 3
                      + ["swap-entries", "swap-names", "duplicate-entry", "drop-entry", "swap-with-journal"])
    s = m["shards"]
    if kind in BYTE_KINDS:
        path.write_bytes(byte_mutation(path.read_bytes(), rng, kind))
        return f"manifest:{kind}"
    if kind in ("value", "nudge", "delete"):
        m = json_mutation(m, rng, kind)
    elif kind == "shard-value":  # a field of one shard entry (the fields readers use most)
        i = rng.randrange(len(s))
        key = rng.choice(["name", "rows", "bytes", "sha256", "rank", "text_rows"])
        s[i][key] = rng.choice(WRONG_VALUES + [s[(i + 1) % len(s)][key]])
    elif kind == "swap-entries":
        i, j = rng.sample(range(len(s)), 2)
        s[i], s[j] = s[j], s[i]
    elif kind == "swap-names":
        i, j = rng.sample(range(len(s)), 2)
        s[i]["name"], s[j]["name"] = s[j]["name"], s[i]["name"]
    elif kind == "duplicate-entry":
        i, j = rng.sample(range(len(s)), 2)
        s[j] = dict(s[i])
    elif kind == "drop-entry":
        s.pop(rng.randrange(len(s)))
    elif kind == "swap-with-journal":
        path.write_bytes((d / JOURNAL).read_bytes())
        return f"manifest:{kind}"
    path.write_bytes(dumps(m))
    return f"manifest:{kind}"


def mutate_resume_files(d: Path, rng: random.Random) -> str:
    """Damage what `kd cache build` reads back on resume; the manifest (and card) are removed first, as after a
    build interrupted before it finalized."""
    (d / fmt.MANIFEST_NAME).unlink()
    (d / fmt.CARD_NAME).unlink()
    target = rng.choices(["journal", "done", "config"], weights=[6, 3, 1])[0]
    if target == "journal":
        path = d / JOURNAL
        lines = path.read_bytes().splitlines(keepends=True)
        kind = rng.choice(BYTE_KINDS + ["value"] * 3 + ["nudge"] * 2 + ["delete", "drop-line", "drop-last",
                                                                         "swap-lines", "dup-line", "torn-tail",
                                                                         "drop-last-shard"])
        if kind in BYTE_KINDS:
            path.write_bytes(byte_mutation(path.read_bytes(), rng, kind))
        elif kind in ("value", "nudge", "delete"):
            i = rng.randrange(len(lines))
            lines[i] = json.dumps(json_mutation(json.loads(lines[i]), rng, kind)).encode() + b"\n"
            path.write_bytes(b"".join(lines))
        elif kind == "drop-line":
            lines.pop(rng.randrange(len(lines)))
            path.write_bytes(b"".join(lines))
        elif kind == "drop-last":  # a crash after the shard's rename, before its journal entry
            path.write_bytes(b"".join(lines[:-1]))
        elif kind == "swap-lines":
            i, j = rng.sample(range(len(lines)), 2)
            lines[i], lines[j] = lines[j], lines[i]
            path.write_bytes(b"".join(lines))
        elif kind == "dup-line":
            i = rng.randrange(len(lines))
            lines.insert(i + 1, lines[i])
            path.write_bytes(b"".join(lines))
        elif kind == "torn-tail":  # a crash mid-append: part of one more line, or zeros where it was to be
            extra = lines[rng.randrange(len(lines))]
            tail = extra[:rng.randrange(1, len(extra) - 1)] if rng.random() < 0.7 else b"\x00" * rng.randint(1, 99)
            path.write_bytes(b"".join(lines) + tail)
        elif kind == "drop-last-shard":  # the last recorded shard is lost
            (d / json.loads(lines[-1])["shard"]).unlink()
        return f"journal:{kind}"
    path = d / (DONE if target == "done" else fmt.CONFIG_NAME)
    kind = rng.choice(BYTE_KINDS + ["value"] * 3 + ["nudge", "delete"])
    if kind in BYTE_KINDS:
        path.write_bytes(byte_mutation(path.read_bytes(), rng, kind))
    else:
        path.write_bytes(dumps(json_mutation(json.loads(path.read_text()), rng, kind)))
    return f"{target}:{kind}"


# --------------------------------------------------------------------------------------------- the oracle
def same_sample(a: dict, b: dict) -> bool:
    for k, v in a.items():
        if k not in b:
            return False
        w = b[k]
        if isinstance(v, np.ndarray):
            if not isinstance(w, np.ndarray) or v.dtype != w.dtype or not np.array_equal(v, w, equal_nan=True):
                return False
        elif v != w:
            return False
    return True


def compare(samples: list[dict], clean: dict) -> str:
    """'identical' (the clean cache's samples, each once) or 'differs'."""
    by_index = {}
    for s in samples:
        if s["sample_index"] in by_index:
            return "differs"
        by_index[s["sample_index"]] = s
    if set(by_index) != set(clean):
        return "differs"
    return "identical" if all(same_sample(clean[i], s) for i, s in by_index.items()) else "differs"


def cli(args: list[str]):
    """Run `kd ...` in-process: (exit code, output lines). Fails on a traceback or anything but the one error policy."""
    logging.root.handlers.clear()  # `kd cache build` configures logging on the stream of this invocation
    try:
        r = runner.invoke(app, args)
    finally:
        logging.root.handlers.clear()
    out = r.output
    assert r.exception is None or isinstance(r.exception, SystemExit), (
        f"kd {' '.join(args[:2])} raised {type(r.exception).__name__}: {r.exception}\n"
        + "".join(traceback.format_exception(r.exception)))
    assert "Traceback" not in out, out
    lines = [line for line in out.splitlines() if line.strip()]
    if r.exit_code == 2:
        errors = [line for line in lines if line.startswith("error: ")]
        assert len(errors) == 1 and all(line.startswith(("error: ", "INFO ", "WARNING ")) for line in lines), out
    elif r.exit_code == 1:
        assert lines and all(line.startswith(("FAIL ", "error: ", "INFO ", "WARNING ")) for line in lines), out
    else:
        assert r.exit_code == 0, out
    return r.exit_code, lines


def read(fn, clean: dict):
    """('identical' | 'differs', samples) or ('error', exception) for a reader; a leak fails the test."""
    try:
        samples = fn()
    except CLEAR as e:
        assert "\n" not in str(e), f"a multi-line error: {e!r}"
        return "error", e
    except CaseTimeout:
        raise
    except Exception as e:  # noqa: BLE001 - what the fuzzing is for
        raise AssertionError(f"leaked {type(e).__name__}: {e}\n{traceback.format_exc()}") from e
    return compare(samples, clean), samples


@pytest.fixture(scope="module")
def fuzz_env(tmp_path_factory, llava_cache, llava_teacher, tiny_data):
    data, images = tiny_data
    clean = {s["sample_index"]: s for s in open_cache(str(llava_cache))}
    assert len(clean) == 12 and len(json.loads((llava_cache / fmt.MANIFEST_NAME).read_text())["shards"]) == 3
    return {"cache": llava_cache, "clean": clean, "records": RecordSource(str(data)), "images": str(images),
            "build_args": ["--teacher", str(llava_teacher), "--data", str(data), "--images", str(images),
                           "--batch-size", "3", "--shard-size", "5", "--quiet"]}


def label(outcome: str, result) -> str:
    return f"error ({type(result).__name__})" if outcome == "error" else outcome


def run_case(d: Path, kind: str, env: dict, counts: dict[str, Counter]) -> str:
    clean, records, images = env["clean"], env["records"], env["images"]
    if kind.split(":")[0] in ("journal", "done", "config"):
        code, lines = cli(["cache", "build", "--out", str(d), *env["build_args"]])
        counts["build"][f"exit {code}"] += 1
        if code:
            return f"build-error (exit {code})"
    code, lines = cli(["cache", "verify", str(d)])
    verify_ok = code == 0
    counts["verify"][{0: "ok", 1: "fail (exit 1)", 2: "error (exit 2)"}[code]] += 1

    outcome, err = read(lambda: list(open_cache(str(d))), clean)
    counts["open_cache"][label(outcome, err)] += 1
    if verify_ok:
        assert outcome == "identical", f"{kind}: verify says OK but open_cache gave {outcome}"

    def stream(**kw):
        return list(CacheStream(str(d), records=records, image_root=images, shuffle_buffer=4, **kw))

    outcome, err = read(stream, clean)
    counts["stream"][label(outcome, err)] += 1
    if verify_ok:
        assert outcome == "identical", f"{kind}: verify says OK but the stream gave {outcome}"

    skipping = {}

    def stream_skipping():
        s = CacheStream(str(d), records=records, image_root=images, shuffle_buffer=4, skip_corrupt_shards=True,
                        verify_checksums=True)
        out = list(s)
        skipping.update(s.stats)
        return out

    outcome, got = read(stream_skipping, clean)
    if outcome != "error":
        # checksums verified: whatever it yields is the clean cache's, and what it leaves out is a counted skip
        assert all(s["sample_index"] in clean and same_sample(clean[s["sample_index"]], s) for s in got), kind
        if outcome == "differs":
            assert skipping["corrupt_shards"] > 0, f"{kind}: samples left out without a counted skip"
            outcome = "skipped shards"
    counts["stream (skip corrupt, checksums)"][label(outcome, got)] += 1
    if verify_ok:
        assert outcome == "identical", f"{kind}: verify says OK but the skipping stream gave {outcome}"
        return "ok-identical"
    return "verify-fail (exit 1)" if code == 1 else "verify-error (exit 2)"


def test_fuzz_readers_and_resume(tmp_path, fuzz_env):
    rng = random.Random(SEED)
    counts: dict[str, Counter] = {k: Counter() for k in ("outcome", "mutation", "verify", "open_cache", "stream",
                                                         "stream (skip corrupt, checksums)", "build")}

    def on_alarm(signum, frame):
        raise CaseTimeout()

    failures: list[str] = []
    old = signal.signal(signal.SIGALRM, on_alarm)
    faulthandler.dump_traceback_later(600, exit=True)  # a hang in native code: tracebacks and exit, not a hang
    t0 = time.perf_counter()
    try:
        for i in range(N_CASES):
            d = tmp_path / f"case-{i % 4}"
            shutil.rmtree(d, ignore_errors=True)
            shutil.copytree(fuzz_env["cache"], d)
            group = (mutate_shards, mutate_manifest, mutate_resume_files)[rng.choices(range(3), [5, 5, 3])[0]]
            kind = group(d, random.Random(rng.getrandbits(64)))
            signal.setitimer(signal.ITIMER_REAL, CASE_SECONDS)
            try:
                outcome = run_case(d, kind, fuzz_env, counts)
            except CaseTimeout:
                failures.append(f"case {i} ({kind}) ran past {CASE_SECONDS} s: a hang")
                outcome = "FAILED"
            except AssertionError as e:
                failures.append(f"case {i} ({kind}): {e}")
                outcome = "FAILED"
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
            if len(failures) >= 10:
                break
            counts["outcome"][outcome] += 1
            counts["mutation"][kind] += 1
    finally:
        faulthandler.cancel_dump_traceback_later()
        signal.signal(signal.SIGALRM, old)
    seconds = time.perf_counter() - t0
    report = {"seed": SEED, "cases": N_CASES, "seconds": round(seconds, 1),
              **{k: dict(sorted(v.items())) for k, v in counts.items()}}
    (tmp_path / "fuzz_outcomes.json").write_text(json.dumps(report, indent=1))
    print("\nfuzz outcomes:", json.dumps(report, indent=1))
    assert not failures, f"{len(failures)} failed cases (seed {SEED}):\n\n" + "\n\n".join(failures)
    assert sum(counts["outcome"].values()) == N_CASES
    assert N_CASES >= 500 or "KD_FUZZ_CASES" in os.environ
    assert counts["outcome"]["ok-identical"] > 0 and counts["verify"]["fail (exit 1)"] > 0
