"""Live plotly figures. Each class owns one FigureWidget, draws what the core measured, computes nothing.

plotly's FigureWidget syncs its full state only when `_widget_data` / `_widget_layout` are assigned;
later edits travel as one-off messages, which a page that connects afterwards never sees (in Voila
the notebook runs before the browser connects; plotly.py #4998). `persist()` re-assigns the full
state after every batch of edits so a view that renders later starts from the current figure.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from typing import Any

import plotly.graph_objects as go

from workbench.analysis import METRICS, describe, frontier
from workbench.events import TokenEvent
from workbench.result import AccuracyStats, LatencyStats, MemoryStats, RooflineStats, RunResult

MIB = 1024 * 1024
_BASE_LAYOUT = dict(height=300, margin=dict(l=60, r=20, t=50, b=45), template="plotly_white",
                    legend=dict(orientation="h", y=-0.25))


def persist(fig: go.FigureWidget) -> None:
    """Make the widget's synced state equal to the figure (for views that connect later)."""
    fig._widget_data = copy.deepcopy(fig._data)
    fig._widget_layout = copy.deepcopy(fig._layout)


def figure(title: str, **layout: Any) -> go.FigureWidget:
    """An empty FigureWidget with the house layout."""
    return go.FigureWidget(layout={**_BASE_LAYOUT, "title": {"text": title, "font": {"size": 14}}, **layout})


class LatencyPlot:
    """Per-token latency of the current generate call, live: arrival time and gap per token, TTFT, budget."""

    def __init__(self, budget_ms: float = 1000.0) -> None:
        self.budget_ms = budget_ms
        self.widget = figure("Per-token latency (live)", width=640, xaxis={"title": "token index"},
                             yaxis={"title": "ms since the request", "type": "log"},
                             yaxis2={"title": "gap to previous token (ms)", "overlaying": "y", "side": "right",
                                     "type": "log", "showgrid": False})
        w = self.widget
        w.add_scatter(x=[], y=[], mode="lines+markers", name="token arrived (ms since request)")
        w.add_scatter(x=[], y=[], mode="markers", name="gap to previous token", yaxis="y2",
                      marker={"symbol": "line-ew-open", "size": 10})
        w.add_scatter(x=[], y=[], mode="markers+text", name="TTFT", text=[], textposition="top right",
                      marker={"size": 12, "symbol": "diamond"})
        self.set_budget(budget_ms)
        persist(w)

    def begin(self, phase: str, repeat: int) -> None:
        """A new generate call starts: clear the live series."""
        with self.widget.batch_update():
            for trace in self.widget.data:
                trace.x, trace.y = [], []
            self.widget.data[2].text = []
            self.widget.layout.title.text = f"Per-token latency (live): {phase} run {repeat + 1}"
        # no persist() here or in add(): they run per batch of tokens; summarize() persists at the end

    def add(self, events: Sequence[TokenEvent]) -> None:
        """Append a batch of token events (throttled by the caller)."""
        if not events:
            return
        arrival, gap, ttft = self.widget.data
        with self.widget.batch_update():
            arrival.x = tuple(arrival.x or ()) + tuple(e.index for e in events)
            arrival.y = tuple(arrival.y or ()) + tuple(e.t_ms for e in events)
            later = [e for e in events if e.index > 0]
            gap.x = tuple(gap.x or ()) + tuple(e.index for e in later)
            gap.y = tuple(gap.y or ()) + tuple(e.gap_ms for e in later)
            first = [e for e in events if e.index == 0]
            if first:
                ttft.x, ttft.y, ttft.text = [0], [first[0].t_ms], [f"TTFT {first[0].t_ms:.1f} ms"]

    def set_budget(self, budget_ms: float) -> None:
        """Draw the 'answer within' line."""
        self.budget_ms = budget_ms
        with self.widget.batch_update():
            self.widget.layout.shapes = [dict(type="line", xref="paper", x0=0, x1=1, yref="y", y0=budget_ms,
                                              y1=budget_ms, line=dict(color="crimson", dash="dash"))]
            self.widget.layout.annotations = [dict(xref="paper", x=0.01, yref="y", y=math.log10(budget_ms),
                                                   text=f"budget {budget_ms:g} ms", showarrow=False,
                                                   font=dict(color="crimson"), yanchor="bottom")]
        persist(self.widget)

    def summarize(self, latency: LatencyStats | None) -> None:
        """Title with the final percentiles; the figure's state is persisted."""
        if latency and latency.ttft_ms and latency.e2e_ms:
            tpot = f", TPOT p50 {latency.tpot_ms.p50:.2f} ms" if latency.tpot_ms else ""
            self.widget.layout.title.text = (f"Per-token latency: TTFT p50 {latency.ttft_ms.p50:.1f} ms{tpot}, "
                                             f"E2E p50 {latency.e2e_ms.p50:.1f} ms ({latency.repeats} runs)")
        persist(self.widget)


