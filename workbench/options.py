"""Dataclass fields with help text and bounds in their metadata, and the checks that enforce them.

The bottom layer of every config (RunConfig, each technique's config, the dashboard's): it imports nothing
from the workbench, so any module may build a config on it without an import cycle.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import field
from typing import Any


def option(default: Any, help: str, *, group: str = "Run", choices: tuple | None = None,
           minimum: float | None = None, maximum: float | None = None, flag: str | None = None,
           **extra: Any) -> Any:
    """A dataclass field whose metadata feeds validation, the CLI's --help and the widgets' tooltips."""
    meta = {"help": help, "group": group, "choices": choices, "min": minimum, "max": maximum,
            "flag": flag, **extra}
    if isinstance(default, (list, dict)):
        raise TypeError("use tuples for sequence defaults: configs are frozen")
    return field(default=default, metadata=meta)


def check_field(obj: Any, f: dataclasses.Field) -> None:
    """Raise ValueError naming the allowed values when obj.<f> breaks its metadata's bounds."""
    value, meta = getattr(obj, f.name), f.metadata
    if value is None:
        return
    choices = meta.get("choices")
    if choices and value not in choices:
        raise ValueError(f"{f.name} must be one of {', '.join(map(str, choices))}; got {value!r}")
    lo, hi = meta.get("min"), meta.get("max")
    if (lo is not None or hi is not None) and isinstance(value, (int, float)) and not isinstance(value, bool):
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            rng = f"{lo if lo is not None else '-inf'}..{hi if hi is not None else 'inf'}"
            raise ValueError(f"{f.name} must be in {rng}; got {value}")


_SCALARS = {int: "an integer", float: "a number", str: "text", bool: "true or false"}


def _check_type(obj: Any, f: dataclasses.Field, hint: Any) -> None:
    """Raise ValueError when a scalar field holds a value of the wrong type (e.g. from JSON)."""
    value = getattr(obj, f.name)
    if typing.get_origin(hint) not in (None, typing.Union, types.UnionType):
        return  # containers are checked by the class itself
    allowed = [a for a in (typing.get_args(hint) or (hint,)) if a in _SCALARS]
    if value is None or not allowed:
        return
    ok = any(isinstance(value, a) and not (a in (int, float) and isinstance(value, bool)) for a in allowed)
    if float in allowed and isinstance(value, int) and not isinstance(value, bool):
        ok = True
    if not ok:
        raise ValueError(f"{f.name} must be {_SCALARS[allowed[0]]}; got {value!r}")


def _check_text(obj: Any, f: dataclasses.Field) -> None:
    """Raise ValueError when text holds a lone surrogate (undecodable bytes from argv, a broken widget value)."""
    value = getattr(obj, f.name)
    for text in value if isinstance(value, tuple) else (value,):
        if isinstance(text, str):
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as e:
                raise ValueError(f"{f.name} is not valid Unicode text: character {e.start} is a lone surrogate "
                                 "(undecodable bytes?); give UTF-8 text") from None


def check_fields(obj: Any) -> None:
    """Validate every field of a dataclass instance against its type and metadata."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        _check_type(obj, f, hints[f.name])
        _check_text(obj, f)
        check_field(obj, f)
