"""Execution settings of a process: which device, how many CPU threads."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import torch

from workbench.errors import ConfigError

logger = logging.getLogger(__name__)


def resolve_device(spec: str) -> torch.device:
    """auto -> cuda if available else cpu; refuse devices this machine does not have."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {spec!r} asked for, but this machine has no CUDA GPU (use cpu or auto)")
        if (device.index or 0) >= torch.cuda.device_count():
            raise ConfigError(f"device {spec!r} does not exist: this machine has {torch.cuda.device_count()} "
                              f"GPU(s), cuda:0..cuda:{torch.cuda.device_count() - 1}")
    return device


@contextlib.contextmanager
def threads(intra: int | None) -> Iterator[None]:
    """Set PyTorch's intra-op threads for the block, then restore them."""
    before = torch.get_num_threads()
    if intra:
        torch.set_num_threads(intra)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def set_interop_threads(n: int | None) -> str | None:
    """Set inter-op threads; PyTorch allows it once per process. Returns a warning when it could not."""
    if not n or torch.get_num_interop_threads() == n:
        return None
    try:
        torch.set_num_interop_threads(n)
    except RuntimeError:
        return (f"inter-op threads stay at {torch.get_num_interop_threads()}: PyTorch sets them once per process "
                f"(asked for {n}; run in a fresh process, e.g. a sweep with --isolate)")
    return None


@functools.cache
def cpuinfo_line(key: str) -> str | None:
    """The value of the first `key : value` line of /proc/cpuinfo (None off Linux or where there is none)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(key):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as Linux names them (`avx2`, `avx512_vnni`, ...); empty off Linux."""
    return frozenset((cpuinfo_line("flags") or "").split())


def cpu_cores() -> int:
    """CPU cores this process may run on."""
    with contextlib.suppress(AttributeError, OSError):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def threads_warning(threads: int | None) -> str | None:
    """A warning when more intra-op threads are asked for than this process has CPU cores."""
    cores = cpu_cores()
    if not threads or threads <= cores:
        return None
    return (f"threads {threads} is more than the {cores} CPU cores this process may use: the threads take turns "
            f"on the cores, so the timings are slower and noisier than they would be with {cores} threads")


class CpuBusy:
    """Context manager: CPU seconds this process used / (wall seconds x intra-op threads) inside the block."""

    share: float | None = None

    def __enter__(self) -> CpuBusy:
        self.cpu, self.wall = psutil.Process().cpu_times(), time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        cpu, wall = psutil.Process().cpu_times(), time.perf_counter() - self.wall
        used = (cpu.user - self.cpu.user) + (cpu.system - self.cpu.system)
        self.share = used / (wall * torch.get_num_threads()) if wall > 0 else None
