"""The documentation is executable: every shell command of README.md and docs/*.md that invokes kd runs, in
document order, as a real subprocess (`bash -c`, with this venv's `kd` / `accelerate` first on PATH) in a fresh
folder per document where the docs' own paths exist (tests/docs_runner.py: hub ids are folders holding tiny models,
data files and image folders a tiny LLaVA-format dataset). A command fails the test on a non-zero exit or a
"Traceback" in its output.

A command that cannot run here (GPU, network, multi-node, vLLM) is skipped by an HTML comment right before its
block in the doc, with the reason: `<!-- docs-test: skip `prefix` (reason) -->` (or `skip (reason)` for the whole
block). That is the only place a skip is decided.

What the test adds to the docs, all listed below:
  * GIVEN: inputs a document takes as given (training.md trains on `caches/instruct` and `caches/caption`, which it
    does not build), built first by kd itself;
  * FILLS: what stands for a `...` in a command (only the flags that command needs; the doc's own flags stay);
  * EXTRA_FLAGS: flags appended to shrink a documented size that would take too long on 2 CPU cores. None is needed
    today: the tiny dataset (40 instruct / 32 caption records) holds one optimizer step of the README's
    `--batch-size 8 --grad-accum 4`, and every documented value runs as written.

Each command runs in its own process group (killed whole on a timeout) with HF_HUB_OFFLINE=1 and OMP_NUM_THREADS=1.
About 2 minutes on 2 CPU cores (each kd process pays ~5 s of imports), so the run is marked `slow`; scripts/test.sh
(and so .ci/run) runs slow tests too.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tests import docs_runner as dr

# Inputs a document uses without building them: run (strictly, like the documented commands) before its commands.
GIVEN: dict[str, list[str]] = {
    "docs/training.md": [
        "kd cache build --teacher TEACHER_DIR --data instruct.json --images imgs/ --out caches/instruct",
        "kd cache build --teacher TEACHER_DIR --data caption.json --images imgs/ --out caches/caption",
    ],
}

# (file, command as extracted) -> what replaces its `...`.
FILLS: dict[tuple[str, str], str] = {
    ("docs/scaling.md", "kd cache build --backend transformers ..."):
        "--teacher llava-hf/llava-1.5-7b-hf --data llava_v1_5_mix665k.json --images data/ --out caches/llava7b",
    ("docs/training.md", "accelerate launch --multi_gpu --num_processes 2 -m kd_cli.main train ..."):
        "--stage dft --student student0 --cache caches/instruct --data instruct.json --images imgs/ --out runs/ddp",
}

# (file, command as extracted) -> flags appended to shrink a size (see the module docstring). Empty today.
EXTRA_FLAGS: dict[tuple[str, str], str] = {}

MIN_KD_COMMANDS = 20  # kd commands found in the docs (run or skipped): a parser that finds none fails
MIN_RUN = 10  # of which run
TIMEOUT_S = 300  # per command


def _docs_with_kd_commands() -> list[str]:
    """The documents that hold a kd command (a document the parser cannot read is kept, so its test says why)."""
    docs = []
    for p in dr.doc_files():
        try:
            if not dr.kd_commands(dr.parse_blocks(p)):
                continue
        except dr.DocsSyntaxError:
            pass
        docs.append(p.relative_to(dr.ROOT).as_posix())
    return docs


def _parse_all() -> dict[str, list[dr.Block]]:
    return {p.relative_to(dr.ROOT).as_posix(): dr.parse_blocks(p) for p in dr.doc_files()}


def _placeholder(cmd: dr.Command) -> bool:
    return "..." in cmd.text.split() or " [--" in cmd.text


def _to_run(blocks: list[dr.Block]) -> list[dr.Command]:
    return [c for c in dr.kd_commands(blocks) if c.skip is None]


def _executed(cmd: dr.Command) -> str:
    key = (cmd.file, cmd.text)
    text = cmd.text
    if key in FILLS:
        words = text.split(" ")
        text = " ".join(FILLS[key] if w == "..." else w for w in words)
    if key in EXTRA_FLAGS:
        text = f"{text} {EXTRA_FLAGS[key]}"
    return text


def test_docs_commands_are_found_and_every_skip_and_fill_is_used():
    parsed = _parse_all()
    commands = [c for blocks in parsed.values() for c in dr.kd_commands(blocks)]
    run = [c for c in commands if c.skip is None]
    assert len(commands) >= MIN_KD_COMMANDS, [str(c) for c in commands]
    assert len(run) >= MIN_RUN, [str(c) for c in run]
    for blocks in parsed.values():
        for b in blocks:
            for s in b.skips:
                assert s.used, f"{b.file}:{s.line}: docs-test skip {s.prefix or '(whole block)'!r} matches no kd " \
                               f"command of the block at line {b.line}"
                assert s.reason.strip(), f"{b.file}:{s.line}: a skip needs a reason"
    keys = {(c.file, c.text) for c in run}
    for key in [*FILLS, *EXTRA_FLAGS]:
        assert key in keys, f"FILLS/EXTRA_FLAGS entry {key} matches no command the docs test runs"
    for file in GIVEN:
        assert file in parsed, file
    for c in run:
        if _placeholder(c):
            assert (c.file, c.text) in FILLS, f"{c}: has a placeholder (`...` or [--optional]); add a FILLS entry " \
                                              "or a docs-test skip comment"


def test_parser_joins_continuations_and_applies_skips(tmp_path):
    doc = tmp_path / "doc.md"
    doc.write_text("""# t

