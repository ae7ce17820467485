"""Where a stage keeps its checkpoints: `<out>/checkpoints/step-NNNNNNNN/`, complete once its trainer_state.json
exists and parses (written last, then the folder renamed into place).

A checkpoint is written into `step-NNNNNNNN.tmp/` (`checkpoint_paths`, `begin_checkpoint`); `commit_checkpoint`
fsyncs every file and the folder, renames it into place and fsyncs `checkpoints/`, so that a kill -9 or a power loss
at any point leaves either the complete new checkpoint or none of it, and never touches the previous one. Older
checkpoints are pruned only after the new one is in place. What a killed or failed write left (`*.tmp` folders)
is ignored by `latest_checkpoint` and removed by `remove_partial` (run at the start of every stage) and by
`prune_checkpoints`.
Folder names and trainer_state.json are untrusted input (a crash, a copy, another tool): a name that is not
`step-<digits>`, a stray file, or a state file that is missing, truncated, not JSON or not a state of that step
makes the folder incomplete, never an error."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from typing import Any

from kd_cache.files import fsync_dir

CHECKPOINT_DIR = "checkpoints"
STATE_NAME = "trainer_state.json"
TMP_SUFFIX = ".tmp"
_STEP = re.compile(r"step-(\d{1,18})")


def checkpoint_root(out: str) -> str:
    return os.path.join(out, CHECKPOINT_DIR)


def checkpoint_step(name: str) -> int | None:
    """N of a folder named `step-N` (any number of digits), None for any other name."""
    m = _STEP.fullmatch(name)
    return int(m.group(1)) if m else None


def read_state(folder: str) -> dict[str, Any] | None:
    """The trainer state of checkpoint `folder`, or None when the folder is not a complete checkpoint: no, an
    unreadable, a truncated or a malformed trainer_state.json, or one of another step than the folder's name."""
    try:
        with open(os.path.join(folder, STATE_NAME), "rb") as f:
            state = json.loads(f.read())
    except (OSError, ValueError):  # missing, unreadable, not UTF-8, not JSON (truncated)
        return None
    if not isinstance(state, dict):
        return None
    ints = [state.get(k) for k in ("step", "epoch", "total_steps")]
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in ints):
        return None
    data = state.get("data")
    if not isinstance(data, list) or not data or not all(isinstance(d, dict) for d in data):
        return None
    if state["step"] != checkpoint_step(os.path.basename(os.path.normpath(folder))):
        return None
    return state


def complete_checkpoints(out: str) -> list[tuple[int, str]]:
    """(step, folder) of every complete checkpoint of `out`, oldest first."""
    root = checkpoint_root(out)
    try:
        names = os.listdir(root)
    except OSError:  # no checkpoints yet (or `checkpoints` is not a folder)
        return []
    found = []
    for name in names:
        step = checkpoint_step(name)
        path = os.path.join(root, name)
        if step is not None and os.path.isdir(path) and read_state(path) is not None:
            found.append((step, path))
    return sorted(found)


def latest_checkpoint(out: str) -> str | None:
    """The newest complete checkpoint folder, None when there is none."""
    found = complete_checkpoints(out)
    return found[-1][1] if found else None


def checkpoint_paths(out: str, step: int) -> tuple[str, str]:
    """(temporary folder, final folder) of the checkpoint of `step`: the same on every rank."""
    final = os.path.join(checkpoint_root(out), f"step-{step:08d}")
    return final + TMP_SUFFIX, final


def begin_checkpoint(tmp: str) -> None:
    """Create the temporary folder `tmp` empty (what an earlier killed write of the same step left is removed).
    Main process only."""
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)


def sync_tree(folder: str) -> None:
    """fsync every file under `folder`, then every folder under it (bottom up), so that their contents and names
    are on disk before a rename publishes them."""
    for dirpath, _, files in os.walk(folder, topdown=False):
        for name in files:
            path = os.path.join(dirpath, name)
            if os.path.islink(path):
                continue
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(dirpath)


def publish_folder(tmp: str, final: str) -> None:
    """Rename the written folder `tmp` to `final` durably: fsync its files and folders, replace what `final` held,
    rename, fsync the parent. A kill at any point leaves `tmp` complete or `final` complete (after the rename)."""
    sync_tree(tmp)
    if os.path.lexists(final):
        if os.path.isdir(final) and not os.path.islink(final):
            shutil.rmtree(final, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.remove(final)  # a stray file or link of that name
    os.replace(tmp, final)
    fsync_dir(os.path.dirname(final) or ".")


def commit_checkpoint(tmp: str, final: str) -> None:
    """Publish the written checkpoint `tmp` (its trainer_state.json written last) as `final` (`publish_folder`).
    Main process only. `final` can only exist here as an incomplete folder of the same step (a newer complete one
    would have been resumed from), so it is replaced."""
    publish_folder(tmp, final)


def abort_checkpoint(tmp: str) -> None:
    """Remove what a failed write (ENOSPC...) left; never raises, the write's own error is the one reported."""
    shutil.rmtree(tmp, ignore_errors=True)


def remove_partial(out: str) -> list[str]:
    """Remove the `step-N.tmp` folders killed writes left; returns their paths. Main process only, before any write
    of this run (a rerun of the same --out; concurrent runs into one --out are not supported)."""
    root = checkpoint_root(out)
    try:
        names = os.listdir(root)
    except OSError:
        return []
    gone = []
    for name in names:
        if name.endswith(TMP_SUFFIX) and checkpoint_step(name[:-len(TMP_SUFFIX)]) is not None:
            path = os.path.join(root, name)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path, ignore_errors=True)
                gone.append(path)
    if gone:
        fsync_dir(root)
    return gone


def prune_checkpoints(out: str, keep: int) -> None:
    """Keep the `keep` newest complete checkpoints; remove older ones, incomplete `step-N` folders older than the
    newest complete one, and leftover `.tmp` folders. Called after a new checkpoint is in place, so it never removes
    the only complete one. Names that are not checkpoints (`step-abc`, stray files) are left alone."""
    remove_partial(out)
    complete = complete_checkpoints(out)
    if not complete:
        return
    kept = {path for _, path in complete[-max(keep, 1):]}
    newest = complete[-1][0]
    root = checkpoint_root(out)
    removed = False
    for name in os.listdir(root):
        step = checkpoint_step(name)
        path = os.path.join(root, name)
        if step is None or path in kept or step > newest or not os.path.isdir(path) or os.path.islink(path):
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed = True
    if removed:
        fsync_dir(root)
