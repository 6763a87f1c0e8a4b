"""`Workbench`: the whole app. Inputs on the left, live plots on the right, work in a background thread."""

from __future__ import annotations

import functools
import html
import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

import ipywidgets as W

from widgets.distill import DistillPanel
from widgets.export import ExportPanel
from widgets.forms import error_html, warning_html
from widgets.history import HistoryPanel
from widgets.panels import AVAILABILITY_INPUTS, SETTINGS_GROUPS, ModelPanel, SettingsPanel, TechniquesPanel
from widgets.publish import policy_note, run_slot
from widgets.plots import AccuracyPlot, LatencyPlot, MemoryPlot, RooflinePlot, live_figure, persist
from widgets.sensitivity import SensitivityPanel
from widgets.tables import parallel_html
from widgets.views import views
from workbench.config import RunConfig
from workbench.errors import WorkbenchError
from workbench.serve.publish import PublishPolicy, check_run
from workbench.serve.slots import RunSlots
from workbench.events import STAGES, MetricEvent, RepeatEvent, StageEvent, TokenEvent, WarningEvent
from workbench.result import RunResult
from workbench.paths import store_path as resolve_store
from workbench.store import Store

logger = logging.getLogger(__name__)
Runner = Callable[..., RunResult]
_DONE = object()  # end of a run's event stream

CSS = """<style>
.wb-table {border-collapse: collapse; font-size: 12px; margin: 4px 0}
.wb-table th, .wb-table td {border: 1px solid #ddd; padding: 2px 6px; text-align: left}
.wb-table th {background: #f4f4f4}
.wb-error {color: #b00020; font-weight: 600}
.wb-warning {color: #8a5300}
.wb-note {color: #555; font-style: italic}
.wb-summary {color: #444; font-size: 12px}
.wb-output {font-family: monospace; white-space: pre-wrap; background: #fafafa; border: 1px solid #eee;
            padding: 6px; min-height: 3em; max-height: 10em; overflow: auto}
</style>"""


def default_runner() -> Runner:
    """The real core (imported lazily so building the app stays fast)."""
    from workbench.runner import run

    return run


