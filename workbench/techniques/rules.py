"""Which techniques may run together: one quantization, float-weight work before packing, each technique's
own dtype and order rules, and whether each can run on a device at all."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from workbench.errors import ConfigError
from workbench.execution import resolve_device
from workbench.techniques.base import TechniqueConfig, parse_spec


def _general_conflict(earlier: TechniqueConfig, later: TechniqueConfig) -> str | None:
    """Rules every technique obeys: one quantization per run; float-weight work before packing."""
    if earlier.kind == "quant" and later.kind == "quant":
        return "two quantizations in one run; choose one"
    if earlier.packs_weights and later.needs_float_weights:
        return (f"{later.name} works on float weights, which {earlier.name} has already packed; "
                f"apply {later.name} first (prune, then quantize)")
    return None


def combination_error(configs: Sequence[TechniqueConfig], dtype: str) -> str | None:
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


def check_techniques(items: Iterable[str | TechniqueConfig], dtype: str,
                     device: str | None = None) -> tuple[TechniqueConfig, ...]:
    """Specs parsed (configs kept as given), in order; ConfigError when they cannot run together.

    With the run's `device` spec, a combination problem (a dtype, an order) is reported only after
    checking that every technique can run on that device at all: the blocking reason comes first, so
    following the advice never leads to a second refusal. Valid combinations never look at the device
    (a stored configuration from a GPU machine still loads on a CPU one).
    """
    configs = tuple(item if isinstance(item, TechniqueConfig) else parse_spec(item) for item in items)
    problem = combination_error(configs, dtype)
    if problem:
        if device is not None:
            check_combination(configs, resolve_device(device))
        raise ConfigError(problem)
    return configs


def normalize_specs(specs: Iterable[str | TechniqueConfig], dtype: str, device: str | None = None) -> tuple[str, ...]:
    """The canonical spec of each technique, after `check_techniques`."""
    return tuple(cfg.spec() for cfg in check_techniques(specs, dtype, device))


def check_combination(configs: Iterable[TechniqueConfig], device: torch.device) -> None:
    """ConfigError naming the first technique that cannot run on `device` at all (before anything is loaded)."""
    for cfg in configs:
        if not isinstance(cfg, TechniqueConfig):
            raise TypeError(f"check_combination takes parsed technique configs (RunConfig.techniques); got {cfg!r}")
        reason = type(cfg).unavailable(device)
        if reason:
            raise ConfigError(f"{cfg.name} cannot run on {device}: {reason}")


def speed_warnings(configs: Iterable[TechniqueConfig], device_type: str, batch: int,
                   compiled: bool) -> tuple[str, ...]:
    """Each technique's known slowness on `device_type` at `batch` sequences per step (`compiled`: the decode step
    is compiled), one warning each: the cause and what to use instead."""
    found = (cfg.speed_warning(device_type, batch, compiled) for cfg in configs)
    return tuple(warning for warning in found if warning)
