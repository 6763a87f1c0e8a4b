"""Views: how the app draws each section of a result, one class per section, found through a registry.

A view is built with the app, gets each `MetricEvent` of its section while a run goes (`show`, with every
section seen so far), and the finished result (`final`). A view that needs a place of its own on the page
sets `widget`; the app lays those out under the live plots. Adding a view is adding a module here.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Mapping
from typing import Any, ClassVar

import ipywidgets as W

from workbench.result import RunResult


class View:
    """Base class: draw one section (`section` names a tracker's section, or `model`)."""

    section: ClassVar[str]
    order: ClassVar[int] = 100
    widget: W.Widget | None = None

    def __init__(self, app: Any) -> None:
        self.app = app

    def reset(self) -> None:
        """A new run starts."""

    def show(self, value: Any, seen: Mapping[str, Any]) -> None:
        """The section's value arrived (None: not measured); `seen` holds every section so far."""

    def final(self, result: RunResult) -> None:
        """The run's result (also a stopped one): draw its own value."""
        self.show(result.sections.get(self.section), result.sections)


VIEWS: dict[str, type[View]] = {}


def register(cls: type[View]) -> type[View]:
    """Class decorator: the app draws this section with this view."""
    VIEWS[cls.section] = cls
    return cls


def views() -> list[type[View]]:
    """Every registered view class, in order. The modules of this package are imported on every call (a dict lookup
    once imported): a view registered before the first call (a user's own) must not hide the built-in ones."""
    for info in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{info.name}")
    return sorted(VIEWS.values(), key=lambda v: (v.order, v.section))
