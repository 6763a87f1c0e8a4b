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
