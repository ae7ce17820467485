"""Where a stage keeps its checkpoints: `<out>/checkpoints/step-NNNNNNNN/`, complete once its trainer_state.json
exists (written last, then the folder renamed into place)."""

from __future__ import annotations

import os
import shutil

CHECKPOINT_DIR = "checkpoints"
STATE_NAME = "trainer_state.json"


def latest_checkpoint(out: str) -> str | None:
    """The newest complete checkpoint folder (complete = its trainer_state.json exists)."""
    root = os.path.join(out, CHECKPOINT_DIR)
    if not os.path.isdir(root):
        return None
    steps = []
    for name in os.listdir(root):
        if name.startswith("step-") and os.path.exists(os.path.join(root, name, STATE_NAME)):
            steps.append((int(name.split("-")[1]), name))
    return os.path.join(root, max(steps)[1]) if steps else None


def prune_checkpoints(out: str, keep: int) -> None:
    root = os.path.join(out, CHECKPOINT_DIR)
    names = sorted((n for n in os.listdir(root) if n.startswith("step-") and "." not in n),
                   key=lambda n: int(n.split("-")[1]))
    for name in names[:-keep]:
        shutil.rmtree(os.path.join(root, name), ignore_errors=True)
