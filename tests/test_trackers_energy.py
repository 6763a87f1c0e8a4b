"""The energy tracker's CUDA path without a GPU: a fake pynvml module stands in for NVML."""

from __future__ import annotations

import sys
import types
from types import SimpleNamespace

import pytest
import torch

from workbench.measure.trackers import energy


class NVMLError_NotSupported(Exception):  # noqa: N801 - pynvml's own spelling
    """What pynvml raises on a GPU without an energy counter (older than Volta)."""


def fake_pynvml(monkeypatch, millijoules: list[int] | None, init_error: Exception | None = None) -> dict:
    """Install a pynvml whose energy counter returns `millijoules` in turn (None: the GPU has no counter)."""
    calls: dict = {"init": 0, "index": None}
    module = types.ModuleType("pynvml")

    def init() -> None:
        calls["init"] += 1
        if init_error is not None:
            raise init_error

    def handle(index: int) -> str:
        calls["index"] = index
        return f"handle-{index}"

    def total_energy(h: str) -> int:
        assert h == f"handle-{calls['index']}"
        if millijoules is None:
            raise NVMLError_NotSupported("Not Supported")
        return millijoules.pop(0) if len(millijoules) > 1 else millijoules[0]
    module.nvmlInit, module.nvmlDeviceGetHandleByIndex = init, handle
    module.nvmlDeviceGetTotalEnergyConsumption = total_energy
    monkeypatch.setitem(sys.modules, "pynvml", module)
    return calls


def fake_run(warnings: list[str], batch: int = 2, tokens: int = 8, calls: int = 3) -> SimpleNamespace:
    """What the tracker reads of a run: the device, the timed calls, the prompts, and where warnings go."""
    timed = SimpleNamespace(samples=[SimpleNamespace(token_ms=[1.0] * tokens)] * calls, partial=None)
    return SimpleNamespace(device=torch.device("cuda", 1), calls=timed, prompt_ids=[[1, 2, 3]] * batch,
                           warn=lambda message, section: warnings.append(message))


def test_nvml_energy_per_token_on_cuda(monkeypatch):
    """Counter in millijoules, read before and after the timed calls (after a synchronize), per generated token."""
    calls = fake_pynvml(monkeypatch, [1_000_000, 1_000_000, 1_048_000])  # check, start, end: 48 J
    synced = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: synced.append(device))
    warnings: list[str] = []
    tracker = energy.EnergyTracker(fake_run(warnings))
    with tracker.around("measure"):
        pass
    stats = tracker.finish()
    assert calls["index"] == 1 and synced == [torch.device("cuda", 1)] and warnings == []
    assert stats.joules == pytest.approx(48.0) and stats.tokens == 2 * 8 * 3
    assert stats.joules_per_token == pytest.approx(1.0) and stats.scope == "device"
    assert stats.method.startswith("NVML total energy counter of cuda:1 (the GPU board only, not the host)")
    assert stats.average_power_w == pytest.approx(48.0 / stats.seconds)


def _warning(monkeypatch) -> str:
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    warnings: list[str] = []
    tracker = energy.EnergyTracker(fake_run(warnings))
    with tracker.around("measure"):
        pass
    assert tracker.finish() is None and len(warnings) == 1
    return warnings[0]


def test_a_gpu_without_an_energy_counter_warns_in_one_sentence(monkeypatch):
    fake_pynvml(monkeypatch, None)
    w = _warning(monkeypatch)
    assert w == ("no energy counter is readable on this machine: NVML has no energy counter for cuda:1 "
                 "(NVMLError_NotSupported: Not Supported; GPUs older than Volta have none); energy is null")
    assert ". " not in w and "\n" not in w


def test_without_a_driver_or_without_pynvml_the_warning_says_which(monkeypatch):
    fake_pynvml(monkeypatch, [1], init_error=RuntimeError("Driver Not Loaded\n(libnvidia-ml.so.1)"))
    assert "NVML has no energy counter for cuda:1 (RuntimeError: Driver Not Loaded (libnvidia-ml.so.1);" in \
        _warning(monkeypatch)
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml raises ImportError
    w = _warning(monkeypatch)
    assert w == ("no energy counter is readable on this machine: pynvml is not installed, so cuda:1's energy "
                 "counter cannot be read (pip install nvidia-ml-py); energy is null")


def test_importing_the_energy_tracker_first_still_registers_every_tracker():
    """A script (or test) that imports one tracker module before anything else must not see a registry of one."""
    import subprocess

    code = ("import workbench.measure.trackers.energy\n"
            "from workbench.analysis import METRICS\n"
            "from workbench.measure import tracker\n"
            "print(list(tracker.sections()), 'e2e_ms_p50' in METRICS)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert done.stdout.split() == ["['latency',", "'memory',", "'accuracy',", "'roofline',", "'energy',", "'pipeline',",
                                   "'speculative',", "'kv_quant']", "True"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_cuda_run_reads_the_boards_energy_counter(fast):
    from workbench.runner import run

    r = run(fast(device="cuda", eval_tokens=0, max_new_tokens=32, warmup=1, min_duration_s=1.0))
    e = r.energy
    assert e is not None, r.warnings  # Volta and newer have the counter (the lent GPUs are H100 / H200)
    assert e.method.startswith("NVML total energy counter of cuda:0") and e.scope == "device"
    assert e.joules > 0 and e.joules_per_token > 0 and e.average_power_w > 0
