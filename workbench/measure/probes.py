"""Cached probes of this machine (read bandwidth, peak FLOP/s): timing, the load check, and the cache file.

A probe is only as good as the machine was calm while it ran. `cpu_times` / `busy_reason` watch the other
processes' CPU use around a probe: a probe taken on a busy machine is kept only as *uncertain* (contention
lowers it) and taken again once the machine is calm; a calm probe is cached per machine (and thread count, and
whatever else the caller puts in its key) in one JSON file of the cache folder and refreshed after a day.
Each entry holds its value under its own key (`bytes_per_s`, `flops_per_s`) next to `measured_at`, `probes`,
`uncertain` and `why`. An uncertain entry is probed again on the next call only when the machine is calm by then,
or `RETRY_BUSY_AFTER_S` after its last probe (`probed_at`); until then a call serves it with `deferred` saying why.
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path

import torch

from workbench.paths import cache_dir

logger = logging.getLogger(__name__)

BUSY_SHARE = 0.1  # a probe is uncertain when other processes used more than this share of all CPUs during it
REMEASURE_AFTER_S = 24 * 3600
# An uncertain entry is probed again on the next call when the machine is calm (watched for LOAD_SAMPLE_S first),
# and while it stays busy only once this long after the last probe: a probe on a busy machine reads too low anyway
# and lengthens every run (a bandwidth probe took 1.3 s next to a one-thread decode on 2 cores, up to 2.5 s loaded).
RETRY_BUSY_AFTER_S = 600
LOAD_SAMPLE_S = 0.25


def best_seconds(fn: Callable[[], object], repeats: int, device: torch.device) -> float:
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


def cpu_times() -> tuple[float, float, float] | None:
    """(CPU seconds every process has used, CPU seconds this process has used, wall clock); None without /proc."""
    try:
        with open("/proc/stat") as f:
            ticks = [int(v) for v in f.readline().split()[1:9]]  # user nice system idle iowait irq softirq steal
    except (OSError, ValueError):
        return None
    busy = sum(ticks) - ticks[3] - ticks[4]  # steal counts: other virtual machines took the CPU
    own = os.times()
    return busy / os.sysconf("SC_CLK_TCK"), own.user + own.system, time.monotonic()


def busy_reason(before: tuple[float, float, float] | None, after: tuple[float, float, float] | None,
                during: str = "during the probe") -> str | None:
    """Why the machine was too busy for a trustworthy probe between two `cpu_times()`, or None when it was calm."""
    if before is None or after is None or after[2] <= before[2]:
        return None
    cpus = os.cpu_count() or 1
    others = max(0.0, (after[0] - before[0]) - (after[1] - before[1])) / (after[2] - before[2])  # CPUs on average
    if others <= BUSY_SHARE * cpus:
        return None
    return f"other processes used {others:.1f} of {cpus} CPUs {during}"


def busy_now() -> str | None:
    """Why the machine is too busy to probe right now (other processes' CPU use over LOAD_SAMPLE_S), or None."""
    before = cpu_times()
    time.sleep(LOAD_SAMPLE_S)
    return busy_reason(before, cpu_times(), "just now")


def machine_key(device: torch.device) -> str:
    """'cuda:<name>' or 'cpu:<host>:<cpu model>:<N>threads': what a cached probe is valid for."""
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    from workbench.measure.env import cpu_name

    return f"cpu:{platform.node()}:{cpu_name()}:{torch.get_num_threads()}threads"


def valid(entry: object, version: int, value: str, fields: dict[str, type | tuple[type, ...]]) -> bool:
    """A cache entry of `version` with a usable positive `value` and `fields` of their types (else probe again)."""
    common = {"measured_at": (int, float), "probes": int, "uncertain": bool}
    return (isinstance(entry, dict) and entry.get("version") == version
            and isinstance(entry.get(value), (int, float)) and math.isfinite(entry[value]) and entry[value] > 0
            and all(isinstance(entry.get(k), t) for k, t in {**common, **fields}.items()))


def deferred_sentence(entry: dict) -> str:
    """' Not probed again for this run: ...' when a call served an uncertain entry without probing, else ''."""
    if not entry.get("deferred"):
        return ""
    return (f" Not probed again for this run: {entry['deferred']}; a run probes again once the machine is calm, "
            f"or {RETRY_BUSY_AFTER_S // 60} minutes after the last probe.")


def merge(old: dict | None, new: dict, value: str) -> dict:
    """The entry to keep: the best calm `value` within a day; a busy probe never replaces a calm value."""
    fresh = old is not None and new["measured_at"] - old["measured_at"] < REMEASURE_AFTER_S
    if new["uncertain"]:
        if old is not None and not old["uncertain"]:
            return {**old, "rejected": new["why"]}  # the calm value stays, its age unchanged
        if not (old is not None and fresh):
            return new
        best = new if new[value] > old[value] else {**old, "why": new["why"]}
        return {**best, "probes": old["probes"] + 1}
    if old is None or old["uncertain"] or not fresh:
        return new
    best = new if new[value] > old[value] else old
    return {**best, "probes": old["probes"] + 1, "rejected": ""}


def _save(path: Path, cache: dict) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(cache, indent=1))
        os.replace(tmp, path)  # readers never see half a file
    except OSError as e:
        logger.warning("cannot cache the probe in %s: %s", path, e)
        tmp.unlink(missing_ok=True)


def cached(file: str, key: str, value: str, is_valid: Callable[[object], bool], probe: Callable[[], dict],
           refresh: bool = False) -> dict:
    """`key`'s entry of the cache `file`: served when calm and under a day old (unless `refresh`), else
    `probe()` runs and its entry is merged with the old one and written back."""
    path = cache_dir() / file
    try:
        cache = json.loads(path.read_text())
    except (OSError, ValueError):
        cache = {}
    cache = cache if isinstance(cache, dict) else {}
    old = cache.get(key) if is_valid(cache.get(key)) else None
    if old is not None and not refresh:
        if not old["uncertain"] and time.time() - old["measured_at"] < REMEASURE_AFTER_S:
            return old
        since = time.time() - old.get("probed_at", old["measured_at"])
        if old["uncertain"] and since < RETRY_BUSY_AFTER_S:
            still = busy_now()
            if still:  # served as it is, not written: the next call looks at the load again
                return {**old, "deferred": f"{still}, {since:.0f} s after the last probe"}
    entry = {**merge(old, probe(), value), "probed_at": time.time()}
    cache[key] = entry
    _save(path, cache)
    return entry
