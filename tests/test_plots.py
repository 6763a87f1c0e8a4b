"""The figures without a browser: empty states, layout, the synced state, the front-end loader."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("ipywidgets", reason="the app extra is not installed (pip install -e '.[dev]')")

from test_app import app  # noqa: E402,F401 - the app over a scripted runner (fixture)
from widgets.figure import _BUNDLE, BUNDLE, LOADER, RESYNC, Figure  # noqa: E402
from widgets.history_plot import ParetoPlot  # noqa: E402

LIVE_AXES = ("xaxis", "yaxis", "yaxis2", "xaxis2", "yaxis3", "xaxis3", "yaxis4", "xaxis4", "yaxis5")


def notes(fig) -> dict[str, tuple[str, bool]]:
    """Empty-state annotations by name: (text, visible), as the page gets them (the synced layout)."""
    return {a["name"]: (a.get("text", ""), a.get("visible", True)) for a in fig._widget_layout["annotations"]
            if a.get("name", "").startswith("empty")}


def test_empty_plots_say_so_instead_of_drawing_meaningless_axes(app):
    w = app()
    layout = w.live._widget_layout  # what a page draws first
    assert [layout[k].get("visible") for k in LIVE_AXES] == [False] * len(LIVE_AXES)
    assert set(notes(w.live).values()) == {("no run yet", True)} and len(notes(w.live)) == 4
    assert notes(w.history.pareto.widget) == {"empty": ("no run stored yet", True)}
    w.start()
    w.wait(10)
    layout = w.live._widget_layout
    assert [layout[k].get("visible") for k in LIVE_AXES] == [True] * len(LIVE_AXES)
    assert {visible for _, visible in notes(w.live).values()} == {False}
    assert notes(w.history.pareto.widget) == {"empty": ("", False)}
    assert "budget 1000 ms" in [a["text"] for a in layout["annotations"]]  # the budget note survives


def test_a_run_without_accuracy_says_not_measured_in_the_empty_plot(app):
    w = app()
    w.accuracy_plot.show(None, "random weights")
    w.roofline_plot.show(None, None)
    assert notes(w.live)["empty 2,2"] == ("not measured", True) and notes(w.live)["empty 1,2"] == ("not measured", True)
    assert w.live.layout.xaxis4.visible is False and w.live.layout.xaxis2.visible is False
    w.latency_plot.begin("measure", 0)  # the first token of a run: the latency axes appear
    assert w.live.layout.xaxis.visible is True and w.live.layout.annotations[4].visible is False


def test_first_run_into_an_empty_store_is_counted_in_the_history_plot(app, tmp_path):
    w = app()
    assert not (tmp_path / "runs.sqlite").exists()
    assert w.history.pareto.widget.layout.title.text.startswith("History: 0 runs with both metrics")
    w.start()
    w.wait(10)
    title = w.history.pareto.widget._widget_layout["title"]["text"]
    assert title.startswith("History: 1 run with both metrics, 1 on the Pareto frontier"), title
    assert len(w.history.pareto.widget._widget_data[0]["x"]) == 1 and "<td>1</td>" in w.history.table.value


def test_history_plot_without_usable_runs_says_why():
    plot = ParetoPlot(lambda _: None)
    plot.show([])
    assert notes(plot.widget) == {"empty": ("no run stored yet", True)}


def test_figures_take_the_page_width_and_the_latency_axes_keep_clear_of_the_roofline(app):
    from widgets.distill import LossPlot
    from widgets.sensitivity_plot import SensitivityPlots

    w = app()
    for fig in (w.live, w.history.pareto.widget, SensitivityPlots().widget, LossPlot().widget):
        assert fig.layout.width is None and "width" not in fig._widget_layout  # the page sets it (the loader)
    layout = w.live.layout
    assert layout.yaxis2.title.text == "gap between tokens (ms)" and layout.yaxis2.side == "right"
    # its own few ticks from 0 (a log axis overlaying the left one copied the left axis' tick positions)
    assert (layout.yaxis2.type, layout.yaxis2.tickmode, layout.yaxis2.rangemode) == (None, "auto", "tozero")
    assert layout.yaxis.type == "log" and layout.yaxis.dtick == "D2"
    # the roofline's bar names sit inside its bars, so nothing of it stands next to the latency plot's right axis
    assert layout.yaxis3.showticklabels is False
    assert layout.xaxis2.domain[0] - layout.xaxis.domain[1] >= 0.15
    w.start()
    w.wait(10)
    assert [t.split(":")[0] for t in w.roofline_plot.bar.text] == ["bandwidth bound", "measured decode"]


def test_figure_front_end_loads_plotly_after_anywidgets_two_second_window(monkeypatch):
    """anywidget gives `_esm` + `initialize` 2 s: the 5 MB plotly bundle is not in them, nor in the widget state
    (which running the notebook sends); the page asks for it when it draws the first figure."""
    fig = Figure()
    state = json.dumps(fig.get_state(), default=str)
    assert len(fig._esm) < 10_000 and fig._esm == LOADER and len(state) < 100_000
    initialize = LOADER[LOADER.index("initialize({ model, experimental })"):LOADER.index("async render")]
    assert "import(" not in initialize and "await" not in initialize and "send(" not in initialize  # at once
    sent: list[dict] = []
    monkeypatch.setattr(fig, "send", sent.append)
    fig._on_message(fig, {"type": BUNDLE}, [])
    assert sent[0]["type"] == BUNDLE and sent[0]["text"].startswith(_BUNDLE[:100]) and len(sent[0]["text"]) > 10**6


def test_figure_resends_its_full_state_when_a_page_missed_edits(monkeypatch):
    fig = Figure()
    fig.add_scatter(x=[1, 2], y=[3, 4])
    sent: list[object] = []
    # persist() may send a changed trait itself (key="..."); the resync sends both, changed or not
    monkeypatch.setattr(fig, "send_state",
                        lambda key=None: isinstance(key, list) and sent.append(("state", tuple(key))))
    monkeypatch.setattr(fig, "send", lambda content: sent.append(("msg", content)))
    fig._on_message(fig, {"type": "something else"}, [])
    assert sent == []
    fig._on_message(fig, {"type": RESYNC}, [])
    assert sent == [("state", ("_widget_data", "_widget_layout")), ("msg", {"type": RESYNC})]
    assert list(fig._widget_data[0]["x"]) == [1, 2]


def test_changing_the_budget_keeps_the_empty_notes(app):
    w = app()
    w.budget.value = 250
    texts = [a["text"] for a in w.live._widget_layout["annotations"]]
    assert "budget 250 ms" in texts and "budget 1000 ms" not in texts and texts.count("no run yet") == 4


def test_the_bound_that_holds_is_a_line_under_the_roofline_plot(app):
    from dataclasses import replace

    from test_app import ScriptedRunner

    from workbench.events import MetricEvent

    explanation = ("The CPU spent 35 % of each decode step in kernels, the rest in Python and dispatch: "
                   "overhead-bound — try --compile. 23.1 GB/s from the fp32 sum <probe>.")

    class Bound(ScriptedRunner):
        def __call__(self, config, on_event, should_stop):
            result = super().__call__(config, on_event, should_stop)
            roof = replace(result.roofline, bound="launch", explanation=explanation, busy_share=0.35)
            on_event(MetricEvent("roofline", roof))
            return replace(result, sections={**result.sections, "roofline": roof})

    w = app(runner=Bound())
    line = next(v for v in w.views if v.section == "roofline").widget
    assert "no run yet" in line.value and line in w.children[2].children
    w.start()
    w.wait(10)
    assert "<b>Bound: launch</b> — The CPU spent 35 % of each decode step in kernels" in line.value
    assert "&lt;probe&gt;" in line.value  # shown as text, never as markup
    plain = app()  # a section without a bound (stored before bounds were decided): says so
    plain.start()
    plain.wait(10)
    assert "not measured" in next(v for v in plain.views if v.section == "roofline").widget.value
