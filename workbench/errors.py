"""Errors a user can act on: each carries one clear sentence, shown instead of a traceback."""

from __future__ import annotations


class WorkbenchError(Exception):
    """Base class: `str(error)` is the one sentence shown to the user."""


class ConfigError(WorkbenchError, ValueError):
    """The settings are invalid or cannot work together; nothing was loaded."""


class ModelSourceError(WorkbenchError):
    """The model cannot be found or read (missing folder, offline hub, corrupt weights)."""


class InsufficientMemory(WorkbenchError):
    """The run would not fit in memory; refused by estimate before allocating."""


class DeviceError(WorkbenchError):
    """The requested device does not exist or cannot run this."""


class StoreError(WorkbenchError):
    """The results database cannot be used (corrupt, locked, not a workbench store)."""


class RunFailed(WorkbenchError):
    """The run failed part-way (e.g. out of memory); memory was released."""


class ExportError(WorkbenchError):
    """A figure or report cannot be written (bad path, no usable browser for PNG/SVG, unknown run)."""


def is_oom(error: BaseException) -> bool:
    """True for an out-of-memory failure of the GPU (torch.OutOfMemoryError) or the host allocator."""
    text = str(error).lower()
    return type(error).__name__ == "OutOfMemoryError" or "out of memory" in text or "can't allocate memory" in text
