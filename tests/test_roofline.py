"""The roofline's bandwidth probe: best of several methods, beyond the caches, never trusted on a busy machine."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import workbench.measure.roofline as rl
from workbench.measure import probes
from workbench.measure.flops import Peak
from workbench.config import RunConfig
from workbench.measure import tracker
from workbench.result import RooflineStats, RunResult
from workbench.serde import from_dict

CPU = torch.device("cpu")
MiB = 2**20
# through the registry: importing one tracker module first would leave the others unregistered
RooflineTracker = {t.section: t for t in tracker.trackers()}["roofline"]


class Machine:
    """Scripted methods and load: each probe's methods return `values`, other processes use `others` CPUs."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, values: dict[str, float]) -> None:
        self.values, self.others, self.calls, self.buffers = dict(values), 0.0, 0, []
        self.clock = 0.0
        monkeypatch.setattr(rl, "MIN_BUFFER_BYTES", MiB)
        monkeypatch.setattr(rl, "last_level_cache_bytes", lambda: 0)
        monkeypatch.setattr(rl, "_available_bytes", lambda: None)
        monkeypatch.setattr(rl, "CPU_METHODS", {name: self._method(name) for name in values})
        monkeypatch.setattr(probes, "cpu_times", self._cpu_times)
        monkeypatch.setattr(rl.os, "cpu_count", lambda: 2)

    def _method(self, name: str):
        def measure(x: torch.Tensor, y: torch.Tensor, repeats: int) -> float:
            self.calls += 1
            self.buffers.append(x.numel() * x.element_size())
            return self.values[name]
        return measure

    def _cpu_times(self) -> tuple[float, float, float]:
        """Every call is one second later; other processes used `others` CPU seconds of it, this one 1.0."""
        self.clock += 1.0
        return self.clock * (1.0 + self.others), self.clock, self.clock


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("WORKBENCH_CACHE_DIR", str(tmp_path))
    return tmp_path / "bandwidth.json"


def _entry(cache: Path) -> dict:
    (entry,) = json.loads(cache.read_text()).values()
    return entry


def _age(cache: Path, seconds: float) -> None:
    data = json.loads(cache.read_text())
    for entry in data.values():
        entry["measured_at"] -= seconds
    cache.write_text(json.dumps(data))


def test_the_best_method_wins_and_is_named(cache, monkeypatch):
    m = Machine(monkeypatch, {"fp32 sum": 20e9, "copy (read + write)": 23e9, "fp32 GEMV (torch.mv)": 28e9})
    bw = rl.probe_bandwidth(CPU)
    assert (bw.bytes_per_s, bw.method, bw.uncertain, bw.probes) == (28e9, "fp32 GEMV (torch.mv)", False, 1)
    assert "from the fp32 GEMV (torch.mv)" in bw.explanation and "1 calm probe" in bw.explanation
    assert "fp32 sum, copy (read + write) and fp32 GEMV (torch.mv)" in bw.explanation
    assert m.calls == 3 and _entry(cache)["method"] == "fp32 GEMV (torch.mv)"
    m.values["fp32 sum"] = 99e9  # a calm value within a day is served from the cache: nothing probed
    assert rl.probe_bandwidth(CPU).bytes_per_s == 28e9 and m.calls == 3


def test_a_busy_probe_is_uncertain_and_probed_again_next_call(cache, monkeypatch):
    m = Machine(monkeypatch, {"fp32 sum": 4.7e9})
    m.others = 1.5
    bw = rl.probe_bandwidth(CPU)
    assert bw.uncertain and bw.bytes_per_s == 4.7e9
    assert "Uncertain: other processes used 1.5 of 2 CPUs during the probe" in bw.explanation
    assert _entry(cache)["uncertain"] is True
    m.others, m.values["fp32 sum"] = 0.0, 22.4e9
    again = rl.probe_bandwidth(CPU)
    assert m.calls == 2 and not again.uncertain and again.bytes_per_s == 22.4e9
    assert _entry(cache)["uncertain"] is False and "Uncertain" not in again.explanation


def test_a_busy_probe_is_not_trusted_over_a_calm_cached_one(cache, monkeypatch):
    m = Machine(monkeypatch, {"fp32 sum": 22e9})
    rl.probe_bandwidth(CPU)
    m.others, m.values["fp32 sum"] = 1.0, 30e9  # even a higher busy value does not replace a calm one
    bw = rl.probe_bandwidth(CPU, refresh=True)
    assert m.calls == 2 and (bw.bytes_per_s, bw.uncertain) == (22e9, False)
    assert "A newer probe was not trusted over it: other processes used 1.0 of 2 CPUs" in bw.explanation
    _age(cache, probes.REMEASURE_AFTER_S + 1)  # a day old: probed again, still busy, the old calm value is kept ...
    m.values["fp32 sum"] = 4e9
    assert rl.probe_bandwidth(CPU).bytes_per_s == 22e9 and m.calls == 3
    m.others, m.values["fp32 sum"] = 0.0, 20e9  # ... and, still a day old, probed on the next call too
    bw = rl.probe_bandwidth(CPU)
    assert m.calls == 4 and (bw.bytes_per_s, bw.probes, bw.uncertain) == (20e9, 1, False)


