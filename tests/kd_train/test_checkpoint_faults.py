"""Checkpoints survive faults (issue 21): a `kd train` killed with SIGKILL at chosen points of a checkpoint write
(before, between and inside its files, before and after the rename, while pruning) or failing with ENOSPC in one
leaves the previous checkpoint intact, nothing half written is resumed from, and the rerun resumes to final weights
bit-identical to an uninterrupted run's. Plus the checkpoint folder's rules on untrusted names and states.

The faults are injected from outside the product: `LAUNCHER` (written next to each run) wraps the functions the
checkpoint write calls (torch.save, the safetensors writer accelerate calls, kd's atomic JSON write, os.replace,
shutil.rmtree), numbers their calls inside `StageRunner.save_checkpoint` ("before"/"after" events), logs them, and
at the chosen event kills its own process (SIGKILL), truncates the file just written then kills, or raises ENOSPC.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kd_eval.tiny import make_tiny_teacher
from kd_train import checkpoint as ck

from tests.conftest import launcher_env, run_in_group

STEPS, EVERY = 12, 4  # 12 steps of batch 1 on the 12-record tiny cache; checkpoints at 4 and 8 (not at the end)
SEED = 21  # picks the random kill points

LAUNCHER = r'''
import errno, hashlib, json, os, re, shutil, signal, sys

plan = json.loads(os.environ["KD_TEST_FAULT_PLAN"])
log_file = open(plan["log"], "a")
count, active = 0, 0


def log(**rec):
    log_file.write(json.dumps(rec) + "\n")
    log_file.flush()  # to the OS: a SIGKILL loses nothing written before it


def sha(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def hashes(out):
    """{checkpoint name: {file: sha256}} of every `step-N` folder holding a trainer_state.json."""
    root, found = os.path.join(out, "checkpoints"), {}
    if os.path.isdir(root):
        for name in sorted(os.listdir(root)):
            d = os.path.join(root, name)
            if re.fullmatch(r"step-\d+", name) and os.path.isfile(os.path.join(d, "trainer_state.json")):
                found[name] = {f: sha(os.path.join(d, f)) for f in sorted(os.listdir(d))}
    return found


def event(when, name, path):
    global count
    if not active:
        return
    i, count = count, count + 1
    log(i=i, ev=f"{when} {name} {os.path.basename(os.fspath(path))}")
    if i != plan.get("at"):
        return
    if plan["action"] == "enospc":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.fspath(path))
    if plan["action"] == "truncate":  # a kill in the middle of writing this file
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
    os.kill(os.getpid(), signal.SIGKILL)


def wrap(owner, attr, name, path_at):
    orig = getattr(owner, attr)

    def wrapped(*a, **k):
        path = path_at(a, k)
        event("before", name, path)
        r = orig(*a, **k)
        event("after", name, path)
        return r

    setattr(owner, attr, wrapped)


import torch
import accelerate.utils.other as acc_other
import kd_cache.files as kd_files
from kd_train import engine

wrap(torch, "save", "save", lambda a, k: a[1] if len(a) > 1 else k["f"])
wrap(acc_other, "safe_save_file", "save_file", lambda a, k: a[1] if len(a) > 1 else k["filename"])
wrap(kd_files, "atomic_write_bytes", "write_json", lambda a, k: a[0])
wrap(os, "replace", "replace", lambda a, k: a[1])
wrap(os, "rename", "rename", lambda a, k: a[1])
wrap(shutil, "rmtree", "rmtree", lambda a, k: a[0])

save_checkpoint = engine.StageRunner.save_checkpoint


def traced(self):
    global active
    log(begin=self.step, hashes=hashes(self.out))  # the copy taken before the write
    active += 1
    try:
        save_checkpoint(self)
    finally:
        active -= 1
    log(end=self.step, hashes=hashes(self.out))


engine.StageRunner.save_checkpoint = traced

from kd_cli.main import main

sys.argv = ["kd", *sys.argv[1:]]
main()
'''


def child_env(**extra) -> dict:
    e = launcher_env(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", **extra)
    if "KD_TEST_FAULT_PLAN" not in extra:  # a fault plan reaches only the run it is given to
        e.pop("KD_TEST_FAULT_PLAN", None)
    return e


@pytest.fixture(scope="module")
def student(tmp_path_factory) -> Path:
    return make_tiny_teacher(tmp_path_factory.mktemp("student"), "llava", hidden_size=32, num_layers=1, seed=7)


@pytest.fixture(scope="module")
def train_args(student, tiny_data, llava_cache):
    data, images = tiny_data

    def args(out: Path) -> list[str]:
        return ["train", "--stage", "dft", "--student", str(student), "--cache", str(llava_cache), "--data",
                str(data), "--images", str(images), "--out", str(out), "--batch-size", "1", "--lr", "1e-3",
                "--shuffle-buffer", "4", "--seed", "0", "--quiet", "--checkpoint-every", str(EVERY),
                "--keep-checkpoints", "1"]

    return args


def run_faulty(out: Path, args: list[str], at: int | None = None, action: str = "kill"):
    """`kd train` under the launcher (`at` None: no fault, events logged); (process, log records)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    launcher = out.parent / f"{out.name}-launcher.py"
    launcher.write_text(LAUNCHER)
    log = out.parent / f"{out.name}-events.jsonl"
    plan = {"log": str(log), "at": at, "action": action}
    r = run_in_group([sys.executable, str(launcher), *args], env=child_env(KD_TEST_FAULT_PLAN=json.dumps(plan)),
                     timeout=300)
    records = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    return r, records