class MemoryPlot:
    """Where the bytes go: weights, KV cache, host and GPU peaks of loading vs running."""

    BARS = (("weights", "weights_bytes"), ("KV cache", "kv_cache_bytes"), ("idle process", "idle_host_bytes"),
            ("host peak: load", "load_peak_host_bytes"), ("host peak: run", "peak_host_bytes"),
            ("GPU peak: load", "load_peak_gpu_allocated_bytes"), ("GPU peak: run", "peak_gpu_allocated_bytes"),
            ("GPU reserved: run", "peak_gpu_reserved_bytes"))

    def __init__(self) -> None:
        self.widget = figure("Memory", width=640, yaxis={"title": "MiB"})
        self.widget.add_bar(x=[], y=[], text=[], textposition="outside", name="MiB")
        persist(self.widget)

    def show(self, memory: MemoryStats | None) -> None:
        """Bars for every measured quantity (GPU bars only when a GPU was used)."""
        bars = [(name, getattr(memory, key)) for name, key in self.BARS] if memory else []
        bars = [(n, v) for n, v in bars if v is not None]
        with self.widget.batch_update():
            bar = self.widget.data[0]
            bar.x = [n for n, _ in bars]
            bar.y = [v / MIB for _, v in bars]
            bar.text = [f"{v / MIB:.1f}" for _, v in bars]
            self.widget.layout.title.text = "Memory" + (f" (host peaks: {memory.host_method})" if memory else "")
        persist(self.widget)


class AccuracyPlot:
    """Agreement with the unmodified model and next-token accuracy (0..1), perplexity and KL in the title."""

    BARS = (("next-token accuracy", "next_token_accuracy"), ("top-1 agreement", "top1_agreement_vs_baseline"),
            ("greedy match", "greedy_match_vs_baseline"))

    def __init__(self) -> None:
        self.widget = figure("Accuracy", width=560, yaxis={"title": "share", "range": [0, 1.05]})
        self.widget.add_bar(x=[], y=[], text=[], textposition="outside", name="share")
        persist(self.widget)

    def show(self, accuracy: AccuracyStats | None, reason: str = "") -> None:
        """Bars for the shares; title with perplexity and KL; or why there is no accuracy."""
        bar = self.widget.data[0]
        with self.widget.batch_update():
            if accuracy is None:
                bar.x, bar.y, bar.text = [], [], []
                self.widget.layout.title.text = f"Accuracy: not measured{' — ' + reason if reason else ''}"
            else:
                pairs = [(n, getattr(accuracy, k)) for n, k in self.BARS if getattr(accuracy, k) is not None]
                bar.x = [n for n, _ in pairs]
                bar.y = [v for _, v in pairs]
                bar.text = [f"{v:.1%}" for _, v in pairs]
                kl = f", KL vs unmodified {accuracy.kl_vs_baseline:.4f} nats" if accuracy.kl_vs_baseline is not None else ""
                self.widget.layout.title.text = (f"Accuracy: perplexity {accuracy.perplexity:.2f}{kl} "
                                                 f"({accuracy.eval_tokens} held-out tokens)")
        persist(self.widget)


class RooflinePlot:
    """Measured decode speed against the memory-bandwidth bound."""

    def __init__(self) -> None:
        self.widget = figure("Roofline", width=560, xaxis={"title": "decode tokens/s"}, height=300,
                             margin=dict(l=120, r=20, t=50, b=45))
        self.widget.add_bar(x=[], y=[], orientation="h", text=[], textposition="auto", name="tokens/s")
        persist(self.widget)

    def show(self, roofline: RooflineStats | None, decode_tokens_per_s: float | None) -> None:
        """Two bars: the bound and what was measured."""
        bar = self.widget.data[0]
        with self.widget.batch_update():
            if roofline is None or roofline.decode_bound_tokens_per_s is None or decode_tokens_per_s is None:
                bar.x, bar.y, bar.text = [], [], []
                self.widget.layout.title.text = "Roofline: not measured"
            else:
                bar.y = ["bandwidth bound", "measured decode"]
                bar.x = [roofline.decode_bound_tokens_per_s, decode_tokens_per_s]
                bar.text = [f"{roofline.decode_bound_tokens_per_s:.0f}", f"{decode_tokens_per_s:.1f}"]
                self.widget.layout.title.text = (
                    f"Roofline: {roofline.fraction_of_bound:.0%} of the bound "
                    f"({roofline.bandwidth_bytes_per_s / 1e9:.1f} GB/s, {roofline.bytes_per_token / MIB:.1f} MiB/token)")
        persist(self.widget)


