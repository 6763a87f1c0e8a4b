"""`widgets.figure.Figure` without a browser: what a page's model holds after the kernel's messages, in order.

The app edits its figures from a drawing thread while the kernel's main thread handles what the page sends;
every edit must reach the page whole, and a full state sent to the page must never be older than an edit
sent before it.
"""

from __future__ import annotations

import copy
import threading
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest

pytest.importorskip("ipywidgets", reason="the app extra is not installed (pip install -e '.[dev]')")
pytest.importorskip("playwright", reason="the dev extra is not installed (pip install -e '.[dev]')")

from tools.browser import browser, chromium_path  # noqa: E402
from widgets.figure import _BUNDLE, BUNDLE, LOADER, RESYNC, Figure, persist  # noqa: E402

WAIT_S = 1.0  # how long a hook waits for the other thread; with the figure's lock that thread waits instead


class PageModel:
    """A page's copy of a figure, kept as plotly's FigureModel keeps it: full states replace, updates apply."""

    def __init__(self, fig: Figure, monkeypatch: pytest.MonkeyPatch) -> None:
        self.data = copy.deepcopy(fig._widget_data)
        monkeypatch.setattr(fig.comm, "send", self.receive)

    def receive(self, data: Any = None, metadata: Any = None, buffers: Any = None) -> None:
        state = data.get("state", {}) if data.get("method") == "update" else {}
        if "_widget_data" in state:
            self.data = copy.deepcopy(state["_widget_data"])
        for key, style, traces in (("_py2js_update", "style_data", "style_traces"),
                                   ("_py2js_restyle", "restyle_data", "restyle_traces")):
            if state.get(key):
                self.restyle(state[key][style], state[key][traces])

    def restyle(self, style: dict[str, Any], traces: list[int] | None) -> None:
        traces = list(range(len(self.data))) if traces is None else traces
        for name, values in style.items():
            values = values if isinstance(values, list) else [values]
            for n, index in enumerate(traces):
                self.data[index][name] = values[n % len(values)]

    def y(self, index: int) -> list[float]:
        return list(self.data[index].get("y", []))


def figure() -> Figure:
    fig = Figure()
    for _ in range(2):
        fig.add_scatter(x=[], y=[])
    persist(fig)  # the state a page starts from
    return fig


def draw(fig: Figure, done: threading.Event) -> threading.Thread:
    """The app's drawing thread: one batch of edits (as LatencyPlot.add sets the TTFT marker), then `done`."""
    def run() -> None:
        with fig.batch_update():
            fig.data[1].x, fig.data[1].y = [0], [12.5]
        done.set()
    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_an_edit_made_while_the_kernel_handles_a_page_message_reaches_the_page(monkeypatch):
    """ipywidgets applies a page's message under traitlets' hold_trait_notifications, which caches every
    thread's trait changes: plotly's `_py2js_update = msg; _py2js_update = None` reached the page as None."""
    fig = figure()
    page = PageModel(fig, monkeypatch)
    inside, done = threading.Event(), threading.Event()
    threads: list[threading.Thread] = []

    def from_json(value: Any, obj: Any) -> Any:  # runs inside set_state's hold: the drawing thread edits now
        inside.set()
        threads.append(draw(fig, done))
        done.wait(WAIT_S)
        return value

    monkeypatch.setattr(fig, "_trait_from_json", from_json)
    fig.set_state({"_bundle_key": fig._bundle_key})  # a page's message (as plotly's trace deltas arrive)
    for thread in threads:
        thread.join()
    assert inside.is_set() and done.is_set()
    assert page.y(1) == [12.5], page.data


def test_the_full_state_answer_is_never_older_than_an_edit_sent_before_it(monkeypatch):
    """The answer to a page's RESYNC re-sends the persisted state: an edit sent between the copy and that
    send was overwritten on the page by the older state."""
    fig = figure()
    page = PageModel(fig, monkeypatch)
    done = threading.Event()
    threads: list[threading.Thread] = []
    send_state = fig.send_state

    def send_after_an_edit(key: Any = None) -> None:
        if isinstance(key, list) and not threads:  # the answer's own send, after persist() copied the figure
            threads.append(draw(fig, done))
            done.wait(WAIT_S)
        send_state(key)

    monkeypatch.setattr(fig, "send_state", send_after_an_edit)
    fig._on_message(fig, {"type": RESYNC}, [])
    for thread in threads:
        thread.join()
    assert done.is_set() and page.y(1) == [12.5], page.data



PHASES = ("stale", "queued", "loading", "resync", "drawing", "after")


@pytest.mark.browser
@pytest.mark.skipif(chromium_path() is None, reason="chromium is not installed (bash dev.sh setup)")
def test_the_page_draws_an_edit_made_in_any_phase_of_the_loaders_life():
    """The loader in a real browser over a stand-in model and kernel (tests/figure_loader_page.js): one figure
    per phase, one edit each. A page whose state was copied before an edit it never got a message for (a page
    connecting mid-run, or edits sent before its model existed) drew the older state: the loader only asked
    for the full state after it had seen an edit arrive early."""
    page_js = (Path(__file__).parent / "figure_loader_page.js").read_text()
    files = {"/bundle.js": _BUNDLE, "/loader.js": LOADER}
    with browser() as b:
        page = b.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.route("http://figure.test/**", lambda r: r.fulfill(
            body=files.get(urlparse(r.request.url).path, "<html><body></body></html>"),
            content_type="text/javascript" if r.request.url.endswith(".js") else "text/html"))
        page.goto("http://figure.test/")
        seen = page.evaluate(page_js, {"loaderUrl": "http://figure.test/loader.js", "phases": list(PHASES),
                                       "bundleUrl": "http://figure.test/bundle.js", "bundleType": BUNDLE,
                                       "resyncType": RESYNC})
    assert [s["want"] for s in seen] == [[7]] * len(PHASES), seen  # every phase's edit was made
    assert [(s["phase"], s["drawn"], s["y"]) for s in seen] == [(p, 1, [7]) for p in PHASES], seen
    assert errors == []