def run_plain(args: list[str]):
    return run_in_group([sys.executable, "-m", "kd_cli.main", *args], env=child_env(), timeout=300)


def hashes(out: Path) -> dict[str, dict[str, str]]:
    """What the launcher records, computed here: {checkpoint name: {file: sha256}} of every folder `step-N` that
    holds a trainer_state.json."""
    root, found = out / "checkpoints", {}
    if root.is_dir():
        for d in sorted(root.iterdir()):
            if d.is_dir() and d.name[5:].isdigit() and d.name.startswith("step-") and (d / ck.STATE_NAME).is_file():
                found[d.name] = {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(d.iterdir())}
    return found


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "final" / "model.safetensors"))


def assert_bit_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


class Reference:
    """The uninterrupted run: its final weights, the hashes of each checkpoint as written, and the numbered events
    of the second checkpoint's write (step 8), where the faults go."""

    def __init__(self, out: Path, records: list[dict]):
        self.out = out
        self.weights = final_weights(out)
        self.written = {f"step-{r['end']:08d}": r["hashes"][f"step-{r['end']:08d}"] for r in records if "end" in r}
        begin = next(i for i, r in enumerate(records) if r.get("begin") == 2 * EVERY)
        end = next(i for i, r in enumerate(records) if r.get("end") == 2 * EVERY)
        self.events = [(r["i"], r["ev"]) for r in records[begin + 1:end]]

    def at(self, ev: str) -> int:
        """The number of the first event of the step-8 write named `ev` ("after save_file model.safetensors")."""
        hits = [i for i, e in self.events if e == ev]
        assert hits, f"no event {ev!r} in the step-8 write: {self.events}"
        return hits[0]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, train_args) -> Reference:
    out = tmp_path_factory.mktemp("reference") / "run"
    r, records = run_faulty(out, train_args(out))
    assert r.returncode == 0, r.stderr[-3000:]
    return Reference(out, records)


def test_the_write_orders_files_state_rename_and_prune(reference):
    """The uninterrupted run's step-8 write, as the launcher saw it: every file before trainer_state.json, that
    before the rename into place, the older checkpoint removed only after the rename; both checkpoints were written
    with the same files."""
    ev = [e for _, e in reference.events]
    tmp, final = "step-00000008.tmp", "step-00000008"
    state = ev.index("after write_json trainer_state.json")
    rename = ev.index(f"after replace {final}")
    files = [i for i, e in enumerate(ev) if e.startswith(("after save ", "after save_file "))]
    assert len(files) >= 3 and max(files) < state < rename, ev  # model, optimizer, scheduler, RNG states
    assert ev.index("after rmtree step-00000004") > rename, ev
    assert f"before rmtree {tmp}" in ev[:2], ev  # a leftover of a killed write of this step goes first
    assert set(reference.written) == {"step-00000004", "step-00000008"}
    assert set(reference.written["step-00000004"]) == set(reference.written["step-00000008"]) >= {
        "model.safetensors", "optimizer.bin", "scheduler.bin", "trainer_state.json"}
    assert not (reference.out / "checkpoints" / "step-00000004").exists()  # --keep-checkpoints 1
    assert [p.name for p in (reference.out / "checkpoints").iterdir()] == [final]


