"""The distillation panel: teacher, student, steps; Start / Stop; live train and held-out loss curves."""

from __future__ import annotations

import html
import logging
import math
import threading
from collections.abc import Callable
from typing import Any

import ipywidgets as W

from widgets.forms import FieldForm, error_html, warning_html
from widgets.plots import _LAYOUT, Figure, persist
from widgets.publish import run_slot
from workbench.errors import WorkbenchError
from workbench.events import MetricEvent, StageEvent, TrainEvent

logger = logging.getLogger(__name__)

FIELDS = ("teacher", "student", "name", "steps", "lr", "temperature", "ce_weight", "batch_size", "text", "overwrite",
          "data_parallel", "sync", "average_every", "straggler_ms", "straggler_rank")


class LossPlot:
    """Train loss per step, held-out loss per check, and the teacher's / the start's held-out loss as lines."""

    def __init__(self) -> None:
        self.widget = Figure()
        self.widget.update_layout(height=380, title="Distillation: loss (nats per token)",
                                  xaxis_title="step", yaxis_title="loss", **_LAYOUT)
        self.widget.add_scatter(x=[], y=[], mode="lines", name="train loss (cross-entropy on the batch)", opacity=0.6)
        self.widget.add_scatter(x=[], y=[], mode="lines+markers", name="held-out loss (cross-entropy)")
        self.train, self.heldout = self.widget.data
        persist(self.widget)

    def start(self, teacher_loss: float, start_loss: float) -> None:
        """Clear the curves; draw the teacher and the untrained student as horizontal references."""
        lines = [(teacher_loss, "teacher", "seagreen"), (start_loss, "student before training", "crimson")]
        with self.widget.batch_update():
            self.train.x = self.train.y = self.heldout.x = self.heldout.y = []
            self.widget.layout.shapes = [dict(type="line", xref="x domain", x0=0, x1=1, yref="y", y0=v, y1=v,
                                              line=dict(color=c, dash="dash")) for v, _, c in lines]
            self.widget.layout.annotations = [dict(xref="x domain", x=0.99, xanchor="right", yref="y", y=v,
                                                   text=f"{t} {v:.3f}", showarrow=False, font=dict(color=c),
                                                   yanchor="bottom") for v, t, c in lines]
        persist(self.widget)

    def add(self, events: list[TrainEvent]) -> None:
        """Append a batch of steps (the caller throttles)."""
        if not events:
            return
        held = [e for e in events if e.heldout_loss is not None]
        with self.widget.batch_update():
            self.train.x = tuple(self.train.x or ()) + tuple(e.step for e in events)
            self.train.y = tuple(self.train.y or ()) + tuple(e.loss for e in events)
            if held:
                self.heldout.x = tuple(self.heldout.x or ()) + tuple(e.step for e in held)
                self.heldout.y = tuple(self.heldout.y or ()) + tuple(e.heldout_loss for e in held)
        persist(self.widget)


