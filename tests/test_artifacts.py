"""tools.artifacts: the suite's JSON records survive tests that record at the same time (pytest-xdist)."""

from __future__ import annotations

import json
import multiprocessing

import tools.artifacts as artifacts


def _record_many(folder: str, prefix: str, n: int) -> None:
    artifacts.ARTIFACTS = artifacts.Path(folder)
    for i in range(n):
        artifacts.record("shared.json", f"{prefix}{i}", i=i)


def test_two_processes_recording_at_once_keep_every_entry(tmp_path, monkeypatch):
    monkeypatch.setattr(artifacts, "ARTIFACTS", tmp_path)
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_record_many, args=(str(tmp_path), prefix, 200)) for prefix in "ab"]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0]
    data = json.loads((tmp_path / "shared.json").read_text())
    assert len(data) == 400 and data["a199"] == {"i": 199} and data["b0"] == {"i": 0}
    assert not list(tmp_path.glob("*.tmp"))