# (name, event that is hit, action); the seeded ones are added below
KILL_POINTS = [
    ("start", "before rmtree step-00000008.tmp", "kill"),
    ("between-files", "after save_file model.safetensors", "kill"),
    ("inside-a-file", "after save optimizer.bin", "truncate"),
    ("before-state", "before write_json trainer_state.json", "kill"),
    ("state-written-not-renamed", "after write_json trainer_state.json", "kill"),
    ("before-rename", "before replace step-00000008", "kill"),
    ("after-rename", "after replace step-00000008", "kill"),
    ("while-pruning", "before rmtree step-00000004", "kill"),
    ("after-pruning", "after rmtree step-00000004", "kill"),
]
QUICK = {"state-written-not-renamed"}  # each case is two `kd train` runs (~10 s of CPU each): the rest are slow


def kill_cases():
    cases = [pytest.param(name, ev, action, id=name, marks=() if name in QUICK else pytest.mark.slow)
             for name, ev, action in KILL_POINTS]
    cases += [pytest.param(f"random-{k}", k, "kill", id=f"seeded-{k}", marks=pytest.mark.slow) for k in range(2)]
    return cases


def resolve(reference: Reference, name: str, ev) -> int:
    if isinstance(ev, int):  # seeded: any event of the write, the same ones on every run
        return random.Random(SEED * 100 + ev).choice([i for i, _ in reference.events])
    return reference.at(ev)


