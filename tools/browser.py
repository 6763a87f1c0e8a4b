"""Real-browser helpers for tests and screenshots: Debian's chromium driven by Playwright, local servers.

Jupyter and Chromium write to $HOME, so every server gets a temporary HOME (and runtime folders);
Chromium runs headless with the flags this sandbox needs. Never `playwright install`: the system
chromium at /usr/bin/chromium is used.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"]


def chromium_path() -> str | None:
    """The system chromium, if installed."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def isolated_env(home: Path) -> dict[str, str]:
    """Environment for a server whose writes all land under `home`."""
    env = dict(os.environ)
    env.update(HOME=str(home), JUPYTER_RUNTIME_DIR=str(home / "runtime"), JUPYTER_DATA_DIR=str(home / "data"),
               JUPYTER_CONFIG_DIR=str(home / "config"), IPYTHONDIR=str(home / "ipython"),
               XDG_CACHE_HOME=str(home / "cache"), MPLCONFIGDIR=str(home / "mpl"), HF_HUB_OFFLINE="1",
               PYTHONUNBUFFERED="1")
    env.setdefault("WORKBENCH_CACHE_DIR", str(home / "workbench-cache"))
    env["JUPYTER_PATH"] = os.pathsep.join(p for p in (str(Path(sys.prefix) / "share" / "jupyter"),
                                                      env.get("JUPYTER_PATH", "")) if p)
    return env


def wait_http(url: str, timeout: float = 60.0, proc: subprocess.Popen | None = None) -> None:
    """Poll until `url` answers, with any HTTP status (or the server process died).

    For Voila, poll a URL that is not the notebook: every request for the notebook starts a kernel.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with code {proc.returncode} before answering {url}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except urllib.error.HTTPError:
            return  # an error page is an answer: the server is up
        except OSError:
            time.sleep(0.3)
    raise TimeoutError(f"{url} did not answer within {timeout:.0f} s")


@contextlib.contextmanager
def server(command: list[str], url: str, cwd: Path, home: Path | None = None, log: Path | None = None,
           timeout: float = 90.0, env: dict[str, str] | None = None) -> Iterator[subprocess.Popen]:
    """Start a server process with an isolated HOME, wait for `url`, stop it (and its kernels) afterwards."""
    home = home or Path(tempfile.mkdtemp(prefix="wb-home-"))
    home.mkdir(parents=True, exist_ok=True)
    out = open(log, "w") if log else subprocess.DEVNULL  # noqa: SIM115 - closed below
    proc = subprocess.Popen(command, cwd=cwd, env={**isolated_env(home), **(env or {})}, stdout=out,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_http(url, timeout, proc)
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
        if log:
            out.close()


def lab_command(root: Path, port: int) -> list[str]:
    """`jupyter lab` on 127.0.0.1:port without token (local tests only)."""
    return [sys.executable, "-m", "jupyterlab", f"--port={port}", "--no-browser", "--ServerApp.ip=127.0.0.1",
            "--IdentityProvider.token=", "--ServerApp.password=", f"--ServerApp.root_dir={root}",
            "--ServerApp.disable_check_xsrf=True", "--ServerApp.allow_root=True", "--LabApp.news_url=None", "--LabApp.check_for_updates_class="
            "jupyterlab.NeverCheckForUpdate"]


def widget_button(page, label: str):  # -> playwright Locator
    """The ipywidgets button whose text is exactly `label` (its accessible name includes the tooltip)."""
    import re

    return page.locator("button.widget-button", has_text=re.compile(rf"^\s*{re.escape(label)}\s*$"))


@contextlib.contextmanager
def browser(home: Path | None = None) -> Iterator[object]:
    """A Playwright chromium browser (the system one)."""
    from playwright.sync_api import sync_playwright

    path = chromium_path()
    if path is None:
        raise RuntimeError("chromium is not installed (bash dev.sh setup installs Debian's chromium)")
    home = home or Path(tempfile.mkdtemp(prefix="wb-chromium-"))
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=path, args=CHROMIUM_ARGS, env=isolated_env(home))
        try:
            yield b
        finally:
            b.close()
