"""`workbench` command line: run, models, techniques, results, report, sensitivity, sweep, distill, dashboard,
build-reference.

One module per subcommand family under this package (each adds its parser and runs its command); this module
lists them and imports only the module of the command being run. `main` is the `workbench` console script
(`python -m workbench` too).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Callable, Collection, Sequence

from workbench import __version__, logs
from workbench.cli.common import EXIT_PIPE, EXIT_STOPPED, HELP, Parser

__all__ = ["build_parser", "main", "COMMANDS", "command"]

# Each subcommand: the module that adds its parser and runs it, and those two functions' names. A module is imported
# only when its command is parsed or run, so `workbench --help` (and `report --help`) import no torch; the commands
# that read run configurations or results import it with them.
COMMANDS: dict[str, tuple[str, str, str]] = {
    "run": ("workbench.cli.run", "add_run_parser", "cmd_run"),
    "models": ("workbench.cli.run", "add_models_parser", "cmd_models"),
    "techniques": ("workbench.cli.run", "add_techniques_parser", "cmd_techniques"),
    "results": ("workbench.cli.results", "add_results_parser", "cmd_results"),
    "report": ("workbench.cli.report", "add_report_parser", "cmd_report"),
    "sensitivity": ("workbench.cli.run", "add_sensitivity_parser", "cmd_sensitivity"),
    "sweep": ("workbench.cli.sweep", "add_sweep_parser", "cmd_sweep"),
    "distill": ("workbench.cli.distill", "add_distill_parser", "cmd_distill"),
    "dashboard": ("workbench.cli.dashboard", "add_dashboard_parser", "cmd_dashboard"),
    "build-reference": ("workbench.cli.run", "add_build_reference_parser", "cmd_build_reference"),
}


def command(name: str) -> Callable[[argparse.Namespace], int]:
    """The function that runs subcommand `name` (importing its module)."""
    module, _, run = COMMANDS[name]
    return getattr(importlib.import_module(module), run)


def build_parser(full: Collection[str] | None = None) -> argparse.ArgumentParser:
    """The whole command line. With `full`, only those subcommands get their arguments (and their modules are
    imported); the others are listed by name and help alone."""
    parser = Parser(prog="workbench", description="LLM Inference Workbench: what each inference optimization "
                    "costs in latency, memory and accuracy.")
    parser.add_argument("--version", action="version", version=f"workbench {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging on stderr (-vv: debug)")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for name, (module, add, _) in COMMANDS.items():
        if full is None or name in full:
            getattr(importlib.import_module(module), add)(sub)
        else:
            sub.add_parser(name, help=HELP[name])
    return parser


def _command_in(argv: Sequence[str]) -> str | None:
    """The subcommand argv names: its first word that is not an option (the top-level options take no value);
    None when that is not a command (argparse then lists the commands)."""
    word = next((a for a in argv if not a.startswith("-")), None)
    return word if word in COMMANDS else None


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `workbench` console script."""
    logs.quiet_libraries()
    argv = sys.argv[1:] if argv is None else list(argv)
    name = _command_in(argv)
    args = build_parser(full=[name] if name else []).parse_args(argv)
    logs.setup(args.verbose)
    args.prog = f"workbench {args.command}"
    try:
        return command(args.command)(args)
    except KeyboardInterrupt:
        print("aborted", file=sys.stderr)
        return EXIT_STOPPED
    except BrokenPipeError:  # the reader closed our stdout (`workbench results | head`): stop quietly, as `cat` does
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the flush at exit does not fail again
        return EXIT_PIPE
