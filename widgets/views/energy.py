"""View of the energy section: joules per token and average power in one line under the live plots, and J/token
next to the latency percentiles in the per-token latency plot's title."""

from __future__ import annotations

import html
from collections.abc import Mapping
from typing import Any

import ipywidgets as W

from widgets.views import View, register


@register
class EnergyView(View):
    """'Energy: 0.012 J per token, 38 W average (method)', or why there is no number."""

    section, order = "energy", 50

    def __init__(self, app: Any) -> None:
        super().__init__(app)
        self.widget = W.HTML(self._text(None, "no run yet"))

    @staticmethod
    def _text(value: Any, missing: str) -> str:
        if value is None:
            return f"<span class='wb-summary'><b>Energy</b>: {html.escape(missing)}</span>"
        per_token = "–" if value.joules_per_token is None else f"{value.joules_per_token:.4g} J per token"
        power = "" if value.average_power_w is None else f", {value.average_power_w:.1f} W average"
        return (f"<span class='wb-summary'><b>Energy</b>: {per_token}{power} over the timed calls "
                f"<span class='wb-note'>({html.escape(value.method)})</span></span>")

    def reset(self) -> None:
        self.widget.value = self._text(None, "measured over the timed calls…")
        self.app.latency_plot.show_energy(None)

    def show(self, value: Any, seen: Mapping[str, Any]) -> None:
        self.app.latency_plot.show_energy(None if value is None else value.joules_per_token)
        self.widget.value = self._text(value, "not measured (see the warnings: no readable energy counter here, "
                                                     "or the run stopped before its timed calls)")
