"""Sweeps: run a grid of configurations, store each run as it ends, resume without redoing stored runs.

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
import logging
import os
import time
import typing
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from workbench.config import RunConfig
from workbench.errors import WorkbenchError
from workbench.events import OnEvent, never_stop, no_event
from workbench.serde import to_dict
from workbench.store import Store, config_hash

logger = logging.getLogger(__name__)
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
    from workbench.analysis import technique_labels

    techniques = " + ".join(cell[TECHNIQUES]) if TECHNIQUES in cell else technique_labels(config.techniques)
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


@dataclass(frozen=True)
class SweepEvent:
    """A configuration of a sweep started, was skipped (already stored ok), or ended (ok, stopped, error)."""

    index: int  # 1-based position in the grid
    total: int
    label: str
    status: str  # "start" | "skipped" | "ok" | "stopped" | "error"
    run_id: int | None = None
    message: str = ""  # the one-sentence error of a failed run
    decode_tokens_per_s: float | None = None
    perplexity: float | None = None
    pid: int | None = None  # the process that ran it (a child process with isolate)
    config_hash: str = ""  # the store's key of this configuration
    elapsed_s: float = 0.0  # since the sweep started


@dataclass(frozen=True)
class SweepReport:
    """What a sweep did; `pending` configurations are still to run (a resume runs them)."""

    total: int
    skipped: int
    done: int
    failed: int
    pending: int
    stopped: bool
    run_ids: tuple[int, ...]
    elapsed_s: float
    outcomes: tuple[SweepEvent, ...] = ()  # the final event of every configuration reached, in grid order

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (JSON edge)."""
        return to_dict(self)


def run_sweep(spec: SweepSpec, store: Store, on_event: OnEvent = no_event,
              should_stop: Callable[[], bool] = never_stop, isolate: bool = False) -> SweepReport:
    """Run, in grid order, every configuration not already stored with status ok; store each as it ends.

    A failed run (WorkbenchError) is stored as an error record and the sweep goes on; a stop request ends
    the current run after its current token (stored as stopped, so a resume redoes it) and the sweep.
    With `isolate`, each run happens in a fresh Python process that writes the store itself.
    """
    configs, t0 = spec.configs(), time.perf_counter()
    stored = store.hashes("ok")
    if isolate:
        from workbench._sweep_child import run_isolated as execute
    else:
        execute = run_inline
    outcomes: list[SweepEvent] = []
    stopped = False
    for index, config in enumerate(configs, 1):
        if should_stop():
            stopped = True
            break
        key = config_hash(config)
        event = SweepEvent(index, len(configs), spec.label(config), "start", config_hash=key,
                           elapsed_s=time.perf_counter() - t0)
        if key in stored:
            event = replace(event, status="skipped")
        else:
            on_event(event)
            logger.info("sweep %d/%d: %s", index, len(configs), event.label)
            event = replace(event, **execute(config, store, on_event, should_stop))
        outcomes.append(replace(event, elapsed_s=time.perf_counter() - t0))
        on_event(outcomes[-1])
        if event.status == "stopped":
            stopped = True
            break
    return _report(len(configs), outcomes, stopped, time.perf_counter() - t0)


def _report(total: int, outcomes: list[SweepEvent], stopped: bool, elapsed: float) -> SweepReport:
    counts = Counter(e.status for e in outcomes)
    skipped, done, failed = counts["skipped"], counts["ok"], counts["error"]
    run_ids = tuple(e.run_id for e in outcomes if e.run_id is not None)
    return SweepReport(total, skipped, done, failed, total - skipped - done - failed, stopped, run_ids, elapsed,
                       tuple(outcomes))


def run_inline(config: RunConfig, store: Store, on_event: OnEvent, should_stop: Callable[[], bool]) -> dict:
    """Run in this process; store the result (or the error sentence); the outcome's SweepEvent fields."""
    from workbench.runner import run

    try:
        result = run(config, on_event, should_stop)
    except WorkbenchError as e:
        return {"status": "error", "run_id": store.add_error(config, str(e)), "message": str(e), "pid": os.getpid()}
    run_id = store.add(result)
    lat, acc = result.latency, result.accuracy
    return {"status": result.status, "run_id": run_id, "pid": os.getpid(),
            "decode_tokens_per_s": lat.decode_tokens_per_s if lat else None,
            "perplexity": acc.perplexity if acc else None}
