"""Where the workbench keeps caches (baselines, bandwidth) and temporary files."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """`$WORKBENCH_CACHE_DIR`, else `~/.cache/llm-workbench`; created on first use."""
    root = os.environ.get("WORKBENCH_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "llm-workbench")
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def compile_cache() -> Path:
    """torch.compile's cache folder: `$TORCHINDUCTOR_CACHE_DIR` if set, else one inside the workbench cache.

    Set before the first compilation, so compiled graphs are reused across runs and processes
    instead of being written to the system temp folder.
    """
    path = Path(os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_dir() / "inductor")))
    path.mkdir(parents=True, exist_ok=True)
    return path


def students_dir() -> Path:
    """Where distilled students are saved: `$WORKBENCH_STUDENTS_DIR`, else `students/` in the cache; created."""
    root = os.environ.get("WORKBENCH_STUDENTS_DIR")
    path = Path(root).expanduser() if root else cache_dir() / "students"
    path.mkdir(parents=True, exist_ok=True)
    return path
