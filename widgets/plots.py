"""Live plotly figures. The painters draw what the core measured; they compute nothing.

Three figures in all (live 2x2, history, sensitivity 1x2, the last made on first use): each is a plotly
view the page must build. They are `widgets.figure.Figure`s: plotly's FigureWidget with a loader that
fetches plotly's 5 MB front end once per page and keeps anywidget from dropping their messages under load.

plotly's FigureWidget syncs its full state only when `_widget_data` / `_widget_layout` are assigned;
later edits travel as one-off messages, which a page that connects afterwards never sees (in Voila
the notebook runs before the browser connects; plotly.py #4998). `persist()` re-assigns the full
state after a batch of edits so a view that renders later starts from the current figure.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from widgets.figure import Figure, persist
from workbench.events import TokenEvent
from workbench.result import AccuracyStats, LatencyStats, MemoryStats, RooflineStats

MIB = 1024 * 1024
NO_RUN, NOT_MEASURED = "no run yet", "not measured"
_LAYOUT = dict(template="plotly_white", margin=dict(l=60, r=30, t=60, b=50), legend=dict(orientation="h", y=-0.12))


@dataclass
class Cell:
    """One subplot of a shared figure: where a painter adds its traces, and its title annotation."""

    fig: go.FigureWidget
    row: int
    col: int
    title_index: int
    refs: list[str] = field(default_factory=list)  # the axes ('x', 'y', 'y2') its traces use

    def add(self, trace: Any, secondary_y: bool = False) -> Any:
        """Add a trace to this subplot; return it (as stored in the figure)."""
        self.fig.add_trace(trace, row=self.row, col=self.col, secondary_y=secondary_y if secondary_y else None)
        stored = self.fig.data[-1]
        self.refs += [ref for ref in (stored.xaxis, stored.yaxis) if ref not in self.refs]
        return stored

    @property
    def title(self) -> str:
        """The subplot's title text."""
        return self.fig.layout.annotations[self.title_index].text

    @title.setter
    def title(self, text: str) -> None:
        self.fig.layout.annotations[self.title_index].text = text

    def empty(self, message: str | None) -> None:
        """Show `message` instead of this subplot's axes (None: the axes again)."""
        show_empty(self.fig, self.refs, message, f"empty {self.row},{self.col}")


def show_empty(fig: go.FigureWidget, refs: Sequence[str], message: str | None, name: str) -> None:
    """Hide the axes `refs` ('x2', 'y') and show `message` in their middle (None: show the axes again).

    An empty plotly plot draws meaningless axes (-1..6); an empty plot here says why it is empty.
    """
    for ref in refs:
        _axis(fig, ref).visible = message is None
    for item in (*fig.layout.shapes, *fig.layout.annotations):  # what is drawn on these axes (the budget line)
        if item.name != name and {str(r or "paper").split()[0] for r in (item.xref, item.yref)} <= set(refs):
            item.visible = message is None
    note = next((a for a in fig.layout.annotations if a.name == name), None)
    if note is None:
        x, y = (next(r for r in refs if r.startswith(k)) for k in "xy")
        fig.add_annotation(name=name, xref=f"{x} domain", yref=f"{y} domain", x=0.5, y=0.5, showarrow=False,
                           font={"size": 14, "color": "gray"})
        note = fig.layout.annotations[-1]
    note.update(text=message or "", visible=message is not None)


def live_figure() -> tuple[go.FigureWidget, list[Cell]]:
    """The 2x2 live figure: latency | roofline / memory | accuracy, as wide as the page."""
    grid = make_subplots(rows=2, cols=2, specs=[[{"secondary_y": True}, {}], [{}, {}]], column_widths=[0.55, 0.45],
                         subplot_titles=["Per-token latency (live)", "Roofline", "Memory", "Accuracy"],
                         vertical_spacing=0.16, horizontal_spacing=0.16)
    fig = Figure(grid)
    fig.update_layout(height=720, **_LAYOUT)
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
        self.summary = self.energy = ""  # the title's final percentiles, and the run's J/token next to them
        _axis(self.fig, self.arrival.xaxis).title.text = "token index"
        # left: log, labelled at 1, 2, 5 per decade; right: linear from 0 with its own few ticks (as a log axis
        # overlaying the left one it copied the left axis' tick positions: crowded, odd values)
        _axis(self.fig, self.arrival.yaxis).update(title_text="ms since the request", type="log", dtick="D2")
        _axis(self.fig, self.gap.yaxis).update(title_text="gap between tokens (ms)", showgrid=False,
                                               rangemode="tozero", tickmode="auto", nticks=6)
        self.cell.empty(NO_RUN)
        self.set_budget(budget_ms)

    def begin(self, phase: str, repeat: int) -> None:
        """A new generate call starts: clear the live series (not persisted: summarize() persists)."""
        with self.fig.batch_update():
            for trace in self.traces:
                trace.x, trace.y = [], []
            self.ttft.text = []
            self.cell.title = f"Per-token latency (live): {phase} run {repeat + 1}"
            self.summary = ""
            self.cell.empty(None)

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
            shown = _axis(self.fig, x).visible is not False  # hidden while the plot is empty
            self.fig.layout.shapes = [dict(type="line", xref=f"{x} domain", x0=0, x1=1, yref=y, y0=budget_ms,
                                           y1=budget_ms, line=dict(color="crimson", dash="dash"), visible=shown)]
            note = dict(name="budget", xref=f"{x} domain", x=0.01, yref=y, y=math.log10(budget_ms), visible=shown,
                        text=f"budget {budget_ms:g} ms", showarrow=False, font=dict(color="crimson"), yanchor="bottom")
            old = [a for a in self.fig.layout.annotations if a.name != "budget"]
            self.fig.layout.annotations = old + [note]
        persist(self.fig)

    def summarize(self, latency: LatencyStats | None) -> None:
        """Title with the final percentiles; the figure's state is persisted."""
        if latency and latency.ttft_ms and latency.e2e_ms:
            tpot = f", TPOT p50 {latency.tpot_ms.p50:.2f} ms" if latency.tpot_ms else ""
            self.summary = (f"Per-token latency: TTFT p50 {latency.ttft_ms.p50:.1f} ms{tpot}, "
                            f"E2E p50 {latency.e2e_ms.p50:.1f} ms ({latency.repeats} runs)")
            self.cell.title = self.summary + self.energy
        persist(self.fig)

    def show_energy(self, joules_per_token: float | None) -> None:
        """The run's energy per token next to its latency percentiles in the title (None: nothing shown)."""
        self.energy = "" if joules_per_token is None else f", {joules_per_token:.4g} J/token"
        if self.summary:
            self.cell.title = self.summary + self.energy
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
        self.cell.empty(NO_RUN)

    def show(self, memory: MemoryStats | None) -> None:
        """Bars for every measured quantity (GPU bars only when a GPU was used)."""
        bars = [(name, getattr(memory, key)) for name, key in self.BARS] if memory else []
        bars = [(n, v) for n, v in bars if v is not None]
        with self.fig.batch_update():
            self.bar.x = [n for n, _ in bars]
            self.bar.y = [v / MIB for _, v in bars]
            self.bar.text = [f"{v / MIB:.1f}" for _, v in bars]
            self.cell.title = "Memory" + (f" (host peaks: {memory.host_method.split(' (')[0]})" if memory else "")
            self.cell.empty(None if bars else NOT_MEASURED)
        persist(self.fig)


