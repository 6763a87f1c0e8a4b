"""Compression techniques: registry, spec parsing, combination rules, and applying them in order."""

from __future__ import annotations

import importlib
import logging
import pkgutil
from collections.abc import Iterable

import torch

from workbench.errors import ConfigError
from workbench.events import OnEvent, StageEvent
from workbench.result import TechniqueRecord
from workbench.techniques.base import (REGISTRY, ApplyContext, TechniqueConfig, handler_for, parse_spec,
                                       record, register, register_handler)

logger = logging.getLogger(__name__)

__all__ = ["REGISTRY", "TechniqueConfig", "ApplyContext", "register", "register_handler", "parse_spec",
           "normalize_specs", "check_combination", "apply_techniques", "load_all"]


def load_all() -> dict[str, type[TechniqueConfig]]:
    """Import every technique module in this package (each registers itself); return the registry."""
    for info in pkgutil.iter_modules(__path__):
        if info.name != "base" and not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")
    return REGISTRY


def _general_conflict(earlier: TechniqueConfig, later: TechniqueConfig) -> str | None:
    """Rules every technique obeys: one quantization per run; float-weight work before packing."""
    if earlier.kind == "quant" and later.kind == "quant":
        return "two quantizations in one run; choose one"
    if earlier.packs_weights and later.needs_float_weights:
        return (f"{later.name} works on float weights, which {earlier.name} has already packed; "
                f"apply {later.name} first (prune, then quantize)")
    return None


def _combination_error(configs: list[TechniqueConfig], dtype: str) -> str | None:
    """One sentence naming the conflict in an ordered list of techniques, or None."""
    for i, cfg in enumerate(configs):
        for earlier in configs[:i]:
            problem = (_general_conflict(earlier, cfg) or cfg.conflicts_with(earlier, dtype)
                       or earlier.conflicts_before(cfg, dtype))
            if problem:
                return f"{earlier.name} then {cfg.name}: {problem}"
        problem = cfg.conflicts_with(None, dtype)
        if problem:
            return f"{cfg.name}: {problem}"
    return None


def normalize_specs(specs: Iterable[str], dtype: str, device: str | None = None) -> tuple[str, ...]:
    """Parse, validate and canonicalize technique specs; refuse impossible combinations (ValueError).

    With the run's `device` spec, a combination problem (a dtype, an order) is reported only after
    checking that every technique can run on that device at all: the blocking reason comes first, so
    following the advice never leads to a second refusal. Valid combinations never look at the device
    (a stored configuration from a GPU machine still loads on a CPU one).
    """
    load_all()
    configs = [parse_spec(s) for s in specs]
    problem = _combination_error(configs, dtype)
    if problem:
        if device is not None:
            from workbench.execution import resolve_device

            _check_devices(configs, resolve_device(device))
        raise ConfigError(problem)
    return tuple(c.spec() for c in configs)


def _check_devices(configs: Iterable[TechniqueConfig], device: torch.device) -> None:
    """ConfigError naming the first technique that cannot run on `device` at all."""
    for cfg in configs:
        reason = type(cfg).unavailable(device)
        if reason:
            raise ConfigError(f"{cfg.name} cannot run on {device}: {reason}")


def check_combination(specs: Iterable[str], device: torch.device) -> None:
    """Refuse techniques that cannot run on `device`, before anything is loaded."""
    load_all()
    _check_devices([parse_spec(spec) for spec in specs], device)


def apply_techniques(loaded, run_config, on_event: OnEvent) -> tuple[TechniqueRecord, ...]:
    """Apply the run's techniques in order to `loaded.model` (replaced when a handler returns a new one)."""
    load_all()
    records = []
    configs = [parse_spec(s) for s in run_config.techniques]
    for i, cfg in enumerate(configs):
        def progress(message: str, fraction: float | None, _i: int = i) -> None:
            overall = (_i + (fraction or 0.0)) / len(configs)
            on_event(StageEvent("apply", "progress", f"{cfg.name}: {message}", overall))

        ctx = ApplyContext(loaded.model, loaded.tokenizer, loaded.device, run_config.dtype, progress)
        progress("applying", 0.0)
        new_model = handler_for(cfg)(cfg, ctx)
        if new_model is not None:
            loaded.model = new_model
        records.append(record(cfg, ctx.notes))
        logger.info("applied %s", cfg.spec())
    return tuple(records)


def describe_techniques(device_spec: str = "auto") -> list[dict]:
    """One row per registered technique: parameters with their help, and whether it runs on the device."""
    import dataclasses
    import typing

    from workbench.execution import resolve_device

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
