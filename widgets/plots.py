"""Live plotly figures. The painters draw what the core measured; they compute nothing.

Three FigureWidgets in all (live 2x2, history, sensitivity 1x2): each FigureWidget carries plotly's
5 MB JavaScript bundle to the browser, so every extra figure costs page-load time.

plotly's FigureWidget syncs its full state only when `_widget_data` / `_widget_layout` are assigned;
later edits travel as one-off messages, which a page that connects afterwards never sees (in Voila
the notebook runs before the browser connects; plotly.py #4998). `persist()` re-assigns the full
state after a batch of edits so a view that renders later starts from the current figure.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from workbench.analysis import METRICS, describe, frontier
from workbench.events import TokenEvent
from workbench.result import AccuracyStats, LatencyStats, MemoryStats, RooflineStats, RunResult

MIB = 1024 * 1024
_LAYOUT = dict(template="plotly_white", margin=dict(l=60, r=30, t=60, b=50), legend=dict(orientation="h", y=-0.12))


def persist(fig: go.FigureWidget) -> None:
    """Make the widget's synced state equal to the figure (for views that connect later)."""
    fig._widget_data = copy.deepcopy(fig._data)
    fig._widget_layout = copy.deepcopy(fig._layout)


@dataclass
class Cell:
    """One subplot of a shared figure: where a painter adds its traces, and its title annotation."""

    fig: go.FigureWidget
    row: int
    col: int
    title_index: int

    def add(self, trace: Any, secondary_y: bool = False) -> Any:
        """Add a trace to this subplot; return it (as stored in the figure)."""
        self.fig.add_trace(trace, row=self.row, col=self.col, secondary_y=secondary_y if secondary_y else None)
        return self.fig.data[-1]

    @property
    def title(self) -> str:
        """The subplot's title text."""
        return self.fig.layout.annotations[self.title_index].text

    @title.setter
    def title(self, text: str) -> None:
        self.fig.layout.annotations[self.title_index].text = text


def live_figure() -> tuple[go.FigureWidget, list[Cell]]:
    """The 2x2 live figure: latency | roofline / memory | accuracy."""
    grid = make_subplots(rows=2, cols=2, specs=[[{"secondary_y": True}, {}], [{}, {}]], column_widths=[0.55, 0.45],
                         subplot_titles=["Per-token latency (live)", "Roofline", "Memory", "Accuracy"],
                         vertical_spacing=0.16, horizontal_spacing=0.12)
    fig = go.FigureWidget(grid)
    fig.update_layout(height=720, width=1250, **_LAYOUT)
    cells = [Cell(fig, r, c, i) for i, (r, c) in enumerate(((1, 1), (1, 2), (2, 1), (2, 2)))]
    return fig, cells


def _axis(fig: go.FigureWidget, ref: str) -> Any:
    """The layout axis object of a trace reference like 'x2' or 'y'."""
    return fig.layout[f"{ref[0]}axis{ref[1:]}"]


class LatencyPlot:
    """Per-token latency of the current generate call, live: arrival time and gap per token, TTFT, budget."""

    def __init__(self, cell: Cell, budget_ms: float = 1000.0) -> None:
        self.cell, self.fig = cell, cell.fig
        self.arrival = cell.add(go.Scatter(x=[], y=[], mode="lines+markers", name="token arrived (ms since request)"))
        self.gap = cell.add(go.Scatter(x=[], y=[], mode="markers", name="gap to previous token (right axis)",
                                       marker={"symbol": "line-ew-open", "size": 10}), secondary_y=True)
        self.ttft = cell.add(go.Scatter(x=[], y=[], mode="markers+text", name="TTFT", text=[],
                                        textposition="top right", marker={"size": 12, "symbol": "diamond"}))
        self.traces = (self.arrival, self.gap, self.ttft)
        _axis(self.fig, self.arrival.xaxis).title.text = "token index"
        _axis(self.fig, self.arrival.yaxis).update(title_text="ms since the request", type="log")
        _axis(self.fig, self.gap.yaxis).update(title_text="gap (ms)", type="log", showgrid=False)
        self.set_budget(budget_ms)

    def begin(self, phase: str, repeat: int) -> None:
        """A new generate call starts: clear the live series (not persisted: summarize() persists)."""
        with self.fig.batch_update():
            for trace in self.traces:
                trace.x, trace.y = [], []
            self.ttft.text = []
            self.cell.title = f"Per-token latency (live): {phase} run {repeat + 1}"

    def add(self, events: Sequence[TokenEvent]) -> None:
        """Append a batch of token events (the caller throttles)."""
        if not events:
            return
        later = [e for e in events if e.index > 0]
        first = [e for e in events if e.index == 0]
        with self.fig.batch_update():
            self.arrival.x = tuple(self.arrival.x or ()) + tuple(e.index for e in events)
            self.arrival.y = tuple(self.arrival.y or ()) + tuple(e.t_ms for e in events)
            self.gap.x = tuple(self.gap.x or ()) + tuple(e.index for e in later)
            self.gap.y = tuple(self.gap.y or ()) + tuple(e.gap_ms for e in later)
            if first:
                self.ttft.x, self.ttft.y, self.ttft.text = [0], [first[0].t_ms], [f"TTFT {first[0].t_ms:.1f} ms"]

    def set_budget(self, budget_ms: float) -> None:
        """Draw the 'answer within' line."""
        self.budget_ms = budget_ms
        x, y = self.arrival.xaxis, self.arrival.yaxis
        with self.fig.batch_update():
            self.fig.layout.shapes = [dict(type="line", xref=f"{x} domain", x0=0, x1=1, yref=y, y0=budget_ms,
                                           y1=budget_ms, line=dict(color="crimson", dash="dash"))]
            self.fig.layout.annotations = list(self.fig.layout.annotations[:4]) + [dict(
                xref=f"{x} domain", x=0.01, yref=y, y=math.log10(budget_ms), text=f"budget {budget_ms:g} ms",
                showarrow=False, font=dict(color="crimson"), yanchor="bottom")]
        persist(self.fig)

    def summarize(self, latency: LatencyStats | None) -> None:
        """Title with the final percentiles; the figure's state is persisted."""
        if latency and latency.ttft_ms and latency.e2e_ms:
            tpot = f", TPOT p50 {latency.tpot_ms.p50:.2f} ms" if latency.tpot_ms else ""
            self.cell.title = (f"Per-token latency: TTFT p50 {latency.ttft_ms.p50:.1f} ms{tpot}, "
                               f"E2E p50 {latency.e2e_ms.p50:.1f} ms ({latency.repeats} runs)")
        persist(self.fig)


