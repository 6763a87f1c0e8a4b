"""The History panel over a results store that other pages write to while it reads."""

from __future__ import annotations

from test_app import fake_result
from widgets.history import HistoryPanel
from workbench.config import RunConfig
from workbench.store import Store


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
