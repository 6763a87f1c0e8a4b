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


def share_import_path() -> None:
    """Make the processes this one starts (ranks, isolated sweep configurations) import this very `workbench`.

    Started as `python -m workbench...`, a child finds the package only where Python looks by itself. Run from a
    checkout that is not installed (pytest's `pythonpath`, a GPU machine without pip access) it would not: the
    checkout's root goes first on PYTHONPATH, once. A package installed into site-packages is found already, and
    that folder is never put on PYTHONPATH (it would come before the standard library).
    """
    root = str(Path(__file__).resolve().parent.parent)
    if Path(root).name in ("site-packages", "dist-packages"):
        return
    parts = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if root not in parts:
        os.environ["PYTHONPATH"] = os.pathsep.join([root, *parts])


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


STORE_ENV = "WORKBENCH_STORE"
STORE_NAME = "results.sqlite"


def data_dir() -> Path:
    """The workbench's data folder: `$XDG_DATA_HOME/workbench`, else `~/.local/share/workbench` (not created here)."""
    root = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(root) / "workbench"


def default_store() -> Path:
    """The one results store every entry point uses unless told otherwise: `$WORKBENCH_STORE`, else
    `results.sqlite` in the data folder. Not created here (a store file appears with its first run)."""
    explicit = os.environ.get(STORE_ENV)
    return Path(explicit).expanduser() if explicit else data_dir() / STORE_NAME


def store_path(given: str | os.PathLike[str] | None = None) -> Path:
    """`given` (a `--store` flag, a `store_path` argument) when set, else the default store."""
    return Path(given).expanduser() if given else default_store()


STORE_HELP = ("results database (default: $WORKBENCH_STORE if set, else results.sqlite in $XDG_DATA_HOME/workbench, "
              "i.e. ~/.local/share/workbench/results.sqlite)")