class MemoryPlot:
    """Where the bytes go: weights, KV cache, host and GPU peaks of loading vs running."""

    BARS = (("weights", "weights_bytes"), ("KV cache", "kv_cache_bytes"), ("idle process", "idle_host_bytes"),
            ("host peak: load", "load_peak_host_bytes"), ("host peak: run", "peak_host_bytes"),
            ("GPU peak: load", "load_peak_gpu_allocated_bytes"), ("GPU peak: run", "peak_gpu_allocated_bytes"),
            ("GPU reserved: run", "peak_gpu_reserved_bytes"))

    def __init__(self, cell: Cell) -> None:
        self.cell, self.fig = cell, cell.fig
        self.bar = cell.add(go.Bar(x=[], y=[], text=[], textposition="outside", name="memory (MiB)",
                                   showlegend=False))
        _axis(self.fig, self.bar.yaxis).title.text = "MiB"

    def show(self, memory: MemoryStats | None) -> None:
        """Bars for every measured quantity (GPU bars only when a GPU was used)."""
        bars = [(name, getattr(memory, key)) for name, key in self.BARS] if memory else []
        bars = [(n, v) for n, v in bars if v is not None]
        with self.fig.batch_update():
            self.bar.x = [n for n, _ in bars]
            self.bar.y = [v / MIB for _, v in bars]
            self.bar.text = [f"{v / MIB:.1f}" for _, v in bars]
            self.cell.title = "Memory" + (f" (host peaks: {memory.host_method.split(' (')[0]})" if memory else "")
        persist(self.fig)


class AccuracyPlot:
    """Agreement with the unmodified model and next-token accuracy (0..1); perplexity and KL in the title."""

    BARS = (("next-token accuracy", "next_token_accuracy"), ("top-1 agreement", "top1_agreement_vs_baseline"),
            ("greedy match", "greedy_match_vs_baseline"))

    def __init__(self, cell: Cell) -> None:
        self.cell, self.fig = cell, cell.fig
        self.bar = cell.add(go.Bar(x=[], y=[], text=[], textposition="outside", name="share", showlegend=False))
        _axis(self.fig, self.bar.yaxis).update(title_text="share", range=[0, 1.1])

    def show(self, accuracy: AccuracyStats | None, reason: str = "") -> None:
        """Bars for the shares, perplexity and KL in the title; or why there is no accuracy."""
        with self.fig.batch_update():
            if accuracy is None:
                self.bar.x, self.bar.y, self.bar.text = [], [], []
                self.cell.title = f"Accuracy: not measured{' — ' + reason if reason else ''}"
            else:
                pairs = [(n, getattr(accuracy, k)) for n, k in self.BARS if getattr(accuracy, k) is not None]
                self.bar.x, self.bar.y = [n for n, _ in pairs], [v for _, v in pairs]
                self.bar.text = [f"{v:.1%}" for _, v in pairs]
                kl = f", KL {accuracy.kl_vs_baseline:.4f} nats" if accuracy.kl_vs_baseline is not None else ""
                self.cell.title = f"Accuracy: perplexity {accuracy.perplexity:.2f}{kl} ({accuracy.eval_tokens} tokens)"
        persist(self.fig)


