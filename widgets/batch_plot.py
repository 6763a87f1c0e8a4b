"""The History's batch sweep: decode tokens/s and energy per token against the batch size.

It draws the stored runs that differ from the selected run only in batch size (and in how long they measured):
`workbench sweep --axis 'batch_size=1|4|16'` makes them, or the app's runs with only the batch size changed.
A batch size whose run measured no energy has no J/token point, and the note under the plot says why.
"""

from __future__ import annotations

import html
from collections.abc import Sequence

import ipywidgets as W

from widgets.figure import Figure, persist
from widgets.plots import _LAYOUT, show_empty
from workbench.analysis import METRICS, batch_series
from workbench.result import RunResult

NONE_SELECTED = "no run stored yet"
HOW = ("run the same settings at other batch sizes (Workload → batch_size, or "
       "<code>workbench sweep --axis 'batch_size=1|4|16'</code>)")


def _energy_reason(r: RunResult) -> str:
    """Why a run has no J/token: its own warning, when it has one."""
    said = next((w for w in r.warnings if w.startswith("no energy counter")), None)
    return said or "the run measured no energy (it stopped before its timed calls, or predates the energy tracker)"


def missing_energy_note(runs: Sequence[RunResult]) -> str:
    """One sentence per reason: which batch sizes have no J/token point, and why."""
    reasons: dict[str, list[int]] = {}
    for r in runs:
        if METRICS["joules_per_token"].value(r) is None:
            reasons.setdefault(_energy_reason(r), []).append(r.config.batch_size)
    return " ".join(f"No J/token at batch {', '.join(map(str, b))}: {why}." for why, b in reasons.items())


class BatchPlot:
    """Decode tokens/s (all sequences together, left axis) and J/token (right axis) by batch size."""

    def __init__(self) -> None:
        layout = {**_LAYOUT, "height": 360, "title": {"text": "Batch sweep", "font": {"size": 14}},
                  "xaxis": {"title": {"text": "batch size"}, "type": "log"},
                  "yaxis": {"title": {"text": "decode tokens/s (all sequences)"}, "rangemode": "tozero"},
                  "yaxis2": {"title": {"text": "energy per token (J)"}, "overlaying": "y", "side": "right",
                             "rangemode": "tozero", "showgrid": False}}
        self.widget = Figure(layout=layout)
        self.widget.add_scatter(x=[], y=[], mode="lines+markers", name="decode tokens/s (left axis)",
                                hovertext=[], hoverinfo="text")
        self.widget.add_scatter(x=[], y=[], mode="lines+markers", name="J/token (right axis)", yaxis="y2",
                                connectgaps=False, hovertext=[], hoverinfo="text", marker={"symbol": "diamond"})
        self.note = W.HTML()
        self.box = W.VBox([self.widget, self.note])
        self.run_ids: list[int | None] = []
        show_empty(self.widget, ("x", "y", "y2"), NONE_SELECTED, "empty")
        persist(self.widget)

    def show(self, results: Sequence[RunResult], anchor: RunResult | None) -> None:
        """The batch sweep of `anchor`'s settings among `results` (None: nothing stored yet)."""
        runs = batch_series(results, anchor) if anchor is not None else []
        self.run_ids = [r.run_id for r in runs]
        batches = [r.config.batch_size for r in runs]
        rates = [METRICS["decode_tokens_per_s"].value(r) for r in runs]
        joules = [METRICS["joules_per_token"].value(r) for r in runs]
        with self.widget.batch_update():
            speed, energy = self.widget.data
            speed.x, speed.y = batches, rates
            speed.hovertext = [f"run {r.run_id}: batch {b}, {v:.1f} tokens/s" if v is not None else
                               f"run {r.run_id}: batch {b}, not measured" for r, b, v in zip(runs, batches, rates)]
            energy.x, energy.y = batches, joules
            energy.hovertext = [f"run {r.run_id}: batch {b}, " + (f"{j:.4g} J/token" if j is not None else
                                                                  "no energy counter") for r, b, j in
                                zip(runs, batches, joules)]
            self.widget.layout.xaxis.tickvals = batches or None
            title = "Batch sweep" if anchor is None else f"Batch sweep of {_settings(anchor)}"
            self.widget.layout.title.text = title + (f": {len(runs)} batch sizes" if len(runs) > 1 else "")
            show_empty(self.widget, ("x", "y", "y2"), None if runs else
                       (NONE_SELECTED if anchor is None else "the selected run did not finish"), "empty")
        persist(self.widget)
        self.note.value = self._note(runs, anchor)

    @staticmethod
    def _note(runs: Sequence[RunResult], anchor: RunResult | None) -> str:
        if anchor is None:
            return ""
        parts = [] if len(runs) > 1 else [f"Only one batch size is stored for these settings: {HOW}."]
        missing = missing_energy_note(runs)
        if missing:
            parts.append(html.escape(missing))
        return f"<span class='wb-note'>{' '.join(parts)}</span>" if parts else ""


def _settings(r: RunResult) -> str:
    """The run's settings apart from the batch size: model, dtype, techniques, device."""
    cfg = r.config
    techniques = " + ".join(t.label() for t in cfg.techniques) or "no technique"
    return f"{cfg.model} {cfg.dtype} on {r.model.device if r.model else cfg.device}, {techniques}"
