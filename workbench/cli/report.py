"""`workbench report RUN_ID... --out FILE.html [--store PATH]`: an offline HTML comparison of stored runs."""

from __future__ import annotations

import argparse
from typing import Any

from workbench.cli.common import HELP, fail
from workbench.errors import ExportError, StoreError
from workbench.paths import STORE_HELP


def add_report_parser(sub: Any) -> None:
    """The `report` subcommand's flags."""
    r = sub.add_parser("report", help=HELP["report"],
                       description="Write one self-contained HTML page comparing stored runs: their settings, latency, "
                       "memory, accuracy, roofline (with the bound that holds), energy and warnings, with one figure "
                       "per section. plotly.js is inlined, so the page opens offline. Run ids are the numbers "
                       "`workbench results` lists.")
    r.add_argument("run_ids", nargs="*", metavar="RUN_ID", help="runs to compare (ids from `workbench results`)")
    r.add_argument("--out", required=True, metavar="FILE.html", help="the page to write (must end in .html)")
    r.add_argument("--store", default=None, help=STORE_HELP)


def cmd_report(args: argparse.Namespace) -> int:
    """Write the report; bad ids, paths or stores are one sentence on stderr."""
    from widgets.report_html import write_report

    try:
        path = write_report(args.run_ids, args.out, args.store)
    except (ExportError, StoreError) as e:
        return fail(str(e), False)
    print(f"report of runs {', '.join(args.run_ids)} written to {path}")
    return 0
