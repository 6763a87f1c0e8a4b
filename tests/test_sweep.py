"""`workbench sweep`: the grid, validation before running, files = flags, skip and resume (also after SIGKILL
and Ctrl-C), a failing cell, a stop request, and isolated runs in child processes."""

from __future__ import annotations

import itertools
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from workbench.cli import main
from workbench.config import RunConfig
from workbench.events import MetricEvent, StageEvent, TokenEvent
from workbench.result import LatencyStats, RunResult
from workbench.store import Store, config_hash
from workbench.sweep import SweepEvent, SweepSpec, run_sweep

FAST = {"model": "tiny", "warmup": 0, "repeats": 1, "min_duration_s": 0.0, "max_new_tokens": 4, "eval_tokens": 0,
        "eval_context": 64, "threads": 1}
FAST_FLAGS = [arg for k, v in FAST.items() for arg in ("--set", f"{k}={json.dumps(v) if k != 'model' else v}")]


def store_rows(path: Path) -> list[dict]:
    """Every stored row, oldest first."""
    with sqlite3.connect(path) as conn:
        conn.row_factory = sqlite3.Row
        return [dict(r) for r in conn.execute("SELECT * FROM runs ORDER BY id")]


def ok_count(path: Path) -> int:
    try:
        with sqlite3.connect(path, timeout=5) as conn:
            return conn.execute("SELECT count(*) FROM runs WHERE status='ok'").fetchone()[0]
    except sqlite3.OperationalError:  # not created yet
        return 0


def test_the_grid_is_the_product_in_order_with_stable_hashes():
    techniques = ("none", "sim:bits=4", ["magnitude:sparsity=0.5", "sim:bits=8"])
    spec = SweepSpec(dict(FAST, min_duration_s=0), (("dtype", ("fp32", "bf16")), ("techniques", techniques),
                                                    ("max_new_tokens", (2, 3))))
    configs = spec.configs()
    expected = [RunConfig(**{**FAST, "dtype": d, "techniques": () if t == "none" else t, "max_new_tokens": n})
                for d, t, n in itertools.product(("fp32", "bf16"), techniques, (2, 3))]
    assert len(configs) == 12 and configs == expected
    # the same hash as `workbench run` gives the same settings (min_duration_s 0 -> 0.0, specs canonical)
    assert [config_hash(c) for c in configs] == [config_hash(c) for c in expected]
    assert spec.label(configs[-1]) == "tiny bf16 magnitude:sparsity=0.5 + sim:bits=8 max_new_tokens=3"
    assert SweepSpec.from_dict(spec.to_dict()).configs() == configs
    from workbench.cli import build_parser
    from workbench.flags import config_from_args

    args = build_parser().parse_args([
        "run", "--model", "tiny", "--warmup", "0", "--repeats", "1", "--min-duration-s", "0", "--max-new-tokens", "3",
        "--eval-tokens", "0", "--eval-context", "64", "--threads", "1", "--dtype", "bf16", "--prune", "magnitude",
        "--quant", "sim:bits=8,symmetric=true"])
    assert config_hash(config_from_args(args)) == config_hash(configs[-1])  # a sweep resumes `workbench run`s


