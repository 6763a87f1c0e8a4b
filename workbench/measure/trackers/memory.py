"""Memory: real weight storage, KV cache, host high-water marks and GPU allocator peaks of loading vs running."""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator

from workbench.measure.memory import GpuPeak, GpuPeaks, HostPeak, host_rss
from workbench.measure.tracker import Axis, Column, Tracker, register
from workbench.report import human_bytes
from workbench.result import MemoryStats


@register
class MemoryTracker(Tracker):
    """Host and GPU peaks while loading (model and techniques) and while running (warm-up and timed calls)."""

    section, stats, ready_after, order = "memory", MemoryStats, "finish", 20
    axes = (Axis("weights_bytes", "weights", "bytes", "lower", lambda s: s.weights_bytes),
            Axis("kv_cache_bytes", "KV cache", "bytes", "lower", lambda s: s.kv_cache_bytes),
            Axis("peak_host_bytes", "host peak (run)", "bytes", "lower", lambda s: s.peak_host_bytes),
            Axis("load_peak_host_bytes", "host peak (load)", "bytes", "lower", lambda s: s.load_peak_host_bytes),
            Axis("peak_gpu_allocated_bytes", "GPU peak allocated", "bytes", "lower",
                 lambda s: s.peak_gpu_allocated_bytes))
    columns = (Column("weights_bytes", "INTEGER", lambda s: s.weights_bytes, "weights", human_bytes),
               Column("peak_host_bytes", "INTEGER", lambda s: s.peak_host_bytes))

    def __init__(self, run) -> None:
        super().__init__(run)
        self.idle: int | None = None
        self.host: dict[str, HostPeak] = {}
        self.gpu: dict[str, GpuPeaks] = {}

    @contextlib.contextmanager
    def _peaks(self, phase: str) -> Iterator[None]:
        if phase == "load":
            gc.collect()
            self.idle = host_rss()
        with HostPeak() as host, GpuPeak(self.run.device) as gpu:
            yield
        self.host[phase], self.gpu[phase] = host, gpu.peaks

    def around(self, phase: str) -> contextlib.AbstractContextManager[None]:
        return self._peaks(phase) if phase in ("load", "run") else contextlib.nullcontext()

    def finish(self) -> MemoryStats | None:
        info = self.run.model_info
        if info is None:
            return None
        load, run = self.host.get("load"), self.host.get("run")
        load_gpu, run_gpu = self.gpu.get("load", GpuPeaks()), self.gpu.get("run", GpuPeaks())
        return MemoryStats(
            weights_bytes=info.weight_bytes, kv_cache_bytes=self.run.calls.kv_bytes,
            load_peak_host_bytes=load.peak if load else None, peak_host_bytes=run.peak if run else None,
            peak_gpu_allocated_bytes=run_gpu.allocated, peak_gpu_reserved_bytes=run_gpu.reserved,
            idle_host_bytes=self.idle, gpu_used_bytes_nvml=run_gpu.nvml_used,
            load_peak_gpu_allocated_bytes=load_gpu.allocated, host_method=load.method if load else "")

    @classmethod
    def rows(cls, mem: MemoryStats) -> list[tuple[str, str]]:
        rows = [("weights", human_bytes(mem.weights_bytes)), ("KV cache", human_bytes(mem.kv_cache_bytes)),
                ("host peak: load / run", f"{human_bytes(mem.load_peak_host_bytes)} / "
                                          f"{human_bytes(mem.peak_host_bytes)}")]
        if mem.peak_gpu_allocated_bytes is not None:
            rows.append(("GPU peak: allocated / reserved",
                         f"{human_bytes(mem.peak_gpu_allocated_bytes)} / {human_bytes(mem.peak_gpu_reserved_bytes)}"))
        return rows
