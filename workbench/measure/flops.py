"""Compute: the FLOPs of one decode step, and the peak FLOP/s of this device in the run's dtype.

Together with the read bandwidth they place decoding on the roofline: a decode step does
`FLOPs per step / bytes per step` FLOP per byte (its arithmetic intensity); the device's ridge point is
`peak FLOP/s / bandwidth`. Below the ridge the bytes take longer than the arithmetic (bandwidth-bound),
above it the arithmetic does (compute-bound). Batching raises the intensity: every row reuses the same
weight bytes.

`probe_flops` times a large square matmul (`torch.mm`) in the run's dtype, the best of a few calls. On the
CPU its size doubles from 256 until one call takes `TARGET_S` (a slow dtype, such as bf16 without native
support, stays small and cheap); on a GPU it is 8192. It is cached like the bandwidth probe
(`workbench.measure.probes`: calm probes per machine, thread count and dtype, busy ones uncertain and probed
again once the machine is calm) in `flops.json` next to `bandwidth.json`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import torch

from workbench.measure import probes
from workbench.models.loader import attention_shape
from workbench.models.sources import TORCH_DTYPES, text_config

logger = logging.getLogger(__name__)

CPU_SIZES = (256, 4096)  # the CPU matmul's first and largest size
CUDA_SIZE = 8192
TARGET_S = 0.05  # the CPU matmul grows until one call takes this long
REPEATS = {"cpu": 3, "cuda": 10}  # timed calls after one untimed call; the fastest counts
_CACHE_VERSION = 1


@dataclass(frozen=True)
class Peak:
    """One answer of the FLOP/s probe, fresh or cached."""

    flops_per_s: float
    size: int  # the square matmul's size
    dtype: str
    probes: int
    uncertain: bool  # taken while other processes were busy: may be too low
    explanation: str


def human_flops(flops_per_s: float) -> str:
    """'1.2 TFLOP/s' / '96 GFLOP/s'."""
    return f"{flops_per_s / 1e12:.1f} TFLOP/s" if flops_per_s >= 1e12 else f"{flops_per_s / 1e9:.0f} GFLOP/s"


def _matmul_flops(n: int, dtype: torch.dtype, device: torch.device, repeats: int) -> float:
    a = torch.randn(n, n, device=device).to(dtype)  # (n, n)
    b = torch.randn(n, n, device=device).to(dtype)  # (n, n)
    out = torch.empty(n, n, dtype=dtype, device=device)  # (n, n)
    return 2 * n**3 / probes.best_seconds(lambda: torch.mm(a, b, out=out), repeats, device)


def _probe(device: torch.device, dtype: str) -> dict:
    """Time the matmul (growing it on the CPU); the best FLOP/s, its size, and the machine's load."""
    torch_dtype = TORCH_DTYPES[dtype]
    before = probes.cpu_times() if device.type == "cpu" else None
    if device.type == "cuda":
        n = CUDA_SIZE
    else:
        n = CPU_SIZES[0]
        while n < CPU_SIZES[1] and 2 * n**3 / _matmul_flops(n, torch_dtype, device, 1) < TARGET_S:
            n *= 2
    best = _matmul_flops(n, torch_dtype, device, REPEATS[device.type])
    why = probes.busy_reason(before, probes.cpu_times() if before is not None else None)
    logger.info("FLOP/s probe (%s, %s): %s at %d%s", probes.machine_key(device), dtype, human_flops(best), n,
                f"; uncertain: {why}" if why else "")
    return {"version": _CACHE_VERSION, "flops_per_s": best, "size": n, "dtype": dtype, "measured_at": time.time(),
            "probes": 1, "uncertain": why is not None, "why": why or ""}


def _valid(entry: object) -> bool:
    return probes.valid(entry, _CACHE_VERSION, "flops_per_s", {"size": int, "dtype": str})


def _explain(entry: dict) -> str:
    calm = "busy" if entry["uncertain"] else "calm"
    text = (f"Peak {human_flops(entry['flops_per_s'])} from a {entry['size']}x{entry['size']} {entry['dtype']} "
            f"matmul, the best of {entry['probes']} {calm} probe(s) within a day.")
    if entry["uncertain"]:
        return text + f" Uncertain: {entry['why']}, so the ridge may be too low." + probes.deferred_sentence(entry)
    return text


def probe_flops(device: torch.device, dtype: str, refresh: bool = False) -> Peak:
    """The peak matmul FLOP/s of `device` in `dtype` at the current thread count: cached when calm, else probed."""
    key = f"{probes.machine_key(device)}:{dtype}"
    entry = probes.cached("flops.json", key, "flops_per_s", _valid, lambda: _probe(device, dtype), refresh)
    return Peak(entry["flops_per_s"], entry["size"], entry["dtype"], entry["probes"], entry["uncertain"],
                _explain(entry))


def decode_flops(params: int, model_config: Any, batch: int, prompt_tokens: int, new_tokens: int) -> float:
    """FLOPs of one decode step (approximately): 2 x the weights' multiply-accumulates per row (an untied input
    embedding is a lookup, not a matmul) plus attention over the mean KV length (QK^T and AV: 4 x layers x
    heads x head_dim per cached position), times the batch."""
    cfg = text_config(model_config)
    layers, heads, _, head_dim = attention_shape(model_config)
    tied = getattr(cfg, "tie_word_embeddings", True)
    macs = params - (0 if tied else (getattr(cfg, "vocab_size", 0) or 0) * cfg.hidden_size)
    kv_mean = prompt_tokens + new_tokens / 2
    return float(batch * (2 * max(macs, 0) + 4 * layers * heads * head_dim * kv_mean))
