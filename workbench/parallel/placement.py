"""Model split across devices (pipeline-style placement) and CPU/disk offload, through accelerate."""

from __future__ import annotations

import logging
import os
import re
import tempfile
from dataclasses import dataclass
from typing import Any

import torch

from workbench.errors import ConfigError

logger = logging.getLogger(__name__)

AUTO_MAPS = ("auto", "balanced", "sequential")
_DEVICE = re.compile(r"^(cpu|disk|cuda|cuda:\d+|\d+)$")
_RANGE = re.compile(r"^(.*?)(\d+)-(\d+)$")
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(B|KiB|MiB|GiB|TiB|KB|MB|GB|TB)?\s*$", re.IGNORECASE)
_UNITS = {"b": 1, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40, "kb": 10**3, "mb": 10**6,
          "gb": 10**9, "tb": 10**12}


@dataclass(frozen=True)
class DeviceMapSpec:
    """A parsed --device-map: an accelerate strategy, or explicit (module, device) rules in order."""

    strategy: str | None
    rules: tuple[tuple[str, str], ...] = ()


def _expand(pattern: str) -> list[str]:
    """'model.layers.0-2' -> model.layers.0, model.layers.1, model.layers.2."""
    match = _RANGE.match(pattern)
    if not match:
        return [pattern]
    prefix, lo, hi = match.group(1), int(match.group(2)), int(match.group(3))
    if hi < lo:
        raise ValueError(f"device_map range {pattern!r} runs backwards")
    return [f"{prefix}{i}" for i in range(lo, hi + 1)]


def parse_device_map(spec: str) -> DeviceMapSpec:
    """Parse `auto` / `balanced` / `sequential` or `MODULES=DEVICE;...` (ValueError naming the problem)."""
    spec = spec.strip()
    if spec in AUTO_MAPS:
        return DeviceMapSpec(spec)
    rules = []
    for item in filter(None, (p.strip() for p in spec.split(";"))):
        name, eq, device = item.partition("=")
        if not eq or not name.strip():
            raise ValueError(f"device_map entries look like 'model.layers.0-3=cpu'; got {item!r}")
        device = device.strip()
        if not _DEVICE.match(device):
            raise ValueError(f"device_map device must be cpu, disk, cuda or cuda:N; got {device!r}")
        rules += [(module, f"cuda:{device}" if device.isdigit() else device) for module in _expand(name.strip())]
    if not rules:
        raise ValueError(f"device_map must be {', '.join(AUTO_MAPS)} or 'MODULES=DEVICE;...'; got {spec!r}")
    return DeviceMapSpec(None, tuple(rules))


def parse_max_memory(spec: str) -> dict[str, int]:
    """'cpu=2GiB,cuda:0=10GiB' -> {'cpu': 2147483648, 0: ...} as accelerate wants it (ValueError otherwise)."""
    out: dict[Any, int] = {}
    for item in filter(None, (p.strip() for p in spec.split(","))):
        device, eq, size = item.partition("=")
        match = _SIZE.match(size)
        if not eq or not match or not _DEVICE.match(device.strip()) or device.strip() == "disk":
            raise ValueError(f"max_memory entries look like 'cpu=2GiB' or 'cuda:0=10GiB'; got {item!r}")
        key: Any = device.strip()
        if key.startswith("cuda"):
            key = int(key.split(":")[1]) if ":" in key else 0
        out[key] = int(float(match.group(1)) * _UNITS[(match.group(2) or "B").lower()])
    return out


def _check_devices(devices: set[str]) -> None:
    cuda = [d for d in devices if d.startswith("cuda")]
    if cuda and not torch.cuda.is_available():
        raise ConfigError(f"device_map puts layers on {sorted(cuda)[0]}, but this machine has no CUDA GPU")
    for d in cuda:
        index = int(d.split(":")[1]) if ":" in d else 0
        if index >= torch.cuda.device_count():
            raise ConfigError(f"device_map names {d}, which does not exist: this machine has "
                              f"{torch.cuda.device_count()} GPU(s)")


def explicit_map(model: torch.nn.Module, spec: DeviceMapSpec, default: str) -> dict[str, str]:
    """A full accelerate device map: the rules for the modules they name, `default` for everything else."""
    modules = dict(model.named_modules())
    blocks = sorted(n for n in modules if re.search(r"\.\d+$", n))
    for name, _ in spec.rules:
        if name not in modules or name == "":
            example = f" (it has {blocks[0]} .. {blocks[-1]})" if blocks else ""
            raise ConfigError(f"device_map names {name}, which this model does not have{example}")
    _check_devices({d for _, d in spec.rules})
    named = dict(spec.rules)
    out: dict[str, str] = {}
    for name, child in model.named_children():  # top-down: a named module takes its whole subtree
        out.update(_assign(name, child, named, default))
    return out


