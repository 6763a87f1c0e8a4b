"""Applying a run's techniques, in order, to a loaded model; what the result records about each."""

from __future__ import annotations

import logging
from typing import Any

from workbench.config import RunConfig
from workbench.events import OnEvent, StageEvent
from workbench.result import TechniqueRecord
from workbench.techniques.base import ApplyContext, TechniqueConfig, handler_for

logger = logging.getLogger(__name__)


def record(config: TechniqueConfig, notes: list[str]) -> TechniqueRecord:
    """What the result says about an applied technique."""
    text = "; ".join(n for n in [config.notes(), *notes] if n)
    return TechniqueRecord(config.name, config.kind, config.params(), config.simulated, text)


def apply_techniques(loaded: Any, run_config: RunConfig, on_event: OnEvent,
                     start: int = 0) -> tuple[TechniqueRecord, ...]:
    """Apply the run's (parsed) techniques in order to `loaded.model` (replaced when a handler returns a new one);
    those before `start` were applied by `from_pretrained` while loading and are not recorded here."""
    records = []
    configs = run_config.techniques
    for i, cfg in enumerate(configs):
        if i < start:
            continue
        def progress(message: str, fraction: float | None, _i: int = i, _cfg: TechniqueConfig = cfg) -> None:
            overall = (_i + (fraction or 0.0)) / len(configs)
            on_event(StageEvent("apply", "progress", f"{_cfg.name}: {message}", overall))

        ctx = ApplyContext(loaded.model, loaded.tokenizer, loaded.device, run_config.dtype, progress)
        progress("applying", 0.0)
        new_model = handler_for(cfg)(cfg, ctx)
        if new_model is not None:
            loaded.model = new_model
        records.append(record(cfg, ctx.notes))
        logger.info("applied %s", cfg.spec())
    return tuple(records)
