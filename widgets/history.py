"""History across runs (the results store, CLI runs included): Pareto view, table, comparison, CSV export."""

from __future__ import annotations

import base64
import html
import logging
from typing import Any

import ipywidgets as W

from widgets.batch_plot import BatchPlot
from widgets.forms import error_html
from widgets.history_plot import ParetoPlot
from workbench.analysis import METRICS, compare, describe
from workbench.errors import WorkbenchError
from workbench.report import human_bytes, summary_cells
from workbench.result import RunResult
from workbench.store import Store

logger = logging.getLogger(__name__)


def _fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "–"
    if unit == "bytes":
        return human_bytes(value)
    return f"{value:.4g}" + (f" {unit}" if unit else "")


def summary_table(rows: list[dict[str, Any]]) -> str:
    """HTML table of stored runs (newest first): the same columns as `workbench results`."""
    header, body = summary_cells(rows, dash="–")
    cells = "".join("<tr>" + "".join(f"<td>{html.escape(c[:120])}</td>" for c in row) + "</tr>" for row in body)
    return (f"<table class='wb-table'><thead><tr>{''.join(f'<th>{h}</th>' for h in header)}</tr></thead>"
            f"<tbody>{cells}</tbody></table>")


def comparison_table(a: RunResult, b: RunResult) -> str:
    """HTML table: two runs side by side, ratio b/a, the better one marked."""
    rows = []
    for row in compare(a, b):
        if row.a is None and row.b is None:
            continue
        mark_a = " ✓" if row.better == "a" else ""
        mark_b = " ✓" if row.better == "b" else ""
        ratio = f"{row.ratio:.3g}×" if row.ratio is not None else "–"
        rows.append(f"<tr><td>{html.escape(row.label)}</td><td>{_fmt(row.a, row.unit)}{mark_a}</td>"
                    f"<td>{_fmt(row.b, row.unit)}{mark_b}</td><td>{ratio}</td></tr>")
    return (f"<table class='wb-table'><thead><tr><th>metric</th><th>A: {html.escape(describe(a))}</th>"
            f"<th>B: {html.escape(describe(b))}</th><th>B / A</th></tr></thead><tbody>{''.join(rows)}</tbody></table>")


def _dropdown(value: str, description: str) -> W.Dropdown:
    """Any metric of any tracker can be an axis (the registry's order: latency, memory, accuracy, ...)."""
    return W.Dropdown(options=[(m.label, k) for k, m in METRICS.items()], value=value, description=description,
                      style={"description_width": "60px"}, layout={"width": "260px"})


def _shared_with(path: str) -> str:
    """Who else reads and writes this store, for the History header."""
    from pathlib import Path

    from workbench.paths import default_store

    if Path(path).expanduser().resolve() == default_store().expanduser().resolve():
        return ("the default store: <code>workbench run</code>, <code>workbench results</code> and the dashboard "
                "use it too")
    return f"<code>workbench results --store {html.escape(str(path))}</code> lists it"


class HistoryPanel:
    """Every stored run: Pareto plot (click two runs to compare), table, CSV export."""

    def __init__(self, store_path: str) -> None:
        self.store_path = store_path
        self.selected: list[int] = []
        self.results: list[RunResult] = []
        self.pareto = ParetoPlot(self.select)
        self.batch = BatchPlot()  # the selected run's settings at every stored batch size: speed and J/token
        self.x = _dropdown("e2e_ms_p50", "x")
        self.y = _dropdown("perplexity", "y")
        self.size = _dropdown("weights_bytes", "size")
        for w in (self.x, self.y, self.size):
            w.observe(self._axes_changed, "value")
        self.refresh_button = W.Button(description="Refresh", icon="refresh", tooltip="Reload runs from the store")
        self.refresh_button.on_click(lambda _: self.refresh())
        self.export_button = W.Button(description="Export CSV", icon="download",
                                      tooltip="Write every stored run to a CSV file and offer it for download")
        self.export_button.on_click(lambda _: self.export_csv())
        self.export_link = W.HTML()
        self.comparison = W.HTML("<i>Click two runs in the plot to compare them side by side.</i>")
        self.table = W.HTML()
        self.message = W.HTML()
        self.where = W.HTML(f"<span class='wb-note'>Runs in <code>{html.escape(str(store_path))}</code> "
                            f"({_shared_with(store_path)})</span>")
        controls = W.HBox([self.x, self.y, self.size, self.refresh_button, self.export_button])
        self.box = W.VBox([self.where, controls, self.message, self.pareto.widget, self.comparison, self.batch.box,
                           self.export_link, self.table])

    def _store(self) -> Store:
        return Store(self.store_path)

    def _axes_changed(self, _: Any) -> None:
        self.pareto.x_key, self.pareto.y_key, self.pareto.size_key = self.x.value, self.y.value, self.size.value
        self.pareto.show(self.results, self.selected)

    def refresh(self) -> None:
        """Reload from the store (also picks up runs made from the CLI)."""
        try:
            store = self._store()
            rows = store.summaries(limit=200)
            # two reads: a run stored between them (another page's) waits for the next refresh, in both views
            newest = rows[0]["id"] if rows else 0
            self.results = [r for r in store.results(status=None) if r.run_id <= newest]
            self.table.value = summary_table(rows) if rows else \
                f"<i>No runs yet in {html.escape(str(store.path))}: press Run.</i>"
            self.message.value = ""
        except WorkbenchError as e:
            self.message.value = error_html(str(e))
            return
        self.pareto.show(self.results, self.selected)
        self.batch.show(self.results, self.anchor())

    def anchor(self) -> RunResult | None:
        """The run whose batch sweep is drawn: the last one selected, else the newest stored."""
        by_id = {r.run_id: r for r in self.results}
        chosen = next((by_id[i] for i in reversed(self.selected) if i in by_id), None)
        return chosen or max(self.results, key=lambda r: r.run_id or 0, default=None)

    def select(self, run_id: int) -> None:
        """Select a run (the last two selected are compared)."""
        self.selected = (self.selected + [run_id])[-2:]
        self.pareto.show(self.results, self.selected)
        self.batch.show(self.results, self.anchor())
        by_id = {r.run_id: r for r in self.results}
        if len(self.selected) == 2 and all(i in by_id for i in self.selected):
            self.comparison.value = comparison_table(by_id[self.selected[0]], by_id[self.selected[1]])
        elif self.selected and self.selected[-1] in by_id:
            self.comparison.value = (f"<i>Selected {html.escape(describe(by_id[self.selected[-1]]))}; "
                                     "click another run to compare.</i>")

    def export_csv(self, path: str = "workbench-results.csv") -> str | None:
        """Write every stored run to CSV; show a link that downloads it (works offline and in Voila)."""
        try:
            frame = self._store().dataframe()
        except WorkbenchError as e:
            self.message.value = error_html(str(e))
            return None
        text = frame.to_csv(index=False)
        try:
            with open(path, "w", encoding="utf-8") as f:
                f.write(text)
            where = f" (also written to {html.escape(path)})"
        except OSError as e:
            logger.warning("cannot write %s: %s", path, e)
            where = ""
        data = base64.b64encode(text.encode()).decode()
        self.export_link.value = (f"<a download='workbench-results.csv' href='data:text/csv;base64,{data}'>"
                                  f"Download {len(frame)} runs as CSV</a>{where}")
        return text
