"""bench/preset_build.py: both builds run, alternate and are reported (no timing is asserted)."""

from __future__ import annotations

import pytest

from workbench.models.presets import PRESETS, Preset


@pytest.fixture
def bench(bench_script):
    return bench_script("preset_build")


def test_the_preset_build_bench_times_both_builds_and_writes_its_table(bench, monkeypatch, tmp_path):
    monkeypatch.setitem(PRESETS, "test-bench", Preset("test-bench", "LlamaConfig", tuple(sorted(dict(
        vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4).items())),
        "test"))
    calls = []
    for name in ("from_config", "build_preset"):
        monkeypatch.setattr(bench, name, lambda *a, _f=getattr(bench, name), _n=name: calls.append(_n) or _f(*a))
    out = tmp_path / "preset_build.md"
    assert bench.main(["--presets", "test-bench", "--rounds", "2", "--markdown", str(out)]) == 0
    assert calls == ["from_config", "build_preset"] * 3  # one untimed round, then two alternating
    text = out.read_text()
    assert "--rounds 2" in text and "| `preset:test-bench` |" in text and text.count(" s |") == 2


def test_the_preset_build_bench_refuses_zero_rounds(bench, capsys):
    with pytest.raises(SystemExit):
        bench.main(["--rounds", "0"])
    assert "--rounds must be at least 1" in capsys.readouterr().err
