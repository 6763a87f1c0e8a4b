"""The accuracy baseline's disk cache when several processes write the same entry at once."""

from __future__ import annotations

import json
import os
from pathlib import Path

from workbench.measure import baseline


def test_processes_saving_the_same_baseline_at_once_do_not_collide(monkeypatch, tmp_path):
    """Four dashboard pages pressing Run together compute the same baseline in four kernels. With one temporary
    name per entry, a kernel's rename found its file already renamed by another ("No such file or directory:
    '...-greedy-....tmp' -> '...-greedy-....json'") and that page's run failed."""
    monkeypatch.setattr(baseline, "_dir", lambda: tmp_path)
    monkeypatch.setattr(baseline, "_memory", {})
    keys = baseline.BaselineKeys(eval_key=None, greedy_key="model-greedy-abc")
    replace, pid, others = Path.replace, os.getpid(), []

    def racing_replace(self: Path, target: Path) -> Path:
        if not others:  # another kernel writes and renames the same entry between this write and this rename
            others.append(pid + 1)
            with monkeypatch.context() as m:
                m.setattr(os, "getpid", lambda: pid + 1)
                baseline.save(keys, None, [1, 2, 3])
        return replace(self, target)

    monkeypatch.setattr(Path, "replace", racing_replace)
    baseline.save(keys, None, [1, 2, 3])
    assert others and json.loads((tmp_path / "model-greedy-abc.json").read_text()) == [1, 2, 3]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model-greedy-abc.json"]
