"""`workbench` command line: run, models, techniques, results, report, sensitivity, sweep, distill, dashboard,
build-reference.

One module per subcommand family under this package (each adds its parser and runs its command); this
module assembles them. `main` is the `workbench` console script (`python -m workbench` too).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from workbench import __version__, logs
from workbench.cli.common import EXIT_STOPPED, Parser
from workbench.cli.dashboard import add_dashboard_parser, cmd_dashboard
from workbench.cli.distill import add_distill_parser, cmd_distill
from workbench.cli.report import add_report_parser, cmd_report
from workbench.cli.results import add_results_parser, cmd_results
from workbench.cli.run import (add_build_reference_parser, add_listing_parsers, add_run_parser,
                               add_sensitivity_parser, cmd_build_reference, cmd_models, cmd_run, cmd_sensitivity,
                               cmd_techniques)
from workbench.cli.sweep import add_sweep_parser, cmd_sweep

__all__ = ["build_parser", "main", "COMMANDS"]

COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "run": cmd_run, "models": cmd_models, "techniques": cmd_techniques, "results": cmd_results,
    "build-reference": cmd_build_reference, "sensitivity": cmd_sensitivity, "dashboard": cmd_dashboard,
    "sweep": cmd_sweep, "distill": cmd_distill, "report": cmd_report}


def build_parser() -> argparse.ArgumentParser:
    """The whole command line."""
    parser = Parser(prog="workbench", description="LLM Inference Workbench: what each inference optimization "
                    "costs in latency, memory and accuracy.")
    parser.add_argument("--version", action="version", version=f"workbench {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging on stderr (-vv: debug)")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    add_run_parser(sub)
    add_listing_parsers(sub)
    add_results_parser(sub)
    add_report_parser(sub)
    add_sensitivity_parser(sub)
    add_sweep_parser(sub)
    add_distill_parser(sub)
    add_dashboard_parser(sub)
    add_build_reference_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `workbench` console script."""
    logs.quiet_libraries()
    parser = build_parser()
    args = parser.parse_args(argv)
    logs.setup(args.verbose)
    args.prog = f"workbench {args.command}"
    try:
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print("aborted", file=sys.stderr)
        return EXIT_STOPPED
