"""`Figure`: plotly's FigureWidget, loaded so that anywidget does not give up on it under load.

anywidget 0.11 gives every model 2 s to import its front-end module and run its `initialize`
(`AbortSignal.timeout(2000)` in its Runtime); past that it logs "[anywidget] Failed to initialize model."
and every later message to that model is dropped for good (`_handle_comm_msg` awaits the rejected
`ready`), so the page keeps drawing the figure as it first got it. plotly's module is a 5 MB bundle; with
several pages loading on a busy machine, importing it took longer than 2 s and live plots stayed empty.
`Figure` ships a small loader module instead: its `initialize` returns at once; when the first figure
is drawn, the page asks the kernel for the bundle (once per page, shared by every figure) and imports
it, and each figure's own front end starts then. Nothing the page missed is lost: once plotly's model
listens, the loader asks the kernel for the full state, then draws. The bundle never travels in the
widget state, so running the notebook no longer pushes 5 MB per figure through the kernel's output
channel: under load that delayed the app's display past Voila's 4-second wait for outputs (nbclient
`iopub_timeout`), and the page came up without the app.

Edits come from two threads: the app's drawing thread changes the figure while the kernel's main thread
handles what the page sends (plotly's views answer every edit with trace and layout deltas). ipywidgets
applies a page's message inside traitlets' `hold_trait_notifications`, which swaps the figure's
`notify_change` for a cache, for every thread; plotly sends each edit as `_py2js_update = msg` followed by
`_py2js_update = None`, so an edit made in that window was folded into one change to `None` and never
reached the page (the TTFT marker, sent once per run, went missing on a busy machine). A `Figure` holds one
lock over the page's messages, every edit with its message, and the full-state answers: an edit is sent
whole, and a state sent to the page is never older than an edit sent before it.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import logging
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import plotly
import plotly.graph_objects as go
import traitlets

logger = logging.getLogger(__name__)

_BUNDLE = (Path(plotly.__file__).parent / "package_data" / "widgetbundle.js").read_text(encoding="utf-8")
BUNDLE, RESYNC = "workbench:bundle", "workbench:resync"  # requests from the page; answers carry the same type

LOADER = """
const modules = (globalThis.__workbenchPlotly ??= new Map());  // one import per page, shared by every figure

function ask(model, type, seconds) {  // send a request to the kernel; resolve with its answer (same type)
  return new Promise((resolve, reject) => {
    const done = (msg) => {
      if (!msg || msg.type !== type) return;
      model.off("msg:custom", done);
      clearTimeout(timer);
      resolve(msg);
    };
    const timer = setTimeout(() => {
      model.off("msg:custom", done);
      reject(new Error(`[workbench] no answer to ${type}`));
    }, seconds * 1000);
    model.on("msg:custom", done);
    model.send({ type });
  });
}

function plotlyModule(model) {  // the bundle comes from the kernel once the page asks, not with the widget state
  const key = model.get("_bundle_key");
  if (!modules.has(key)) {
    const loading = ask(model, "BUNDLE", 300).then(async ({ text }) => {
      const url = URL.createObjectURL(new Blob([text], { type: "text/javascript" }));
      try { return await import(url); } finally { URL.revokeObjectURL(url); }
    });
    loading.catch(() => modules.delete(key));  // the next view asks again
    modules.set(key, loading);
  }
  return modules.get(key);
}

function fitWidth(model, el) {  // plotly sizes a plot once, when drawn: keep it as wide as its place on the page
  let width = 0;
  const fit = () => {
    const w = Math.floor(el.getBoundingClientRect().width);
    if (w > 0 && w !== width && el._fullLayout && window.Plotly && !model.get("_widget_layout").width) {
      width = w;
      window.Plotly.relayout(el, { width: w, _doNotReportToPy: true });
    }
  };
  const drawn = (event) => { if (event.detail.element === el) fit(); };
  const observer = new ResizeObserver(fit);
  observer.observe(el);
  document.addEventListener("plotlywidget-after-render", drawn);
  return () => { observer.disconnect(); document.removeEventListener("plotlywidget-after-render", drawn); };
}