def test_yaml_json_and_flags_give_the_same_configs(tmp_path):
    (tmp_path / "grid.yaml").write_text(
        "base:\n  model: tiny\n  warmup: 0\n  min_duration_s: 0\n"
        "grid:\n  techniques:\n    - none\n    - sim:bits=4,granularity=per-group\n"
        "    - magnitude:sparsity=0.5+dynamic-int8\n    - '2:4'\n  max_new_tokens: [4, 8]\n")
    (tmp_path / "grid.json").write_text(json.dumps({
        "base": {"model": "tiny", "warmup": 0, "min_duration_s": 0.0},
        "grid": {"techniques": [[], "sim:bits=4,granularity=per-group", ["magnitude:sparsity=0.5", "dynamic-int8"],
                                "2:4"], "max_new_tokens": [4, 8]}}))
    from_yaml = SweepSpec.from_file(tmp_path / "grid.yaml").configs()
    from_json = SweepSpec.from_file(tmp_path / "grid.json").configs()
    from_flags = SweepSpec.from_sources(None, ["model=tiny", "warmup=0", "min_duration_s=0"], [
        "techniques=none|sim:bits=4,granularity=per-group|magnitude:sparsity=0.5+dynamic-int8|2:4",
        "max_new_tokens=4|8"]).configs()
    assert len(from_yaml) == 8 and from_yaml == from_json == from_flags
    assert from_yaml[5].techniques == RunConfig(techniques=("magnitude:sparsity=0.5", "dynamic-int8")).techniques
    # flags override the file: --set pins an axis, --axis replaces one
    pinned = SweepSpec.from_sources(tmp_path / "grid.yaml", ["max_new_tokens=16"], ["techniques=none|2:4"]).configs()
    assert [(c.max_new_tokens, len(c.techniques)) for c in pinned] == [(16, 0), (16, 1)]


