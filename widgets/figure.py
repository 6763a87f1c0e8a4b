"""`Figure`: plotly's FigureWidget, loaded so that anywidget does not give up on it under load.

anywidget 0.11 gives every model 2 s to import its front-end module and run its `initialize`
(`AbortSignal.timeout(2000)` in its Runtime); past that it logs "[anywidget] Failed to initialize model."
and every later message to that model is dropped for good (`_handle_comm_msg` awaits the rejected
`ready`), so the page keeps drawing the figure as it first got it. plotly's module is a 5 MB bundle; with
several pages loading on a busy machine, importing it took longer than 2 s and live plots stayed empty.
`Figure` ships a small loader module instead: its `initialize` returns at once; when the first figure
is drawn, the page asks the kernel for the bundle (once per page, shared by every figure) and imports
it, and each figure's own front end starts then. Edits that arrive before that are not lost: the loader
asks the kernel for the full state before drawing. The bundle never travels in the widget state, so
running the notebook no longer pushes 5 MB per figure through the kernel's output channel: under load
that delayed the app's display past Voila's 4-second wait for outputs (nbclient `iopub_timeout`), and
the page came up without the app.
"""

from __future__ import annotations

import copy
import hashlib
import logging
from pathlib import Path
from typing import Any

import plotly
import plotly.graph_objects as go
import traitlets

logger = logging.getLogger(__name__)

_BUNDLE = (Path(plotly.__file__).parent / "package_data" / "widgetbundle.js").read_text(encoding="utf-8")
BUNDLE, RESYNC = "workbench:bundle", "workbench:resync"  # requests from the page; answers carry the same type

LOADER = """
const PY2JS = ["addTraces", "deleteTraces", "moveTraces", "restyle", "relayout", "update", "animate",
               "removeLayoutProps", "removeTraceProps"].map((name) => `change:_py2js_${name}`);
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
  let missed = false;
  let init = null;  // the model as initialize got it: plotly's listeners must outlive any one view
  let started = null;
  const note = () => { missed = true; };
  const start = () => (started ??= plotlyModule(init.model).then(async (mod) => {
    const widget = mod.default();
    widget.initialize(init);
    for (const name of PY2JS) init.model.off(name, note);
    if (missed) await ask(init.model, "RESYNC", 30).catch(() => {});  // the full state, then its answer
    return widget;
  }));
  start.reset = () => { started = null; };
  return {
    initialize({ model, experimental }) {
      // Return at once: anywidget stops waiting for a model after 2 s. plotly starts with the first view.
      init = { model, experimental };
      for (const name of PY2JS) model.on(name, note);
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


def persist(fig: go.FigureWidget) -> None:
    """Make the widget's synced state equal to the figure (for views that connect later)."""
    fig._widget_data = copy.deepcopy(fig._data)
    fig._widget_layout = copy.deepcopy(fig._layout)


class Figure(go.FigureWidget):
    """A plotly FigureWidget whose 5 MB front end loads after anywidget's 2-second initialisation window.

    The bundle is not part of the widget's state: a page asks for it once (any figure answers) after it has
    connected, so running the notebook sends the kernel's widgets without it.
    """

    _esm = LOADER
    _bundle_key = traitlets.Unicode(f"plotly-{plotly.__version__}-{hashlib.sha1(_BUNDLE.encode()).hexdigest()[:12]}"
                                    ).tag(sync=True)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.on_msg(self._on_message)

    def _on_message(self, _: Any, content: Any, buffers: Any) -> None:
        """Answer the page's requests: plotly's bundle; the full state (after edits it did not see)."""
        kind = content.get("type") if isinstance(content, dict) else None
        if kind == BUNDLE:
            self.send({"type": BUNDLE, "text": _BUNDLE})
        elif kind == RESYNC:
            persist(self)
            self.send_state(["_widget_data", "_widget_layout"])
            self.send({"type": RESYNC})
