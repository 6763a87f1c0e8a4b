"""What every subcommand shares: the parser class, exit codes, one-sentence errors, progress on stderr."""

from __future__ import annotations

import argparse
import json
import sys
import typing
from collections.abc import Callable
from typing import Any

from workbench.events import StageEvent

EXIT_ERROR, EXIT_USAGE, EXIT_STOPPED = 1, 2, 130
EXIT_PIPE = 141  # 128 + SIGPIPE: what a shell reports for a command whose reader went away

# Each subcommand's line in `workbench --help`, in that listing's order. The package lists every command from this
# table and imports only the module of the one being run (see `workbench.cli`).
HELP = {
    "run": "load a model, apply techniques, measure latency, memory and accuracy",
    "models": "list model sources",
    "techniques": "list techniques, their parameters, and whether they run here",
    "results": "list stored runs, or export them",
    "report": "write an offline HTML comparison of stored runs",
    "sensitivity": "per-layer error (SQNR, KL) of one technique, and a weight histogram",
    "sweep": "run a grid of configurations, storing each; a rerun skips stored ones",
    "distill": "distil a smaller student from a teacher; save it as student:NAME",
    "dashboard": "serve the app as a Voila dashboard (127.0.0.1 unless told otherwise)",
    "build-reference": "rebuild the `tiny` reference model from the stdlib docs",
}


class Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as one sentence (plus a pointer to --help)."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def usage(prog: str, message: str) -> int:
    """Print a usage error (something the user typed) and return its exit code."""
    print(f"{prog}: error: {message}", file=sys.stderr)
    return EXIT_USAGE


def fail(message: str, as_json: bool, config: Any = None) -> int:
    """Print a failure (and, with --json, one JSON object saying so); return its exit code."""
    print(f"error: {message}", file=sys.stderr)
    if as_json:
        print(json.dumps({"status": "error", "error": message, "config": config.to_dict() if config else None}))
    return EXIT_ERROR


def progress_printer(enabled: bool, every_s: float = 5.0) -> Callable[[Any], None]:
    """An on_event that narrates stages on stderr (the result itself goes to stdout): each start, and a stage's
    progress (tokens done, time left) when it has been quiet for `every_s` seconds (its first progress at once)."""
    last: dict[str, float] = {}

    def on_event(event: Any) -> None:
        if not enabled or not isinstance(event, StageEvent):
            return
        if event.state == "start":
            last[event.stage] = float("-inf")  # the stage's first progress line is printed at once
        elif not (event.state == "progress" and event.message
                  and event.elapsed_s - last.get(event.stage, float("-inf")) >= every_s):
            return
        else:
            last[event.stage] = event.elapsed_s
        print(f"[{event.elapsed_s:6.1f}s] {event.stage}: {event.message}", file=sys.stderr, flush=True)
    return on_event