@pytest.mark.parametrize("name,ev,action", kill_cases())
def test_kill_during_a_checkpoint_write(tmp_path, reference, train_args, name, ev, action):
    at = resolve(reference, name, ev)
    rename = reference.at("after replace step-00000008")
    out = tmp_path / "run"
    r, records = run_faulty(out, train_args(out), at=at, action=action)
    assert r.returncode == -9, f"not killed at event {at} ({r.returncode})\n{r.stderr[-3000:]}"
    hit = [rec["ev"] for rec in records if rec.get("i") == at]
    assert len(hit) == 1 and hit[0] == dict(reference.events)[at], (hit, at)
    assert not (out / "final").exists()

    # what is left: the previous checkpoint as it was before the write began (and as the reference wrote it); the
    # new one only if the kill came after its rename, then whole
    before = next(rec["hashes"] for rec in records if rec.get("begin") == 2 * EVERY)
    assert before == {"step-00000004": reference.written["step-00000004"]}
    expect = "step-00000008" if at >= rename else "step-00000004"
    left = hashes(out)
    assert expect in left
    for ckpt, files in left.items():
        assert files == reference.written[ckpt], ckpt
    assert ck.latest_checkpoint(str(out)) == str(out / "checkpoints" / expect)

    r = run_plain(train_args(out))
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resumed stage dft from {out / 'checkpoints' / expect} " in r.stderr, r.stderr[-3000:]
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.endswith(".tmp")]
    assert_bit_identical(final_weights(out), reference.weights)
    steps = [json.loads(line).get("step") for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [s for s in steps if s is not None] == list(range(1, STEPS + 1))  # each step logged once


@pytest.mark.parametrize("ev", [
    pytest.param("before save optimizer.bin", id="in-the-state-files", marks=pytest.mark.slow),
    pytest.param("before write_json trainer_state.json", id="in-trainer-state", marks=pytest.mark.slow),
])
def test_enospc_during_a_checkpoint_write(tmp_path, reference, train_args, ev):
    at = reference.at(ev)
    out = tmp_path / "run"
    r, _ = run_faulty(out, train_args(out), at=at, action="enospc")
    assert r.returncode == 1, r.stderr[-3000:]
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, r.stderr[-3000:]
    assert "No space left on device" in errors[0] and "step-00000008" in errors[0], errors[0]
    assert str(out / "checkpoints" / "step-00000004") in errors[0], errors[0]  # names what a rerun resumes from
    assert not (out / "final").exists()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000004"]  # the half one removed
    assert hashes(out) == {"step-00000004": reference.written["step-00000004"]}

    r = run_plain(train_args(out))
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resumed stage dft from {out / 'checkpoints' / 'step-00000004'} " in r.stderr, r.stderr[-3000:]
    assert_bit_identical(final_weights(out), reference.weights)


# ------------------------------------------------------------------------------ the folder's rules, in process
def make_ckpt(root: Path, name: str, step: int | None = None, state: str | bytes | None = None) -> Path:
    d = root / "checkpoints" / name
    d.mkdir(parents=True)
    (d / "model.safetensors").write_bytes(b"weights")
    if state is None:
        state = json.dumps({"step": step, "epoch": 0, "total_steps": 12, "data": [{"rank": 0}]})
    (d / ck.STATE_NAME).write_bytes(state if isinstance(state, bytes) else state.encode())
    return d


def test_latest_checkpoint_skips_what_is_not_a_complete_checkpoint(tmp_path):
    good = make_ckpt(tmp_path, "step-00000004", 4)
    make_ckpt(tmp_path, "step-00000008", state='{"step": 8, "epoch": 0, "total_st')  # truncated
    make_ckpt(tmp_path, "step-00000009", state="")  # empty
    make_ckpt(tmp_path, "step-00000010", state="[1, 2]")  # not a state
    make_ckpt(tmp_path, "step-00000011", state=json.dumps({"step": "11", "epoch": 0, "total_steps": 12, "data": [{}]}))
    make_ckpt(tmp_path, "step-00000012", 4)  # a state of another step
    make_ckpt(tmp_path, "step-00000013", state=b"\xff\xfe{}")  # not UTF-8 JSON
    make_ckpt(tmp_path, "step-00000014.tmp", 14)  # a write that was not renamed into place
    make_ckpt(tmp_path, "step-abc", 99)
    make_ckpt(tmp_path, "step-", 99)
    make_ckpt(tmp_path, "step-1e3", 1000)
    (tmp_path / "checkpoints" / "step-00000020").write_text("a stray file")
    (tmp_path / "checkpoints" / "step-00000030").mkdir()  # no state at all
    (tmp_path / "checkpoints" / "README").write_text("notes")
    assert ck.latest_checkpoint(str(tmp_path)) == str(good)
    assert [s for s, _ in ck.complete_checkpoints(str(tmp_path))] == [4]
    assert ck.latest_checkpoint(str(tmp_path / "nothing")) is None
    (tmp_path / "file-out").write_text("")
    assert ck.latest_checkpoint(str(tmp_path / "file-out")) is None


def test_prune_keeps_the_newest_complete_and_leaves_foreign_names(tmp_path):
    for step in (2, 4, 6):
        make_ckpt(tmp_path, f"step-{step:08d}", step)
    make_ckpt(tmp_path, "step-00000003", state="{")  # incomplete, older than the newest complete: superseded
    make_ckpt(tmp_path, "step-00000008", state="{")  # incomplete, newer: left (a rerun reaching 8 replaces it)
    make_ckpt(tmp_path, "step-00000007.tmp", 7)
    make_ckpt(tmp_path, "step-abc", 1)
    (tmp_path / "checkpoints" / "notes.txt").write_text("")
    ck.prune_checkpoints(str(tmp_path), keep=2)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "notes.txt", "step-00000004", "step-00000006", "step-00000008", "step-abc"]
    ck.prune_checkpoints(str(tmp_path), keep=1)
    assert ck.latest_checkpoint(str(tmp_path)).endswith("step-00000006")
    assert not (tmp_path / "checkpoints" / "step-00000004").exists()