def test_busy_probes_keep_their_best_until_a_calm_one_arrives(cache, monkeypatch):
    m = Machine(monkeypatch, {"fp32 sum": 5e9})
    m.others = 2.0
    rl.probe_bandwidth(CPU)
    m.values["fp32 sum"] = 3e9
    bw = rl.probe_bandwidth(CPU, refresh=True)
    assert (bw.bytes_per_s, bw.probes, bw.uncertain) == (5e9, 2, True) and "2 busy probe(s)" in bw.explanation


def test_while_the_machine_stays_busy_an_uncertain_probe_is_served_until_ten_minutes_have_passed(cache, monkeypatch):
    """A probe on a busy machine reads too low and lengthens every run: a later call probes again when the load
    has dropped, and while it has not, only RETRY_BUSY_AFTER_S after the last probe."""
    monkeypatch.setattr(probes, "LOAD_SAMPLE_S", 0.0)
    m = Machine(monkeypatch, {"fp32 sum": 5e9})
    m.others = 1.6
    rl.probe_bandwidth(CPU)
    written = cache.read_text()
    bw = rl.probe_bandwidth(CPU)  # still busy: served, not probed, the cache file untouched
    assert m.calls == 1 and (bw.bytes_per_s, bw.probes, bw.uncertain) == (5e9, 1, True)
    assert "Not probed again for this run: other processes used 1.6 of 2 CPUs just now, 0 s after the last probe" \
        in bw.explanation and "10 minutes after the last probe" in bw.explanation
    assert cache.read_text() == written
    _age(cache, probes.RETRY_BUSY_AFTER_S - 60)  # probed_at is not aged: still within ten minutes of it
    rl.probe_bandwidth(CPU)
    assert m.calls == 1
    data = json.loads(cache.read_text())
    for entry in data.values():
        entry["probed_at"] -= probes.RETRY_BUSY_AFTER_S + 1
    cache.write_text(json.dumps(data))
    m.values["fp32 sum"] = 6e9
    bw = rl.probe_bandwidth(CPU)  # ten minutes on, probed even though busy: the better busy value is kept
    assert m.calls == 2 and (bw.bytes_per_s, bw.probes, bw.uncertain) == (6e9, 2, True)
    assert "Not probed again" not in bw.explanation
    m.others, m.values["fp32 sum"] = 0.0, 22e9
    bw = rl.probe_bandwidth(CPU)  # calm again: probed at once, and the calm value replaces the busy ones
    assert m.calls == 3 and (bw.bytes_per_s, bw.probes, bw.uncertain) == (22e9, 1, False)


