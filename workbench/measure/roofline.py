"""Roofline: decode reads every weight once per step, so bandwidth / bytes per token bounds its speed."""

from __future__ import annotations

import json
import logging
import platform
import time

import torch

from workbench.paths import cache_dir
from workbench.result import RooflineStats

logger = logging.getLogger(__name__)

_PROBE_BYTES = 512 * 1024 * 1024


def _machine_key(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    from workbench.measure.env import cpu_name

    return f"cpu:{platform.node()}:{cpu_name()}:{torch.get_num_threads()}threads"


def _time_reads(device: torch.device, nbytes: int, repeats: int) -> float:
    """Best read bandwidth (bytes/s) of summing a buffer much larger than the caches."""
    x = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    best = float("inf")
    for _ in range(repeats + 1):  # the first pass faults the pages in
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        x.sum()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - t0)
    del x
    return nbytes / best


REMEASURE_AFTER_S = 24 * 3600


def memory_bandwidth(device: torch.device, refresh: bool = False) -> tuple[float, str]:
    """Read bandwidth of `device` in bytes/s, per machine and thread count, cached for a day.

    Contention can only make a measurement lower, never higher, so the cache keeps the best value
    seen: a probe taken while the machine was busy is corrected by the next one.
    """
    path = cache_dir() / "bandwidth.json"
    try:
        cached = json.loads(path.read_text())
    except (OSError, ValueError):
        cached = {}
    key = _machine_key(device)
    entry = cached.get(key)
    if isinstance(entry, dict) and not refresh and time.time() - entry.get("measured_at", 0) < REMEASURE_AFTER_S:
        return entry["bytes_per_s"], f"cached read bandwidth, best of {entry['probes']} probe(s) ({key})"
    nbytes = _PROBE_BYTES * (4 if device.type == "cuda" else 1)
    bw = _time_reads(device, nbytes, repeats=5)
    best = max(bw, entry["bytes_per_s"]) if isinstance(entry, dict) else bw
    probes = (entry.get("probes", 0) if isinstance(entry, dict) else 0) + 1
    cached[key] = {"bytes_per_s": best, "measured_at": time.time(), "probes": probes}
    try:
        path.write_text(json.dumps(cached, indent=1))
    except OSError as e:
        logger.warning("cannot cache the bandwidth in %s: %s", path, e)
    return best, f"read bandwidth: best of {probes} probe(s) summing {nbytes >> 20} MiB ({key})"


def bytes_per_step(model: torch.nn.Module, weights: int, kv_cache: int | None, prompt: int, new_tokens: int) -> int:
    """Bytes one decode step reads: the weights (an untied input embedding only reads B rows, so it is left out)
    plus the KV cache at its mean length over the generation."""
    read = weights
    emb, out = model.get_input_embeddings(), model.get_output_embeddings()
    if emb is not None and out is not None and emb.weight is not getattr(out, "weight", None):
        read -= emb.weight.numel() * emb.weight.element_size()
    kv_mean = (kv_cache or 0) * (prompt + new_tokens / 2) / (prompt + new_tokens)
    return int(read + kv_mean)


def roofline(bandwidth: float, bytes_per_step: int, batch: int, decode_tokens_per_s: float | None,
             method: str) -> RooflineStats:
    """The decode bound for `batch` rows per step and how close the measured decode came to it."""
    per_token = bytes_per_step / batch
    bound = bandwidth / per_token if per_token else None
    fraction = decode_tokens_per_s / bound if bound and decode_tokens_per_s else None
    return RooflineStats(bandwidth_bytes_per_s=bandwidth, bytes_per_token=int(per_token),
                         decode_bound_tokens_per_s=bound, fraction_of_bound=fraction,
                         method=method + "; bytes per token = (weights read per decode step + mean KV "
                         "cache) / batch; a model that fits in the CPU caches can exceed the DRAM bound")
