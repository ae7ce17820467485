"""Config plumbing shared by the commands: dataclass defaults <- optional YAML/JSON file <- CLI flags."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, TypeVar

import typer

T = TypeVar("T")


def load_config_file(path: str | None) -> dict:
    if not path:
        return {}
    p = Path(path)
    if not p.exists():
        raise typer.BadParameter(f"config file not found: {path}")
    text = p.read_text()
    if p.suffix in (".yaml", ".yml"):
        import yaml

        data = yaml.safe_load(text) or {}
    else:
        data = json.loads(text)
    if not isinstance(data, dict):
        raise typer.BadParameter(f"config file must hold a mapping of field: value, got {type(data).__name__}")
    return {k.replace("-", "_"): v for k, v in data.items()}


def resolve(cls: type[T], config_file: str | None, flags: dict[str, Any]) -> T:
    """Build `cls` from the config file, with every flag the user actually passed (not None) on top."""
    data = load_config_file(config_file)
    known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - known)
    if unknown:
        raise typer.BadParameter(f"unknown config keys {unknown}; known: {sorted(known)}")
    data.update({k: v for k, v in flags.items() if v is not None})
    try:
        return cls(**data)
    except TypeError as e:
        raise typer.BadParameter(str(e)) from None
