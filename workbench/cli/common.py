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