class DistillPanel:
    """Start a distillation in a background thread; Stop keeps the best checkpoint; the student becomes a model."""

    def __init__(self, app: Any, distiller: Callable[..., Any] | None = None, redraw_interval_s: float = 0.25) -> None:
        from workbench.distill import DistillConfig

        self.app, self.distiller, self.redraw_interval_s = app, distiller, redraw_interval_s
        self.form = FieldForm(DistillConfig, FIELDS)
        self.start_button = W.Button(description="Start training", icon="graduation-cap", button_style="primary",
                                     tooltip="Train the student from the teacher")
        self.stop_button = W.Button(description="Stop training", icon="stop", disabled=True,
                                    tooltip="End after the current step and save the best checkpoint so far")
        self.use_button = W.Button(description="Use the student", icon="check", disabled=True,
                                   tooltip="Select the saved student as the model of the next run")
        self.start_button.on_click(lambda _: self.start())
        self.stop_button.on_click(lambda _: self.stop())
        self.use_button.on_click(lambda _: self.use())
        self.status, self.summary = W.HTML(), W.HTML()
        self.plot: LossPlot | None = None  # created on the first start: every figure costs page load time
        self.figure_box = W.Box()
        self.thread: threading.Thread | None = None
        self.stop_event = threading.Event()
        self.last_result: Any = None
        self._pending: list[TrainEvent] = []
        self._lock = threading.Lock()
        self._last_draw = 0.0
        self.box = W.VBox([self.form.box, W.HBox([self.start_button, self.stop_button, self.use_button]),
                           self.status, self.figure_box, self.summary])

    def config(self) -> Any:
        """The DistillConfig of the form (ValueError with one sentence when a field is invalid)."""
        from workbench.distill import DistillConfig

        values = self.form.values()
        values["text"] = values.get("text") or None
        config = DistillConfig(**values)
        policy = getattr(self.app, "policy", None)
        if policy is not None:  # the publisher's lock: listed models, caps, text only from the working folder
            from workbench.serve.publish import check_distill

            config = check_distill(policy, config)
        return config

    def start(self) -> bool:
        """Validate and start training in a thread; False (with the reason shown) when it cannot start."""
        if self.thread is not None and self.thread.is_alive():
            self.status.value = warning_html("A distillation is already running.")
            return False
        try:
            config = self.config()
        except (ValueError, WorkbenchError) as e:
            self.status.value = error_html(str(e))
            return False
        if self.plot is None:
            self.plot = LossPlot()
            self.figure_box.children = [self.plot.widget]
        self.stop_event.clear()
        self.summary.value, self.use_button.disabled = "", True
        self.start_button.disabled, self.stop_button.disabled = True, False
        self.form.set_disabled(True)
        self.thread = threading.Thread(target=self._work, args=(config,), daemon=True, name="workbench-distill")
        self.thread.start()
        return True

    def stop(self) -> None:
        """Ask the training to end after its current step (the best checkpoint is saved)."""
        self.stop_event.set()
        self.status.value = "Stopping after the current step; saving the best checkpoint…"

    def use(self) -> None:
        """Make the saved student the app's model."""
        if self.last_result is not None:
            try:
                self.app.model_panel.set_model(self.last_result.model)
            except ValueError as e:  # a locked server that does not offer students
                self.status.value = error_html(str(e))

    def wait(self, timeout: float | None = None) -> None:
        """Block until the current distillation ends (tests, scripts)."""
        if self.thread is not None:
            self.thread.join(timeout)

    def _work(self, config: Any) -> None:
        from workbench.distill import distill

        try:
            with run_slot(getattr(self.app, "slots", None), self.stop_event.is_set, self._queued) as admitted:
                if not admitted:
                    self.status.value = "Stopped while waiting in the queue: nothing ran."
                    return
                result = (self.distiller or distill)(config, on_event=self._on_event,
                                                     should_stop=self.stop_event.is_set)
            self._flush()
            self.last_result = result
            self._show(result)
        except (WorkbenchError, ValueError) as e:
            self.status.value = error_html(str(e))
        except Exception as e:  # noqa: BLE001 - the app must survive anything
            logger.exception("distillation failed")
            self.status.value = error_html(f"unexpected {type(e).__name__}: {e}")
        finally:
            self.start_button.disabled, self.stop_button.disabled = False, True
            self.form.set_disabled(False)

    def _queued(self, message: str) -> None:
        self.status.value = html.escape(message)

    def _on_event(self, event: Any) -> None:
        import time

        if isinstance(event, TrainEvent):
            with self._lock:
                self._pending.append(event)
            rate = f", {event.tokens_per_s:,.0f} tokens/s" if event.tokens_per_s else ""
            held = f", held-out perplexity {math.exp(event.heldout_loss):.2f}" if event.heldout_loss is not None else ""
            self.status.value = html.escape(f"step {event.step}/{event.steps}: loss {event.loss:.3f}{held}{rate}")
            if event.heldout_loss is not None or time.monotonic() - self._last_draw >= self.redraw_interval_s:
                self._flush()
        elif isinstance(event, MetricEvent) and event.section == "start":
            s = event.value
            self.plot.start(s.teacher_heldout_loss, s.start_heldout_loss)
            self.status.value = html.escape(f"student: {s.student_layout} ({s.student_params / 1e6:.2f} M of the "
                                             f"teacher's {s.teacher_params / 1e6:.2f} M parameters)")
        elif isinstance(event, StageEvent) and event.state == "start":
            self.status.value = html.escape(f"{event.stage}: {event.message}")

    def _flush(self) -> None:
        import time

        with self._lock:
            events, self._pending = self._pending, []
        if self.plot is not None:
            self.plot.add(events)
        self._last_draw = time.monotonic()

    def _show(self, r: Any) -> None:
        recovered = f", {r.recovered:.0%} of what making the student lost" if r.recovered is not None else ""
        self.status.value = html.escape(f"{r.status}: {r.steps_done} steps in {r.wall_s:.0f} s, best at step "
                                        f"{r.best_step}; saved as {r.model}")
        rows = [("teacher", r.teacher_perplexity, r.teacher_params), ("student before training", r.start_perplexity,
                                                                       r.student_params),
                ("student after distillation", r.final_perplexity, r.student_params)]
        body = "".join(f"<tr><td>{html.escape(n)}</td><td>{p:.2f}</td><td>{c / 1e6:.2f} M</td></tr>" for n, p, c in rows)
        self.summary.value = ("<table class='wb-table'><thead><tr><th></th><th>held-out perplexity</th><th>parameters"
                              f"</th></tr></thead><tbody>{body}</tbody></table><span class='wb-note'>Recovered "
                              f"{(r.start_perplexity - r.final_perplexity):.2f} perplexity points{recovered}. "
                              f"Run <code>{html.escape(r.model)}</code> to compare its speed on the same Pareto view."
                              "</span>" + (ranks_html(r.parallel) if r.parallel is not None else ""))
        self.use_button.disabled = False


def ranks_html(par: Any) -> str:
    """Where each data-parallel rank's training time went (seconds), and whether the ranks ended identical."""
    mode = ("synchronous: gradients averaged every step" if par.sync == "sync"
            else f"asynchronous (local SGD): weights averaged every {par.average_every} steps")
    head = "".join(f"<th>{h}</th>" for h in ("rank", "steps", "compute", "straggler sleep", "waiting", "all-reduce",
                                             "meetings"))
    body = "".join(f"<tr><td>{s.rank}</td><td>{s.steps_done}</td><td>{s.compute_s:.2f}</td><td>{s.straggler_s:.2f}"
                   f"</td><td>{s.wait_s:.2f}</td><td>{s.comm_s:.2f}</td><td>{s.collectives}</td></tr>"
                   for s in par.ranks)
    same = "bit-identical" if par.identical else "different"
    return (f"<p class='wb-note'>{html.escape(mode)} on {par.world_size} ranks ({html.escape(par.backend)}); final "
            f"weights {same} across ranks.</p><table class='wb-table'><thead><tr>{head}</tr></thead><tbody>{body}"
            "</tbody></table>")
