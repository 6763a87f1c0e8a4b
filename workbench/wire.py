"""Events across process edges: an event dataclass <-> a JSON-ready message (sweep children, distributed ranks)."""

from __future__ import annotations

import dataclasses
from typing import Any

from workbench import events
from workbench.measure import tracker
from workbench.result import ModelInfo
from workbench.serde import from_dict, to_dict


def event_to_wire(event: Any) -> dict[str, Any]:
    """An event dataclass as a JSON-ready message."""
    return {"event": type(event).__name__, "data": to_dict(event)}


def event_from_wire(message: dict[str, Any]) -> Any:
    """Rebuild an event of `workbench.events` (None for anything unknown)."""
    cls = getattr(events, str(message.get("event", "")), None)
    data = message.get("data")
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)) or not isinstance(data, dict):
        return None
    try:
        if cls is events.MetricEvent:
            return cls(data["section"], _metric_value(data["section"], data.get("value")))
        return from_dict(cls, data)
    except (ValueError, TypeError, KeyError):
        return None


def _metric_value(section: str, value: Any) -> Any:
    """A MetricEvent's value as its section's dataclass (the tracker's, or the model's; the dict if none fits)."""
    kind = {**tracker.sections(), "model": ModelInfo}.get(section)
    return from_dict(kind, value) if kind is not None and isinstance(value, dict) else value