@pytest.mark.parametrize("args, message", [
    (["--axis", "dtype=fp32|bf16", "--axis", "techniques=none|dynamic-int8"],
     "grid cell 4 (dtype=bf16, techniques=dynamic-int8): dynamic-int8:"),
    (["--axis", "max_new_tokens=4|0"], "grid cell 2 (max_new_tokens=0): max_new_tokens must be in 1..32768; got 0"),
    (["--axis", "colour=red|blue"], "unknown setting 'colour'; known: model, dtype,"),
    (["--axis", "techniques=sim:bits=4|sim:bits=4,symmetric=true"], "grid cells 1 and 2"),
    (["--set", "dtype=fp32"], "the grid is empty"),
    (["--axis", "dtype"], "--axis takes KEY=VALUE; got 'dtype'"),
    (["missing.yaml"], "cannot read sweep file 'missing.yaml'"),
    (["unquoted.yaml"], "must be a spec such as 'sim:bits=4'"),
])
def test_bad_grids_fail_in_one_sentence_before_anything_runs(args, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "unquoted.yaml").write_text("grid:\n  techniques: [none, 2:4]\n")  # YAML reads 2:4 as 124
    import workbench.runner

    monkeypatch.setattr(workbench.runner, "run", lambda *a, **k: pytest.fail("a run started"))
    assert main(["sweep", *args, "--store", "r.sqlite"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("workbench sweep: error: ") and message in err, err
    assert not (tmp_path / "r.sqlite").exists()  # nothing stored, not even an empty store


def test_a_rerun_skips_stored_runs_and_dry_run_lists_them(store_path, capsys):
    grid = ["--axis", "dtype=fp32|bf16", "--store", str(store_path)]
    assert main(["sweep", *FAST_FLAGS, *grid]) == 0
    out, err = capsys.readouterr()
    assert "[1/2] ok run 1: tiny fp32 none — decode " in err and "[2/2] ok run 2: tiny bf16 none" in err
    assert "2 configurations: 2 ran ok, 0 already stored, 0 failed" in out and "decode tok/s" in out

    grid[1] = "dtype=fp32|fp16|bf16"
    assert main(["sweep", *FAST_FLAGS, *grid, "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[:2] for line in lines[2:5]] == [["1", "stored"], ["2", "to"], ["3", "stored"]]
    assert "3 configurations: 2 already stored, 1 to run" in lines[-1] and "nothing was run" in lines[-1]
    assert main(["sweep", *FAST_FLAGS, *grid, "--dry-run", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [c["stored"] for c in listed["configs"]] == [True, False, True] and listed["to_run"] == 1
    assert len(store_rows(store_path)) == 2  # a dry run runs nothing

    assert main(["sweep", *FAST_FLAGS, *grid, "--json"]) == 0
    out, err = capsys.readouterr()
    report = json.loads(out)
    assert (report["total"], report["skipped"], report["done"], report["run_ids"]) == (3, 2, 1, [3])
    assert [(r["status"], r["run_id"]) for r in report["runs"]] == [("skipped", 1), ("ok", 3), ("skipped", 2)]
    assert "[1/3] skipped: tiny fp32 none — already stored" in err
    assert [r["dtype"] for r in store_rows(store_path)] == ["fp32", "bf16", "fp16"]


def test_a_failing_cell_is_stored_as_an_error_and_the_sweep_goes_on(store_path, tmp_path):
    missing = str(tmp_path / "no-such-model")
    spec = SweepSpec(FAST, (("model", (missing, "tiny")),))
    seen: list[SweepEvent] = []
    report = run_sweep(spec, Store(store_path), lambda e: seen.append(e) if isinstance(e, SweepEvent) else None)
    assert (report.failed, report.done, report.pending, report.stopped) == (1, 1, 0, False)
    rows = store_rows(store_path)
    assert [r["status"] for r in rows] == ["error", "ok"]
    assert rows[0]["error"].startswith("no model folder at") and rows[0]["result_json"] is None
    assert [(e.index, e.status) for e in seen] == [(1, "start"), (1, "error"), (2, "start"), (2, "ok")]
    assert seen[1].message == rows[0]["error"] and seen[1].run_id == rows[0]["id"]
    again = run_sweep(spec, Store(store_path))  # a failed configuration is tried again, the ok one skipped
    assert (again.failed, again.skipped, again.done) == (1, 1, 0)


def _stop_after_tokens(index: int, tokens: int):
    """(on_event, should_stop): ask to stop once configuration `index` has generated `tokens` tokens."""
    state = {"config": 0, "tokens": 0}

    def on_event(event):
        if isinstance(event, SweepEvent) and event.status == "start":
            state["config"] = event.index
        elif isinstance(event, TokenEvent) and state["config"] == index:
            state["tokens"] += 1
    return on_event, lambda: state["tokens"] >= tokens


def test_a_stop_stores_the_partial_run_and_a_resume_completes_it(store_path):
    spec = SweepSpec(dict(FAST, max_new_tokens=24), (("techniques", ("none", "sim:bits=8", "sim:bits=4")),))
    on_event, should_stop = _stop_after_tokens(2, 3)
    report = run_sweep(spec, Store(store_path), on_event, should_stop)
    assert report.stopped and (report.done, report.pending) == (1, 2)
    assert [e.status for e in report.outcomes] == ["ok", "stopped"]
    rows = store_rows(store_path)
    assert [r["status"] for r in rows] == ["ok", "stopped"]
    partial = RunResult.from_dict(json.loads(rows[1]["result_json"]))
    assert partial.status == "stopped" and partial.latency is not None
    assert len(partial.latency.samples[-1].token_ms) <= 4  # stopped within one token of the request

    resumed = run_sweep(spec, Store(store_path))
    assert (resumed.skipped, resumed.done, resumed.stopped) == (1, 2, False)
    ok = [r["config_hash"] for r in store_rows(store_path) if r["status"] == "ok"]
    assert sorted(ok) == sorted(config_hash(c) for c in spec.configs())  # exactly one ok row per config


def _sweep_process(args: list[str], tmp_path: Path, name: str) -> tuple[subprocess.Popen, Path, Path]:
    out, err = tmp_path / f"{name}.out", tmp_path / f"{name}.err"
    with open(out, "w") as o, open(err, "w") as e:
        proc = subprocess.Popen([sys.executable, "-m", "workbench", "sweep", *args], stdout=o, stderr=e)
    return proc, out, err


def _wait_for_ok_rows(proc: subprocess.Popen, path: Path, count: int) -> int:
    deadline = time.monotonic() + 240
    while (n := ok_count(path)) < count:
        assert proc.poll() is None, "the sweep ended before it was interrupted"
        assert time.monotonic() < deadline
        time.sleep(0.02)
    return n


def check_store_intact(path: Path) -> None:
    """SQLite's own check, and every row complete: settings, hash, and a full result unless it failed."""
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    for row in store_rows(path):
        config = RunConfig.from_json(row["config_json"])
        assert row["config_hash"] == config_hash(config) and row["status"] in ("ok", "stopped")
        result = RunResult.from_dict(json.loads(row["result_json"]))
        assert result.status == row["status"] and result.config == config
        if row["status"] == "ok":
            assert row["decode_tokens_per_s"] and result.latency.repeats >= 1


def test_resume_after_sigkill_and_ctrl_c_runs_only_the_missing_configs(tmp_path):
    path = tmp_path / "r.sqlite"
    sets = [f"{k}={json.dumps(v) if k != 'model' else v}" for k, v in dict(FAST, min_duration_s=0.3).items()]
    axes = ["dtype=fp32|bf16", "techniques=none|sim:bits=8|magnitude:sparsity=0.5"]
    args = [*(a for s in sets for a in ("--set", s)), *(a for x in axes for a in ("--axis", x)), "--store", str(path)]
    proc, _, _ = _sweep_process(args, tmp_path, "killed")
    _wait_for_ok_rows(proc, path, 2)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    check_store_intact(path)
    after_kill = ok_count(path)
    assert 2 <= after_kill < 6

    proc, _, err = _sweep_process(args, tmp_path, "interrupted")  # Ctrl-C once: stop and end the sweep
    _wait_for_ok_rows(proc, path, after_kill + 1)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=120) == 130, err.read_text()
    assert "stopping after the current token" in err.read_text()
    check_store_intact(path)
    before = ok_count(path)
    assert before < 6

    proc, out, err = _sweep_process([*args, "--json"], tmp_path, "resumed")
    assert proc.wait(timeout=240) == 0, err.read_text()
    report = json.loads(out.read_text())
    assert (report["skipped"], report["done"], report["failed"]) == (before, 6 - before, 0)
    check_store_intact(path)
    spec = SweepSpec.from_sources(None, sets, axes)
    ok = [r["config_hash"] for r in store_rows(path) if r["status"] == "ok"]
    assert sorted(ok) == sorted(config_hash(c) for c in spec.configs())  # exactly one ok row per config


def test_isolate_runs_each_config_in_a_child_process(store_path, tmp_path, monkeypatch, capsys):
    import workbench.runner

    monkeypatch.setattr(workbench.runner, "run", lambda *a, **k: pytest.fail("a run happened in the parent"))
    missing = str(tmp_path / "no-such-model")
    assert main(["sweep", *FAST_FLAGS, "--axis", f"model={missing}|tiny", "--isolate", "--json",
                 "--store", str(store_path)]) == 1  # 1: a configuration failed
    out, err = capsys.readouterr()
    runs = json.loads(out)["runs"]
    rows = store_rows(store_path)
    assert [r["status"] for r in runs] == [r["status"] for r in rows] == ["error", "ok"]
    assert runs[0]["error"] == rows[0]["error"] and rows[0]["error"].startswith("no model folder at")
    assert f"[1/2] error run 1: {missing} fp32 none — no model folder at" in err  # the child's sentence
    pids = {r["pid"] for r in runs}
    assert len(pids) == 2 and os.getpid() not in pids  # two fresh processes, neither of them this one

    # a stop request reaches the child, which stores the partial run; the child's events are relayed
    spec = SweepSpec(dict(FAST, max_new_tokens=24, repeats=200, min_duration_s=30.0),
                     (("techniques", ("sim:bits=8",)),))
    on_event, should_stop = _stop_after_tokens(1, 3)  # long runs: the stop, not the end, must finish it
    seen = []
    report = run_sweep(spec, Store(store_path), lambda e: (seen.append(e), on_event(e)), should_stop, isolate=True)
    assert report.stopped and [e.status for e in report.outcomes] == ["stopped"]
    assert store_rows(store_path)[-1]["status"] == "stopped"
    assert any(isinstance(e, StageEvent) and e.stage == "load" for e in seen)
    assert any(isinstance(e, MetricEvent) and isinstance(e.value, LatencyStats) for e in seen)
