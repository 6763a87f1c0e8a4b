"""Energy per token in the app: next to the latency numbers, in the History's comparison and table, and against
the batch size in the History's batch sweep (runs that differ only in batch size)."""

from __future__ import annotations

from dataclasses import replace

import pytest

pytest.importorskip("ipywidgets", reason="the app extra is not installed (pip install -e '.[dev]')")

from test_app import ScriptedRunner, app, fake_result  # noqa: E402,F401 - app is a fixture
from widgets.history import HistoryPanel  # noqa: E402
from workbench.analysis import batch_series  # noqa: E402
from workbench.config import RunConfig  # noqa: E402
from workbench.events import MetricEvent  # noqa: E402
from workbench.measure.trackers.energy import EnergyStats  # noqa: E402
from workbench.result import EnvInfo  # noqa: E402
from workbench.store import Store  # noqa: E402

NO_COUNTER = "no energy counter is readable on this machine: no RAPL package domain under /sys; energy is null"


def with_energy(result, joules_per_token, batch=None, warnings=()):
    """`result` with an energy section (None: not measured, with the tracker's warning) and a batch size."""
    energy = None if joules_per_token is None else EnergyStats(joules_per_token, 30.0, "a test counter", 1.0, 100,
                                                                0.1, "device")
    config = result.config if batch is None else result.config.replace(batch_size=batch)
    return replace(result, config=config, sections={**result.sections, "energy": energy},
                   warnings=tuple(warnings) + ((NO_COUNTER,) if joules_per_token is None else ()))


class EnergyRunner(ScriptedRunner):
    def __init__(self, joules_per_token):
        super().__init__()
        self.joules_per_token = joules_per_token

    def __call__(self, config, on_event, should_stop):
        result = with_energy(super().__call__(config, on_event, should_stop), self.joules_per_token)
        on_event(MetricEvent("energy", result.energy))
        return result


def test_joules_per_token_stand_next_to_the_latency_numbers(app):
    w = app(runner=EnergyRunner(0.0125))
    w.run_button.click()
    w.wait(10)
    title = w.latency_plot.cell.title
    assert title.startswith("Per-token latency: TTFT p50 3.0 ms")
    assert title.endswith("E2E p50 20.0 ms (3 runs), 0.0125 J/token")
    assert w.status.value.startswith("done: run 1, decode 250.0 tokens/s, 0.0125 J/token in ")
    w.runner = EnergyRunner(None)  # a machine without a counter: no number, and the title does not keep the old one
    w.run_button.click()
    w.wait(10)
    assert "J/token" not in w.latency_plot.cell.title and "J/token" not in w.status.value
    assert "not measured" in next(v for v in w.views if v.section == "energy").widget.value


def test_history_compares_and_lists_joules_per_token(tmp_path):
    path = tmp_path / "runs.sqlite"
    store = Store(path)
    a = store.add(with_energy(fake_result(RunConfig()), 0.02))
    b = store.add(with_energy(fake_result(RunConfig(), scale=0.5), 0.01))
    panel = HistoryPanel(str(path))
    panel.refresh()
    assert "<th>J/token</th>" in panel.table.value and "<td>0.020</td>" in panel.table.value
    panel.select(a)
    panel.select(b)
    row = next(r for r in panel.comparison.value.split("<tr>") if "energy per token" in r)
    assert "<td>0.02 J ✓</td>" not in row and "<td>0.01 J ✓</td>" in row and "0.5×" in row


def _sweep(store):
    """Batch 1, 4 (twice: the newer counts), 16 of one setting, batch 16 without a counter; bf16 runs aside."""
    cfg = RunConfig(max_new_tokens=8)
    ids = {"b1": store.add(with_energy(fake_result(cfg), 0.04, batch=1)),
           "b4 old": store.add(with_energy(fake_result(cfg, scale=2.0), 0.05, batch=4)),
           "b4": store.add(with_energy(fake_result(cfg.replace(repeats=3), scale=0.5), 0.012, batch=4)),
           "b16": store.add(with_energy(fake_result(cfg, scale=0.25), None, batch=16)),
           "bf16": store.add(with_energy(fake_result(cfg.replace(dtype="bf16")), 0.03, batch=2))}
    store.add_error(cfg.replace(batch_size=8), "out of memory")
    return ids


