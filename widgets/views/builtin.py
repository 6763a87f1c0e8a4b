"""Views of the model, latency, memory, accuracy and roofline sections: the app's live plots."""

from __future__ import annotations

import html
from collections.abc import Mapping
from typing import Any

import ipywidgets as W

from widgets.views import View, register
from workbench.result import RunResult


@register
class ModelView(View):
    """One line: the model as it runs (after techniques)."""

    section, order = "model", 0

    def show(self, value: Any, seen: Mapping[str, Any]) -> None:
        self.app.model_info.value = "" if value is None else html.escape(
            f"{value.name}: {value.architecture}, {value.params / 1e6:.2f} M parameters, {value.dtype} on "
            f"{value.device}" + (" — random weights" if value.random_weights else ""))

    def final(self, result: RunResult) -> None:
        self.show(result.model, result.sections)


@register
class LatencyView(View):
    """The per-token plot's title gets the percentiles; its points came live as tokens."""

    section, order = "latency", 10

    def show(self, value: Any, seen: Mapping[str, Any]) -> None:
        self.app.latency_plot.summarize(value)


@register
class MemoryView(View):
    section, order = "memory", 20

    def show(self, value: Any, seen: Mapping[str, Any]) -> None:
        self.app.memory_plot.show(value)


@register
class AccuracyView(View):
    """Accuracy bars; an empty plot says why there are none."""

    section, order = "accuracy", 30

    def show(self, value: Any, seen: Mapping[str, Any]) -> None:
        self.app.accuracy_plot.show(value)

    def final(self, result: RunResult) -> None:
        random = result.model is not None and result.model.random_weights
        self.app.accuracy_plot.show(result.accuracy, "random weights" if random else
                                    ("run stopped" if result.status == "stopped" else "eval_tokens is 0"))


@register
class RooflineView(View):
    """The measured decode rate against the bandwidth bound (the latency section brings the rate), and a line
    under the plots: which bound holds and why (the section's `bound` and `explanation`, as measured)."""

    section, order = "roofline", 40

    def __init__(self, app: Any) -> None:
        super().__init__(app)
        self.widget = W.HTML(self._line(None, "no run yet"))

    @staticmethod
    def _line(value: Any, missing: str) -> str:
        if value is None or not value.bound:
            return f"<span class='wb-summary'><b>Bound</b>: {html.escape(missing)}</span>"
        return (f"<span class='wb-summary'><b>Bound: {html.escape(value.bound)}</b> — "
                f"{html.escape(value.explanation)}</span>")

    def reset(self) -> None:
        self.widget.value = self._line(None, "decided after the timed calls…")

    def show(self, value: Any, seen: Mapping[str, Any]) -> None:
        latency = seen.get("latency")
        self.app.roofline_plot.show(value, latency.decode_tokens_per_s if latency else None)
        self.widget.value = self._line(value, "not measured (no decode rate, or no bandwidth bound)")
