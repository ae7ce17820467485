"""Typed command configs: each dataclass field is the one place a setting's name, type, default and help live.

Declare fields with `option(...)`. `kd_cli` derives every command-line option (its spelling, type, choices, help
and the default it shows) from the fields, so a setting cannot exist without its flag, nor a flag without reaching
the config. Resolution order: the dataclass default <- an optional YAML/JSON file <- the flags the user passed.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

MISSING = dataclasses.MISSING


def option(default: Any = MISSING, *, help: str, flag: str | None = None, default_help: str | None = None,
           choices: tuple[str, ...] | None = None, cli: bool = True) -> Any:
    """A config field with its documentation.

    help: one sentence for `--help` (the default is appended automatically).
    flag: the CLI spelling when it is not `--field-name`, e.g. "--progress/--quiet" for a bool.
    default_help: what to show as the default when the field's default is None and means something else
        (e.g. "1e-3 DPT, 2e-5 SFT/DFT (the stage's preset)").
    choices: the accepted strings, listed in --help; flags are checked by the CLI, every value (flags, config
        files, the Python API) by `check_choices`, which each config's `__post_init__` calls.
    cli: False for fields only a config file or the Python API sets.
    """
    meta = {"help": help, "flag": flag, "default_help": default_help, "choices": choices, "cli": cli}
    return dataclasses.field(default=default, metadata=meta)


def check_choices(cfg: Any) -> None:
    """Refuse a field whose value is not one of the field's declared `choices` (None passes where None is the
    field's default, i.e. unset): the one place choices are validated."""
    for f in dataclasses.fields(cfg):
        choices = f.metadata.get("choices")
        value = getattr(cfg, f.name)
        if not choices or (value is None and f.default is None):
            continue
        if value not in choices:
            raise ValueError(f"{f.name} must be one of {', '.join(map(str, choices))}, got {value!r}")


def load_config_file(path: str | None) -> dict:
    """The mapping in a YAML (.yaml/.yml) or JSON file; dashes in keys become underscores."""
    if not path:
        return {}
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"config file not found: {path}")
    text = p.read_text(encoding="utf-8")
    try:
        if p.suffix in (".yaml", ".yml"):
            import yaml  # deferred: only a YAML config file needs it (the CLI imports this module at start)

            data = yaml.safe_load(text) or {}
        else:
            data = json.loads(text)
    except Exception as e:  # yaml.YAMLError / json.JSONDecodeError: both name the line
        raise ValueError(f"config file {path} is not valid {'YAML' if p.suffix in ('.yaml', '.yml') else 'JSON'}: "
                         f"{e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} must hold a mapping of field: value, got {type(data).__name__}")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def resolve(cls: type[T], config_file: str | None = None, flags: dict[str, Any] | None = None) -> T:
    """`cls` from the config file's values with every flag the user passed (not None) on top."""
    data = load_config_file(config_file)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(f"unknown config keys {unknown} in {config_file}; known: {sorted(fields)}")
    data.update({k: v for k, v in (flags or {}).items() if v is not None})
    missing = [n for n, f in fields.items() if n not in data and f.default is MISSING
               and f.default_factory is MISSING]
    if missing:
        spelled = ", ".join(f"--{n.replace('_', '-')}" for n in missing)
        raise ValueError(f"missing required option {spelled} (a flag, or a key in --config), got none")
    return cls(**data)


def to_dict(cfg: Any) -> dict:
    """Every field of a config, JSON-ready: what a run saves next to its outputs."""
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
