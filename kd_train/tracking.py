"""Metrics logging: the JSON-lines tracker every stage writes to `<out>/metrics.jsonl`."""

from __future__ import annotations

import json
import os

from accelerate.tracking import GeneralTracker

from kd_cache.files import atomic_write_text


class JsonlTracker:
    """accelerate tracker writing one JSON object per logged step to `<out>/metrics.jsonl` (main process only)."""

    name = "jsonl"
    requires_logging_directory = True
    main_process_only = True

    def __init__(self, run_name: str, logging_dir: str):
        os.makedirs(logging_dir, exist_ok=True)
        self.path = os.path.join(logging_dir, "metrics.jsonl")
        self.run_name = run_name
        self._file = None  # opened on first write: a run refused before training leaves no log behind

    @property
    def _f(self):
        if self._file is None:
            self._file = open(self.path, "a")
        return self._file

    @property
    def tracker(self):
        return self._f

    def start(self) -> None:  # accelerate >= 1.2 calls this lazily
        pass

    def store_init_configuration(self, values: dict) -> None:
        self._f.write(json.dumps({"run": self.run_name, "config": values}, default=str) + "\n")
        self._f.flush()

    def log(self, values: dict, step: int | None = None, **kwargs) -> None:
        self._f.write(json.dumps({"step": step, **values}, default=float) + "\n")
        self._f.flush()

    def drop_after(self, step: int) -> None:
        """Forget what a killed run logged after `step` (the checkpoint a resume starts from), so that each step is
        logged once: the file is rewritten (tmp + rename) without those lines."""
        if not os.path.exists(self.path):
            return
        with open(self.path) as f:
            lines = f.readlines()
        keep = []
        for line in lines:
            try:
                logged = json.loads(line).get("step")
            except (json.JSONDecodeError, AttributeError):
                continue  # a line torn by the kill
            if logged is None or logged <= step:
                keep.append(line if line.endswith("\n") else line + "\n")
        if len(keep) != len(lines):
            if self._file is not None:
                self._file.close()
                self._file = None
            atomic_write_text(self.path, "".join(keep))

    def finish(self) -> None:
        if self._file is not None:
            self._file.close()


def make_tracker_class():
    return type("KdJsonlTracker", (JsonlTracker, GeneralTracker), {})
