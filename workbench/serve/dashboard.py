"""`workbench dashboard`: serve notebooks/dashboard.ipynb with Voila, on 127.0.0.1 unless told otherwise."""

from __future__ import annotations

import json
import logging
import os
import secrets
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from workbench.config import RunConfig
from workbench.errors import ConfigError
from workbench.options import check_fields, option
from workbench.paths import cache_dir
from workbench.serve.publish import ENV as POLICY_ENV
from workbench.serve.publish import PublishPolicy, check_run, is_loopback
from workbench.serve.slots import ENV as SLOTS_ENV
from workbench.serve.slots import RunSlots

logger = logging.getLogger(__name__)

NOTEBOOK = Path(__file__).resolve().parents[2] / "notebooks" / "dashboard.ipynb"
VOILA_CONFIG = Path(__file__).resolve().parent / "voila_config"  # voila.py: Voila settings of the dashboard
# Named to Voila, which imports it (it needs jupyter_server): never imported here.
KERNEL_MANAGER = "workbench.serve.voila_limits.LimitedKernelManager"
DASHBOARD_SOURCE = '''import json
import os

from workbench import logs
from workbench.serve.publish import PublishPolicy
from workbench.serve.slots import RunSlots

logs.quiet_libraries()
from widgets import Workbench  # noqa: E402

# A published server passes its lock (WORKBENCH_POLICY) and its run slots (WORKBENCH_SLOTS); none on 127.0.0.1.
app = Workbench(store_path=None,  # None: $WORKBENCH_STORE, else the user's one default store
                policy=PublishPolicy.from_env(), slots=RunSlots.from_env())
app.set_values(**json.loads(os.environ.get("WORKBENCH_DEFAULTS", "{}")))
app'''


@dataclass(frozen=True)
class DashboardConfig:
    """How the dashboard is served."""

    ip: str = option("127.0.0.1", "Address to listen on; anything but 127.x/localhost/::1 publishes it to the "
                     "network: then a token is required and the publisher's lock is on unless told otherwise.",
                     group="Serving")
    port: int = option(8866, "TCP port.", group="Serving", minimum=1, maximum=65535)
    base_url: str = option("/", "URL prefix when served behind a proxy, e.g. /workbench/.", group="Serving")
    cull_idle_s: int = option(900, "Shut down a user's kernel this many seconds after its page was closed "
                              "(0: never).", group="Serving", minimum=0)
    store: str | None = option(None, "Results database shared by every user of this server (default: the one "
                               "default store of `workbench run` and `workbench results`: $WORKBENCH_STORE, else "
                               "~/.local/share/workbench/results.sqlite).", group="Serving")
    open_browser: bool = option(False, "Open a local browser on the page.", group="Serving")
    token: bool | None = option(None, "Require a token (Jupyter's token login; the URL with it is printed; "
                                "$JUPYTER_TOKEN chooses it). Default: on when published; --no-token only behind "
                                "a proxy that authenticates.", group="Publishing")
    lock: bool | None = option(None, "The publisher's lock: no trust-remote-code or pickle inputs, only the "
                               "--models listed, capped sizes, file inputs inside this folder. Default: on when "
                               "published.", group="Publishing")
    max_runs: int | None = option(None, "Runs at once across all visitors; the others wait in a queue that shows "
                                  "their place (0: no limit; default: 1 when published, else no limit).",
                                  group="Limits", minimum=0, maximum=1024)
    max_users: int | None = option(None, "Visitors (kernels) at once; the next one gets a 'busy, try again' page "
                                   "(0: no limit; default: 8 when published, else no limit).", group="Limits",
                                   minimum=0, maximum=10000)

    def __post_init__(self) -> None:
        check_fields(self)
        if not (self.base_url.startswith("/") and self.base_url.endswith("/")):
            raise ValueError(f"base_url must start and end with '/'; got {self.base_url!r}")

    @property
    def published(self) -> bool:
        """Reachable from other machines (not bound to a loopback address)."""
        return not is_loopback(self.ip)

    @property
    def needs_token(self) -> bool:
        """Whether visitors must present the token."""
        return self.published if self.token is None else self.token

    @property
    def locked(self) -> bool:
        """Whether the publisher's lock applies."""
        return self.published if self.lock is None else self.lock

    @property
    def runs_limit(self) -> int:
        """Runs at once (0: no limit)."""
        return (1 if self.published else 0) if self.max_runs is None else self.max_runs

    @property
    def users_limit(self) -> int:
        """Kernels at once (0: no limit)."""
        return (8 if self.published else 0) if self.max_users is None else self.max_users


def dashboard_notebook() -> dict[str, Any]:
    """notebooks/dashboard.ipynb: one code cell that shows the app and nothing else."""
    cell = {"cell_type": "code", "id": "app", "metadata": {}, "execution_count": None, "outputs": [],
            "source": DASHBOARD_SOURCE}
    return {"nbformat": 4, "nbformat_minor": 5, "cells": [cell],
            "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
                         "language_info": {"name": "python"}}}