def test_the_flops_probe_is_deferred_the_same_way(tmp_path, monkeypatch):
    from workbench.measure import flops

    monkeypatch.setenv("WORKBENCH_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(probes, "LOAD_SAMPLE_S", 0.0)
    m = Machine(monkeypatch, {"fp32 sum": 5e9})
    m.others = 1.6
    calls = []

    def probe(device, dtype):
        calls.append(dtype)
        return {"version": flops._CACHE_VERSION, "flops_per_s": 1e11, "size": 64, "dtype": dtype,
                "measured_at": time.time(), "probes": 1, "uncertain": True, "why": "other processes used 1.6 of 2 CPUs"}

    monkeypatch.setattr(flops, "_probe", probe)
    flops.probe_flops(CPU, "fp32")
    peak = flops.probe_flops(CPU, "fp32")
    assert calls == ["fp32"] and peak.uncertain and "Not probed again for this run" in peak.explanation


def test_calm_probes_keep_the_best_within_a_day_and_are_refreshed_after_it(cache, monkeypatch):
    m = Machine(monkeypatch, {"fp32 sum": 20e9})
    rl.probe_bandwidth(CPU)
    m.values["fp32 sum"] = 18e9
    bw = rl.probe_bandwidth(CPU, refresh=True)
    assert (bw.bytes_per_s, bw.probes) == (20e9, 2) and "2 calm probe(s)" in bw.explanation
    _age(cache, probes.REMEASURE_AFTER_S + 1)
    bw = rl.probe_bandwidth(CPU)
    assert m.calls == 3 and (bw.bytes_per_s, bw.probes) == (18e9, 1)


@pytest.mark.parametrize("content", [
    "{not json", "[1, 2]", '{"KEY": "text"}',
    '{"KEY": {"bytes_per_s": 3e10, "measured_at": NOW, "probes": 1}}',  # the old format: one x.sum(), no load check
    '{"KEY": {"version": 2, "bytes_per_s": -1, "method": "m", "methods": ["m"], "buffer_bytes": 1, '
    '"measured_at": NOW, "probes": 1, "uncertain": false}}',
])
def test_a_corrupt_or_old_cache_is_probed_again(cache, monkeypatch, content):
    m = Machine(monkeypatch, {"fp32 sum": 21e9})
    cache.write_text(content.replace("KEY", probes.machine_key(CPU)).replace("NOW", str(time.time())))
    bw = rl.probe_bandwidth(CPU)
    assert m.calls == 1 and bw.bytes_per_s == 21e9
    assert _entry(cache)["bytes_per_s"] == 21e9  # rewritten whole


def _sysfs(root: Path, caches: list[tuple[str, int, str, str]]) -> Path:
    for i, (kind, level, size, shared) in enumerate(caches):
        index = root / "cpu0" / "cache" / f"index{i}"
        index.mkdir(parents=True)
        for name, value in (("type", kind), ("level", level), ("size", size), ("shared_cpu_list", shared)):
            (index / name).write_text(f"{value}\n")
    return root


def test_the_last_level_cache_is_read_from_sysfs(tmp_path, monkeypatch):
    monkeypatch.setattr(rl.os, "cpu_count", lambda: 8)
    root = _sysfs(tmp_path, [("Data", 1, "48K", "0"), ("Instruction", 1, "32K", "0"), ("Unified", 2, "2048K", "0"),
                             ("Unified", 3, "96M", "0-3")])
    assert rl.last_level_cache_bytes(root) == 2 * 96 * MiB  # two L3s of four CPUs each
    assert rl.last_level_cache_bytes(tmp_path / "missing") == 0


def test_the_probe_buffers_are_eight_times_the_last_level_cache_and_at_least_256_mib(cache, monkeypatch):
    monkeypatch.setattr(rl, "_available_bytes", lambda: None)
    monkeypatch.setattr(rl, "last_level_cache_bytes", lambda: 96 * MiB)
    assert rl.buffer_bytes(CPU) == 768 * MiB
    monkeypatch.setattr(rl, "last_level_cache_bytes", lambda: 0)  # unknown: the floor
    assert rl.buffer_bytes(CPU) == 256 * MiB
    monkeypatch.setattr(rl, "last_level_cache_bytes", lambda: 512 * MiB)
    monkeypatch.setattr(rl, "_available_bytes", lambda: 2048 * MiB)  # at most a quarter of the free memory each
    assert rl.buffer_bytes(CPU) == 512 * MiB
    m = Machine(monkeypatch, {"fp32 sum": 1e9})  # and the probe allocates what buffer_bytes says
    monkeypatch.setattr(rl, "last_level_cache_bytes", lambda: 2 * MiB)
    rl.probe_bandwidth(CPU)
    assert m.buffers == [16 * MiB] and _entry(cache)["buffer_bytes"] == 16 * MiB


def test_other_processes_cpu_use_decides_whether_the_machine_was_busy(monkeypatch):
    monkeypatch.setattr(rl.os, "cpu_count", lambda: 2)
    before = (100.0, 10.0, 50.0)
    assert probes.busy_reason(before, (102.1, 12.0, 51.0)) is None  # 0.1 CPU of others: calm
    assert probes.busy_reason(before, (103.0, 12.0, 51.0)) == "other processes used 1.0 of 2 CPUs during the probe"
    assert probes.busy_reason(None, None) is None
    assert probes.cpu_times() is None or len(probes.cpu_times()) == 3


def test_the_real_methods_measure_on_small_buffers(cache, monkeypatch):
    monkeypatch.setattr(rl, "MIN_BUFFER_BYTES", 4 * MiB)
    monkeypatch.setattr(rl, "last_level_cache_bytes", lambda: 0)
    monkeypatch.setattr(rl, "REPEATS", 1)
    bw = rl.probe_bandwidth(CPU)
    assert bw.method in rl.CPU_METHODS and math.isfinite(bw.bytes_per_s) and bw.bytes_per_s > 0
    assert _entry(cache)["methods"] == list(rl.CPU_METHODS)


def _bandwidth(uncertain: bool) -> rl.Bandwidth:
    why = " Uncertain: other processes used 1.5 of 2 CPUs during the probe." if uncertain else ""
    return rl.Bandwidth(20e9, "copy (read + write)", 1, uncertain, "20.0 GB/s from the copy." + why)


def test_the_new_roofline_keys_round_trip_and_old_results_still_load():
    roof = rl.roofline(_bandwidth(True), 100_000_000, 1, 150.0)
    assert (roof.bound, roof.uncertain, roof.fraction_of_bound) == ("bandwidth", True, 0.75)
    result = RunResult(RunConfig(model="tiny"), None, (), None, sections={"roofline": roof})
    data = json.loads(result.to_json())["roofline"]
    assert {"bandwidth_bytes_per_s", "bytes_per_token", "decode_bound_tokens_per_s", "fraction_of_bound", "bound",
            "explanation", "uncertain"} <= set(data)
    assert data["bound"] == "bandwidth" and "Uncertain" in data["explanation"]
    assert RunResult.from_dict(json.loads(result.to_json())).roofline == roof
    old = from_dict(RooflineStats, {"bandwidth_bytes_per_s": 1e10, "bytes_per_token": 10, "fraction_of_bound": 0.5,
                                    "decode_bound_tokens_per_s": 1e9, "method": "summing 512 MiB"})
    assert (old.bound, old.explanation, old.uncertain) == (None, "", False)
    assert rl.roofline(_bandwidth(False), 0, 1, 150.0).bound is None


def test_the_report_row_says_when_the_bound_is_uncertain():
    calm, bound = RooflineTracker.rows(rl.roofline(_bandwidth(False), 100_000_000, 1, 150.0))
    busy, _ = RooflineTracker.rows(rl.roofline(_bandwidth(True), 100_000_000, 1, 150.0))
    assert bound == ("bound", "bandwidth: Bandwidth-bound (compute was not compared: no FLOP count); the CPU's busy "
                              "share is unknown (not measured).")
    assert calm[1].startswith("75% of 200 tokens/s") and "uncertain" not in calm[1]
    assert busy[1].startswith(calm[1]) and "(uncertain: the machine was busy while the bandwidth was probed" in busy[1]


def test_the_tracker_warns_and_marks_the_section_when_the_probe_was_busy(monkeypatch):
    warnings: list[tuple[str, str]] = []
    engine = SimpleNamespace(bytes_per_step=lambda prompt, new, kv: 100_000_000,
                             flops_per_step=lambda prompt, new, batch: 2e8, profile_refusal=lambda: "not profiled",
                             compiled_mode=lambda: None, uses_cuda_graphs=lambda: False)
    run = SimpleNamespace(model_info=object(), sections={"latency": SimpleNamespace(decode_tokens_per_s=150.0,
                                                                                    tpot_ms=None)},
                          device=CPU, engine=engine, prompt_ids=[[1, 2, 3]],
                          config=SimpleNamespace(max_new_tokens=8, dtype="fp32", compile=False, tensor_parallel=1,
                                                 data_parallel=1, pipeline_parallel=1),
                          calls=SimpleNamespace(kv_bytes=0), warn=lambda message, section: warnings.append(
                              (message, section)))
    monkeypatch.setattr("workbench.measure.trackers.roofline.probe_flops",
                        lambda device, dtype: Peak(1e11, 1024, dtype, 1, False, "Peak 100 GFLOP/s."))
    monkeypatch.setattr("workbench.measure.trackers.roofline.probe_bandwidth", lambda device: _bandwidth(True))
    roof = RooflineTracker(run).finish()
    assert roof.uncertain and roof.decode_bound_tokens_per_s == 200.0
    assert warnings == [("roofline bound uncertain: 20.0 GB/s from the copy. Uncertain: other processes used 1.5 "
                         "of 2 CPUs during the probe.", "roofline")]
    monkeypatch.setattr("workbench.measure.trackers.roofline.probe_bandwidth", lambda device: _bandwidth(False))
    assert not RooflineTracker(run).finish().uncertain and len(warnings) == 1


@pytest.mark.gpu
def test_the_cuda_probe_takes_the_best_of_a_sum_and_a_copy(cache):
    bw = rl.probe_bandwidth(torch.device("cuda"))
    assert bw.method in rl.CUDA_METHODS and bw.bytes_per_s > 0 and not bw.uncertain
    assert _entry(cache)["buffer_bytes"] == rl.CUDA_BUFFER_BYTES


@pytest.mark.skipif(not os.environ.get("PYTEST_XDIST_WORKER"), reason="only a pytest-xdist worker gets the probes")
def test_a_test_worker_starts_with_the_probes_its_controller_took(session_tmp):
    """conftest: under `-n 2` the controller probes once before the workers start, each worker serves the copies
    (on a machine two workers keep busy, every run would otherwise probe again)."""
    from conftest import PROBE_FILES

    seeded = Path(os.environ["WORKBENCH_TEST_PROBES"])
    for name in PROBE_FILES:
        controller = json.loads((seeded / name).read_text())
        worker = json.loads((session_tmp / "cache" / name).read_text())
        assert controller and set(controller) <= set(worker), name
    key = probes.machine_key(CPU)  # the workers' one thread
    assert key in json.loads((seeded / "bandwidth.json").read_text())
