"""The sensitivity figure: per-layer KL heatmap | one layer's weight histogram before/after (created on first use)."""

from __future__ import annotations

from typing import Any

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from widgets.plots import _LAYOUT, Cell, Figure, persist


class SensitivityPlots:
    """One figure: per-layer KL heatmap (blocks x layers) | one layer's weight histogram before/after."""

    def __init__(self) -> None:
        grid = make_subplots(rows=1, cols=2, column_widths=[0.55, 0.45], horizontal_spacing=0.14,
                             subplot_titles=["Per-layer sensitivity", "Weights before / after"])
        self.widget = Figure(grid)
        self.widget.update_layout(height=420, barmode="overlay", **_LAYOUT)
        self.heatmap_cell, self.histogram_cell = Cell(self.widget, 1, 1, 0), Cell(self.widget, 1, 2, 1)
        self.heatmap = self.heatmap_cell.add(go.Heatmap(z=[], x=[], y=[], colorscale="Reds",
                                                        colorbar={"title": {"text": "KL"}, "x": 0.5}))
        self.before = self.histogram_cell.add(go.Bar(x=[], y=[], name="before", opacity=0.55))
        self.after = self.histogram_cell.add(go.Bar(x=[], y=[], name="after", opacity=0.55))
        self.widget.layout.yaxis.autorange = "reversed"
        self.widget.layout.xaxis2.title.text = "weight value"
        self.widget.layout.yaxis2.update(title_text="count", type="log")
        persist(self.widget)

    def show(self, report: Any) -> None:  # SensitivityReport
        """Draw a SensitivityReport."""
        blocks, modules, grid = report.matrix("kl")
        h = report.histogram
        with self.widget.batch_update():
            self.heatmap.z, self.heatmap.x, self.heatmap.y = grid, modules, [f"block {b}" for b in blocks]
            self.heatmap_cell.title = f"KL caused by compressing one layer alone: {report.technique.split(',')[0]}…"
            if h is None:
                self.before.x = self.before.y = self.after.x = self.after.y = []
            else:
                centers = [(a + b) / 2 for a, b in zip(h.edges, h.edges[1:])]
                self.before.x, self.before.y = centers, list(h.before)
                self.after.x, self.after.y = centers, list(h.after)
                self.histogram_cell.title = f"{h.layer}: {h.distinct_after} distinct values after"
        persist(self.widget)
