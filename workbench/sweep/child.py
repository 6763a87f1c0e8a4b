"""The child process of an isolated sweep run (`python -m workbench.sweep.child`; see workbench.sweep.isolated).

It reads one JSON request line (the config, the store path) on stdin, runs it in this process, stores it, and
writes the run's events, then the outcome, as JSON lines on the stdout it was given.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
from typing import Any

from workbench import logs
from workbench.config import RunConfig
from workbench.store import Store
from workbench.sweep.inline import run_inline
from workbench.sweep.isolated import close_quietly
from workbench.wire import event_to_wire


def child_main() -> None:
    """Entry of an isolated run: a request line on stdin; events and the outcome as JSON lines on stdout.

    A "stop" line on stdin, or stdin closing (the parent is gone), stops the run after its current token.
    """
    logs.setup(0)
    wire = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # stray prints from libraries go to stderr, never into the protocol
    request = json.loads(sys.stdin.readline())
    logging.getLogger().setLevel(request.get("log_level", logging.WARNING))
    stop = threading.Event()
    threading.Thread(target=_watch_parent, args=(stop,), daemon=True).start()

    def emit(message: dict[str, Any]) -> None:
        try:
            wire.write(json.dumps(message, default=str) + "\n")
        except (OSError, ValueError):
            stop.set()  # the parent is gone: end the run as stopped; it is still stored

    config, store = RunConfig.from_dict(request["config"]), Store(request["store"])
    outcome = run_inline(config, store, lambda e: emit(event_to_wire(e)), stop.is_set)
    emit({"outcome": outcome})
    close_quietly(wire)


def _watch_parent(stop: threading.Event) -> None:
    """Set `stop` on a "stop" line or when stdin closes."""
    for line in sys.stdin:
        if line.strip() == "stop":
            break
    stop.set()


if __name__ == "__main__":
    child_main()
