"""`workbench dashboard`: serve the app with Voila (see workbench.serve.dashboard), locked when published."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import Any

from workbench.cli.common import HELP, usage
from workbench.config import RunConfig
from workbench.flags import add_dataclass_arguments, flag
from workbench.serve import dashboard
from workbench.serve.dashboard import DashboardConfig, check_defaults, local_url, server_token
from workbench.serve.publish import PublishPolicy


def add_dashboard_parser(sub: Any) -> None:
    """The `dashboard` subcommand: DashboardConfig's flags, the publisher's caps, and --set defaults."""
    d = sub.add_parser("dashboard", help=HELP["dashboard"],
                       description="Serve the app with Voila. On 127.0.0.1 it is yours alone; on any other "
                       "address it is published: a token is required and the publisher's lock is on by default.")
    add_dataclass_arguments(d, DashboardConfig, skip=("token", "lock"))
    p = d.add_argument_group("Publishing")
    for name in ("token", "lock"):
        p.add_argument(flag(name), dest=name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                       help=DashboardConfig.__dataclass_fields__[name].metadata["help"])
    add_dataclass_arguments(d, PublishPolicy, skip=("models", "root"))
    d.add_argument("--models", dest="models", default=argparse.SUPPRESS, metavar="LIST",
                   help=PublishPolicy.__dataclass_fields__["models"].metadata["help"])
    d.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="starting value of a run setting in the app, e.g. --set threads=1 --set max_new_tokens=64")


def _defaults(items: list[str] | None) -> dict[str, Any]:
    """--set KEY=VALUE items: each value read as JSON when it parses, else as text."""
    defaults: dict[str, Any] = {}
    for item in items or []:
        key, eq, raw = item.partition("=")
        if not eq:
            raise ValueError(f"--set takes KEY=VALUE; got {item!r}")
        try:
            defaults[key.strip()] = json.loads(raw)
        except ValueError:
            defaults[key.strip()] = raw
    return defaults


def cmd_dashboard(args: argparse.Namespace) -> int:
    """Validate every flag and --set value, print the URL (and the lock), then serve until Ctrl-C."""
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(DashboardConfig) if hasattr(args, f.name)}
    caps = {f.name: getattr(args, f.name) for f in dataclasses.fields(PublishPolicy) if hasattr(args, f.name)}
    try:
        config = DashboardConfig(**given)
        if caps and not config.locked:
            raise ValueError(f"{flag(next(iter(caps)))} sets the publisher's lock, which is off here: add --lock")
        policy = PublishPolicy(**caps) if config.locked else None
        defaults = _defaults(args.set)
        RunConfig(**{k: v for k, v in defaults.items() if k != "techniques"})
        check_defaults(policy, defaults)
    except (ValueError, TypeError) as e:
        return usage(args.prog, str(e))
    token = server_token(config)
    print(f"dashboard: {local_url(config, token)}  (Ctrl-C to stop)", flush=True)
    if config.published and not config.needs_token:
        print("warning: published without a token: every visitor who reaches this port gets the app; only do "
              "this behind a proxy that authenticates", file=sys.stderr, flush=True)
    if policy is not None:
        print(f"locked: models {', '.join(policy.models)}; batch <= {policy.max_batch_size}, new tokens <= "
              f"{policy.max_new_tokens}; files under {policy.root}", flush=True)
    return dashboard.serve(config, defaults, policy, token)  # looked up here, so a test can stand in for it