def _assign(name: str, module: torch.nn.Module, named: dict[str, str], default: str) -> dict[str, str]:
    if name in named:
        return {name: named[name]}
    if not any(n.startswith(name + ".") for n in named):
        return {name: default}
    out: dict[str, str] = {}
    for child_name, child in module.named_children():
        out.update(_assign(f"{name}.{child_name}", child, named, default))
    direct = [n for n, _ in module.named_parameters(recurse=False)] + [n for n, _ in module.named_buffers(recurse=False)]
    for leaf in direct:  # parameters held directly by a split module stay on the default device
        out[f"{name}.{leaf}"] = default
    return out


@dataclass
class Placement:
    """Where each part of a dispatched model lives (module -> device) and the bytes per device."""

    device_map: dict[str, str]
    bytes_by_device: dict[str, int]
    offload_dir: str | None = None


def module_bytes(model: torch.nn.Module, device_map: dict[str, str]) -> dict[str, int]:
    """Bytes of the parameters and buffers each device holds under `device_map`."""
    sizes: dict[str, int] = {}
    tensors = dict(model.named_parameters()) | dict(model.named_buffers())
    for name, tensor in tensors.items():
        owner = next((m for m in sorted(device_map, key=len, reverse=True) if name == m or name.startswith(m + ".")),
                     None)
        device = device_map.get(owner, "cpu") if owner is not None else "cpu"
        sizes[device] = sizes.get(device, 0) + tensor.numel() * tensor.element_size()
    return sizes


def _auto_map(model: torch.nn.Module, strategy: str, max_memory: dict[Any, int] | None) -> dict[str, str]:
    from accelerate import infer_auto_device_map
    from accelerate.utils import get_balanced_memory

    no_split = list(getattr(model, "_no_split_modules", None) or [])
    if strategy == "balanced":
        max_memory = get_balanced_memory(model, max_memory=max_memory, no_split_module_classes=no_split)
    raw = infer_auto_device_map(model, max_memory=max_memory, no_split_module_classes=no_split)
    return {k: f"cuda:{v}" if isinstance(v, int) else str(v) for k, v in raw.items()}


def fill_max_memory(max_memory: dict[Any, int] | None) -> dict[Any, int] | None:
    """A --max-memory cap for the devices it names, and what accelerate finds free on every other device (so
    'cuda:0=4GiB' caps the GPU and leaves the rest to the CPU, then the disk); None stays None."""
    if max_memory is None:
        return None
    from accelerate.utils import get_max_memory

    return {**get_max_memory(), **max_memory}


def device_map_for(model: torch.nn.Module, spec: DeviceMapSpec, default: torch.device,
                   max_memory: dict[Any, int] | None = None) -> dict[str, str]:
    """Module -> device for `model` (a meta model sized as it will load is enough): an accelerate strategy
    under the memory caps, or the explicit rules with `default` for the modules they do not name."""
    if spec.strategy:
        return _auto_map(model, spec.strategy, fill_max_memory(max_memory))
    return explicit_map(model, spec, str(default))


def main_device(device_map: dict[str, str]) -> torch.device:
    """Where a dispatched model computes: its first GPU, else the CPU."""
    gpus = sorted(d for d in set(device_map.values()) if d.startswith("cuda"))
    return torch.device(gpus[0]) if gpus else torch.device("cpu")


def offloaded(device_map: dict[str, str]) -> list[str]:
    """Modules whose weights live away from where they compute (disk; the CPU when a GPU computes)."""
    gpu = main_device(device_map).type == "cuda"
    return [m for m, d in device_map.items() if d == "disk" or (gpu and d == "cpu")]


def offload_dir(root: str | None) -> str:
    """A new folder for one run's offloaded weights, inside `root` (default: the system's temporary folder)."""
    return tempfile.mkdtemp(prefix="workbench-offload-", dir=root or None)


def check_offload_folder(root: str | None) -> None:
    """Refuse, before anything loads, an offload folder that cannot be created or written (ConfigError)."""
    where = root or tempfile.gettempdir()
    try:
        os.makedirs(where, exist_ok=True)
        os.rmdir(offload_dir(where))
    except OSError as e:
        raise ConfigError(f"offload_folder {where!r} is not writable ({e.strerror or e}); offloaded layers are "
                          "written there: choose a writable folder") from None


def place(model: torch.nn.Module, spec: DeviceMapSpec, default: torch.device,
          max_memory: dict[Any, int] | None = None, offload_root: str | None = None) -> tuple[torch.nn.Module, Placement]:
    """Dispatch a loaded model over devices (CPU, GPUs, disk) with accelerate's hooks; return it and its placement.

    For a model changed whole after loading (pruning); otherwise `from_pretrained` places it while loading.
    """
    from accelerate import dispatch_model

    device_map = device_map_for(model, spec, default, max_memory)
    sizes = module_bytes(model, device_map)
    devices = set(device_map.values())
    folder = offload_dir(offload_root) if "disk" in devices else None
    accel_map = {k: (int(v.split(":")[1]) if v.startswith("cuda:") else v) for k, v in device_map.items()}
    model = dispatch_model(model, device_map=accel_map, main_device=main_device(device_map), offload_dir=folder)
    logger.info("placed the model: %s", {d: sum(1 for v in device_map.values() if v == d) for d in devices})
    return model, Placement(device_map, sizes, folder)
