"""One configuration of a sweep, run in this process and stored (the isolated child runs it this way too)."""

from __future__ import annotations

import os
from collections.abc import Callable

from workbench import runner
from workbench.config import RunConfig
from workbench.errors import WorkbenchError
from workbench.events import OnEvent
from workbench.store import Store


def run_inline(config: RunConfig, store: Store, on_event: OnEvent, should_stop: Callable[[], bool]) -> dict:
    """Run in this process; store the result (or the error sentence); the outcome's SweepEvent fields."""
    try:
        result = runner.run(config, on_event, should_stop)
    except WorkbenchError as e:
        return {"status": "error", "run_id": store.add_error(config, str(e)), "message": str(e), "pid": os.getpid()}
    run_id = store.add(result)
    lat, acc = result.latency, result.accuracy
    return {"status": result.status, "run_id": run_id, "pid": os.getpid(),
            "decode_tokens_per_s": lat.decode_tokens_per_s if lat else None,
            "perplexity": acc.perplexity if acc else None}
