"""Ctrl-C for the long CLI commands (run, sweep, distill): the first asks the work to stop cleanly, the second aborts."""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any


@contextlib.contextmanager
def stop_on_ctrl_c(what: str) -> Iterator[Callable[[], bool]]:
    """Yield a `should_stop`; the first Ctrl-C sets it (printing `what` will happen), the second raises."""
    requested = threading.Event()

    def on_sigint(signum: int, frame: Any) -> None:
        if requested.is_set():
            raise KeyboardInterrupt
        requested.set()
        print(f"{what} (Ctrl-C again to abort)", file=sys.stderr, flush=True)

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        yield requested.is_set
    finally:
        signal.signal(signal.SIGINT, previous)
