"""Roofline: decode reads every weight once per step, so bandwidth / bytes per token bounds its speed.

The bound is only as good as the bandwidth under it. `probe_bandwidth` measures the best read bandwidth this
machine reaches at the current thread count: several methods (fp32 and bf16 sums, a copy, a large fp32 GEMV)
on buffers far larger than the last-level cache, keeping the best of all. It watches the other processes' CPU
use while it probes: a probe taken on a busy machine is kept only as *uncertain* (contention lowers it) and is
taken again on the next call; a calm probe is cached per machine and thread count and refreshed after a day.
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from workbench.paths import cache_dir
from workbench.result import RooflineStats

logger = logging.getLogger(__name__)

MIN_BUFFER_BYTES = 256 * 2**20  # each probe buffer is at least this large ...
CACHE_MULTIPLE = 8  # ... and at least this many times the last-level cache
CUDA_BUFFER_BYTES = 2**30  # far beyond any GPU's L2 cache
REPEATS = 4  # timed passes per method (after one untimed pass that faults the pages in); the fastest counts
BUSY_SHARE = 0.1  # a probe is uncertain when other processes used more than this share of all CPUs during it
REMEASURE_AFTER_S = 24 * 3600
GEMV_COLS = 4096  # the GEMV's matrix is (buffer / 16 KiB) x 4096 fp32; its vector stays in the L1 cache
_CACHE_VERSION = 2  # entries of older versions (one `x.sum()`, no load check) are probed again
_CPU_ROOT = Path("/sys/devices/system/cpu")


@dataclass(frozen=True)
class Bandwidth:
    """One answer of the bandwidth probe, fresh or cached."""

    bytes_per_s: float
    method: str  # the method that reached it, e.g. "fp32 GEMV (torch.mv)"
    probes: int  # how many probes the value is the best of
    uncertain: bool  # taken while other processes were busy: may be too low
    explanation: str  # one or two sentences: method, probes, buffers, threads, uncertainty and why


def _best_seconds(fn: Callable[[], object], repeats: int, device: torch.device) -> float:
    """Fastest of `repeats` timed calls of `fn`, after one untimed call (page faults, lazy init)."""
    best = math.inf
    for i in range(repeats + 1):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i:
            best = min(best, time.perf_counter() - t0)
    return best


def sum_fp32(x: torch.Tensor, y: torch.Tensor, repeats: int) -> float:
    """Read bandwidth of a multi-threaded fp32 reduction over the whole buffer."""
    return x.numel() * x.element_size() / _best_seconds(x.sum, repeats, x.device)


def sum_bf16(x: torch.Tensor, y: torch.Tensor, repeats: int) -> float:
    """Read bandwidth of a bf16 reduction over the same bytes (half the bytes per element, other kernels)."""
    xb = x.view(torch.bfloat16)  # (2N,) the fp32 ones read as bf16 1.0 / 0.0: no NaNs, no denormals
    return xb.numel() * xb.element_size() / _best_seconds(xb.sum, repeats, x.device)


def copy(x: torch.Tensor, y: torch.Tensor, repeats: int) -> float:
    """Bandwidth of a copy, counting the bytes read and the bytes written."""
    return 2 * x.numel() * x.element_size() / _best_seconds(lambda: y.copy_(x), repeats, x.device)


def gemv_fp32(x: torch.Tensor, y: torch.Tensor, repeats: int) -> float:
    """Read bandwidth of a large fp32 matrix-vector product (what decode does): matrix bytes / time."""
    a = x.view(-1, GEMV_COLS)  # (N / 4096, 4096)
    v = torch.ones(GEMV_COLS, dtype=x.dtype, device=x.device)  # (4096,)
    return a.numel() * a.element_size() / _best_seconds(lambda: torch.mv(a, v), repeats, x.device)


CPU_METHODS: dict[str, Callable[[torch.Tensor, torch.Tensor, int], float]] = {
    "fp32 sum": sum_fp32, "bf16 sum": sum_bf16, "copy (read + write)": copy, "fp32 GEMV (torch.mv)": gemv_fp32}
CUDA_METHODS: dict[str, Callable[[torch.Tensor, torch.Tensor, int], float]] = {
    "fp32 sum": sum_fp32, "copy (read + write)": copy}


def _size_bytes(text: str) -> int:
    """'32768K' / '1M' / '512' (as sysfs writes cache sizes) -> bytes."""
    m = re.fullmatch(r"\s*(\d+)\s*([KMG]?)B?\s*", text, re.IGNORECASE)
    if not m:
        raise ValueError(f"not a size: {text!r}")
    return int(m[1]) * 1024 ** " KMG".index((m[2] or " ").upper())


def _cpus_in(cpu_list: str) -> int:
    """Number of CPUs in a sysfs list such as '0-3,8-11'."""
    total = 0
    for part in cpu_list.strip().split(","):
        lo, _, hi = part.partition("-")
        total += int(hi or lo) - int(lo) + 1
    return total


def last_level_cache_bytes(root: Path = _CPU_ROOT) -> int:
    """The machine's last-level CPU cache in bytes (cpu0's highest data cache x its instances); 0 if unknown."""
    best = (0, 0, 0)  # (level, size, CPUs sharing it)
    for index in (root / "cpu0" / "cache").glob("index*"):
        try:
            if (index / "type").read_text().strip() == "Instruction":
                continue
            level, size = int((index / "level").read_text()), _size_bytes((index / "size").read_text())
            shared = _cpus_in((index / "shared_cpu_list").read_text()) if (index / "shared_cpu_list").exists() else 0
        except (OSError, ValueError):
            continue
        best = max(best, (level, size, shared))
    _, size, shared = best
    instances = max(1, (os.cpu_count() or 1) // shared) if shared else 1
    return size * instances


def _available_bytes() -> int | None:
    try:
        meminfo = Path("/proc/meminfo").read_text()
        return int(re.search(r"MemAvailable:\s+(\d+) kB", meminfo)[1]) * 1024  # type: ignore[index]
    except (OSError, TypeError):
        return None


def buffer_bytes(device: torch.device) -> int:
    """Size of each probe buffer: >= 8x the last-level cache and >= 256 MiB (CPU; capped at 1/4 of free memory)."""
    if device.type == "cuda":
        return CUDA_BUFFER_BYTES
    wanted = max(MIN_BUFFER_BYTES, CACHE_MULTIPLE * last_level_cache_bytes())
    available = _available_bytes()
    if available is not None and wanted > max(MIN_BUFFER_BYTES, available // 4):
        wanted = max(MIN_BUFFER_BYTES, available // 4)
    return wanted // GEMV_COLS // 4 * GEMV_COLS * 4  # whole rows of the GEMV's fp32 matrix


def _cpu_times() -> tuple[float, float, float] | None:
    """(CPU seconds every process has used, CPU seconds this process has used, wall clock); None without /proc."""
    try:
        with open("/proc/stat") as f:
            ticks = [int(v) for v in f.readline().split()[1:9]]  # user nice system idle iowait irq softirq steal
    except (OSError, ValueError):
        return None
    busy = sum(ticks) - ticks[3] - ticks[4]  # steal counts: other virtual machines took the CPU
    own = os.times()
    return busy / os.sysconf("SC_CLK_TCK"), own.user + own.system, time.monotonic()


def _busy_reason(before: tuple[float, float, float] | None, after: tuple[float, float, float] | None) -> str | None:
    """Why the machine was too busy for a trustworthy probe between two `_cpu_times()`, or None when it was calm."""
    if before is None or after is None or after[2] <= before[2]:
        return None
    cpus = os.cpu_count() or 1
    others = max(0.0, (after[0] - before[0]) - (after[1] - before[1])) / (after[2] - before[2])  # CPUs on average
    if others <= BUSY_SHARE * cpus:
        return None
    return f"other processes used {others:.1f} of {cpus} CPUs during the probe"


def _probe(device: torch.device) -> dict:
    """Run every method once on fresh buffers; the best, which method gave it, the buffer size, the load."""
    methods = CUDA_METHODS if device.type == "cuda" else CPU_METHODS
    nbytes = buffer_bytes(device)
    before = _cpu_times() if device.type == "cpu" else None
    x = torch.ones(nbytes // 4, dtype=torch.float32, device=device)  # (N,)
    y = torch.empty_like(x)  # (N,) the copy's destination
    results = {name: fn(x, y, REPEATS) for name, fn in methods.items()}
    del x, y
    why = _busy_reason(before, _cpu_times() if before is not None else None)
    method = max(results, key=lambda name: results[name])
    logger.info("bandwidth probe (%s): %s%s", _machine_key(device),
                ", ".join(f"{k} {v / 1e9:.1f} GB/s" for k, v in results.items()), f"; uncertain: {why}" if why else "")
    return {"version": _CACHE_VERSION, "bytes_per_s": results[method], "method": method, "methods": list(results),
            "buffer_bytes": nbytes, "measured_at": time.time(), "probes": 1, "uncertain": why is not None,
            "why": why or ""}


def _machine_key(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    from workbench.measure.env import cpu_name

    return f"cpu:{platform.node()}:{cpu_name()}:{torch.get_num_threads()}threads"


def _valid(entry: object) -> bool:
    """A cache entry this version wrote, with usable numbers (anything else is probed again)."""
    return (isinstance(entry, dict) and entry.get("version") == _CACHE_VERSION
            and isinstance(entry.get("bytes_per_s"), (int, float)) and math.isfinite(entry["bytes_per_s"])
            and entry["bytes_per_s"] > 0 and isinstance(entry.get("measured_at"), (int, float))
            and isinstance(entry.get("probes"), int) and isinstance(entry.get("uncertain"), bool)
            and isinstance(entry.get("method"), str) and isinstance(entry.get("methods"), list)
            and isinstance(entry.get("buffer_bytes"), int))


def _merge(old: dict | None, new: dict) -> dict:
    """The entry to keep: the best calm value within a day; a busy probe never replaces a calm value."""
    fresh = old is not None and new["measured_at"] - old["measured_at"] < REMEASURE_AFTER_S
    if new["uncertain"]:
        if old is not None and not old["uncertain"]:
            return {**old, "rejected": new["why"]}  # the calm value stays, its age unchanged
        if not (old is not None and fresh):
            return new
        best = new if new["bytes_per_s"] > old["bytes_per_s"] else {**old, "why": new["why"]}
        return {**best, "probes": old["probes"] + 1}
    if old is None or old["uncertain"] or not fresh:
        return new
    best = new if new["bytes_per_s"] > old["bytes_per_s"] else old
    return {**best, "probes": old["probes"] + 1, "rejected": ""}


def _explain(entry: dict, key: str) -> str:
    """One or two sentences on how `entry`'s bandwidth was probed and how far to trust it."""
    methods = entry["methods"]
    listed = ", ".join(methods[:-1]) + f" and {methods[-1]}" if len(methods) > 1 else methods[0]
    calm = "busy" if entry["uncertain"] else "calm"
    text = (f"{entry['bytes_per_s'] / 1e9:.1f} GB/s from the {entry['method']}, the best of {entry['probes']} "
            f"{calm} probe(s) within a day, each the fastest of {listed} on {entry['buffer_bytes'] >> 20} MiB "
            f"buffers ({key}).")
    if entry["uncertain"]:
        return text + f" Uncertain: {entry['why']}, so the bound may be too low; the next run probes again."
    if entry.get("rejected"):
        return text + f" A newer probe was not trusted over it: {entry['rejected']}."
    return text


