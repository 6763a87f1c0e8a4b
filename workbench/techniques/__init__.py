"""Compression techniques: registry, spec parsing, combination rules, and applying them in order.

Layers (no import cycles): `base` (configs, registry, parsing) and `rules` (what may run together) sit below
`workbench.config`, which holds parsed configs; `apply` (turning them into model changes and result records)
sits above `workbench.result`. Each other module here is one technique.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any

from workbench.execution import resolve_device
from workbench.techniques.base import (REGISTRY, ApplyContext, TechniqueConfig, handler_for, load_all, parse_spec,
                                       register, register_handler)
from workbench.techniques.rules import check_combination, check_techniques, normalize_specs

__all__ = ["REGISTRY", "TechniqueConfig", "ApplyContext", "register", "register_handler", "handler_for", "parse_spec",
           "check_techniques", "normalize_specs", "check_combination", "apply_techniques", "load_all",
           "describe_techniques"]


def __getattr__(name: str) -> Any:
    """`apply_techniques`, imported on first use: it sits above `workbench.config`, which imports this package."""
    if name == "apply_techniques":
        from workbench.techniques.apply import apply_techniques

        return apply_techniques
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def describe_techniques(device_spec: str = "auto") -> list[dict]:
    """One row per registered technique: parameters with their help, and whether it runs on the device."""
    device = resolve_device(device_spec)
    rows = []
    for name, cls in sorted(load_all().items(), key=lambda kv: (kv[1].kind, kv[0])):
        hints = typing.get_type_hints(cls)
        params = [{"name": f.name, "type": getattr(hints[f.name], "__name__", str(hints[f.name])),
                   "default": f.default, "help": f.metadata.get("help", ""), "choices": f.metadata.get("choices"),
                   "min": f.metadata.get("min"), "max": f.metadata.get("max")} for f in dataclasses.fields(cls)]
        reason = cls.unavailable(device)
        rows.append({"name": name, "kind": cls.kind, "simulated": cls.simulated, "summary": cls.summary,
                     "available": reason is None, "reason": reason, "device": str(device), "params": params,
                     "signature": ", ".join(f"{p['name']}={p['default']}" for p in params) or "-"})
    return rows