def test_prune_never_removes_the_only_complete_checkpoint(tmp_path):
    make_ckpt(tmp_path, "step-00000004", state="{")
    make_ckpt(tmp_path, "step-00000002", state="{")
    ck.prune_checkpoints(str(tmp_path), keep=1)  # nothing complete: nothing to prune against
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-00000002", "step-00000004"]


def test_remove_partial_removes_only_unrenamed_writes(tmp_path):
    make_ckpt(tmp_path, "step-00000004", 4)
    make_ckpt(tmp_path, "step-00000008.tmp", 8)
    (tmp_path / "checkpoints" / "notes.tmp").write_text("not ours")
    gone = ck.remove_partial(str(tmp_path))
    assert gone == [str(tmp_path / "checkpoints" / "step-00000008.tmp")]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["notes.tmp", "step-00000004"]


def test_commit_fsyncs_every_file_the_folder_and_its_parent_before_and_after_the_rename(tmp_path, monkeypatch):
    tmp, final = ck.checkpoint_paths(str(tmp_path), 8)
    ck.begin_checkpoint(tmp)
    for name in ("model.safetensors", "optimizer.bin", ck.STATE_NAME):
        Path(tmp, name).write_text("x")
    os.makedirs(os.path.join(tmp, "sub"))
    Path(tmp, "sub", "extra.pkl").write_text("y")
    calls: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))),
                                                 real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (calls.append(("replace", str(b))), real_replace(a, b))[1])
    ck.commit_checkpoint(tmp, final)
    rename = calls.index(("replace", final))
    synced_before = {p for op, p in calls[:rename] if op == "fsync"}
    want = {os.path.join(tmp, n) for n in ("model.safetensors", "optimizer.bin", ck.STATE_NAME, "sub/extra.pkl")}
    assert want | {tmp, os.path.join(tmp, "sub")} <= synced_before, calls
    assert ("fsync", os.path.dirname(final)) in calls[rename + 1:], calls
    assert sorted(os.listdir(final)) == sorted(["model.safetensors", "optimizer.bin", ck.STATE_NAME, "sub"])
    assert not os.path.exists(tmp)


def test_commit_replaces_an_incomplete_folder_of_the_same_step(tmp_path):
    make_ckpt(tmp_path, "step-00000008", state="{")
    tmp, final = ck.checkpoint_paths(str(tmp_path), 8)
    ck.begin_checkpoint(tmp)
    Path(tmp, ck.STATE_NAME).write_text(json.dumps({"step": 8, "epoch": 0, "total_steps": 12, "data": [{}]}))
    ck.commit_checkpoint(tmp, final)
    assert ck.latest_checkpoint(str(tmp_path)) == final and os.listdir(final) == [ck.STATE_NAME]


def test_an_enospc_in_process_leaves_one_error_and_no_temporary_folder(tmp_path, monkeypatch, student, tiny_data,
                                                                        llava_cache):
    """In process, through the CLI: the write of the first checkpoint fails with ENOSPC inside accelerate's
    save_state; the error says no earlier checkpoint exists, the temporary folder is gone."""
    from typer.testing import CliRunner

    import accelerate.utils.other as acc_other
    from kd_cli.main import app

    def full(*a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(a[1]))

    monkeypatch.setattr(acc_other, "safe_save_file", full)
    data, images = tiny_data
    out = tmp_path / "run"
    r = CliRunner().invoke(app, ["train", "--stage", "dft", "--student", str(student), "--cache", str(llava_cache),
                                 "--data", str(data), "--images", str(images), "--out", str(out), "--batch-size", "4",
                                 "--max-steps", "2", "--checkpoint-every", "1", "--quiet"])
    assert r.exit_code == 1, r.output
    assert r.exception is None or isinstance(r.exception, SystemExit), r.exception
    assert "Traceback" not in r.output
    [line] = [x for x in r.output.splitlines() if x.startswith("error:")]
    assert "writing checkpoint" in line and "No space left on device" in line and "no earlier checkpoint" in line
    assert list((out / "checkpoints").iterdir()) == []
