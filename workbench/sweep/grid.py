"""A sweep's grid: the configurations to run, from a grid file and/or `--set`/`--axis` flags, validated up front.

A grid file (YAML or JSON) holds two sections; every key is a `RunConfig` field::

    base:                     # settings shared by every run (an axis of the same name overrides one)
      model: tiny
      max_new_tokens: 16
    grid:                     # one axis per field, a list of values each; the product runs in
      dtype: [fp32, bf16]     # this order, the last axis varying fastest
      techniques:             # per value: one spec, specs chained with '+', a list of specs, or none
        - none
        - sim:bits=4,granularity=per-group
        - magnitude:sparsity=0.5+dynamic-int8
        - "2:4"               # quote specs that YAML would read as a number

On the command line the same grid is `--set KEY=VALUE` (base) and `--axis KEY=V1|V2|...` (values are
separated by '|' because technique specs contain commas); a value is read as JSON when it parses
(and fits the field), else as text. Flags override the file: `--set` pins a file axis to one value,
`--axis` replaces a file axis or base setting.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from workbench.config import RunConfig
from workbench.serde import to_dict
from workbench.store import config_hash

TECHNIQUES = "techniques"
_LABEL_FIELDS = ("model", "dtype", TECHNIQUES)


def field_names() -> tuple[str, ...]:
    """The settings a sweep may set: every `RunConfig` field."""
    return tuple(f.name for f in dataclasses.fields(RunConfig) if f.init)


def technique_specs(value: Any) -> tuple[str, ...]:
    """One techniques value -> spec strings: none/''/[] -> (), 'a+b' -> (a, b), a list of specs as given."""
    if value is None:
        return ()
    if isinstance(value, str):
        parts = (p.strip() for p in value.split("+"))
        return tuple(p for p in parts if p and p.lower() != "none")
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return tuple(spec for v in value for spec in technique_specs(v))
    raise ValueError(f"techniques must be a spec such as 'sim:bits=4', a list of specs, or none; got {value!r} "
                     "(quote specs such as '2:4' that YAML reads as numbers)")


def _frozen(name: str, value: Any) -> Any:
    if name == TECHNIQUES:
        return technique_specs(value)
    return tuple(value) if isinstance(value, list) else value


def _show(value: Any) -> str:
    if isinstance(value, tuple):
        return "+".join(map(str, value)) or "none"
    return json.dumps(value) if isinstance(value, bool) or value is None else str(value)


def cli_value(name: str, raw: str) -> Any:
    """The text of a flag -> its JSON value when it parses and fits the field, else the text itself."""
    if name == TECHNIQUES:
        return raw
    try:
        value = json.loads(raw)
    except ValueError:
        return raw
    hint = typing.get_type_hints(RunConfig).get(name)
    allowed = typing.get_args(hint) or (hint,)
    if value is not None and not isinstance(value, str) and str in allowed and type(value) not in allowed:
        return raw  # e.g. --set prompt=42: text, not a number
    return value


def _key_value(item: str, flag: str) -> tuple[str, str]:
    key, eq, raw = item.partition("=")
    if not eq or not key.strip():
        raise ValueError(f"{flag} takes KEY=VALUE; got {item!r}")
    return key.strip().replace("-", "_"), raw


def _read_file(path: str | Path) -> dict[str, Any]:
    import yaml

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read sweep file {str(path)!r}: {getattr(e, 'strerror', None) or e}") from None
    kind = "JSON" if path.suffix.lower() == ".json" else "YAML"
    try:
        data = json.loads(text) if kind == "JSON" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as e:
        raise ValueError(f"sweep file {str(path)!r} is not valid {kind}: {' '.join(str(e).split())}") from None
    if not isinstance(data, dict) or set(data) - {"base", "grid"}:
        raise ValueError(f"sweep file {str(path)!r} must hold an object with 'base' and 'grid' sections only")
    for section in ("base", "grid"):
        if not isinstance(data.get(section) or {}, dict):
            raise ValueError(f"sweep file {str(path)!r}: '{section}' must map setting names to values")
    return data


def _label(config: RunConfig, cell: dict[str, Any]) -> str:
    """model dtype techniques key=value...: the techniques as the grid spelled them, else their short labels."""
    labels = " + ".join(t.label() for t in config.techniques)
    techniques = " + ".join(cell[TECHNIQUES]) if TECHNIQUES in cell else labels
    parts = [config.model, config.dtype, techniques or "none"]
    return " ".join(parts + [f"{n}={_show(v)}" for n, v in cell.items() if n not in _LABEL_FIELDS])


@dataclass(frozen=True)
class SweepSpec:
    """A grid of runs: `base` settings shared by all, `axes` ((field, values), ...) multiplied in order
    (an axis overrides a base setting of the same name).

    Every configuration is built (and so validated) on construction: a bad cell fails before anything runs.
    """

    base: dict[str, Any] = field(default_factory=dict)
    axes: tuple[tuple[str, tuple[Any, ...]], ...] = ()

    def __post_init__(self) -> None:
        known = field_names()
        if not isinstance(self.base, dict):
            raise ValueError(f"base must map setting names to values; got {self.base!r}")
        names = [name for name, _ in self.axes]
        for name in list(self.base) + names:
            if name not in known:
                raise ValueError(f"unknown setting {name!r}; known: {', '.join(known)}")
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"axis {repeated[0]!r} is given twice; give it once with all its values")
        if not self.axes:
            raise ValueError("the grid is empty: give at least one axis, e.g. --axis 'dtype=fp32|bf16'")
        for name, values in self.axes:
            if not isinstance(values, (list, tuple)) or not values:
                raise ValueError(f"axis {name!r} needs a non-empty list of values; got {values!r}")
        object.__setattr__(self, "base", {k: _frozen(k, v) for k, v in self.base.items()})
        object.__setattr__(self, "axes", tuple((n, tuple(_frozen(n, v) for v in vs)) for n, vs in self.axes))
        built = self._build()
        object.__setattr__(self, "_configs", tuple(config for config, _ in built))
        object.__setattr__(self, "_labels", {config_hash(config): text for config, text in built})

    def _build(self) -> tuple[tuple[RunConfig, str], ...]:
        names = [name for name, _ in self.axes]
        built: list[tuple[RunConfig, str]] = []
        first: dict[str, int] = {}
        for index, values in enumerate(itertools.product(*(vs for _, vs in self.axes)), 1):
            cell = dict(zip(names, values))
            shown = ", ".join(f"{n}={_show(v)}" for n, v in cell.items())
            try:
                config = RunConfig.from_dict({**self.base, **cell})
            except (ValueError, TypeError) as e:
                raise ValueError(f"grid cell {index} ({shown}): {e}") from None
            earlier = first.setdefault(config_hash(config), index)
            if earlier != index:
                raise ValueError(f"grid cells {earlier} and {index} ({shown}) are the same run; "
                                 "remove the duplicate value")
            built.append((config, _label(config, cell)))
        return tuple(built)

    def configs(self) -> list[RunConfig]:
        """The validated cartesian product, in grid order (the last axis varies fastest)."""
        return list(self._configs)  # type: ignore[attr-defined]

    def label(self, config: RunConfig) -> str:
        """A run's short name: model, dtype, techniques (as the grid spells them), then the other axes as key=value."""
        known = self._labels.get(config_hash(config))  # type: ignore[attr-defined]
        return known or _label(config, {n: getattr(config, n) for n, _ in self.axes if n != TECHNIQUES})

    def to_dict(self) -> dict[str, Any]:
        """The grid file form: {"base": {...}, "grid": {field: [values]}}."""
        return {"base": to_dict(self.base), "grid": {name: to_dict(values) for name, values in self.axes}}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SweepSpec:
        """Inverse of `to_dict` (the content of a grid file)."""
        if not isinstance(data, dict) or not all(isinstance(data.get(k) or {}, dict) for k in ("base", "grid")):
            raise ValueError("a sweep is an object {'base': {setting: value}, 'grid': {setting: [values]}}")
        return cls(dict(data.get("base") or {}), tuple((k, v) for k, v in (data.get("grid") or {}).items()))

    @classmethod
    def from_file(cls, path: str | Path) -> SweepSpec:
        """Load a YAML or JSON grid file (format in the module docstring)."""
        return cls.from_dict(_read_file(path))

    @classmethod
    def from_sources(cls, path: str | Path | None = None, sets: Sequence[str] = (),
                     axes: Sequence[str] = ()) -> SweepSpec:
        """A grid file (optional) overridden by `--set KEY=VALUE` and `--axis KEY=V1|V2` flags."""
        data = _read_file(path) if path else {}
        base, grid = dict(data.get("base") or {}), dict(data.get("grid") or {})
        for item in sets:
            key, raw = _key_value(item, "--set")
            grid.pop(key, None)
            base[key] = cli_value(key, raw)
        for item in axes:
            key, raw = _key_value(item, "--axis")
            base.pop(key, None)
            grid[key] = [cli_value(key, v) for v in raw.split("|")]
        return cls.from_dict({"base": base, "grid": grid})
