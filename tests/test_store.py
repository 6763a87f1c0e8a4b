"""Results store: one transaction per run, exports, and refusing to touch a damaged database."""

from __future__ import annotations

import json
import sqlite3

import pytest

from workbench.errors import StoreError
from workbench.store import Store


@pytest.fixture(scope="module")
def result():
    from workbench.config import RunConfig
    from workbench.runner import run

    return run(RunConfig(model="tiny", warmup=0, repeats=2, min_duration_s=0, max_new_tokens=4, eval_tokens=200,
                         eval_context=64))


def test_add_get_round_trip(store_path, result):
    store = Store(store_path)
    rid = store.add(result)
    back = store.get(rid)
    assert back == result and back.run_id == rid


def test_summaries_dataframe_and_csv(store_path, result, tmp_path):
    store = Store(store_path)
    a = store.add(result)
    b = store.add_error(result.config, "something went wrong")
    rows = store.summaries()
    assert [r["id"] for r in rows] == [b, a]
    assert rows[0]["status"] == "error" and rows[0]["error"] == "something went wrong"
    assert rows[1]["decode_tokens_per_s"] == pytest.approx(result.latency.decode_tokens_per_s)
    frame = store.dataframe()
    assert len(frame) == 2
    assert "latency.ttft_ms.p50" in frame.columns and "accuracy.perplexity" in frame.columns
    assert "latency.samples" not in frame.columns
    assert len(store.results()) == 1  # errors have no measurements
    frame.to_csv(tmp_path / "x.csv", index=False)
    import pandas as pd

    back = pd.read_csv(tmp_path / "x.csv")
    assert len(back) == 2 and list(back["status"]) == ["ok", "error"]


def test_a_failed_write_leaves_nothing_behind(store_path, result, monkeypatch):
    store = Store(store_path)
    store.add(result)

    def broken(*args, **kwargs):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(type(result), "to_json", broken)
    with pytest.raises(RuntimeError):
        store.add(result)
    monkeypatch.undo()
    assert len(store.summaries()) == 1
    with sqlite3.connect(store_path) as conn:
        assert conn.execute("SELECT count(*) FROM runs").fetchone()[0] == 1


def test_a_new_store_gets_all_its_tables_at_once(tmp_path, result, monkeypatch):
    """Two apps sharing a new store: the second one read the tables between the first one's CREATE statements and
    refused the store as "not a workbench results store (tables: workbench_meta)". A schema that fails halfway
    leaves no table at all, so nobody can see half of it."""
    import workbench.store as store_module

    path = tmp_path / "new.sqlite"
    monkeypatch.setattr(store_module, "_SCHEMA", store_module._SCHEMA + "NOT SQL;")
    with pytest.raises(StoreError):
        Store(path).add(result)
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT name FROM sqlite_master WHERE type='table'").fetchall() == []
    monkeypatch.undo()
    assert Store(path).add(result) == 1


def test_a_transaction_interrupted_inside_sqlite_rolls_back(store_path, result):
    store = Store(store_path)
    store.add_error(result.config, "an earlier failure")  # the store file exists from its first row on
    with sqlite3.connect(store_path) as conn:  # a trigger that fails the insert half-way
        conn.execute("CREATE TRIGGER boom BEFORE INSERT ON runs WHEN NEW.model = 'tiny' "
                     "BEGIN SELECT RAISE(ABORT, 'simulated crash'); END")
    with pytest.raises(StoreError):
        store.add(result)
    assert [r["status"] for r in store.summaries()] == ["error"]


def test_corrupt_database_is_refused_and_left_untouched(tmp_path):
    path = tmp_path / "bad.sqlite"
    path.write_bytes(b"this is not sqlite at all" * 100)
    before = path.read_bytes()
    with pytest.raises(StoreError, match="unusable|corrupt"):
        Store(path)
    assert path.read_bytes() == before


def test_foreign_sqlite_database_is_refused(tmp_path):
    path = tmp_path / "other.sqlite"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE customers (id INTEGER)")
    with pytest.raises(StoreError, match="not a workbench results store"):
        Store(path)


def test_store_path_that_is_a_folder(tmp_path):
    with pytest.raises(StoreError, match="is a folder"):
        Store(tmp_path)


def test_results_json_export_is_one_list(store_path, result):
    store = Store(store_path)
    store.add(result)
    data = json.loads(json.dumps([r.to_dict() for r in store.results()]))
    assert data[0]["latency"]["new_tokens"] == 4


def test_reading_a_missing_store_finds_no_runs_and_creates_nothing(tmp_path):
    path = tmp_path / "none.sqlite"
    store = Store(path)
    assert store.summaries() == [] and store.results() == [] and store.hashes() == set()
    assert len(store.dataframe()) == 0
    with pytest.raises(StoreError, match="no run 3 in .*: no runs yet"):
        store.get(3)
    assert not path.exists() and not store.exists()


def test_the_first_run_creates_the_store_and_the_default_data_folder(monkeypatch, tmp_path, result):
    """No path and no WORKBENCH_STORE: results.sqlite in $XDG_DATA_HOME/workbench, made with the first run."""
    from workbench.paths import default_store

    monkeypatch.delenv("WORKBENCH_STORE")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    store = Store()
    assert store.path == default_store() == tmp_path / "data" / "workbench" / "results.sqlite"
    assert not (tmp_path / "data").exists()
    assert store.add(result) == 1 and Store().summaries()[0]["id"] == 1
    monkeypatch.delenv("XDG_DATA_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert Store().path == tmp_path / "home" / ".local" / "share" / "workbench" / "results.sqlite"


def test_a_named_store_in_a_missing_folder_is_refused(monkeypatch, tmp_path):
    monkeypatch.setenv("WORKBENCH_STORE", str(tmp_path / "nowhere" / "r.sqlite"))
    with pytest.raises(StoreError, match="folder .*nowhere' does not exist"):
        Store()


def test_the_app_history_names_its_store(tmp_path, result):
    from widgets.history import HistoryPanel
    from workbench.paths import default_store

    path = tmp_path / "runs.sqlite"
    panel = HistoryPanel(str(path))
    panel.refresh()
    assert str(path) in panel.where.value and panel.where in panel.box.children
    assert f"workbench results --store {path}</code> lists it" in panel.where.value
    assert "the default store" in HistoryPanel(str(default_store())).where.value
    assert f"No runs yet in {path}" in panel.table.value and not path.exists()
    Store(path).add(result)
    panel.refresh()
    assert "No runs yet" not in panel.table.value and "tiny" in panel.table.value
