"""Commands generated from config dataclasses, and the one error policy every command uses.

`config_command(Cls)` turns `fn(cfg: Cls, **rest)` into a typer command whose options are exactly Cls's fields
(declared with `kd_cache.config.option`): the flag spelling, type, choices, help and shown default all come from
the field, plus `--config FILE`. The function receives the resolved config; flags the user did not pass stay
unset, so the file (then the dataclass default) decides them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import re
import types
import typing
from collections.abc import Callable, Iterator
from typing import Any, Optional, TypeVar

import typer
from rich.markup import escape as rich_escape

from kd_cache.config import MISSING, resolve
from kd_cache.errors import describe, storage_errors, user_errors

T = TypeVar("T")

CONFIG_HELP = "YAML/JSON file of the same fields (dashes or underscores); flags override it."


@contextlib.contextmanager
def reported() -> Iterator[None]:
    """One `error: ...` line instead of a traceback. Exit 2: the arguments or inputs are wrong (ValueError,
    FileNotFoundError, a corrupt shard or missing image kd was told not to skip). Exit 1: the storage said no
    (permissions, credentials, the hub...; kd_cache.errors.storage_errors)."""
    try:
        yield
    except user_errors() as e:
        typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from None
    except storage_errors() as e:
        typer.secho(f"error: {describe(e)}", fg=typer.colors.RED, err=True)
        raise typer.Exit(1) from None


def _base_type(annotation: Any) -> type:
    """`int | None` -> int; the CLI passes None for 'not given' whatever the field's type."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and len(args) == 1:
        return args[0]
    return annotation


def _shown_default(f: dataclasses.Field) -> str | None:
    md = f.metadata
    if md.get("default_help"):
        return md["default_help"]
    if f.default is MISSING:
        return None
    if f.default is None:
        return "none"
    if isinstance(f.default, bool):
        pos, _, neg = (md.get("flag") or f"--{f.name.replace('_', '-')}/--no-{f.name.replace('_', '-')}").partition("/")
        return pos if f.default else (neg or f"not {pos}")
    return str(f.default)


def field_parameters(cls: type) -> list[inspect.Parameter]:
    """One keyword parameter (a typer.Option defaulting to None) per CLI field of `cls`."""
    hints = typing.get_type_hints(cls)
    params = []
    for f in dataclasses.fields(cls):
        md = f.metadata
        if "help" not in md:
            raise TypeError(f"{cls.__name__}.{f.name} has no help: declare it with kd_cache.config.option()")
        if not md.get("cli", True):
            continue
        typ = _base_type(hints[f.name])
        flag = md.get("flag") or f"--{f.name.replace('_', '-')}"
        if typ is bool and "/" not in flag:
            flag = f"{flag}/--no-{flag.lstrip('-')}"
        shown = _shown_default(f)
        # the field's real default, or what None means for it; escaped: typer renders help as rich markup
        tail = " Required (a flag or a --config key)." if f.default is MISSING else \
            f" [default: {shown}]" if shown is not None else ""
        kwargs: dict[str, Any] = {"help": rich_escape(md["help"] + tail), "show_default": False}
        if md.get("choices"):  # listed in the help; checked by the config (one `error:` line, not click's box)
            kwargs["help"] += rich_escape(f" One of: {', '.join(map(str, md['choices']))}.")
            kwargs["metavar"] = "[" + "|".join(map(str, md["choices"])) + "]"
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, annotation=Optional[typ],
                                        default=typer.Option(None, *flag.split(" "), **kwargs)))
    return params


def flag_of(f: dataclasses.Field) -> str:
    """The flag a field is typed as (the first spelling: `--train-vision` of `--train-vision/--freeze-vision`)."""
    return (f.metadata.get("flag") or f"--{f.name.replace('_', '-')}").split("/")[0].split(" ")[0]


# a one-word field name reads as the option only where a message uses it as one ("lr must be", "cache (a folder")
_AS_OPTION = r"(?==| must\b| is required\b| needs\b| and\b| or\b|,| \(|$)"


def with_flags(message: str, cls: type) -> str:
    """`message` with each field name of `cls` written as the flag the user typed (`max_steps` -> `--max-steps`)."""
    for f in sorted(dataclasses.fields(cls), key=lambda f: -len(f.name)):
        if f.metadata.get("cli", True) is False:
            continue
        tail = "(?![\\w/.-])" if "_" in f.name else _AS_OPTION
        message = re.sub(rf"(?<![\w/.$-]){re.escape(f.name)}{tail}", flag_of(f), message)
    return message


@contextlib.contextmanager
def flags_named(cls: type) -> Iterator[None]:
    """ValueErrors raised inside name the options of `cls` as flags (one `error:` line through `reported`)."""
    try:
        yield
    except ValueError as e:
        if type(e) is ValueError:  # kd's own option checks; typed errors (a manifest's, a model's) name their fields
            raise ValueError(with_flags(str(e), cls)) from None
        raise


def config_command(cls: type[T]) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorate `fn(cfg, **rest)`: the result is a typer command with `fn`'s own parameters (`rest`), every CLI
    field of `cls` as an option, and `--config`. Resolution errors follow the common error policy."""

    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        own = list(inspect.signature(fn, eval_str=True).parameters.values())[1:]  # the first parameter is cfg
        fields = field_parameters(cls)
        clash = {p.name for p in own} & {p.name for p in fields}
        if clash:
            raise TypeError(f"{fn.__name__}: parameters {sorted(clash)} shadow fields of {cls.__name__}")
        config_param = inspect.Parameter("config", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[str],
                                         default=typer.Option(None, "--config", help=CONFIG_HELP))
        names = {p.name for p in fields}

        @functools.wraps(fn)
        def command(**kwargs: Any) -> Any:
            flags = {k: kwargs.pop(k) for k in list(kwargs) if k in names}
            config_file = kwargs.pop("config")
            with reported(), flags_named(cls):
                cfg = resolve(cls, config_file, flags)
            return fn(cfg, **kwargs)

        own = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own]
        params = own + fields + [config_param]
        # typer reads the signature and the annotations: both must describe the generated parameters, not fn's
        command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
        command.__annotations__ = {p.name: p.annotation for p in params}
        del command.__wrapped__
        command.config_class = cls  # type: ignore[attr-defined]  (the option-walk test reads it)
        return command

    return wrap
