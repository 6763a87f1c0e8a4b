"""The app's exports that leave the page: the HTML report of the selected runs, and every plot as PNG, SVG or HTML.

Files go to the working folder (or the path typed); on a published (locked) dashboard every path must lie under
the server's working folder, as for its other file inputs. Exports run in a thread (starting the browser behind
PNG/SVG takes seconds); the status line says where the files went, or why not in one sentence.
"""

from __future__ import annotations

import html
import logging
import re
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ipywidgets as W
import plotly.graph_objects as go

from widgets.figure import sync_lock
from widgets.forms import error_html
from workbench.errors import WorkbenchError
from workbench.serve.publish import PublishPolicy

logger = logging.getLogger(__name__)

PLOT_FORMATS = ("png", "svg", "html")


def figures_in(widget: Any) -> list[go.FigureWidget]:
    """Every plotly figure shown inside a widget tree, in page order (each once)."""
    found: list[go.FigureWidget] = []

    def walk(w: Any) -> None:
        if isinstance(w, go.FigureWidget):
            if all(f is not w for f in found):
                found.append(w)
        for child in getattr(w, "children", ()) or ():
            walk(child)
    walk(widget)
    return found


def _slug(fig: go.FigureWidget, index: int) -> str:
    """A file-name part from the figure's title (else its number)."""
    title = fig.layout.title.text if fig.layout.title and fig.layout.title.text else ""
    if not title and fig.layout.annotations:
        title = fig.layout.annotations[0].text or ""
    words = re.sub(r"<[^>]+>", " ", title)
    slug = re.sub(r"[^a-z0-9]+", "-", words.lower()).strip("-")[:40]
    return f"{index:02d}-{slug}" if slug else f"{index:02d}"


class ExportPanel:
    """Export report (the selected runs, else the newest) and Export plots (a format dropdown), with a status line."""

    def __init__(self, selected_runs: Callable[[], list[int]], store_path: str, root: Callable[[], Any],
                 policy: PublishPolicy | None = None) -> None:
        self.selected_runs, self.store_path, self.root, self.policy = selected_runs, store_path, root, policy
        self.report_path = W.Text(value="workbench-report.html", description="report file",
                                  style={"description_width": "70px"}, layout={"width": "300px"},
                                  tooltip="Where Export report writes (relative: the working folder)")
        self.report_button = W.Button(description="Export report", icon="file-text",
                                      tooltip="An offline HTML page comparing the selected runs (else the newest)")
        self.plots_folder = W.Text(value=".", description="plots folder", style={"description_width": "80px"},
                                   layout={"width": "260px"}, tooltip="Where Export plots writes one file per plot")
        self.plot_format = W.Dropdown(options=PLOT_FORMATS, value="png", description="as",
                                      style={"description_width": "24px"}, layout={"width": "110px"})
        self.plots_button = W.Button(description="Export plots", icon="image",
                                     tooltip="Write every plot on the page as PNG, SVG or self-contained HTML")
        self.status = W.HTML()
        self.report_button.on_click(lambda _: self.start(self.export_report))
        self.plots_button.on_click(lambda _: self.start(self.export_plots))
        self.thread: threading.Thread | None = None
        self.box = W.VBox([W.HBox([self.report_path, self.report_button]),
                           W.HBox([self.plots_folder, self.plot_format, self.plots_button]), self.status])

    def _resolve(self, path: str, what: str) -> Path:
        """The path as typed (relative: the working folder); on a locked server, refused outside its folder."""
        if self.policy is not None:
            return Path(self.policy.resolve_path(path, what))
        return Path(path).expanduser()

    def start(self, work: Callable[[], Any]) -> None:
        """Run an export in a thread (one at a time)."""
        if self.thread is not None and self.thread.is_alive():
            self.status.value = error_html("an export is still running; wait for it to finish")
            return
        self.report_button.disabled = self.plots_button.disabled = True
        self.status.value = "<span class='wb-note'>exporting…</span>"
        self.thread = threading.Thread(target=self._guarded, args=(work,), daemon=True)
        self.thread.start()

    def wait(self, timeout: float | None = None) -> None:
        """Wait for the running export (tests, scripts)."""
        if self.thread is not None:
            self.thread.join(timeout)

    def _guarded(self, work: Callable[[], Any]) -> None:
        try:
            work()
        except WorkbenchError as e:  # one sentence, never a traceback
            self.status.value = error_html(str(e))
        except Exception as e:  # noqa: BLE001 - an unexpected failure is still one line in the page
            logger.exception("export failed")
            self.status.value = error_html(f"export failed: {type(e).__name__}: {e}")
        finally:
            self.report_button.disabled = self.plots_button.disabled = False

    def export_report(self) -> Path:
        """Write the report of the selected runs (the newest stored run when none is selected)."""
        from workbench.errors import ExportError
        from widgets.report_html import write_report
        from workbench.store import Store

        path = self._resolve(self.report_path.value.strip(), "report file")
        ids = list(self.selected_runs())
        if not ids:
            newest = Store(self.store_path).summaries(limit=1)
            if not newest:
                raise ExportError("no runs to report yet: press Run first")
            ids = [newest[0]["id"]]
        written = write_report(ids, path, self.store_path)
        self.status.value = (f"<span class='wb-note'>Report of run{'s' if len(ids) > 1 else ''} "
                             f"{', '.join(map(str, ids))} written to <code>{html.escape(str(written.resolve()))}"
                             "</code></span>")
        return written

    def export_plots(self) -> list[Path]:
        """Write every plot on the page into the plots folder, one file each, in the chosen format."""
        from workbench.errors import ExportError
        from widgets.figures import export_figure

        folder = self._resolve(self.plots_folder.value.strip() or ".", "plots folder")
        if not folder.is_dir():
            raise ExportError(f"plots folder {str(folder)!r} does not exist")
        fmt = self.plot_format.value
        written = []
        for i, fig in enumerate(figures_in(self.root()), start=1):
            with sync_lock(fig):  # the drawing thread may be editing it: export a whole state
                data, name = fig.to_dict(), f"workbench-plot-{_slug(fig, i)}.{fmt}"
            written.append(export_figure(data, folder / name))
        self.status.value = (f"<span class='wb-note'>{len(written)} plots written as {fmt.upper()} to "
                             f"<code>{html.escape(str(folder.resolve()))}</code></span>")
        return written