def _save(path: Path, cache: dict) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(cache, indent=1))
        os.replace(tmp, path)  # readers never see half a file
    except OSError as e:
        logger.warning("cannot cache the bandwidth in %s: %s", path, e)
        tmp.unlink(missing_ok=True)


def probe_bandwidth(device: torch.device, refresh: bool = False) -> Bandwidth:
    """The best read bandwidth of `device` at the current thread count: cached when calm, else probed now."""
    path = cache_dir() / "bandwidth.json"
    try:
        cache = json.loads(path.read_text())
    except (OSError, ValueError):
        cache = {}
    cache = cache if isinstance(cache, dict) else {}
    key = _machine_key(device)
    old = cache.get(key) if _valid(cache.get(key)) else None
    if (old is not None and not old["uncertain"] and not refresh
            and time.time() - old["measured_at"] < REMEASURE_AFTER_S):
        return Bandwidth(old["bytes_per_s"], old["method"], old["probes"], False, _explain(old, key))
    entry = _merge(old, _probe(device))
    cache[key] = entry
    _save(path, cache)
    return Bandwidth(entry["bytes_per_s"], entry["method"], entry["probes"], entry["uncertain"], _explain(entry, key))


def memory_bandwidth(device: torch.device, refresh: bool = False) -> tuple[float, str]:
    """(bytes/s, how it was measured): `probe_bandwidth` as a pair, for notebooks and scripts."""
    probe = probe_bandwidth(device, refresh)
    return probe.bytes_per_s, probe.explanation


