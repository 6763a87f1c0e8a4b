"""Trackers: one class per metric, each owning one section of the result.

A tracker declares its section's name and frozen dataclass, wraps the run phases it measures (a context
manager per phase, entered by the runner with one `ExitStack`), builds its section once the phase named
`ready_after` has ended, says how the ranks of a distributed run combine, which rows it adds to the text
report, which numbers are Pareto axes, and which become summary columns of the results store. Tracker
modules live in `workbench/measure/trackers/` and register themselves; adding a metric is adding a file.
"""

from __future__ import annotations

import contextlib
import importlib
import pkgutil
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

# The runner's phases, in order. "run" spans the warm-up and the timed calls; "measure" only the timed calls.
PHASES = ("load", "run", "measure", "evaluate", "finish")


@dataclass(frozen=True)
class Axis:
    """A number of a section that runs can be compared on (a Pareto axis, a History axis)."""

    key: str
    label: str
    unit: str
    better: str  # "lower" | "higher"
    get: Callable[[Any], float | None]  # from the section's dataclass


@dataclass(frozen=True)
class Column:
    """A summary column of the results store, filled from the section when a run is added."""

    name: str
    sql_type: str  # "REAL" | "INTEGER" | "TEXT"
    get: Callable[[Any], Any]  # from the section's dataclass
    label: str = ""  # header in `workbench results`; empty: not listed there
    fmt: Callable[[Any], str] = str


class RunView(Protocol):
    """What a tracker may read of the run it measures (the runner's `_Run`)."""

    config: Any
    device: Any
    engine: Any
    calls: Any  # measure.latency.TimedCalls
    sections: dict[str, Any]

    def warn(self, message: str, section: str = "run") -> None: ...


class Tracker:
    """Base class: override what your metric needs."""

    section: ClassVar[str]
    stats: ClassVar[type]
    ready_after: ClassVar[str] = "finish"  # the phase after which `finish()` builds the section
    order: ClassVar[int] = 100  # place in the result, the report and the app (lower first)
    axes: ClassVar[tuple[Axis, ...]] = ()
    columns: ClassVar[tuple[Column, ...]] = ()

    def __init__(self, run: RunView) -> None:
        self.run = run

    def around(self, phase: str) -> contextlib.AbstractContextManager[None]:
        """A context manager around one phase of the run (nothing by default)."""
        return contextlib.nullcontext()

    def finish(self) -> Any:
        """The section's dataclass, or None when it was not measured."""
        return None

    @classmethod
    def merge(cls, values: Sequence[Any], kind: str) -> Any:
        """The section of a distributed run from every rank's (rank 0 first); by default rank 0's."""
        return values[0] if values else None

    @classmethod
    def rows(cls, stats: Any) -> list[tuple[str, str]]:
        """Labelled rows of the text report."""
        return []


REGISTRY: dict[str, type[Tracker]] = {}


def register(cls: type[Tracker]) -> type[Tracker]:
    """Class decorator: make a tracker part of every run."""
    if cls.ready_after not in PHASES:
        raise ValueError(f"tracker {cls.__name__}: ready_after {cls.ready_after!r} is not one of {PHASES}")
    REGISTRY[cls.section] = cls
    return cls


def trackers() -> list[type[Tracker]]:
    """Every registered tracker class, in section order (importing the tracker modules on first use: a module
    imported on its own before registers only its tracker)."""
    package = importlib.import_module("workbench.measure.trackers")
    for info in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"{package.__name__}.{info.name}")  # once: later imports are dictionary look-ups
    return sorted(REGISTRY.values(), key=lambda t: (t.order, t.section))


def sections() -> dict[str, type]:
    """Section name -> its dataclass, in order."""
    return {t.section: t.stats for t in trackers()}


def axes() -> list[Axis]:
    """Every tracker's comparable numbers."""
    return [a for t in trackers() for a in t.axes]


def columns() -> list[Column]:
    """Every tracker's store summary columns."""
    return [c for t in trackers() for c in t.columns]


@contextlib.contextmanager
def entered(active: Sequence[Tracker], phase: str) -> Iterator[None]:
    """Enter every tracker's context for `phase` (one ExitStack; exits in reverse order, also on errors)."""
    with contextlib.ExitStack() as stack:
        for tracker in active:
            stack.enter_context(tracker.around(phase))
        yield
