"""Metrics logging: `--trackers`, a comma list of `jsonl` (kd's own JSON-lines file, `<out>/metrics.jsonl`) and any
tracker accelerate supports by name (TensorBoard, W&B, MLflow, ...); every one gets the same values at each logged
step (docs/training.md, "Trackers and logged metrics")."""

from __future__ import annotations

import importlib.util
import json
import os
from typing import Any

from kd_cache.files import atomic_write_text

JSONL = "jsonl"

# accelerate's own trackers (`accelerate.utils.LoggerType`, accelerate 1.16): name -> (modules any one of which makes
# it available, as accelerate checks; the pip package to install). Kept here so that `--trackers` is checked without
# importing accelerate (torch); a name only a newer accelerate knows is looked up there (`check_trackers`).
ACCELERATE_TRACKERS: dict[str, tuple[tuple[str, ...], str]] = {
    "tensorboard": (("tensorboard", "tensorboardX"), "tensorboard"),
    "wandb": (("wandb",), "wandb"),
    "mlflow": (("mlflow",), "mlflow"),
    "comet_ml": (("comet_ml",), "comet-ml"),
    "aim": (("aim",), "aim"),
    "clearml": (("clearml",), "clearml"),
    "dvclive": (("dvclive",), "dvclive"),
    "swanlab": (("swanlab",), "swanlab"),
    "trackio": (("trackio",), "trackio"),
}


def _accelerate_names() -> set[str]:
    """The tracker names the installed accelerate knows (its LoggerType and registered classes), "all" aside."""
    try:
        from accelerate.tracking import LOGGER_TYPE_TO_CLASS
        from accelerate.utils import LoggerType
    except ImportError:  # pragma: no cover - accelerate is a dependency
        return set()
    return ({str(t.value) for t in LoggerType} | set(LOGGER_TYPE_TO_CLASS)) - {"all"}


def parse_trackers(value: str) -> list[str]:
    """The names of a `--trackers` comma list, stripped, lower-cased, each once, in order."""
    out: list[str] = []
    for name in (t.strip().lower() for t in str(value).split(",")):
        if name and name not in out:
            out.append(name)
    return out


def check_trackers(value: str) -> list[str]:
    """The trackers of a `--trackers` value, each known and installed, or ValueError naming the option and the pip
    package to install (raised before anything trains: accelerate itself would skip a missing one silently)."""
    names = parse_trackers(value)
    known = sorted({JSONL, *ACCELERATE_TRACKERS})
    for name in names:
        if name == "all":
            raise ValueError(f"trackers must name each tracker (all is not accepted: it would start every tracker "
                             f"installed); choose from {', '.join(known)}")
        if name == JSONL:
            continue
        if name in ACCELERATE_TRACKERS:
            modules, package = ACCELERATE_TRACKERS[name]
        elif name in _accelerate_names():  # a tracker a newer accelerate added
            modules, package = (name,), name.replace("_", "-")
        else:
            raise ValueError(f"trackers must be a comma list of {', '.join(known)} (or another tracker accelerate "
                             f"supports by name); got {name!r}")
        if not any(importlib.util.find_spec(m) is not None for m in modules):
            raise ValueError(f"trackers must name installed trackers: {name} needs its package "
                             f"(pip install {package})")
    return names


def mlflow_local_uri(out: str) -> str:
    """MLflow's store when MLFLOW_TRACKING_URI is not set: a local one under `out` that works offline, SQLite
    (`<out>/mlflow.db`, MLflow's recommended local backend) where sqlalchemy and alembic are installed (full
    `mlflow`), else the file store `<out>/mlruns` (`mlflow-skinny`; MLflow 3 asks for MLFLOW_ALLOW_FILE_STORE=true)."""
    root = os.path.abspath(out)
    if all(importlib.util.find_spec(m) is not None for m in ("sqlalchemy", "alembic")):
        return "sqlite:///" + os.path.join(root, "mlflow.db")
    return "file:" + os.path.join(root, "mlruns")


def make_trackers(names: list[str], run_name: str, out: str) -> tuple[list[Any], "JsonlTracker | None"]:
    """(accelerate's `log_with` list, the jsonl tracker or None) for the checked `names`: kd's JSON-lines tracker
    object for `jsonl`, accelerate's names for the others (their logs go under `out`, accelerate's project_dir:
    TensorBoard to `<out>/<project>`; MLflow to MLFLOW_TRACKING_URI, else a local store under `out`
    (`mlflow_local_uri`); W&B and others follow their own environment variables, e.g. WANDB_MODE=offline)."""
    trackers: list[Any] = []
    jsonl = None
    for name in names:
        if name == JSONL:
            jsonl = make_tracker_class()(run_name=run_name, logging_dir=out)
            trackers.append(jsonl)
            continue
        from accelerate.tracking import get_available_trackers

        if name not in {str(getattr(t, "value", t)) for t in get_available_trackers()}:
            _, package = ACCELERATE_TRACKERS.get(name, ((name,), name))
            raise ValueError(f"trackers must name installed trackers: accelerate finds no usable {name} "
                             f"(pip install {package})")
        if name == "mlflow":  # this stage's store (a recipe's stages each have their own out without the variable)
            import mlflow

            uri = os.environ.get("MLFLOW_TRACKING_URI") or mlflow_local_uri(out)
            if uri.startswith("file:"):  # kd's own default with mlflow-skinny: MLflow 3 refuses it unless opted in
                os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            mlflow.set_tracking_uri(uri)
        trackers.append(name)
    return trackers, jsonl


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
    from accelerate.tracking import GeneralTracker  # deferred: `--trackers` is checked without accelerate (torch)

    return type("KdJsonlTracker", (JsonlTracker, GeneralTracker), {})