```bash
# a comment line
kd cache build --teacher T \\
    --out "a b"   # trailing comment
pip install x
```

<!-- docs-test: skip `kd train --gpu` (needs a GPU) -->
```sh
kd train --gpu 1
kd train --cpu 1
```

<!-- docs-test: skip (needs the network) -->
```console
$ kd cache publish c --repo r
uploaded
$ python -m kd_cli.main cache info c
```

```python
kd = 1
```
""")
    blocks = dr.parse_blocks(doc)
    assert [(c.line, c.text, c.skip) for c in dr.kd_commands(blocks)] == [
        (5, 'kd cache build --teacher T --out "a b"', None),
        (12, "kd train --gpu 1", "needs a GPU"),
        (13, "kd train --cpu 1", None),
        (18, "kd cache publish c --repo r", "needs the network"),
        (20, "python -m kd_cli.main cache info c", "needs the network"),
    ]
    assert [c.text for c in blocks[0].commands] == ['kd cache build --teacher T --out "a b"', "pip install x"]
    doc.write_text("<!-- docs-test: skip (x) -->\nprose\n\n```bash\nkd x\n```\n")
    with pytest.raises(dr.DocsSyntaxError, match="right before"):
        dr.parse_blocks(doc)
    doc.write_text("<!-- docs-test: run it -->\n```bash\nkd x\n```\n")
    with pytest.raises(dr.DocsSyntaxError, match="unknown docs-test directive"):
        dr.parse_blocks(doc)
    assert dr.invokes_kd("RANK=3 kd cache build") and dr.invokes_kd("srun bash -c 'python -m kd_cli.main x'")
    assert not dr.invokes_kd("pip install 'kd-offline[remote]'") and not dr.invokes_kd("bash scripts/setup.sh vllm")


def test_run_shell_kills_the_whole_process_group_on_timeout(tmp_path):
    import os
    import time

    env = dr.kd_env(tmp_path, Path(sys.executable).parent)
    r = dr.run_shell("sleep 300 & echo $! > child; wait", tmp_path, env, timeout=2)
    assert r.rc is None and r.seconds < 10
    child = int((tmp_path / "child").read_text())
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # the background child was killed with its group (and reaped by init)
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"pid {child} outlived its process group's timeout")
    r = dr.run_shell("echo out; exit 3", tmp_path, env, timeout=30)
    assert (r.rc, r.output) == (3, "out\n")


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> Path:
    return dr.make_assets(tmp_path_factory.mktemp("docs-assets"))


@pytest.mark.slow
@pytest.mark.parametrize("doc", _docs_with_kd_commands())
def test_documented_commands_run(doc, assets, tmp_path):
    blocks = dr.parse_blocks(dr.ROOT / doc)
    commands = _to_run(blocks)
    if not commands:
        skipped = [f"{c.line}: {c.text} ({c.skip})" for c in dr.kd_commands(blocks)]
        pytest.skip(f"{doc}: no kd command to run here" + (f"; skipped: {skipped}" if skipped else ""))
    world = dr.populate(tmp_path / "world", assets)
    env = dr.kd_env(tmp_path, Path(sys.executable).parent)  # this interpreter's venv (.venv): its kd, accelerate
    steps = [(f"{doc} (given)", c) for c in GIVEN.get(doc, [])] + [(f"{c.file}:{c.line}", _executed(c))
                                                                    for c in commands]
    failures, log = [], []
    for where, command in steps:
        r = dr.run_shell(command, world, env, TIMEOUT_S)
        log.append(f"{r.seconds:6.1f} s  rc={r.rc}  {where}: {command}")
        if r.rc is None:
            bad = f"timed out after {TIMEOUT_S} s (process group killed)"
        elif r.rc != 0:
            bad = f"exit {r.rc}"
        elif "Traceback" in r.output:
            bad = "exit 0 but a traceback in its output"
        else:
            continue
        failures.append(f"{where}: {command}\n  -> {bad}{' (after an earlier failure)' if failures else ''}; "
                        f"output (last 4000 chars):\n{r.output[-4000:]}")
    print("\n".join(log))
    assert not failures, "documented commands failed:\n\n" + "\n\n".join(failures)
