"""The test suite keeps its caches and temporary files in one folder per process, and removes it when it ends."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_a_test_session_removes_its_folder_when_it_ends(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "WORKBENCH_"))}
    env["TMPDIR"] = str(tmp_path)  # where conftest makes the session's folder
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist",
                           "tests/test_deferred.py::test_which_modules_are_deferred"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "1 passed" in done.stdout
    assert list(tmp_path.iterdir()) == []  # the session's folder (its caches, TMPDIR, tmp_path folders) is gone
