"""`workbench results`: list the runs of the results store (it names its path), show one, or export them all."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from workbench.cli.common import HELP, fail
from workbench.errors import StoreError
from workbench.paths import STORE_HELP
from workbench.report import format_result, format_summaries
from workbench.store import Store


def add_results_parser(sub: Any) -> None:
    """The `results` subcommand's flags."""
    r = sub.add_parser("results", help=HELP["results"],
                       description="List the runs in the results store (newest first), show one in full, or export "
                       "them all as CSV or JSON. Every entry point (run, sweep, the app, the dashboard) writes to the "
                       "same default store, so this lists them all; the listing names the store's path. Listing "
                       "never creates a store.")
    r.add_argument("--store", default=None, help=STORE_HELP)
    r.add_argument("--csv", nargs="?", const="-", default=None, metavar="PATH", help="export CSV (to stdout or PATH)")
    r.add_argument("--json", action="store_true", help="export every stored result as a JSON list")
    r.add_argument("--show", type=int, default=None, metavar="ID", help="one run in full")
    r.add_argument("--limit", type=int, default=50, help="rows listed (default 50)")


def cmd_results(args: argparse.Namespace) -> int:
    """List, show or export; reading never creates the store (a missing one has "no runs yet")."""
    try:
        store = Store(args.store)
        if args.show is not None:
            result = store.get(args.show)
            print(result.to_json(indent=1) if args.json else format_result(result))
        elif args.csv is not None:
            frame = store.dataframe()
            frame.to_csv(sys.stdout if args.csv == "-" else args.csv, index=False)
        elif args.json:
            print(json.dumps([r.to_dict() | {"run_id": r.run_id} for r in store.results(status=None)]))
        else:
            rows = store.summaries(limit=args.limit)
            print(f"runs in {store.path} (newest first):\n{format_summaries(rows)}" if rows else
                  f"no runs yet in {store.path}")
    except StoreError as e:
        return fail(str(e), False)
    return 0
