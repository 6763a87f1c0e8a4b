"""The sensitivity panel: per-layer KL heatmap and a weight histogram for one technique."""

from __future__ import annotations

import html
import logging
import threading
from collections.abc import Callable
from typing import Any

import ipywidgets as W

from widgets.forms import error_html, warning_html
from widgets.sensitivity_plot import SensitivityPlots
from widgets.publish import run_slot
from workbench.errors import WorkbenchError
from workbench.events import StageEvent

logger = logging.getLogger(__name__)


class SensitivityPanel:
    """Analyze the technique enabled in the app (first of the pruning, then quantization panels)."""

    def __init__(self, app: Any, analyzer: Callable[..., Any] | None = None) -> None:
        self.app = app
        self.analyzer = analyzer
        self.plots: SensitivityPlots | None = None  # created on the first report: each figure costs page load
        self.spec = W.Text(description="technique", placeholder="e.g. sim:bits=3 (default: the one enabled above)",
                           style={"description_width": "80px"}, layout={"width": "460px"},
                           tooltip="Any technique that keeps layer shapes: quantization, magnitude, wanda, 2:4")
        self.tokens = W.BoundedIntText(value=512, min=16, max=100000, description="eval tokens",
                                       style={"description_width": "80px"}, layout={"width": "200px"})
        self.button = W.Button(description="Analyze", icon="search", tooltip="Compress one layer at a time")
        self.button.on_click(lambda _: self.start())
        self.status = W.HTML()
        self.thread: threading.Thread | None = None
        self.last_report: Any = None
        self.figure_box = W.Box()
        self.box = W.VBox([W.HBox([self.spec, self.tokens, self.button]), self.status, self.figure_box])

    def technique(self) -> str | None:
        """The spec to analyze: typed in, or the first technique enabled in the app."""
        if self.spec.value.strip():
            return self.spec.value.strip()
        enabled = self.app.prune.specs() + self.app.quant.specs()
        return enabled[0] if enabled else None

    def start(self) -> bool:
        """Run the analysis in a background thread."""
        if self.thread is not None and self.thread.is_alive():
            self.status.value = warning_html("An analysis is already running.")
            return False
        try:
            spec = self.technique()
            model = self.app.model_panel.model()
            if getattr(self.app, "policy", None) is not None:  # the publisher's lock
                from workbench.serve.publish import check_sensitivity

                check_sensitivity(self.app.policy, model, self.tokens.value)
        except ValueError as e:
            self.status.value = error_html(str(e))
            return False
        if not spec:
            self.status.value = error_html("Enable a technique above or type one here.")
            return False
        self.thread = threading.Thread(target=self._work, args=(model, spec), daemon=True, name="workbench-sensitivity")
        self.thread.start()
        return True

    def _work(self, model: str, spec: str) -> None:
        from workbench.sensitivity import analyze

        analyzer = self.analyzer or analyze
        self.button.disabled = True
        try:
            with run_slot(getattr(self.app, "slots", None), lambda: self.app.stop_requested,
                          lambda message: setattr(self.status, "value", html.escape(message))) as admitted:
                report = analyzer(model, spec, eval_tokens=self.tokens.value, on_event=self._on_event,
                                  should_stop=lambda: self.app.stop_requested) if admitted else None
            if report is not None:
                self.last_report = report
                self.show(report)
                self.status.value = html.escape(f"{len(report.layers)} layers analyzed on {report.eval_tokens} tokens")
        except (WorkbenchError, ValueError) as e:
            self.status.value = error_html(str(e))
        except Exception as e:  # noqa: BLE001 - the app must survive anything
            logger.exception("sensitivity failed")
            self.status.value = error_html(f"unexpected {type(e).__name__}: {e}")
        finally:
            self.button.disabled = False

    def show(self, report: Any) -> None:
        """Draw a SensitivityReport (creating the figure the first time)."""
        if self.plots is None:
            self.plots = SensitivityPlots()
            self.figure_box.children = [self.plots.widget]
        self.plots.show(report)

    def _on_event(self, event: Any) -> None:
        if isinstance(event, StageEvent):
            frac = f" {event.fraction:.0%}" if event.fraction is not None else ""
            self.status.value = html.escape(f"{event.stage}{frac}: {event.message}")