export default () => {
  let init = null;  // the model as initialize got it: plotly's listeners must outlive any one view
  let started = null;
  const start = () => (started ??= plotlyModule(init.model).then(async (mod) => {
    const widget = mod.default();
    widget.initialize(init);  // from here on plotly applies every edit to the model's _widget_data
    // The state the page holds may be older than the figure: edits sent before plotly listened, a state copied
    // before the page connected, edits sent before this model existed. The kernel sends the full state, then
    // its answer (no edit between them).
    await ask(init.model, "RESYNC", 30).catch(() => {});
    return widget;
  }));
  start.reset = () => { started = null; };
  return {
    initialize({ model, experimental }) {
      // Return at once: anywidget stops waiting for a model after 2 s. plotly starts with the first view.
      init = { model, experimental };
    },
    async render({ model, el, experimental }) {
      const widget = await start().catch((error) => { start.reset(); throw error; });
      const stop = fitWidth(init.model, el);
      const cleanup = await widget.render({ model, el, experimental });
      return () => { stop(); if (typeof cleanup === "function") cleanup(); };
    },
  };
};
""".replace('"BUNDLE"', f'"{BUNDLE}"').replace('"RESYNC"', f'"{RESYNC}"')


_F = TypeVar("_F", bound=Callable[..., Any])
_C = TypeVar("_C", bound=type)
# plotly.py's entry points that change the figure and send the change, the sends themselves, and the handling
# of a page's message: each runs whole under the figure's lock (see the module docstring)
_SERIALIZED = ("set_state", "plotly_update", "plotly_restyle", "plotly_relayout", "_restyle_child",
               "_relayout_child", "add_traces", "_repr_mimebundle_", "_send_addTraces_msg", "_send_deleteTraces_msg",
               "_send_moveTraces_msg", "_send_restyle_msg", "_send_relayout_msg", "_send_update_msg",
               "_send_animate_msg")


def sync_lock(fig: go.FigureWidget) -> threading.RLock:
    """The lock a figure's edits, sends and page messages share (made on first use)."""
    lock = fig.__dict__.get("_workbench_sync_lock")
    return lock if lock is not None else fig.__dict__.setdefault("_workbench_sync_lock", threading.RLock())


def _serialized(method: _F) -> _F:
    @functools.wraps(method)
    def locked(self: go.FigureWidget, *args: Any, **kwargs: Any) -> Any:
        with sync_lock(self):
            return method(self, *args, **kwargs)
    return locked  # type: ignore[return-value]


def _serialize(cls: _C) -> _C:
    """Class decorator: run each of `_SERIALIZED` under the figure's lock."""
    for name in _SERIALIZED:
        setattr(cls, name, _serialized(getattr(cls, name)))
    return cls


def persist(fig: go.FigureWidget) -> None:
    """Make the widget's synced state equal to the figure (for views that connect later)."""
    with sync_lock(fig):
        fig._widget_data = copy.deepcopy(fig._data)
        fig._widget_layout = copy.deepcopy(fig._layout)


@_serialize
class Figure(go.FigureWidget):
    """A plotly FigureWidget whose 5 MB front end loads after anywidget's 2-second initialisation window.

    The bundle is not part of the widget's state: a page asks for it once (any figure answers) after it has
    connected, so running the notebook sends the kernel's widgets without it. Edits from any thread reach the
    page whole (one lock; see the module docstring).
    """

    _esm = LOADER
    _bundle_key = traitlets.Unicode(f"plotly-{plotly.__version__}-{hashlib.sha1(_BUNDLE.encode()).hexdigest()[:12]}"
                                    ).tag(sync=True)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.on_msg(self._on_message)

    @contextlib.contextmanager
    def batch_update(self) -> Iterator[None]:
        """plotly's batch_update, holding the figure's lock from the first edit until the update is sent."""
        with sync_lock(self), super().batch_update():
            yield

    def _on_message(self, _: Any, content: Any, buffers: Any) -> None:
        """Answer the page's requests: plotly's bundle; the full state (then the answer, with no edit between)."""
        kind = content.get("type") if isinstance(content, dict) else None
        if kind == BUNDLE:
            self.send({"type": BUNDLE, "text": _BUNDLE})
        elif kind == RESYNC:
            with sync_lock(self):
                persist(self)
                self.send_state(["_widget_data", "_widget_layout"])
                self.send({"type": RESYNC})
