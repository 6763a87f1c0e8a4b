"""Execution settings of a process: which device, how many CPU threads."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

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
