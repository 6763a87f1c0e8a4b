"""The History panel over a results store that other pages write to while it reads."""

from __future__ import annotations

import pytest

pytest.importorskip("ipywidgets", reason="the app extra is not installed (pip install -e '.[dev]')")

from test_app import fake_result  # noqa: E402
from widgets.history import HistoryPanel  # noqa: E402
from workbench.config import RunConfig  # noqa: E402
from workbench.store import Store  # noqa: E402


def test_plot_and_table_show_the_same_runs_when_another_page_stores_one_between_the_reads(tmp_path, monkeypatch):
    """refresh() reads the store twice (full results for the plot, summaries for the table): a run another page
    stored between the reads was in the table and not in the plot (four pages at once: 'History: 3 runs' over
    a table of 4)."""
    path = tmp_path / "runs.sqlite"
    Store(path).add(fake_result(RunConfig()))
    panel = HistoryPanel(str(path))
    added: list[int] = []
    for name in ("summaries", "results"):
        def read(self, *args, _read=getattr(Store, name), **kwargs):
            out = _read(self, *args, **kwargs)
            if not added:  # right after the first read: another page's run lands
                added.append(Store(path).add(fake_result(RunConfig(), scale=0.5, ppl=30.0)))
            return out
        monkeypatch.setattr(Store, name, read)
    panel.refresh()
    assert added and len(Store(path).summaries()) == 2
    rows = panel.table.value.split("<tbody>")[1].count("<tr>")
    assert len(panel.pareto.run_ids) == rows == 1
    panel.refresh()  # the next refresh shows it in both
    rows = panel.table.value.split("<tbody>")[1].count("<tr>")
    assert len(panel.pareto.run_ids) == rows == 2


def _stored(path, *engines: str) -> None:
    store = Store(path)
    for i, engine in enumerate(engines):
        store.add(fake_result(RunConfig(engine=engine), scale=1.0 + i, ppl=20.0 - i))


def test_history_shows_both_engines_runs_together_marked_by_engine_in_plot_hover_and_table(tmp_path):
    path = tmp_path / "runs.sqlite"
    _stored(path, "hf", "llamacpp", "hf")
    panel = HistoryPanel(str(path))
    panel.refresh()
    runs, frontier, _ = panel.pareto.widget.data
    by_id = dict(zip(panel.pareto.run_ids, runs.marker.symbol))
    assert by_id == {1: "circle", 2: "diamond", 3: "circle"}
    assert runs.name == "runs: ● hf, ◆ llamacpp"  # the legend says which symbol is which engine
    state = panel.pareto.widget._widget_data[0]  # what a page draws first
    assert state["name"] == runs.name and list(state["marker"]["symbol"]) == list(runs.marker.symbol)
    hover = dict(zip(panel.pareto.run_ids, runs.hovertext))
    assert "(hf engine)" in hover[1] and "(llamacpp engine)" in hover[2] and "(hf engine)" in hover[3]
    assert list(frontier.marker.symbol) == [by_id[i] for i in panel.pareto.frontier_ids]
    header = panel.table.value.split("</thead>")[0]
    assert "<th>engine</th>" in header
    assert sorted(row.split("</td><td>")[4] for row in panel.table.value.split("<tbody>")[1].split("<tr>")[1:]) \
        == ["hf", "hf", "llamacpp"]
    panel.select(1)
    panel.select(2)  # the comparison names each run's engine
    assert "(hf engine)" in panel.comparison.value and "(llamacpp engine)" in panel.comparison.value


def test_runs_of_a_store_older_than_the_engine_column_show_hf(tmp_path):
    import json
    import sqlite3

    path = tmp_path / "runs.sqlite"
    _stored(path, "hf")
    with sqlite3.connect(path) as conn:  # as an older workbench wrote it: no engine column, no engine in the JSON
        config, result = conn.execute("SELECT config_json, result_json FROM runs").fetchone()
        config, result = json.loads(config), json.loads(result)
        del config["engine"], result["config"]["engine"]
        conn.execute("UPDATE runs SET config_json=?, result_json=?", (json.dumps(config), json.dumps(result)))
        conn.execute("ALTER TABLE runs DROP COLUMN engine")
    panel = HistoryPanel(str(path))
    panel.refresh()
    assert panel.message.value == "" and "<td>hf</td>" in panel.table.value
    runs = panel.pareto.widget.data[0]
    assert list(runs.marker.symbol) == ["circle"] and runs.name == "runs: ● hf" and "(hf engine)" in runs.hovertext[0]


def test_every_engine_gets_its_own_marker_symbol():
    from widgets.history_plot import ENGINE_SYMBOLS, engine_symbols

    assert engine_symbols(["llamacpp", "hf"]) == {"hf": "circle", "llamacpp": "diamond"}  # known ones first
    symbols = engine_symbols(["later", "hf", "other", "later"])  # engines this version does not know
    assert list(symbols) == ["hf", "later", "other"] and len(set(symbols.values())) == 3
    assert not {symbols["later"], symbols["other"]} & set(ENGINE_SYMBOLS.values())
    assert engine_symbols([]) == {}
