"""Trackers (one per metric), the energy tracker, engines, and what a result section reaches on its own."""

from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
import time
from dataclasses import dataclass

import pytest
import torch

from workbench.analysis import METRICS
from workbench.config import RunConfig
from workbench.engines.base import engine_class, engines
from workbench.errors import ConfigError
from workbench.measure import tracker
from workbench.measure.trackers import energy
from workbench.report import format_result, format_summaries
from workbench.result import RunResult
from workbench.runner import run
from workbench.store import Store


def fake_rapl(root, uj: int = 1_000, max_uj: int = 2**32) -> None:
    """A powercap tree with one package domain and one sub-domain (which must not count)."""
    for name, label in (("intel-rapl:0", "package-0"), ("intel-rapl:0:0", "core")):
        domain = root / name
        domain.mkdir(parents=True)
        (domain / "name").write_text(label + "\n")
        (domain / "energy_uj").write_text(f"{uj}\n")
        (domain / "max_energy_range_uj").write_text(f"{max_uj}\n")


@contextlib.contextmanager
def ticking(path, uj_per_tick: int = 5_000):
    """Raise a counter file every millisecond while the block runs (a CPU drawing energy)."""
    done = threading.Event()

    def tick() -> None:
        while not done.wait(0.001):
            spare = path.with_suffix(".next")
            spare.write_text(f"{int(path.read_text()) + uj_per_tick}\n")
            spare.replace(path)  # atomic, as the kernel's counter is
    thread = threading.Thread(target=tick, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


def test_every_section_is_a_top_level_json_key_and_round_trips(fast):
    r = run(fast(eval_tokens=0))
    data = json.loads(r.to_json())
    assert list(tracker.sections()) == ["latency", "memory", "accuracy", "roofline", "energy", "pipeline",
                                       "speculative", "kv_quant"]
    assert set(tracker.sections()) <= set(data) and "sections" not in data
    assert data["config"]["engine"] == "hf" and data["accuracy"] is None
    assert RunResult.from_dict(data) == r
    assert r.latency is r.sections["latency"] and r.latency.decode_tokens_per_s > 0


def test_a_result_stored_before_a_tracker_existed_still_loads():
    r = RunResult(RunConfig(), None, techniques=(), env=None)
    data = r.to_dict()
    del data["energy"]  # what the workbench wrote before the energy tracker
    loaded = RunResult.from_dict(data)
    assert loaded.energy is None and loaded == r


def test_without_an_energy_counter_energy_is_null_with_a_warning(fast, tmp_path, monkeypatch):
    monkeypatch.setattr(energy, "POWERCAP", tmp_path / "no-powercap")
    r = run(fast(eval_tokens=0))
    assert r.energy is None and r.to_dict()["energy"] is None
    assert any(w.startswith("no energy counter is readable on this machine: no RAPL package domain") for w in
               r.warnings), r.warnings


def test_rapl_energy_per_token_over_the_timed_calls(fast, tmp_path, monkeypatch):
    root = tmp_path / "powercap"
    fake_rapl(root)
    monkeypatch.setattr(energy, "POWERCAP", root)
    with ticking(root / "intel-rapl:0" / "energy_uj"):
        r = run(fast(eval_tokens=0, repeats=3, batch_size=2))
    e = r.energy
    assert e.tokens == 2 * 6 * r.latency.repeats  # batch x new tokens x timed calls
    assert e.joules > 0 and e.joules_per_token == pytest.approx(e.joules / e.tokens)
    assert e.average_power_w == pytest.approx(e.joules / e.seconds) and e.scope == "package"
    assert e.method.startswith("Linux RAPL energy counters (package-0)")
    assert not any("energy" in w for w in r.warnings)
    assert "J/token" in format_result(r) and "energy per token" == METRICS["joules_per_token"].label


def test_rapl_counters_that_wrap_or_are_root_only(tmp_path, monkeypatch):
    root = tmp_path / "powercap"
    fake_rapl(root, uj=900, max_uj=1_000)
    monkeypatch.setattr(energy, "POWERCAP", root)
    read, _ = energy.rapl_counter()
    start = read()
    (root / "intel-rapl:0" / "energy_uj").write_text("100\n")  # wrapped past 1000 uJ: 200 uJ later
    assert read() - start == pytest.approx(200e-6)
    (root / "intel-rapl:0" / "energy_uj").chmod(0)
    monkeypatch.setattr(energy.Path, "read_text", _denied, raising=True)
    read, why = energy.rapl_counter()
    assert read is None and "readable by root only" in why


def _denied(self, *args, **kwargs):
    raise PermissionError(13, "Permission denied")


def test_energy_of_ranks_combines_by_counter_scope():
    def stats(joules: float, tokens: int, scope: str) -> energy.EnergyStats:
        return energy.EnergyStats(joules / tokens, joules / 2.0, "m", joules, tokens, 2.0, scope)

    gpus = energy.EnergyTracker.merge([stats(10.0, 100, "device"), stats(30.0, 100, "device")], "data")
    assert gpus.joules == 40.0 and gpus.joules_per_token == pytest.approx(0.2)  # two boards: their sum
    cpu = energy.EnergyTracker.merge([stats(10.0, 100, "package"), stats(10.0, 100, "package")], "data")
    assert cpu.joules == 10.0 and cpu.joules_per_token == pytest.approx(0.05)  # one package read twice
    assert energy.EnergyTracker.merge([stats(1.0, 1, "package"), None], "data") is None


@dataclass(frozen=True)
class Probe:
    """A section of a tracker registered by this test only."""

    phases: tuple[str, ...]
    tokens: int


def test_a_new_tracker_is_one_class(fast, tmp_path, monkeypatch):
    """Registered, it wraps the phases, and its section reaches the JSON, the report, the store and the merge."""
    class ProbeTracker(tracker.Tracker):
        section, stats, ready_after, order = "probe", Probe, "evaluate", 99
        axes = (tracker.Axis("probe_tokens", "probe tokens", "", "higher", lambda s: s.tokens),)
        columns = (tracker.Column("probe_tokens", "INTEGER", lambda s: s.tokens, "probe", str),)

        def __init__(self, run) -> None:
            super().__init__(run)
            self.seen: list[str] = []

        @contextlib.contextmanager
        def _note(self, phase):
            self.seen.append(phase)
            yield

        def around(self, phase):
            return self._note(phase)

        def finish(self):
            return Probe(tuple(self.seen), sum(len(t.token_ms) for t in self.run.calls.samples))

        @classmethod
        def rows(cls, stats):
            return [("probe", f"{stats.tokens} tokens")]

    Store(tmp_path / "old.sqlite").add(run(fast(eval_tokens=0)))  # a store made before the tracker existed
    monkeypatch.setitem(tracker.REGISTRY, "probe", ProbeTracker)
    r = run(fast(eval_tokens=0))
    assert r.probe == Probe(("load", "run", "measure", "evaluate"), 6 * r.latency.repeats)
    assert json.loads(r.to_json())["probe"]["tokens"] == r.probe.tokens
    assert "probe" in format_result(r) and RunResult.from_dict(json.loads(r.to_json())).probe == r.probe
    store = Store(tmp_path / "old.sqlite")  # opened by a workbench that has the tracker: gains its column
    store.add(r)
    rows = store.summaries()
    assert [row["probe_tokens"] for row in rows] == [r.probe.tokens, None]
    assert "probe" in format_summaries(rows).splitlines()[0]


def test_the_store_gains_the_engine_column_and_lists_old_rows_as_hf(fast, tmp_path):
    path = tmp_path / "old.sqlite"
    with sqlite3.connect(path) as conn:  # the runs table as the first wave created it
        conn.executescript("""CREATE TABLE runs (id INTEGER PRIMARY KEY AUTOINCREMENT, created_at TEXT NOT NULL,
            status TEXT NOT NULL, model TEXT NOT NULL, dtype TEXT NOT NULL, device TEXT, techniques TEXT NOT NULL,
            config_hash TEXT NOT NULL, decode_tokens_per_s REAL, ttft_ms_p50 REAL, e2e_ms_p50 REAL,
            weights_bytes INTEGER, peak_host_bytes INTEGER, perplexity REAL, kl_vs_baseline REAL, error TEXT,
            config_json TEXT NOT NULL, result_json TEXT);
            INSERT INTO runs (created_at, status, model, dtype, techniques, config_hash, error, config_json)
            VALUES ('2026-11-01T00:00:00', 'error', 'tiny', 'fp32', '', 'x', 'boom', '{}');""")
    store = Store(path)
    store.add(run(fast(eval_tokens=0)))
    rows = store.summaries()
    assert [r["engine"] for r in rows] == ["hf", None] and rows[0]["joules_per_token"] is None
    listing = format_summaries(rows)
    assert "engine" in listing.splitlines()[0].split() and all(" hf " in line for line in listing.splitlines()[2:])


def test_engines_are_a_registry_and_an_unknown_one_is_refused():
    assert "hf" in engines() and engine_class("hf").name == "hf"
    with pytest.raises(ConfigError, match=r"unknown engine 'vllm'; known: hf, llamacpp"):
        engine_class("vllm")
    with pytest.raises(ValueError, match="engine"):
        RunConfig(engine="vllm")
    assert "hf engine" in format_result(RunResult(RunConfig(), None, techniques=(), env=None))


def test_the_token_clock_does_not_depend_on_the_engine(fast, monkeypatch):
    """The runner times whatever an engine reports to the clock: a fake engine's tokens are timed the same way."""
    from workbench.engines.base import Generation
    from workbench.engines.hf import HFEngine

    seen = []

    def generate(self, clock, *, want_cache, interruptible):
        clock.begin()
        clock.put(torch.tensor(self.prompt_ids))  # the prompt first, as transformers' generate does
        for step in range(self.ctx.config.max_new_tokens):
            time.sleep(0.001)
            clock.put(torch.tensor([7 + step]))
        seen.append(len(clock.tokens))
        return Generation(clock.timing(time.perf_counter()), [list(r) for r in zip(*clock.tokens)], 1024)

    monkeypatch.setattr(HFEngine, "generate", generate)
    r = run(fast(eval_tokens=0, max_new_tokens=4))
    assert seen and set(seen) == {4} and r.latency.new_tokens == 4 and r.memory.kv_cache_bytes == 1024
    assert all(len(s.token_ms) == 4 for s in r.latency.samples)


def test_an_engine_refuses_a_technique_it_cannot_apply_before_loading(fast, monkeypatch, capsys):
    from workbench.cli import main
    from workbench.engines.hf import HFEngine

    monkeypatch.setattr(HFEngine, "can_apply", classmethod(
        lambda cls, name: "no such kernel here" if name == "sim" else None))
    monkeypatch.setattr(HFEngine, "load", lambda self: pytest.fail("weights were loaded"))
    with pytest.raises(ConfigError, match=r"^the hf engine cannot apply sim: no such kernel here$"):
        run(fast(techniques=("sim:bits=4",)))
    assert main(["techniques", "--engine", "hf", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["sim"]["available"] is False and rows["sim"]["reason"] == "no such kernel here"
    assert rows["magnitude"]["engine"] == "hf" and rows["magnitude"]["available"] is True


def test_adding_the_engine_field_kept_the_hashes_of_stored_runs():
    """A sweep resumed over a store written before `engine` existed still finds its runs."""
    import hashlib

    from workbench.store import config_hash

    config = RunConfig(model="tiny", techniques=("sim:bits=4",), max_new_tokens=7)
    before = {k: v for k, v in config.to_dict().items() if k != "engine"}  # what the first wave hashed
    assert config_hash(config) == hashlib.sha256(json.dumps(before, sort_keys=True).encode()).hexdigest()[:20]
