"""Roofline: decode reads every weight once per step, so bandwidth / bytes per token bounds its speed.

The bound is only as good as the bandwidth under it. `probe_bandwidth` measures the best read bandwidth this
machine reaches at the current thread count: several methods (fp32 and bf16 sums, a copy, a large fp32 GEMV)
on buffers far larger than the last-level cache, keeping the best of all. It watches the other processes' CPU
use while it probes: a probe taken on a busy machine is kept only as *uncertain* (contention lowers it) and is
taken again once the machine is calm (or 10 minutes later); a calm probe is cached per machine and thread count
and refreshed after a day (`workbench.measure.probes`).

Which limit holds (`classify`): a device that works less than `LAUNCH_BOUND_BELOW` (half) of each decode step
(`workbench.measure.busy`) waits more on launching work than on doing it: "launch" (on the CPU: Python and
dispatch overhead). Otherwise a step whose arithmetic intensity (FLOPs / bytes, `workbench.measure.flops`) is
above the device's ridge point (peak FLOP/s / bandwidth) is "compute"-bound, and below it "bandwidth"-bound.
Half is where the device's own work stops being the larger part of a step: below it, the idle time left
between kernels outweighs anything faster kernels (fewer bytes, fewer FLOPs) could save.
"""

from __future__ import annotations

import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from workbench.measure import probes
from workbench.measure.busy import Busy
from workbench.measure.flops import Peak
from workbench.measure.probes import best_seconds
from workbench.result import RooflineStats

logger = logging.getLogger(__name__)

MIN_BUFFER_BYTES = 256 * 2**20  # each probe buffer is at least this large ...
CACHE_MULTIPLE = 8  # ... and at least this many times the last-level cache
CUDA_BUFFER_BYTES = 2**30  # far beyond any GPU's L2 cache
REPEATS = 4  # timed passes per method (after one untimed pass that faults the pages in); the fastest counts
GEMV_COLS = 4096  # the GEMV's matrix is (buffer / 16 KiB) x 4096 fp32; its vector stays in the L1 cache
LAUNCH_BOUND_BELOW = 0.5  # a device working less than half of each decode step is held back by launches / dispatch
KERNELS_FAR_BELOW = 0.5  # kernels reading at under half the bandwidth while they run: something else holds them
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


def sum_fp32(x: torch.Tensor, y: torch.Tensor, repeats: int) -> float:
    """Read bandwidth of a multi-threaded fp32 reduction over the whole buffer."""
    return x.numel() * x.element_size() / best_seconds(x.sum, repeats, x.device)


def sum_bf16(x: torch.Tensor, y: torch.Tensor, repeats: int) -> float:
    """Read bandwidth of a bf16 reduction over the same bytes (half the bytes per element, other kernels)."""
    xb = x.view(torch.bfloat16)  # (2N,) the fp32 ones read as bf16 1.0 / 0.0: no NaNs, no denormals
    return xb.numel() * xb.element_size() / best_seconds(xb.sum, repeats, x.device)


def copy(x: torch.Tensor, y: torch.Tensor, repeats: int) -> float:
    """Bandwidth of a copy, counting the bytes read and the bytes written."""
    return 2 * x.numel() * x.element_size() / best_seconds(lambda: y.copy_(x), repeats, x.device)


def gemv_fp32(x: torch.Tensor, y: torch.Tensor, repeats: int) -> float:
    """Read bandwidth of a large fp32 matrix-vector product (what decode does): matrix bytes / time."""
    a = x.view(-1, GEMV_COLS)  # (N / 4096, 4096)
    v = torch.ones(GEMV_COLS, dtype=x.dtype, device=x.device)  # (4096,)
    return a.numel() * a.element_size() / best_seconds(lambda: torch.mv(a, v), repeats, x.device)


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