def test_batch_series_keeps_one_run_per_batch_size_of_the_same_settings(tmp_path):
    store = Store(tmp_path / "runs.sqlite")
    ids = _sweep(store)
    results = store.results(status=None)
    by_id = {r.run_id: r for r in results}
    series = batch_series(results, by_id[ids["b1"]])
    assert [r.run_id for r in series] == [ids["b1"], ids["b4"], ids["b16"]]  # newest batch 4; no error, no bf16
    assert [r.run_id for r in batch_series(results, by_id[ids["bf16"]])] == [ids["bf16"]]
    env = EnvInfo("3.11", "2", "5", "cpu A", 2, None, None, "0.1", None)
    elsewhere = replace(by_id[ids["b4"]], env=replace(env, cpu="cpu B"), run_id=99)
    assert elsewhere not in batch_series([*results, elsewhere], by_id[ids["b1"]])  # another machine's run


def test_history_batch_sweep_draws_speed_and_joules_per_token_by_batch(tmp_path):
    path = tmp_path / "runs.sqlite"
    ids = _sweep(Store(path))
    panel = HistoryPanel(str(path))
    panel.refresh()  # the newest run (bf16, alone at its settings) is drawn until one is selected
    assert panel.batch.run_ids == [ids["bf16"]] and "Only one batch size is stored" in panel.batch.note.value
    panel.select(ids["b4"])
    speed, energy = panel.batch.widget.data
    assert list(speed.x) == [1, 4, 16] and list(speed.y) == [250.0, 500.0, 1000.0]
    assert list(energy.x) == [1, 4, 16] and list(energy.y) == [0.04, 0.012, None] and energy.yaxis == "y2"
    assert panel.batch.note.value == ("<span class='wb-note'>No J/token at batch 16: no energy counter is readable "
                                      "on this machine: no RAPL package domain under /sys; energy is null.</span>")
    assert panel.batch.widget.layout.title.text == "Batch sweep of tiny fp32 on cpu, no technique: 3 batch sizes"
    assert "no energy counter" in energy.hovertext[2] and "0.012 J/token" in energy.hovertext[1]
    state = panel.batch.widget._widget_data[1]  # what a page draws first
    assert list(state["y"]) == [0.04, 0.012, None]
    assert panel.batch.widget in panel.box.children[5].children


def test_an_empty_store_has_an_empty_batch_sweep(tmp_path):
    panel = HistoryPanel(str(tmp_path / "runs.sqlite"))
    panel.refresh()
    assert panel.batch.run_ids == [] and panel.batch.note.value == ""
    assert any(a.text == "no run stored yet" and a.visible for a in panel.batch.widget.layout.annotations)


def test_a_batch_sweep_on_the_command_line_lists_joules_per_token(tmp_path):
    from workbench.cli.sweep import _format_report, _report_json
    from workbench.sweep import SweepEvent, SweepReport

    store = Store(tmp_path / "runs.sqlite")
    ids = [store.add(with_energy(fake_result(RunConfig()), j, batch=b)) for b, j in ((1, 0.04), (4, None))]
    events = tuple(SweepEvent(i + 1, 2, f"tiny fp32 none batch_size={b}", "ok", run_id)
                   for i, (b, run_id) in enumerate(zip((1, 4), ids)))
    report = SweepReport(2, 0, 2, 0, 0, False, tuple(ids), 1.0, events)
    rows = [(e, store.get(e.run_id)) for e in events]
    lines = _format_report(report, rows).splitlines()
    assert lines[0].split()[4:7] == ["decode", "tok/s", "J/token"]
    assert lines[2].split()[7:9] == ["250.0", "0.04"] and lines[3].split()[7:9] == ["250.0", "-"]
    assert [r["joules_per_token"] for r in _report_json(report, rows, store)["runs"]] == [0.04, None]
