"""Running a sweep: every configuration of the grid in order, each stored as it ends; stored ones are skipped."""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from workbench.events import OnEvent, never_stop, no_event
from workbench.serde import to_dict
from workbench.store import Store, config_hash
from workbench.sweep.grid import SweepSpec
from workbench.sweep.inline import run_inline
from workbench.sweep.isolated import run_isolated

logger = logging.getLogger(__name__)


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
    execute = run_isolated if isolate else run_inline
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