def _probe(device: torch.device) -> dict:
    """Run every method once on fresh buffers; the best, which method gave it, the buffer size, the load."""
    methods = CUDA_METHODS if device.type == "cuda" else CPU_METHODS
    nbytes = buffer_bytes(device)
    before = probes.cpu_times() if device.type == "cpu" else None
    x = torch.ones(nbytes // 4, dtype=torch.float32, device=device)  # (N,)
    y = torch.empty_like(x)  # (N,) the copy's destination
    results = {name: fn(x, y, REPEATS) for name, fn in methods.items()}
    del x, y
    why = probes.busy_reason(before, probes.cpu_times() if before is not None else None)
    method = max(results, key=lambda name: results[name])
    logger.info("bandwidth probe (%s): %s%s", probes.machine_key(device),
                ", ".join(f"{k} {v / 1e9:.1f} GB/s" for k, v in results.items()), f"; uncertain: {why}" if why else "")
    return {"version": _CACHE_VERSION, "bytes_per_s": results[method], "method": method, "methods": list(results),
            "buffer_bytes": nbytes, "measured_at": time.time(), "probes": 1, "uncertain": why is not None,
            "why": why or ""}


def _explain(entry: dict, key: str) -> str:
    """One or two sentences on how `entry`'s bandwidth was probed and how far to trust it."""
    methods = entry["methods"]
    listed = ", ".join(methods[:-1]) + f" and {methods[-1]}" if len(methods) > 1 else methods[0]
    calm = "busy" if entry["uncertain"] else "calm"
    text = (f"{entry['bytes_per_s'] / 1e9:.1f} GB/s from the {entry['method']}, the best of {entry['probes']} "
            f"{calm} probe(s) within a day, each the fastest of {listed} on {entry['buffer_bytes'] >> 20} MiB "
            f"buffers ({key}).")
    if entry["uncertain"]:
        return (text + f" Uncertain: {entry['why']}, so the bound may be too low; a later run probes again."
                + probes.deferred_sentence(entry))
    if entry.get("rejected"):
        return text + f" A newer probe was not trusted over it: {entry['rejected']}."
    return text


def _valid(entry: object) -> bool:
    """A bandwidth entry this version wrote, with usable numbers (anything else is probed again)."""
    return probes.valid(entry, _CACHE_VERSION, "bytes_per_s", {"method": str, "methods": list, "buffer_bytes": int})


def probe_bandwidth(device: torch.device, refresh: bool = False) -> Bandwidth:
    """The best read bandwidth of `device` at the current thread count: cached when calm, else probed now."""
    key = probes.machine_key(device)
    entry = probes.cached("bandwidth.json", key, "bytes_per_s", _valid, lambda: _probe(device), refresh)
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


def classify(has_bound: bool, busy_share: float | None, intensity: float | None, ridge: float | None) -> str | None:
    """The limit that holds: "launch" when the device works less than LAUNCH_BOUND_BELOW of each step, else
    "compute" when a step's FLOP per byte is above the device's ridge, else "bandwidth"; None without a bound.
    An unknown busy share skips the launch test, an unknown ridge the compute test."""
    if not has_bound:
        return None
    if busy_share is not None and busy_share < LAUNCH_BOUND_BELOW:
        return "launch"
    if intensity is not None and ridge is not None and intensity > ridge:
        return "compute"
    return "bandwidth"


def _num(x: float) -> str:
    return f"{x:.0f}" if x >= 10 else f"{x:.2g}"


def kernel_fraction(fraction_of_bound: float | None, busy_share: float | None) -> float | None:
    """The share of the bandwidth bound the device's kernels reached while they ran: the step's bytes over its
    kernel time (busy share x TPOT), against the probed bandwidth. Below 1 by the whole gap when the kernels
    themselves are slow for their bytes; above 1 when the weights are served from the device's caches."""
    if not fraction_of_bound or not busy_share:
        return None
    return fraction_of_bound / busy_share


def _far_below(kind: str, who: str, batch: int, intensity: float | None, ridge: float | None, peak_why: str,
               share: float, kernels: float) -> str:
    """The sentence for a step whose kernels ran far below the limit that applies: slower than the bandwidth
    allows (below the ridge), or far from the peak FLOP/s (above it)."""
    side = "above" if kind == "compute" else "below"
    ceiling = (f"batch {batch} does {_num(intensity)} FLOP per byte, {side} this {who}'s ridge of {_num(ridge)}"
               if intensity is not None and ridge is not None else
               f"compute was not compared: {peak_why or 'no FLOP count'}")
    if kind == "compute":
        reached, verdict = "reached only", "the kernels are slower than the device's arithmetic allows"
        limit = "peak FLOP/s"
        held = f"matmuls of {batch} rows, attention and element-wise operations, all slower than the probe's matmul"
    else:
        reached, verdict, limit = "read at only", "the kernels, not the memory, hold this step back", "bandwidth"
        held = ("kernels too small to fill the GPU, or kernels that unpack quantized weights" if who == "GPU" else
                "too little work per kernel, unpacking quantized weights")
    held += ", or other processes sharing the CPU" if who == "CPU" else ""
    return (f"Far below the {kind} bound ({ceiling}): the {who} spent {100 * share:.0f} % of each decode step in "
            f"kernels, but while they ran they {reached} {100 * kernels:.0f} % of the {limit}; {verdict} ({held}).")


def _bound_sentence(kind: str, who: str, batch: int, busy: Busy | None, intensity: float | None,
                    ridge: float | None, peak_why: str, compiled: bool, cuda_graphs: bool,
                    kernels: float | None = None, kernel_flops: float | None = None) -> str:
    """One sentence: the limit that holds, the numbers that decided it, and what to try. `kernels` is the share
    of the bandwidth the kernels reached while they ran (`kernel_fraction`), `kernel_flops` their share of the
    peak FLOP/s."""
    share = busy.share if busy is not None else None
    if share is None:
        worked = f"the {who}'s busy share is unknown ({busy.why if busy else 'not measured'})"
    elif who == "GPU":
        worked = f"the GPU was busy {100 * share:.0f} % of each decode step"
    else:
        worked = f"the CPU spent {100 * share:.0f} % of each decode step in kernels"
    if kind == "launch":
        if who == "GPU":
            return worked[0].upper() + worked[1:] + ": launch-bound — " + (
                "even with CUDA graphs; a larger batch does more work per launch." if cuda_graphs else
                "use CUDA graphs (--compile-mode reduce-overhead)." if compiled else
                "compile with CUDA graphs (--compile).")
        return worked[0].upper() + worked[1:] + ", the rest in Python and dispatch: overhead-bound — " + (
            "even compiled; a larger batch does more work per step." if compiled else "try --compile.")
    they = "they" if who == "CPU" else "its kernels"
    if kind == "bandwidth" and share is not None and kernels is not None:
        if kernels < KERNELS_FAR_BELOW:
            return _far_below(kind, who, batch, intensity, ridge, peak_why, share, kernels)
        worked += (f", and {they} read at {100 * kernels:.0f} % of the bandwidth while they ran"
                   + (f" (the weights come from the {who}'s caches)" if kernels > 1 else ""))
    if kind == "compute" and share is not None and kernel_flops is not None:
        if kernel_flops < KERNELS_FAR_BELOW:
            return _far_below(kind, who, batch, intensity, ridge, peak_why, share, kernel_flops)
        worked += f", and {they} reached {100 * kernel_flops:.0f} % of the peak FLOP/s while they ran"
    if intensity is None or ridge is None:
        return f"Bandwidth-bound (compute was not compared: {peak_why or 'no FLOP count'}); {worked}."
    side = "above" if intensity > ridge else "below"
    return (f"{kind.capitalize()}-bound: batch {batch} does {_num(intensity)} FLOP per byte, {side} this {who}'s "
            f"ridge of {_num(ridge)}; {worked}.")


def roofline(bandwidth: Bandwidth, bytes_per_step: int, batch: int, decode_tokens_per_s: float | None, *,
             busy: Busy | None = None, peak: Peak | None = None, flops_per_step: float | None = None,
             who: str = "CPU", compiled: bool = False, cuda_graphs: bool = False, peak_why: str = "") -> RooflineStats:
    """The decode bound for `batch` rows per step, how close the measured decode came to it, and which limit
    holds (`classify`) given the device's busy share, the step's FLOPs and the device's peak FLOP/s."""
    per_token = bytes_per_step / batch
    bound = bandwidth.bytes_per_s / per_token if per_token else None
    fraction = decode_tokens_per_s / bound if bound and decode_tokens_per_s else None
    intensity = flops_per_step / bytes_per_step if flops_per_step and bytes_per_step else None
    ridge = peak.flops_per_s / bandwidth.bytes_per_s if peak is not None else None
    share = busy.share if busy else None
    kind = classify(bound is not None, share, intensity, ridge)
    kernels = kernel_fraction(fraction, share)
    kernel_flops = (flops_per_step * decode_tokens_per_s / batch / share / peak.flops_per_s
                    if flops_per_step and decode_tokens_per_s and share and peak is not None else None)
    explanation = " ".join(x for x in (
        _bound_sentence(kind, who, batch, busy, intensity, ridge, peak_why, compiled, cuda_graphs, kernels,
                        kernel_flops) if kind else "",
        bandwidth.explanation, peak.explanation if peak is not None else "") if x)
    return RooflineStats(bandwidth_bytes_per_s=bandwidth.bytes_per_s, bytes_per_token=int(per_token),
                         decode_bound_tokens_per_s=bound, fraction_of_bound=fraction,
                         method=f"read bandwidth from the {bandwidth.method}; bytes per token = (weights read per "
                         "decode step + mean KV cache) / batch; a model that fits in the CPU caches can exceed the "
                         "DRAM bound", bound=kind, explanation=explanation, uncertain=bandwidth.uncertain,
                         busy_share=share, kernel_fraction_of_bound=kernels, arithmetic_intensity=intensity,
                         ridge_flop_per_byte=ridge, peak_flops_per_s=peak.flops_per_s if peak else None)