def bytes_per_step(model: torch.nn.Module, weights: int, kv_cache: int | None, prompt: int, new_tokens: int) -> int:
    """Bytes one decode step reads: the weights (an untied input embedding only reads B rows, so it is left out)
    plus the KV cache at its mean length over the generation."""
    read = weights
    emb, out = model.get_input_embeddings(), model.get_output_embeddings()
    if emb is not None and out is not None and emb.weight is not getattr(out, "weight", None):
        read -= emb.weight.numel() * emb.weight.element_size()
    kv_mean = (kv_cache or 0) * (prompt + new_tokens / 2) / (prompt + new_tokens)
    return int(read + kv_mean)


def roofline(bandwidth: Bandwidth, bytes_per_step: int, batch: int, decode_tokens_per_s: float | None) -> RooflineStats:
    """The decode bound for `batch` rows per step and how close the measured decode came to it."""
    per_token = bytes_per_step / batch
    bound = bandwidth.bytes_per_s / per_token if per_token else None
    fraction = decode_tokens_per_s / bound if bound and decode_tokens_per_s else None
    return RooflineStats(bandwidth_bytes_per_s=bandwidth.bytes_per_s, bytes_per_token=int(per_token),
                         decode_bound_tokens_per_s=bound, fraction_of_bound=fraction,
                         method=f"read bandwidth from the {bandwidth.method}; bytes per token = (weights read per "
                         "decode step + mean KV cache) / batch; a model that fits in the CPU caches can exceed the "
                         "DRAM bound", bound="bandwidth" if bound else None, explanation=bandwidth.explanation,
                         uncertain=bandwidth.uncertain)
