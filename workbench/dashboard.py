"""`workbench dashboard`: serve notebooks/dashboard.ipynb with Voila, on 127.0.0.1 unless told otherwise."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from workbench.config import RunConfig, check_fields, option
from workbench.errors import ConfigError

logger = logging.getLogger(__name__)

NOTEBOOK = Path(__file__).resolve().parent.parent / "notebooks" / "dashboard.ipynb"
DASHBOARD_SOURCE = '''import json
import os

from workbench import logs

logs.quiet_libraries()
from widgets import Workbench  # noqa: E402

app = Workbench(store_path=os.environ.get("WORKBENCH_STORE", "workbench-results.sqlite"))
app.set_values(**json.loads(os.environ.get("WORKBENCH_DEFAULTS", "{}")))
app'''


@dataclass(frozen=True)
class DashboardConfig:
    """How the dashboard is served."""

    ip: str = option("127.0.0.1", "Address to listen on; 0.0.0.0 publishes it to the network (no login: put "
                     "it behind an authenticating proxy).", group="Serving")
    port: int = option(8866, "TCP port.", group="Serving", minimum=1, maximum=65535)
    base_url: str = option("/", "URL prefix when served behind a proxy, e.g. /workbench/.", group="Serving")
    cull_idle_s: int = option(900, "Shut down a user's kernel this many seconds after its page was closed "
                              "(0: never).", group="Serving", minimum=0)
    store: str = option("workbench-results.sqlite", "Results database shared by every user of this server.",
                        group="Serving")
    open_browser: bool = option(False, "Open a local browser on the page.", group="Serving")

    def __post_init__(self) -> None:
        check_fields(self)
        if not (self.base_url.startswith("/") and self.base_url.endswith("/")):
            raise ValueError(f"base_url must start and end with '/'; got {self.base_url!r}")


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
    from workbench.paths import cache_dir

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
    if not config.open_browser:
        cmd.append("--no-browser")
    return cmd


def environment(config: DashboardConfig, defaults: dict[str, Any]) -> dict[str, str]:
    """Environment of the Voila server: the shared store and the app's starting values."""
    unknown = set(defaults) - set(RunConfig.__dataclass_fields__)
    if unknown:
        raise ConfigError(f"not run settings: {', '.join(sorted(unknown))}")
    env = dict(os.environ)
    env["WORKBENCH_STORE"] = str(Path(config.store).resolve())
    env["WORKBENCH_DEFAULTS"] = json.dumps({"threads": default_threads(), **defaults})
    return env


def default_threads() -> int:
    """Intra-op threads for a dashboard run: leave a core to the browser and the server when there are few.

    On a 2-core machine two threads fighting the browser for the cores decoded `tiny` ~17x slower
    than one thread (9.8 vs 162 tokens/s, measured in JupyterLab with chromium on the same machine).
    """
    cores = os.cpu_count() or 1
    return max(1, cores - 1) if cores <= 8 else cores - 2


def local_url(config: DashboardConfig) -> str:
    """Where to open the dashboard on this machine."""
    host = "127.0.0.1" if config.ip in ("0.0.0.0", "::") else config.ip
    return f"http://{host}:{config.port}{config.base_url}"


def serve(config: DashboardConfig, defaults: dict[str, Any] | None = None) -> int:
    """Run Voila in the foreground until interrupted; return its exit code."""
    env = environment(config, defaults or {})
    try:
        return subprocess.call(voila_command(config), env=env)
    except KeyboardInterrupt:
        return 0
