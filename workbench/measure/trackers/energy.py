"""Energy per token over the timed calls: NVML's energy counter on CUDA, Linux RAPL on CPU, else null.

On a GPU the counter is the device's total energy since the driver loaded (`nvmlDeviceGetTotalEnergyConsumption`,
millijoules, Volta and newer): the GPU board only, not the host. On a CPU it is the sum of the RAPL package
domains (`/sys/class/powercap/intel-rapl:N/energy_uj`, microjoules, wrapping at `max_energy_range_uj`): every
core of the socket(s), whatever else runs on them, but not DRAM or the rest of the machine. Where neither is
readable (no RAPL in a VM, counters readable by root only, no NVML) the section is null and a warning says why.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from workbench.measure.tracker import Axis, Column, Tracker, register
from workbench.report import num

POWERCAP = Path("/sys/class/powercap")  # Linux RAPL (tests point it at a fake tree)


@dataclass(frozen=True)
class EnergyStats:
    """Energy of the timed calls: per generated token and as average power over their wall time."""

    joules_per_token: float | None
    average_power_w: float | None
    method: str
    joules: float = 0.0
    tokens: int = 0
    seconds: float = 0.0
    scope: str = ""  # "device": one counter per rank (GPUs); "package": one shared by every rank of a machine


def _rapl_domains() -> list[Path]:
    """The package domains (intel-rapl:N, not their sub-domains intel-rapl:N:M)."""
    return sorted(p for p in POWERCAP.glob("intel-rapl:*") if p.name.count(":") == 1)


def rapl_counter() -> tuple[Callable[[], float] | None, str]:
    """A reader of the total RAPL package energy in joules (wrap-around handled by the caller), or why not."""
    domains = _rapl_domains()
    if not domains:
        return None, f"no RAPL package domain under {POWERCAP} (a VM or a CPU without RAPL)"
    try:
        ranges = [int((d / "max_energy_range_uj").read_text()) for d in domains]
        files = [d / "energy_uj" for d in domains]
        for f in files:
            int(f.read_text())
    except PermissionError:
        return None, f"{domains[0] / 'energy_uj'} is readable by root only (chmod o+r it, or run as root)"
    except (OSError, ValueError) as e:
        return None, f"RAPL counters under {POWERCAP} are unreadable ({e})"
    wraps = [0.0] * len(files)
    last = [int(f.read_text()) for f in files]

    def read() -> float:  # joules since the first read of this reader, across counter wrap-arounds
        for i, f in enumerate(files):
            now = int(f.read_text())
            if now < last[i]:
                wraps[i] += ranges[i]
            last[i] = now
        return (sum(last) + sum(wraps)) / 1e6
    names = ", ".join((d / "name").read_text().strip() if (d / "name").exists() else d.name for d in domains)
    return read, f"Linux RAPL energy counters ({names}): CPU package(s) only, not DRAM or the rest of the machine"


def nvml_counter(index: int) -> tuple[Callable[[], float] | None, str]:
    """A reader of the GPU's total energy in joules (NVML), or why not."""
    try:
        import pynvml
    except ImportError:
        return None, (f"pynvml is not installed, so cuda:{index}'s energy counter cannot be read "
                      "(pip install nvidia-ml-py)")
    try:
        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        pynvml.nvmlDeviceGetTotalEnergyConsumption(handle)
    except Exception as e:  # noqa: BLE001 - no driver, a GPU older than Volta: all say "not here"
        why = " ".join(str(e).split()) or "no reason given"
        return None, (f"NVML has no energy counter for cuda:{index} ({type(e).__name__}: {why}; "
                      "GPUs older than Volta have none)")
    return (lambda: pynvml.nvmlDeviceGetTotalEnergyConsumption(handle) / 1e3,
            f"NVML total energy counter of cuda:{index} (the GPU board only, not the host)")


@register
class EnergyTracker(Tracker):
    """Reads the device's energy counter before and after the timed calls."""

    section, stats, ready_after, order = "energy", EnergyStats, "measure", 50
    axes = (Axis("joules_per_token", "energy per token", "J", "lower", lambda s: s.joules_per_token),
            Axis("average_power_w", "average power", "W", "lower", lambda s: s.average_power_w))
    columns = (Column("joules_per_token", "REAL", lambda s: s.joules_per_token, "J/token", lambda v: num(v, ".3f")),)

    def __init__(self, run) -> None:
        super().__init__(run)
        self.joules: float | None = None
        self.seconds: float | None = None
        self.how = self.why = ""

    @contextlib.contextmanager
    def _measure(self) -> Iterator[None]:
        device = self.run.device
        read, self.how = nvml_counter(device.index or 0) if device.type == "cuda" else rapl_counter()
        if read is None:
            self.why = self.how
            yield
            return
        start, t0 = read(), time.perf_counter()
        yield
        if device.type == "cuda":
            import torch

            torch.cuda.synchronize(device)
        try:
            self.joules, self.seconds = read() - start, time.perf_counter() - t0
        except Exception as e:  # noqa: BLE001 - a counter that vanished or failed must not lose the run
            self.why = f"the energy counter could not be read after the timed calls ({type(e).__name__}: {e})"

    def around(self, phase: str) -> contextlib.AbstractContextManager[None]:
        return self._measure() if phase == "measure" else contextlib.nullcontext()

    def finish(self) -> EnergyStats | None:
        if self.joules is None:
            self.run.warn(f"no energy counter is readable on this machine: {self.why}; energy is null", "run")
            return None
        calls = self.run.calls
        timed = calls.samples + ([calls.partial] if calls.partial else [])
        tokens = len(self.run.prompt_ids) * sum(len(t.token_ms) for t in timed)
        return EnergyStats(joules_per_token=self.joules / tokens if tokens else None,
                           average_power_w=self.joules / self.seconds if self.seconds else None,
                           method=f"{self.how}; over the timed calls (prefill and decode), per generated token",
                           joules=self.joules, tokens=tokens, seconds=self.seconds,
                           scope="device" if self.run.device.type == "cuda" else "package")

    @classmethod
    def merge(cls, values: Sequence[EnergyStats | None], kind: str) -> EnergyStats | None:
        """Ranks on their own GPUs add up; ranks sharing one CPU package all read the same counter (rank 0's)."""
        present = [v for v in values if v is not None]
        if not present or len(present) < len(values):
            return None
        joules = sum(v.joules for v in present) if present[0].scope == "device" else present[0].joules
        tokens = present[0].tokens if kind == "pipeline" else sum(v.tokens for v in present)  # stages: same tokens
        seconds = max(v.seconds for v in present)
        return EnergyStats(joules / tokens if tokens else None, joules / seconds if seconds else None,
                           present[0].method + f"; {len(present)} ranks", joules, tokens, seconds, present[0].scope)

    @classmethod
    def rows(cls, e: EnergyStats) -> list[tuple[str, str]]:
        return [("energy", f"{num(e.joules_per_token, '.4f')} J/token, {num(e.average_power_w, '.1f')} W average "
                           f"({e.joules:.1f} J over {e.tokens} tokens, {e.seconds:.1f} s)")]
