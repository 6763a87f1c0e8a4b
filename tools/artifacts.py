"""Test artifacts (screenshots, timings) under test-artifacts/, or $WORKBENCH_ARTIFACTS.

The suite runs in parallel processes (pytest-xdist), so a JSON record is read, updated and written under an
exclusive lock, and replaced in one step: two tests recording at once both keep their entries, and a reader
never sees half a file.
"""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path

ARTIFACTS = Path(os.environ.get("WORKBENCH_ARTIFACTS", Path(__file__).resolve().parent.parent / "test-artifacts"))


def record(file: str, key: str, **values: object) -> None:
    """Set `key` to `values` in the JSON object of ARTIFACTS / `file`, keeping every other key."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / file
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        data = json.loads(path.read_text()) if path.exists() else {}
        data[key] = values
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=1))
        os.replace(tmp, path)
