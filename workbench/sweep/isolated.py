"""Isolated sweep runs: each in a fresh Python process that writes the store itself.

The parent (`run_isolated`, here) starts `python -m workbench.sweep.child`, sends one JSON request line
(the config, the store path) on its stdin, and reads JSON lines from its stdout: the run's events,
then the outcome. A "stop" line on stdin, or stdin closing (the parent was killed), stops the run
after its current token; the child still stores the partial run. The child's stderr passes through.
"""

from __future__ import annotations

import contextlib
import json
import logging
import queue
import subprocess
import sys
import threading
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any, TextIO

from workbench.config import RunConfig
from workbench.events import OnEvent
from workbench.paths import share_import_path
from workbench.store import Store
from workbench.wire import event_from_wire

CHILD_MODULE = "workbench.sweep.child"  # its entry point: started with -m, imported by no module


def run_isolated(config: RunConfig, store: Store, on_event: OnEvent, should_stop: Callable[[], bool]) -> dict:
    """Run in a fresh Python process (`child_main`) that stores the result itself; relay its events."""
    request = {"config": config.to_dict(), "store": str(store.path.resolve()),
               "log_level": logging.getLogger().getEffectiveLevel()}
    pipe = subprocess.PIPE
    share_import_path()
    proc = subprocess.Popen([sys.executable, "-m", CHILD_MODULE], stdin=pipe, stdout=pipe, stderr=pipe,
                            text=True, start_new_session=True)  # a Ctrl-C in the terminal reaches only us
    tail: deque[str] = deque(maxlen=20)
    relay = threading.Thread(target=_pump, args=(proc.stderr, lambda line: _relay(line, tail)), daemon=True)
    relay.start()
    try:
        _send(proc.stdin, request)
        outcome = _follow(proc, on_event, should_stop)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=60)
    finally:
        if proc.poll() is None:  # aborted (second Ctrl-C) or stuck: the child must not outlive us
            proc.kill()
        proc.wait()
        relay.join(timeout=5)
        for pipe in (proc.stdin, proc.stdout, proc.stderr):
            close_quietly(pipe)
    if outcome is None:
        message = _crash_message(proc.returncode, tail)
        return {"status": "error", "run_id": store.add_error(config, message), "message": message, "pid": proc.pid}
    return outcome


def _follow(proc: subprocess.Popen, on_event: OnEvent, should_stop: Callable[[], bool]) -> dict | None:
    """Relay the child's events until it closes stdout; pass on a stop request; return its outcome."""
    lines: queue.Queue[str | None] = queue.Queue()
    threading.Thread(target=_pump, args=(proc.stdout, lines.put), daemon=True).start()
    outcome, asked = None, False
    while True:
        if not asked and should_stop():
            _send(proc.stdin, "stop")
            asked = True
        try:
            line = lines.get(timeout=0.05)
        except queue.Empty:
            continue
        if line is None:
            return outcome
        try:
            message = json.loads(line)
        except ValueError:
            continue
        if "outcome" in message:
            outcome = message["outcome"]
        elif (event := event_from_wire(message)) is not None:
            on_event(event)


def _pump(stream: TextIO, put: Callable[[Any], None]) -> None:
    """Feed every line of `stream` to `put`, then None."""
    try:
        for line in stream:
            put(line)
    except (OSError, ValueError):
        pass
    put(None)


def _relay(line: str | None, tail: deque[str]) -> None:
    """The child's stderr goes to ours, as an inline run's would; keep the last lines for a crash message."""
    if line is None:
        return
    sys.stderr.write(line)
    sys.stderr.flush()
    if line.strip():
        tail.append(line.strip())


def _send(stream: TextIO | None, message: Any) -> None:
    try:
        stream.write((message if isinstance(message, str) else json.dumps(message)) + "\n")
        stream.flush()
    except (OSError, ValueError, AttributeError):
        pass  # the other side is gone


def close_quietly(stream: TextIO | None) -> None:
    """Close a pipe whose other side may be gone."""
    try:
        if stream is not None:
            stream.close()
    except OSError:
        pass


def _crash_message(code: int | None, tail: Iterable[str]) -> str:
    how = f"was killed by signal {-code}" if code is not None and code < 0 else f"exited with code {code}"
    if code == -9:
        how += " (out of memory?)"
    last = list(tail)[-1:] or [""]
    return f"the run process {how} without a result" + (f": {last[0]}" if last[0] else "")
