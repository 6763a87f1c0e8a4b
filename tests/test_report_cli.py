"""`workbench report RUN_ID... --out FILE.html [--store PATH]`: an offline HTML comparison of stored runs."""

from __future__ import annotations

import json
import re

import pytest

pytest.importorskip("ipywidgets", reason="the app extra is not installed (pip install -e '.[dev]')")

from test_app import fake_result  # noqa: E402
from workbench.cli import main  # noqa: E402
from workbench.config import RunConfig  # noqa: E402
from widgets.report_html import parse_run_ids  # noqa: E402
from workbench.store import Store  # noqa: E402


@pytest.fixture
def stored(store_path):
    """Two stored runs that differ in dtype and speed (fp32: 250 decode tokens/s; bf16: 125), and a failed one."""
    store = Store(store_path)
    a = store.add(fake_result(RunConfig(model="tiny")))
    b = store.add(fake_result(RunConfig(model="tiny", dtype="bf16"), scale=2.0))
    failed = store.add_error(RunConfig(model="tiny", batch_size=4), "out of memory while loading")
    return store_path, a, b, failed


def _plotly_data(text: str) -> list[list[dict]]:
    """The traces of every figure in the page (plotly.io.to_html's `Plotly.newPlot(id, data, layout, config)`)."""
    found = []
    for call in re.findall(r"Plotly\.newPlot\(\s*\"[^\"]+\",\s*(\[.*?\]),\s*\{", text, flags=re.S):
        found.append(json.loads(call))
    return found


def test_report_compares_the_runs_offline(stored, tmp_path, capsys):
    path, a, b, _ = stored
    out = tmp_path / "report.html"
    assert main(["report", str(a), str(b), "--out", str(out), "--store", str(path)]) == 0
    assert str(out) in capsys.readouterr().out
    text = out.read_text()
    assert not re.search(r"<script[^>]+src=[\"']?https?:", text)  # plotly.js inlined, no CDN
    assert len(re.findall(r"\* plotly\.js v\d", text)) == 1  # the whole library, inlined once for every figure
    for run_id in (a, b):
        assert f"<td>{run_id}</td>" in text and f"run {run_id}" in text
    for section in ("Settings", "Latency", "Memory", "Accuracy", "Roofline", "Warnings"):
        assert f"<h2>{section}</h2>" in text
    assert re.search(r"<tr class=differs><td>dtype</td><td>fp32</td><td>bf16</td></tr>", text)
    assert "<tr><td>model</td><td>tiny</td><td>tiny</td></tr>" in text  # same setting: not marked
    figures = _plotly_data(text)
    assert len(figures) == 4  # latency, memory, accuracy, roofline (the fake runs measured no energy)
    decode = next(t for fig in figures for t in fig if t["name"] == "decode")
    assert decode["x"] == [f"run {a}", f"run {b}"] and decode["y"] == [250.0, 125.0]
    bound = next(t for fig in figures for t in fig if t["name"] == "decode bound")
    assert bound["y"] == [600.0, 600.0]


def test_report_shows_each_runs_warnings(store_path, tmp_path):
    from dataclasses import replace

    store = Store(store_path)
    run_id = store.add(replace(fake_result(RunConfig(model="tiny")), warnings=("CV 35% > 10%: noisy machine",)))
    out = tmp_path / "r.html"
    assert main(["report", str(run_id), "--out", str(out), "--store", str(store_path)]) == 0
    assert f"<li><b>run {run_id}</b>: CV 35% &gt; 10%: noisy machine</li>" in out.read_text()


def test_unknown_run_id_lists_known_ones(stored, tmp_path, capsys):
    path, a, b, failed = stored
    assert main(["report", str(a), "99", "--out", str(tmp_path / "r.html"), "--store", str(path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: no run 99 in") and f"known runs are {failed}, {b}, {a}" in err
    assert err.count("\n") == 1 and not (tmp_path / "r.html").exists()


def test_a_failed_run_has_nothing_to_compare(stored, tmp_path, capsys):
    path, _, _, failed = stored
    assert main(["report", str(failed), "--out", str(tmp_path / "r.html"), "--store", str(path)]) == 1
    assert f"run {failed} failed (out of memory while loading)" in capsys.readouterr().err


@pytest.mark.parametrize("args, says", [
    ([], "no run ids given"),
    (["abc"], "run id 'abc' is not a number"),
])
def test_bad_run_ids(stored, tmp_path, capsys, args, says):
    path = stored[0]
    assert main(["report", *args, "--out", str(tmp_path / "r.html"), "--store", str(path)]) == 1
    assert says in capsys.readouterr().err


@pytest.mark.parametrize("out, says", [
    ("report.pdf", "the file name must end in .html"),
    ("missing-folder/report.html", "does not exist"),
])
def test_bad_out_paths(stored, tmp_path, capsys, out, says):
    path, a, _, _ = stored
    assert main(["report", str(a), "--out", str(tmp_path / out), "--store", str(path)]) == 1
    err = capsys.readouterr().err
    assert says in err and "Traceback" not in err


def test_out_is_required(capsys):
    with pytest.raises(SystemExit) as e:
        main(["report", "1"])
    assert e.value.code == 2 and "--out" in capsys.readouterr().err


def test_missing_store_is_one_sentence(tmp_path, capsys):
    assert main(["report", "1", "--out", str(tmp_path / "r.html"), "--store", str(tmp_path / "none.sqlite")]) == 1
    assert "it has no runs yet" in capsys.readouterr().err


def test_run_ids_as_results_lists_them():
    assert parse_run_ids(["3", "#7", 3]) == [3, 7]