def notebook_path() -> Path:
    """The dashboard notebook: the checkout's, or a generated copy when the package is installed alone."""
    if NOTEBOOK.exists():
        return NOTEBOOK
    path = cache_dir() / "dashboard.ipynb"
    path.write_text(json.dumps(dashboard_notebook(), indent=1) + "\n")
    return path


def voila_command(config: DashboardConfig, notebook: Path | None = None) -> list[str]:
    """The voila command line for these settings."""
    cmd = [sys.executable, "-m", "voila", str(notebook or notebook_path()), f"--port={config.port}",
           f"--Voila.ip={config.ip}", f"--Voila.base_url={config.base_url}",
           "--VoilaConfiguration.show_tracebacks=False", "--theme=light"]
    if config.cull_idle_s:
        cmd += [f"--MappingKernelManager.cull_idle_timeout={config.cull_idle_s}",
                f"--MappingKernelManager.cull_interval={min(60, config.cull_idle_s)}"]
    if config.needs_token:  # the token itself travels in $JUPYTER_TOKEN, never on the command line
        cmd.append("--Voila.auto_token=True")
    if config.users_limit:
        cmd += [f"--VoilaConfiguration.multi_kernel_manager_class={KERNEL_MANAGER}",
                f"--LimitedKernelManager.max_kernels={config.users_limit}"]
    if not config.open_browser:
        cmd.append("--no-browser")
    cmd.append(f"--Voila.config_file_paths={VOILA_CONFIG}")  # the _xsrf cookie a closing page needs (see there)
    return cmd


def environment(config: DashboardConfig, defaults: dict[str, Any], policy: PublishPolicy | None = None,
                slots: RunSlots | None = None, token: str | None = None) -> dict[str, str]:
    """Environment of the Voila server: the shared store, the app's starting values, the lock, the run slots."""
    unknown = set(defaults) - set(RunConfig.__dataclass_fields__)
    if unknown:
        raise ConfigError(f"not run settings: {', '.join(sorted(unknown))}")
    env = dict(os.environ)
    for name in (POLICY_ENV, SLOTS_ENV):
        env.pop(name, None)  # never inherit a lock or slots this server did not choose
    if config.store:  # else the kernels find the same default store as every other entry point
        env["WORKBENCH_STORE"] = str(Path(config.store).expanduser().resolve())
    env["WORKBENCH_DEFAULTS"] = json.dumps({"threads": default_threads(), **defaults})
    if policy is not None:
        env[POLICY_ENV] = policy.to_json()
    if slots is not None:
        env[SLOTS_ENV] = slots.to_env()
    if token:
        env["JUPYTER_TOKEN"] = token  # read by jupyter_server's IdentityProvider (Voila.auto_token)
    return env


def default_threads() -> int:
    """Intra-op threads for a dashboard run: leave a core to the browser and the server when there are few.

    On a 2-core machine two threads fighting the browser for the cores decoded `tiny` ~17x slower
    than one thread (9.8 vs 162 tokens/s, measured in JupyterLab with chromium on the same machine).
    """
    cores = os.cpu_count() or 1
    return max(1, cores - 1) if cores <= 8 else cores - 2


def local_url(config: DashboardConfig, token: str | None = None) -> str:
    """Where to open the dashboard on this machine (with the token, when there is one)."""
    host = "127.0.0.1" if config.ip in ("0.0.0.0", "::") else config.ip
    host = f"[{host}]" if ":" in host else host
    return f"http://{host}:{config.port}{config.base_url}" + (f"?token={token}" if token else "")


def server_token(config: DashboardConfig) -> str | None:
    """The token visitors need: $JUPYTER_TOKEN when set, else a fresh random one; None without a token."""
    if not config.needs_token:
        return None
    return os.environ.get("JUPYTER_TOKEN") or secrets.token_urlsafe(24)


def check_defaults(policy: PublishPolicy | None, defaults: dict[str, Any]) -> None:
    """Refuse starting values (--set) that the publisher's own lock would refuse."""
    if policy is not None:
        check_run(policy, RunConfig(**{k: v for k, v in defaults.items() if k != "techniques"}))


def serve(config: DashboardConfig, defaults: dict[str, Any] | None = None, policy: PublishPolicy | None = None,
          token: str | None = None) -> int:
    """Run Voila in the foreground until interrupted; return its exit code."""
    with tempfile.TemporaryDirectory(prefix="workbench-runs-") as folder:
        slots = RunSlots(folder=folder, count=config.runs_limit) if config.runs_limit else None
        env = environment(config, defaults or {}, policy, slots, token)
        try:
            return subprocess.call(voila_command(config), env=env)
        except KeyboardInterrupt:
            return 0