class AccuracyPlot:
    """Agreement with the unmodified model and next-token accuracy (0..1); perplexity and KL in the title."""

    BARS = (("next-token accuracy", "next_token_accuracy"), ("top-1 agreement", "top1_agreement_vs_baseline"),
            ("greedy match", "greedy_match_vs_baseline"))

    def __init__(self, cell: Cell) -> None:
        self.cell, self.fig = cell, cell.fig
        self.bar = cell.add(go.Bar(x=[], y=[], text=[], textposition="outside", name="share", showlegend=False))
        _axis(self.fig, self.bar.yaxis).update(title_text="share", range=[0, 1.1])
        self.cell.empty(NO_RUN)

    def show(self, accuracy: AccuracyStats | None, reason: str = "") -> None:
        """Bars for the shares, perplexity and KL in the title; or why there is no accuracy."""
        with self.fig.batch_update():
            if accuracy is None:
                self.bar.x, self.bar.y, self.bar.text = [], [], []
                self.cell.title = f"Accuracy: not measured{' — ' + reason if reason else ''}"
                self.cell.empty(NOT_MEASURED)
            else:
                pairs = [(n, getattr(accuracy, k)) for n, k in self.BARS if getattr(accuracy, k) is not None]
                self.bar.x, self.bar.y = [n for n, _ in pairs], [v for _, v in pairs]
                self.bar.text = [f"{v:.1%}" for _, v in pairs]
                self.cell.empty(None if pairs else NOT_MEASURED)
                kl = f", KL {accuracy.kl_vs_baseline:.4f} nats" if accuracy.kl_vs_baseline is not None else ""
                self.cell.title = f"Accuracy: perplexity {accuracy.perplexity:.2f}{kl} ({accuracy.eval_tokens} tokens)"
        persist(self.fig)


class RooflinePlot:
    """Measured decode speed against the memory-bandwidth bound."""

    def __init__(self, cell: Cell) -> None:
        self.cell, self.fig = cell, cell.fig
        # the bar names sit inside the bars: y tick labels on the left would crowd the latency plot's right axis
        self.bar = cell.add(go.Bar(x=[], y=[], orientation="h", text=[], textposition="auto", textangle=0,
                                   insidetextanchor="start", name="tokens/s", showlegend=False))
        _axis(self.fig, self.bar.xaxis).title.text = "decode tokens/s"
        _axis(self.fig, self.bar.yaxis).showticklabels = False
        self.cell.empty(NO_RUN)

    def show(self, roofline: RooflineStats | None, decode_tokens_per_s: float | None) -> None:
        """Two bars: the bound and what was measured."""
        with self.fig.batch_update():
            if roofline is None or roofline.decode_bound_tokens_per_s is None or decode_tokens_per_s is None:
                self.bar.x, self.bar.y, self.bar.text = [], [], []
                self.cell.title = "Roofline: not measured"
                self.cell.empty(NOT_MEASURED)
            else:
                self.bar.y = ["bandwidth bound", "measured decode"]
                self.bar.x = [roofline.decode_bound_tokens_per_s, decode_tokens_per_s]
                self.bar.text = [f"bandwidth bound: {roofline.decode_bound_tokens_per_s:.0f} tokens/s",
                                 f"measured decode: {decode_tokens_per_s:.1f} tokens/s"]
                self.cell.empty(None)
                self.cell.title = (f"Roofline: {roofline.fraction_of_bound:.0%} of the bound "
                                   f"({roofline.bandwidth_bytes_per_s / 1e9:.1f} GB/s, "
                                   f"{roofline.bytes_per_token / MIB:.1f} MiB per token)")
        persist(self.fig)