class Workbench(W.VBox):
    """The workbench app. Display it as the last expression of a cell; `__init__` never calls display()."""

    def __init__(self, store_path: str | None = None, runner: Runner | None = None,
                 analyzer: Callable[..., Any] | None = None, distiller: Callable[..., Any] | None = None,
                 budget_ms: float = 1000.0,
                 redraw_interval_s: float = 0.1, policy: PublishPolicy | None = None,
                 slots: RunSlots | None = None) -> None:
        from workbench.execution import resolve_device

        self.store_path = str(resolve_store(store_path))  # None: the default store every entry point uses
        self.runner = runner or default_runner()
        self.redraw_interval_s = redraw_interval_s
        self.policy, self.slots = policy, slots  # the publisher's lock and the server's run slots (None: local)
        self.thread: threading.Thread | None = None
        self._busy = False
        self.stop_requested = False
        self.last_result: RunResult | None = None
        self.last_error: str | None = None
        device = resolve_device("auto")
        self.model_panel = ModelPanel(policy)
        self.quant = TechniquesPanel("quant", device)
        self.prune = TechniquesPanel("prune", device)
        self.settings = {group: SettingsPanel(group) for group in SETTINGS_GROUPS}
        self.live, cells = live_figure()
        self.latency_plot, self.roofline_plot = LatencyPlot(cells[0], budget_ms), RooflinePlot(cells[1])
        self.memory_plot, self.accuracy_plot = MemoryPlot(cells[2]), AccuracyPlot(cells[3])
        persist(self.live)  # every painter's traces are in the state a page draws first (plotly #4998)
        self.views = [view(self) for view in views()]  # how each section of a result is drawn
        self.seen: dict[str, Any] = {}  # the sections of the current run so far
        self.history = HistoryPanel(self.store_path)
        if policy is not None:  # a locked server writes exports into its working folder, not the notebook's
            export = policy.resolve_path("workbench-results.csv", "export")
            self.history.export_csv = functools.partial(self.history.export_csv, export)  # type: ignore
        self.exports = ExportPanel(lambda: list(self.history.selected), self.store_path, lambda: self, policy)
        self.sensitivity = SensitivityPanel(self, analyzer)
        self.distill = DistillPanel(self, distiller)
        self._build_controls(budget_ms)
        super().__init__(self._layout())
        for w in (p.form.inputs[n] for p in self.settings.values() for n in AVAILABILITY_INPUTS if n in p.form.inputs):
            w.observe(lambda _: self.refresh_availability(), "value")  # before validate sees the change
        for panel in (self.model_panel, self.quant, self.prune, *self.settings.values()):
            panel.observe(lambda _: self.validate())
        self.validate()
        self.history.refresh()

    # ------------------------------------------------------------------ layout
    def _build_controls(self, budget_ms: float) -> None:
        self.run_button = W.Button(description="Run", button_style="success", icon="play",
                                   tooltip="Load, apply the techniques, measure (background thread)")
        self.stop_button = W.Button(description="Stop", button_style="danger", icon="stop", disabled=True,
                                    tooltip="End the run after the current token; the partial result is kept")
        self.run_button.on_click(lambda _: self.start())
        self.stop_button.on_click(lambda _: self.stop())
        self.budget = W.BoundedFloatText(value=budget_ms, min=1, max=1e7, description="answer within (ms)",
                                         style={"description_width": "130px"}, layout={"width": "240px"},
                                         tooltip="The latency budget line: does the whole answer arrive in time?")
        self.budget.observe(lambda c: self.latency_plot.set_budget(c["new"]), "value")
        self.problems = W.HTML()
        self.progress = W.FloatProgress(value=0.0, min=0.0, max=1.0, description="idle",
                                        style={"description_width": "90px"}, layout={"width": "100%"})
        self.status = W.HTML()
        self.error = W.HTML()
        self.text = W.HTML("<div class='wb-output'></div>")
        self._text = ""
        self.latency_notes, self.accuracy_notes, self.run_notes = W.HTML(), W.HTML(), W.HTML()
        self.model_info = W.HTML()
        self.execution = W.HTML()

    def _layout(self) -> list[W.Widget]:
        inputs = W.Accordion(children=[self.model_panel.box, self.quant.box, self.prune.box,
                                       *(p.box for p in self.settings.values())],
                             titles=("Model", "Quantization", "Pruning", *SETTINGS_GROUPS), selected_index=0,
                             layout={"width": "520px"})
        left = W.VBox([inputs, self.problems, W.HBox([self.run_button, self.stop_button]), self.budget],
                      layout={"width": "540px"})
        live = W.VBox([self.progress, self.status, self.error, self.model_info, self.text, self.run_notes,
                       self.execution],
                      layout={"flex": "1 1 auto"})
        plots = W.VBox([self.live, W.HBox([self.latency_notes, self.accuracy_notes]),
                        *(v.widget for v in self.views if v.widget is not None)])
        title = W.HTML(CSS + "<h3 style='margin:4px 0'>LLM Inference Workbench</h3><span class='wb-note'>Choose a "
                       "model and techniques, press Run: latency, memory and accuracy are measured in one run.</span>"
                       + policy_note(self.policy))
        return [title, W.HBox([left, live]), plots,
                W.HTML("<h4>History</h4>"), self.history.box, self.exports.box,
                W.HTML("<h4>Sensitivity</h4>"), self.sensitivity.box,
                W.HTML("<h4>Distillation</h4>"), self.distill.box]

    # ------------------------------------------------------------------ settings
    def set_values(self, **values: Any) -> None:
        """Fill the inputs from RunConfig field values, e.g. `app.set_values(threads=1, max_new_tokens=64)`."""
        unknown = set(values) - set(RunConfig.__dataclass_fields__) - {"techniques"}
        if unknown:
            raise ValueError(f"not RunConfig fields: {sorted(unknown)}")
        if "model" in values:
            self.model_panel.set_model(values.pop("model"))
        self.model_panel.form.set_values(values)
        for panel in self.settings.values():
            panel.form.set_values(values)
        if "techniques" in values:
            from workbench.techniques import TechniqueConfig, parse_spec

            chosen = [t if isinstance(t, TechniqueConfig) else parse_spec(t) for t in values["techniques"]]
            for panel in (self.prune, self.quant):
                panel.set_enabled({c.name: c.params() for c in chosen})
        self.validate()

    def config(self) -> RunConfig:
        """The RunConfig the inputs describe (ValueError with the reason when they are invalid)."""
        values: dict[str, Any] = self.model_panel.values()
        for panel in self.settings.values():
            values.update(panel.values())
        techniques = self.prune.configs() + self.quant.configs()  # prune, then quantize
        return RunConfig(**values, techniques=tuple(techniques))

    def refresh_availability(self) -> None:
        """Technique rows follow the chosen device ("auto" resolved) and engine; an impossible device is left to
        validate()."""
        from workbench.execution import resolve_device

        values = {k: v for panel in self.settings.values() for k, v in panel.values().items()}
        try:
            device = resolve_device(values["device"])
        except (ValueError, WorkbenchError):
            return
        for panel in (self.quant, self.prune):
            panel.refresh(device, values.get("engine", "hf"))

    def validate(self) -> RunConfig | None:
        """Explain an impossible setting before Run (and disable Run); return the config when valid."""
        from workbench.execution import resolve_device
        from workbench.techniques import check_combination

        try:
            config = self.config()
            check_combination(config.techniques, resolve_device(config.device))
            if self.policy is not None:
                check_run(self.policy, config)
        except (ValueError, WorkbenchError) as e:
            self.problems.value = error_html(f"Cannot run: {e}")
            self.run_button.disabled = True
            return None
        self.problems.value = ""
        self.run_button.disabled = self.running
        return config

    @property
    def running(self) -> bool:
        """True from Run until the run's result (or error) is shown."""
        return self._busy

    # ------------------------------------------------------------------ run / stop
    def start(self, config: RunConfig | None = None) -> bool:
        """Start a run in a background thread; refuse politely while one is running."""
        if self.running:
            self.status.value = warning_html("A run is already in progress: press Stop first.")
            return False
        config = config or self.validate()
        if config is None:
            return False
        self._reset_view()
        self.stop_requested, self._busy = False, True
        self.run_button.disabled, self.stop_button.disabled = True, False
        self.thread = threading.Thread(target=self._work, args=(config,), name="workbench-run", daemon=True)
        self.thread.start()
        return True

    def stop(self) -> None:
        """Ask the run to end after the current token."""
        if self.running:
            self.stop_requested = True
            self.status.value = "stopping after the current token…"

    def wait(self, timeout: float | None = None) -> None:
        """Block until the current run's thread ends (for scripts and tests)."""
        if self.thread is not None:
            self.thread.join(timeout)

    def _reset_view(self) -> None:
        self.error.value = self.latency_notes.value = self.accuracy_notes.value = self.run_notes.value = ""
        self.execution.value = ""
        self.seen = {}
        for view in self.views:
            view.reset()
        self._text, self._buffer = "", []
        self._set_text("")
        self.last_error = None

    def _work(self, config: RunConfig) -> None:
        """The background thread: run, store, show; every error becomes one message.

        The run only queues its events; a second thread draws them, so widget traffic never slows
        the generation being measured.
        """
        events: queue.SimpleQueue = queue.SimpleQueue()
        pump = threading.Thread(target=self._pump, args=(events,), name="workbench-ui", daemon=True)
        pump.start()
        result: RunResult | None = None
        try:
            with run_slot(self.slots, lambda: self.stop_requested, self._queued) as admitted:
                if admitted:
                    result = self.runner(config, on_event=events.put, should_stop=lambda: self.stop_requested)
            if result is None:  # stopped while waiting for a run slot
                self.progress.description, self.progress.bar_style = "stopped", "warning"
                self.status.value = "stopped while waiting in the queue: nothing ran"
            else:
                result = result.with_id(Store(self.store_path).add(result))
        except WorkbenchError as e:
            self._fail(config, str(e))
        except Exception as e:  # noqa: BLE001 - the app must survive anything a run raises
            logger.exception("run failed")
            self._fail(config, f"unexpected {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        finally:
            events.put(_DONE)
            pump.join()
            self._busy = False
            self.stop_button.disabled = True
        if result is not None:
            self._show_result(result)
        self.history.refresh()
        self.validate()

    def _pump(self, events: queue.SimpleQueue) -> None:
        """Draw queued events in batches, at most once per `redraw_interval_s`."""
        done = False
        while not done:
            batch = [events.get()]
            time.sleep(self.redraw_interval_s)  # let a batch gather: redraws are throttled
            while True:
                try:
                    batch.append(events.get_nowait())
                except queue.Empty:
                    break
            for event in batch:
                if event is _DONE:
                    done = True
                else:
                    self._on_event(event)
            self._flush()

    def _queued(self, message: str) -> None:
        self.progress.description, self.progress.bar_style = "queued", "info"
        self.status.value = html.escape(message)

    def _fail(self, config: RunConfig, message: str) -> None:
        self.last_error = message
        self.error.value = f"<span class='wb-error'>Run failed: {html.escape(message)}</span>"
        self.progress.description, self.progress.bar_style = "failed", "danger"
        try:
            Store(self.store_path).add_error(config, message)
        except WorkbenchError as e:
            self.error.value += "<br>" + error_html(str(e))

    # ------------------------------------------------------------------ events (worker thread)
    def _on_event(self, event: Any) -> None:
        if isinstance(event, TokenEvent):
            self._on_token(event)
        elif isinstance(event, StageEvent):
            self._on_stage(event)
        elif isinstance(event, RepeatEvent):
            self.status.value = (f"timed run {event.repeat + 1}: TTFT {event.ttft_ms:.1f} ms, "
                                 f"E2E {event.e2e_ms:.1f} ms")
        elif isinstance(event, MetricEvent):
            self._on_metric(event)
        elif isinstance(event, WarningEvent):
            self._warn(event.message, event.section)

    def _on_token(self, event: TokenEvent) -> None:
        if event.index == 0:  # a new generate call: show it from the start
            self._flush()
            self.latency_plot.begin(event.phase, event.repeat)
            self._text = ""
        self._buffer.append(event)
        self._text += event.text

    def _flush(self) -> None:
        events, self._buffer = self._buffer, []
        if events:
            self.latency_plot.add(events)
            self._set_text(self._text)

    def _set_text(self, text: str) -> None:
        self.text.value = f"<div class='wb-output'>{html.escape(text)}</div>"

    def _on_stage(self, event: StageEvent) -> None:
        index = STAGES.index(event.stage) if event.stage in STAGES else 0
        done = 1.0 if event.state == "end" else (event.fraction or 0.0)
        self.progress.bar_style = ""
        self.progress.value = (index + done) / len(STAGES)
        self.progress.description = event.stage
        if event.message:
            self.status.value = html.escape(f"{event.stage}: {event.message}")

    def _on_metric(self, event: MetricEvent) -> None:
        self.seen[event.section] = event.value
        for view in self.views:
            if view.section == event.section:
                view.show(event.value, self.seen)

    def _warn(self, message: str, section: str) -> None:
        target = {"latency": self.latency_notes, "accuracy": self.accuracy_notes}.get(section, self.run_notes)
        target.value += f"<div class='wb-warning'>⚠ {html.escape(message)}</div>"

    def _show_result(self, result: RunResult) -> None:
        """Final numbers (also after a stop): every plot shows the result's own values."""
        self.last_result = result
        for view in self.views:
            view.final(result)
        if result.status == "stopped":
            self.progress.description, self.progress.bar_style = "stopped", "warning"
            self.status.value = f"stopped: partial result kept as run {result.run_id}"
        else:
            self.progress.value, self.progress.description, self.progress.bar_style = 1.0, "done", "success"
            decode = result.latency.decode_tokens_per_s if result.latency else None
            joules = result.energy.joules_per_token if result.energy else None
            self.status.value = (f"done: run {result.run_id}" + (f", decode {decode:.1f} tokens/s" if decode else "")
                                 + (f", {joules:.4g} J/token" if joules is not None else "")
                                 + f" in {result.duration_s:.1f} s")
        if result.output_text:
            self._set_text(result.output_text)
        self.execution.value = parallel_html(result.parallel)
