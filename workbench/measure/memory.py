"""Memory: real storage of weights (packed/quantized counted), KV-cache bytes, host and GPU peaks."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any

import psutil
import torch


logger = logging.getLogger(__name__)


def _tensor_bytes(t: torch.Tensor, seen: set[tuple[str, int]]) -> int:
    """Bytes of a tensor's own storage, recursing into tensor subclasses (torchao, bnb, quantized).

    A tensor-parallel DTensor counts its local shard's elements: the bytes this rank reads per token. (Its
    shard may be a view into the whole memory-mapped checkpoint tensor, whose untouched pages cost no RAM.)
    """
    if not isinstance(t, torch.Tensor):
        return 0
    if hasattr(t, "device_mesh") and hasattr(t, "to_local"):
        local = t.to_local()
        key = ("shard:" + str(local.device), local.data_ptr())
        if key in seen and key[1] != 0:
            return 0
        seen.add(key)
        return local.numel() * local.element_size()
    flatten = getattr(type(t), "__tensor_flatten__", None)
    if flatten is not None and type(t) not in (torch.Tensor, torch.nn.Parameter):
        names, _ = t.__tensor_flatten__()
        return sum(_tensor_bytes(getattr(t, n), seen) for n in names)
    if t.is_quantized:  # torch.ao quantized tensor: int storage + per-channel scales/zero points
        extra = 0
        if t.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
            extra = _tensor_bytes(t.q_per_channel_scales(), seen) + _tensor_bytes(t.q_per_channel_zero_points(), seen)
        return t.numel() * t.element_size() + extra
    if t.device.type == "meta":
        return t.numel() * t.element_size()
    try:
        storage = t.untyped_storage()
        key = (str(t.device), storage.data_ptr())
    except (RuntimeError, NotImplementedError):
        return t.numel() * t.element_size()
    if key in seen and key[1] != 0:
        return 0
    seen.add(key)
    return storage.nbytes()


def _walk(value: Any) -> list[torch.Tensor]:
    """Tensors inside a state-dict value (packed params are tuples of tensors)."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _walk(v)]
    return []


def weight_bytes(model: torch.nn.Module) -> int:
    """Real bytes of every parameter and buffer (tied weights once; packed/quantized storage as stored)."""
    seen: set[tuple[str, int]] = set()
    total = 0
    for value in model.state_dict(keep_vars=True).values():
        for t in _walk(value):
            total += _tensor_bytes(t, seen)
    return total


def parameter_count(model: torch.nn.Module) -> int:
    """Logical parameter count (tied weights once; 4-bit packed weights by their unpacked shape)."""
    total, seen = 0, set()
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        shape = getattr(getattr(p, "quant_state", None), "shape", None)
        total += int(torch.Size(shape).numel()) if shape is not None else p.numel()
    for module in model.modules():  # packed modules (e.g. dynamic int8 Linear) hide their weights
        count = getattr(module, "_workbench_param_count", None)
        if count:
            total += count
    return total


def cache_bytes(cache: Any) -> int:
    """Bytes held by a transformers KV cache (any Cache subclass, or legacy tuples)."""
    seen: set[tuple[str, int]] = set()
    layers = getattr(cache, "layers", None)
    if layers is not None:
        tensors = [t for layer in layers for t in (getattr(layer, "keys", None), getattr(layer, "values", None))
                   if isinstance(t, torch.Tensor)]
        # a QuantizedCache layer keeps only its newest positions in keys/values; the rest is its quantized storage:
        # a tensor subclass (quanto: data, scale, shift) or (packed tensor, meta dict of scale/zero tensors) (hqq)
        for layer in layers:
            for stored in (getattr(layer, "_quantized_keys", None), getattr(layer, "_quantized_values", None)):
                tensors += _walk(list(stored[1].values()) + [stored[0]] if isinstance(stored, tuple)
                                 and isinstance(stored[-1], dict) else stored)
    else:
        tensors = _walk(cache)
    return sum(_tensor_bytes(t, seen) for t in tensors if t.numel())


# ---------------------------------------------------------------- host and GPU peaks

def _read_status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def reset_host_peak() -> bool:
    """Reset the kernel's high-water mark (VmHWM) to the current RSS; False where Linux won't."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def host_rss() -> int:
    """Current resident set size of this process."""
    return psutil.Process().memory_info().rss


class HostPeak:
    """Context manager: peak resident memory inside the block.

    Uses VmHWM after resetting it through /proc/self/clear_refs; elsewhere falls back to sampling
    RSS every 5 ms in a thread (which can miss short spikes; `method` says which was used).
    """

    def __init__(self) -> None:
        self.peak: int | None = None
        self.method = ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._sampled = 0

    def __enter__(self) -> HostPeak:
        if reset_host_peak() and _read_status_kib("VmHWM") is not None:
            self.method = "VmHWM (reset via /proc/self/clear_refs)"
        else:
            self.method = "RSS sampled every 5 ms"
            self._sampled = host_rss()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self._sampled = max(self._sampled, host_rss())

    def __exit__(self, *exc: Any) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self.peak = max(self._sampled, host_rss())
        else:
            self.peak = _read_status_kib("VmHWM")


@dataclass
class GpuPeaks:
    """Allocator peaks of one phase on one CUDA device."""

    allocated: int | None = None
    reserved: int | None = None
    nvml_used: int | None = None


class GpuPeak:
    """Context manager: CUDA allocator peaks inside the block (reset on entry); no-op on CPU."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peaks = GpuPeaks()

    def __enter__(self) -> GpuPeak:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.device.type != "cuda":
            return
        torch.cuda.synchronize(self.device)
        self.peaks = GpuPeaks(torch.cuda.max_memory_allocated(self.device),
                              torch.cuda.max_memory_reserved(self.device), nvml_used_bytes(self.device))


def nvml_used_bytes(device: torch.device) -> int | None:
    """Device memory in use as NVML sees it (all processes), when nvidia-ml-py is installed."""
    try:
        import pynvml

        pynvml.nvmlInit()
        index = device.index if device.index is not None else torch.cuda.current_device()
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        return int(pynvml.nvmlDeviceGetMemoryInfo(handle).used)
    except Exception:  # noqa: BLE001 - NVML is optional; any failure means "not available"
        return None


def available_bytes(device: torch.device) -> int:
    """Memory a run may still take on `device` (host: available RAM; CUDA: free device memory)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    avail = psutil.virtual_memory().available
    headroom = _cgroup_headroom()
    return min(avail, headroom) if headroom is not None else avail


def _read_int(path: str) -> int | None:
    try:
        with open(path) as f:  # closed at once (an unclosed file is a ResourceWarning per run)
            text = f.read().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _cgroup_headroom() -> int | None:
    """What the container's memory limit still allows (cgroup v2, then v1), when a limit is set."""
    for limit_path, used_path in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                  ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                   "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        limit, used = _read_int(limit_path), _read_int(used_path)
        if limit is not None and used is not None and limit < 1 << 60:
            return max(0, limit - used)
    return None