class RooflinePlot:
    """Measured decode speed against the memory-bandwidth bound."""

    def __init__(self, cell: Cell) -> None:
        self.cell, self.fig = cell, cell.fig
        self.bar = cell.add(go.Bar(x=[], y=[], orientation="h", text=[], textposition="auto", name="tokens/s",
                                   showlegend=False))
        _axis(self.fig, self.bar.xaxis).title.text = "decode tokens/s"

    def show(self, roofline: RooflineStats | None, decode_tokens_per_s: float | None) -> None:
        """Two bars: the bound and what was measured."""
        with self.fig.batch_update():
            if roofline is None or roofline.decode_bound_tokens_per_s is None or decode_tokens_per_s is None:
                self.bar.x, self.bar.y, self.bar.text = [], [], []
                self.cell.title = "Roofline: not measured"
            else:
                self.bar.y = ["bandwidth bound", "measured decode"]
                self.bar.x = [roofline.decode_bound_tokens_per_s, decode_tokens_per_s]
                self.bar.text = [f"{roofline.decode_bound_tokens_per_s:.0f}", f"{decode_tokens_per_s:.1f}"]
                self.cell.title = (f"Roofline: {roofline.fraction_of_bound:.0%} of the bound "
                                   f"({roofline.bandwidth_bytes_per_s / 1e9:.1f} GB/s, "
                                   f"{roofline.bytes_per_token / MIB:.1f} MiB per token)")
        persist(self.fig)


class ParetoPlot:
    """Runs from the store: latency x accuracy, marker area = memory, the Pareto frontier drawn; click selects."""

    def __init__(self, on_select: Callable[[int], None]) -> None:
        self.on_select = on_select
        self.x_key, self.y_key, self.size_key = "e2e_ms_p50", "perplexity", "weights_bytes"
        self.run_ids: list[int] = []
        self.frontier_ids: list[int] = []
        self.widget = go.FigureWidget(layout={**_LAYOUT, "height": 420, "width": 1250,
                                              "title": {"text": "History", "font": {"size": 14}}})
        self.widget.add_scatter(x=[], y=[], mode="markers", name="runs", hovertext=[], hoverinfo="text",
                                marker={"sizemode": "area", "sizemin": 5, "opacity": 0.75})
        self.widget.add_scatter(x=[], y=[], mode="lines+markers", name="Pareto frontier", line={"dash": "dot"},
                                hoverinfo="skip")
        self.widget.add_scatter(x=[], y=[], mode="markers", name="selected", hoverinfo="skip",
                                marker={"size": 18, "symbol": "circle-open", "line": {"width": 3}})
        self.widget.data[0].on_click(self._clicked)
        persist(self.widget)

    def _clicked(self, trace: Any, points: Any, state: Any) -> None:
        for i in points.point_inds:
            self.on_select(self.run_ids[i])

    def show(self, results: Sequence[RunResult], selected: Sequence[int] = ()) -> None:
        """Redraw from these results (those missing a metric are left out)."""
        mx, my, ms = METRICS[self.x_key], METRICS[self.y_key], METRICS[self.size_key]
        usable = [r for r in results if mx.value(r) is not None and my.value(r) is not None]
        self.run_ids = [r.run_id for r in usable]
        front = sorted((usable[i] for i in frontier(usable, (self.x_key, self.y_key, self.size_key))),
                       key=lambda r: mx.value(r))
        self.frontier_ids = [r.run_id for r in front]
        sizes = [ms.value(r) or 0.0 for r in usable]
        biggest = max(sizes, default=0.0) or 1.0
        chosen = [r for r in usable if r.run_id in selected]
        with self.widget.batch_update():
            runs, line, sel = self.widget.data
            runs.x, runs.y = [mx.value(r) for r in usable], [my.value(r) for r in usable]
            runs.hovertext = [f"{describe(r)}<br>{mx.label} {mx.value(r):.4g} {mx.unit}, {my.label} "
                              f"{my.value(r):.4g}, {ms.label} {(ms.value(r) or 0) / MIB:.1f} MiB" for r in usable]
            runs.marker.size = [4 + 40 * s / biggest for s in sizes]
            line.x, line.y = [mx.value(r) for r in front], [my.value(r) for r in front]
            sel.x, sel.y = [mx.value(r) for r in chosen], [my.value(r) for r in chosen]
            self.widget.layout.xaxis.title.text = f"{mx.label} ({mx.unit}), {mx.better} is better"
            self.widget.layout.yaxis.title.text = f"{my.label}, {my.better} is better"
            self.widget.layout.title.text = (f"History: {len(usable)} runs with both metrics, {len(front)} on the "
                                             f"Pareto frontier (marker area = {ms.label})")
        persist(self.widget)


class SensitivityPlots:
    """One figure: per-layer KL heatmap (blocks x layers) | one layer's weight histogram before/after."""

    def __init__(self) -> None:
        grid = make_subplots(rows=1, cols=2, column_widths=[0.55, 0.45], horizontal_spacing=0.14,
                             subplot_titles=["Per-layer sensitivity", "Weights before / after"])
        self.widget = go.FigureWidget(grid)
        self.widget.update_layout(height=420, width=1250, barmode="overlay", **_LAYOUT)
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