class ParetoPlot:
    """Runs from the store: latency x accuracy, marker size = memory, the Pareto frontier drawn; click selects."""

    def __init__(self, on_select: Callable[[int], None]) -> None:
        self.on_select = on_select
        self.x_key, self.y_key, self.size_key = "e2e_ms_p50", "perplexity", "weights_bytes"
        self.run_ids: list[int] = []
        self.frontier_ids: list[int] = []
        self.widget = figure("History: latency x accuracy x memory", width=1200, height=420)
        self.widget.add_scatter(x=[], y=[], mode="markers", name="runs", hovertext=[], hoverinfo="text",
                                marker={"sizemode": "area", "sizemin": 5, "opacity": 0.75})
        self.widget.add_scatter(x=[], y=[], mode="lines+markers", name="Pareto frontier",
                                line={"dash": "dot"}, hoverinfo="skip")
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
        front = [usable[i] for i in frontier(usable, (self.x_key, self.y_key, self.size_key))]
        front.sort(key=lambda r: mx.value(r))
        self.frontier_ids = [r.run_id for r in front]
        sizes = [ms.value(r) or 0.0 for r in usable]
        biggest = max(sizes, default=0.0) or 1.0
        chosen = [r for r in usable if r.run_id in selected]
        with self.widget.batch_update():
            runs, line, sel = self.widget.data
            runs.x, runs.y = [mx.value(r) for r in usable], [my.value(r) for r in usable]
            runs.hovertext = [f"{describe(r)}<br>{mx.label} {mx.value(r):.4g} {mx.unit}, {my.label} {my.value(r):.4g}, "
                              f"{ms.label} {(ms.value(r) or 0) / MIB:.1f} MiB" for r in usable]
            runs.marker.size = [4 + 40 * s / biggest for s in sizes]
            line.x, line.y = [mx.value(r) for r in front], [my.value(r) for r in front]
            sel.x, sel.y = [mx.value(r) for r in chosen], [my.value(r) for r in chosen]
            self.widget.layout.xaxis.title.text = f"{mx.label} ({mx.unit})" + (" — lower is better" if mx.better == "lower" else " — higher is better")
            self.widget.layout.yaxis.title.text = f"{my.label}" + (" (lower is better)" if my.better == "lower" else " (higher is better)")
            self.widget.layout.title.text = (f"History: {len(usable)} runs with both metrics, {len(front)} on the "
                                             f"frontier (marker area = {ms.label})")
        persist(self.widget)


class SensitivityPlots:
    """Per-layer KL heatmap (blocks x layers) and one layer's weight histogram before/after."""

    def __init__(self) -> None:
        self.heatmap = figure("Per-layer sensitivity", width=640, height=380, xaxis={"title": "layer in block"},
                              yaxis={"title": "block", "autorange": "reversed"})
        self.heatmap.add_heatmap(z=[], x=[], y=[], colorscale="Reds", colorbar={"title": "KL"})
        self.histogram = figure("Weights before / after", width=560, height=380, barmode="overlay",
                                xaxis={"title": "weight value"}, yaxis={"title": "count", "type": "log"})
        self.histogram.add_bar(x=[], y=[], name="before", opacity=0.55)
        self.histogram.add_bar(x=[], y=[], name="after", opacity=0.55)
        persist(self.heatmap)
        persist(self.histogram)

    def show(self, report: Any) -> None:  # SensitivityReport
        """Draw a SensitivityReport."""
        blocks, modules, grid = report.matrix("kl")
        with self.heatmap.batch_update():
            hm = self.heatmap.data[0]
            hm.z, hm.x, hm.y = grid, modules, [f"block {b}" for b in blocks]
            self.heatmap.layout.title.text = f"KL caused by compressing one layer alone: {report.technique.split(',')[0]}…"
        h = report.histogram
        with self.histogram.batch_update():
            before, after = self.histogram.data
            if h is None:
                before.x = before.y = after.x = after.y = []
            else:
                centers = [(a + b) / 2 for a, b in zip(h.edges, h.edges[1:])]
                before.x, before.y, after.x, after.y = centers, list(h.before), centers, list(h.after)
                self.histogram.layout.title.text = f"{h.layer}: {h.distinct_after} distinct values after"
        persist(self.heatmap)
        persist(self.histogram)
