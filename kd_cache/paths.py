"""Checks of the paths a command is given, made before anything heavy is loaded (no torch, no transformers).

A model name that is meant as a folder but does not exist would otherwise reach the hub client, which answers
with its repo-id rule ("Repo id must use alphanumeric chars..."); these checks say what is actually wrong.
"""

from __future__ import annotations

import os


class ModelNotFoundError(FileNotFoundError, ValueError):
    """A model folder that does not exist. Both a FileNotFoundError (what it is) and a ValueError (a bad argument:
    the CLI prints one `error: ...` line and exits 2)."""


def hub_offline() -> bool:
    """Whether the Hugging Face hub is switched off (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE)."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().upper() in ("1", "ON", "YES", "TRUE"):
            return True
    return False


def looks_like_path(name: str) -> bool:
    """Whether `name` is meant as a local path rather than a hub id (`org/name` or `name`): it starts with `/`,
    `./`, `../` or `~`, holds more than one path separator, or its first component is an existing folder
    (`students/qwen05b` while `students/` exists here)."""
    name = str(name)
    if name in (".", "..") or name.startswith(("/", "./", "../", "~", ".\\", "..\\")):
        return True
    seps = name.count("/") + (name.count(os.sep) if os.sep != "/" else 0)
    if seps > 1:
        return True
    head = name.replace(os.sep, "/").split("/", 1)[0]
    return seps == 1 and head not in ("", ".", "..") and os.path.isdir(head)


def check_model_path(name: str | os.PathLike, what: str = "model") -> None:
    """Raise ModelNotFoundError when `name` looks like a local path (see `looks_like_path`) that does not exist, and
    ValueError when it is a file rather than a model folder. Hub ids pass unchecked."""
    name = str(name)
    if os.path.exists(name):
        if not os.path.isdir(name):
            raise ValueError(f"{what} {name} is a file; give the model's folder (with config.json) or a hub id")
        hint = "" if os.path.exists(os.path.join(name, "config.json")) else _student_hint(name)
        if hint:  # (other folders without config.json, e.g. GGUF ones, are the loader's to judge)
            raise ValueError(f"{what} folder {name} holds no config.json: {hint}")
        return
    if looks_like_path(name):
        hub = ("a hub id like org/name needs the hub, which is unreachable offline: HF_HUB_OFFLINE=1"
               if hub_offline() else "a hub id looks like org/name")
        raise ModelNotFoundError(f"{what} folder {name} does not exist ({hub})")


def _student_hint(folder: str) -> str:
    """Where the model is when `folder` is what `kd train` wrote around it: a stage's `final/`, a recipe's last
    stage."""
    if os.path.exists(os.path.join(folder, "final", "config.json")):
        return f"it is a `kd train` stage folder; its student is {os.path.join(folder, 'final')}"
    for stage in ("dft", "sft", "dpt"):
        if os.path.exists(os.path.join(folder, stage, "final", "config.json")):
            return (f"it is a `kd train` recipe folder; its student is {os.path.join(folder, stage, 'final')} "
                    "(the last stage that finished)")
    return ""


def check_input_path(path: str | os.PathLike, what: str, *, folder: bool | None = None) -> None:
    """FileNotFoundError naming `what` when a local input path does not exist (URLs and hub paths pass), ValueError
    when it is a file where a folder is needed (`folder=True`) or the reverse."""
    path = str(path)
    if "://" in path or path.startswith("hf:"):
        return
    if not os.path.exists(path):
        raise FileNotFoundError(f"{what} {path} does not exist")
    if folder is True and not os.path.isdir(path):
        raise ValueError(f"{what} {path} is a file, not a folder")
    if folder is False and os.path.isdir(path) and what.endswith("file"):
        raise ValueError(f"{what} {path} is a folder, not a file")


def check_writable_folder(path: str | os.PathLike, what: str = "output folder") -> None:
    """ValueError unless `path` is a folder this process can write to, or does not exist yet and can be created
    (its nearest existing parent is a writable folder). Creates nothing."""
    path = os.path.abspath(str(path))
    probe = path
    while not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    if not os.path.isdir(probe):
        where = "is a file" if probe == path else f"cannot be created: {probe} is a file"
        raise ValueError(f"{what} {path} {where}")
    if not os.access(probe, os.W_OK | os.X_OK):
        where = "is not writable" if probe == path else f"cannot be created: {probe} is not writable"
        raise ValueError(f"{what} {path} {where} by this user")
