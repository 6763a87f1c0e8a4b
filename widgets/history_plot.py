"""The History figure: stored runs on two chosen metrics, marker area a third, marker symbol the engine, the
Pareto frontier drawn; clicking a run selects it (the History panel compares the last two)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from widgets.figure import Figure, persist
from widgets.plots import _LAYOUT, MIB, show_empty
from workbench.analysis import METRICS, describe, frontier
from workbench.result import RunResult


def _runs(n: int) -> str:
    return f"{n} run" + ("" if n == 1 else "s")


# History markers: one symbol per engine (the legend's glyph for it); an engine not named here gets a free one
SYMBOLS = {"circle": "●", "diamond": "◆", "square": "■", "triangle-up": "▲", "cross": "✚", "x": "✖"}
ENGINE_SYMBOLS = {"hf": "circle", "llamacpp": "diamond"}


def engine_symbols(engines: Sequence[str]) -> dict[str, str]:
    """Marker symbol of each engine among `engines` (hf a circle, llamacpp a diamond), known engines first."""
    seen = dict.fromkeys(engines)
    free = [s for s in SYMBOLS if s not in ENGINE_SYMBOLS.values()]
    others = [e for e in seen if e not in ENGINE_SYMBOLS]
    return {**{e: s for e, s in ENGINE_SYMBOLS.items() if e in seen},
            **{e: free[i % len(free)] for i, e in enumerate(others)}}


class ParetoPlot:
    """Runs from the store: latency x accuracy, marker area = memory, symbol = engine, the Pareto frontier drawn;
    click selects."""

    def __init__(self, on_select: Callable[[int], None]) -> None:
        self.on_select = on_select
        self.x_key, self.y_key, self.size_key = "e2e_ms_p50", "perplexity", "weights_bytes"
        self.run_ids: list[int] = []
        self.frontier_ids: list[int] = []
        self.widget = Figure(layout={**_LAYOUT, "height": 420, "title": {"text": "History", "font": {"size": 14}}})
        self.widget.add_scatter(x=[], y=[], mode="markers", name="runs", hovertext=[], hoverinfo="text",
                                marker={"sizemode": "area", "sizemin": 5, "opacity": 0.75})
        self.widget.add_scatter(x=[], y=[], mode="lines+markers", name="Pareto frontier", line={"dash": "dot"},
                                hoverinfo="skip")
        self.widget.add_scatter(x=[], y=[], mode="markers", name="selected", hoverinfo="skip",
                                marker={"size": 18, "symbol": "circle-open", "line": {"width": 3}})
        self.widget.data[0].on_click(self._clicked)
        show_empty(self.widget, ("x", "y"), "no run stored yet", "empty")
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
        symbols = engine_symbols([r.config.engine for r in usable])
        with self.widget.batch_update():
            runs, line, sel = self.widget.data
            runs.x, runs.y = [mx.value(r) for r in usable], [my.value(r) for r in usable]
            runs.marker.symbol = [symbols[r.config.engine] for r in usable]
            runs.name = "runs: " + ", ".join(f"{SYMBOLS[s]} {e}" for e, s in symbols.items()) if usable else "runs"
            runs.hovertext = [f"{describe(r)}<br>{mx.label} {mx.value(r):.4g} {mx.unit}, {my.label} "
                              f"{my.value(r):.4g}, {ms.label} {(ms.value(r) or 0) / MIB:.1f} MiB" for r in usable]
            runs.marker.size = [4 + 40 * s / biggest for s in sizes]
            line.x, line.y = [mx.value(r) for r in front], [my.value(r) for r in front]
            line.marker.symbol = [symbols[r.config.engine] for r in front]
            sel.x, sel.y = [mx.value(r) for r in chosen], [my.value(r) for r in chosen]
            self.widget.layout.xaxis.title.text = f"{mx.label} ({mx.unit}), {mx.better} is better"
            self.widget.layout.yaxis.title.text = f"{my.label}, {my.better} is better"
            self.widget.layout.title.text = (f"History: {_runs(len(usable))} with both metrics, {len(front)} on "
                                             f"the Pareto frontier (marker area = {ms.label})")
            empty = "no run stored yet" if not results else f"no stored run has both {mx.label} and {my.label}"
            show_empty(self.widget, ("x", "y"), None if usable else empty, "empty")
        persist(self.widget)
