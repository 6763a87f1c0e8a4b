"""Screenshots of the app in JupyterLab after a real run on the reference model (for docs/).

    python -m tools.screenshots [--out docs]

Starts JupyterLab on 127.0.0.1 with a temporary HOME, opens a notebook that shows the app, runs it,
clicks Run, waits for the result and saves full-page screenshots.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from tools.browser import browser, free_port, lab_command, server, widget_button

CELLS = [
    "from widgets import Workbench\napp = Workbench(store_path='runs.sqlite')\napp",
    # a quick but complete configuration; one intra-op thread, as the browser and the Jupyter server
    # share this 2-core machine (two threads would fight them for the cores)
    "app.set_values(repeats=3, min_duration_s=0.5, eval_tokens=1024, threads=1)",
]


def notebook(cells: list[str]) -> dict:
    """A minimal nbformat-4 notebook."""
    return {"nbformat": 4, "nbformat_minor": 5, "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3",
                                                                           "language": "python"}},
            "cells": [{"cell_type": "code", "metadata": {}, "execution_count": None, "outputs": [], "source": c,
                       "id": f"c{i}"} for i, c in enumerate(cells)]}


def run_all(page) -> None:
    """JupyterLab: Run > Run All Cells."""
    page.get_by_role("menuitem", name="Run", exact=True).click()
    page.get_by_text("Run All Cells", exact=True).click()


def run_and_wait(page, done: int) -> None:
    """Click Run and wait for the `done`-th finished run."""
    widget_button(page, "Run").click()
    page.get_by_text(f"done: run {done}").wait_for(timeout=300_000)


def dismiss_news(page) -> None:
    """Close JupyterLab's 'get notified about news?' toast if it shows."""
    no = page.get_by_role("button", name="No", exact=True)
    if no.count():
        no.first.click()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="docs")
    args = parser.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="wb-lab-"))
    (root / "app.ipynb").write_text(json.dumps(notebook(CELLS)))
    port = free_port()
    with server(lab_command(root, port), f"http://127.0.0.1:{port}/lab", root, log=root / "lab.log"), browser() as b:
        page = b.new_page(viewport={"width": 1600, "height": 3400})
        page.goto(f"http://127.0.0.1:{port}/lab/tree/app.ipynb")
        page.wait_for_selector(".jp-Notebook", timeout=120_000)
        time.sleep(3)
        dismiss_news(page)
        run_all(page)
        widget_button(page, "Run").wait_for(timeout=120_000)
        time.sleep(3)
        run_and_wait(page, 1)  # the unmodified model
        page.get_by_text("Quantization", exact=True).click()
        page.locator(".widget-checkbox", has_text="sim").locator("input").first.check()
        run_and_wait(page, 2)  # sim 8-bit (the default): the history then holds two runs
        widget_button(page, "Analyze").click()
        page.get_by_text("layers analyzed").wait_for(timeout=300_000)
        time.sleep(3)
        page.locator(".jp-Cell").first.screenshot(path=str(out / "app-jupyterlab.png"))
        print(f"wrote {out / 'app-jupyterlab.png'}")


if __name__ == "__main__":
    main()
