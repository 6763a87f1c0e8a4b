"""bench/generate_loop.py: run as users run it (`python bench/generate_loop.py ...`), on the reference model.

No timing is asserted: only that every way decodes, the ways agree on the tokens, and the tables are filled.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def loop(bench_script):
    return bench_script("generate_loop")


def test_configurations_parse(loop):
    assert loop.parse("fp32") == ("fp32", (), False)
    assert loop.parse("bf16|compile") == ("bf16", (), True)
    assert loop.parse("fp32|w4a16:group_size=64|compile") == ("fp32", ("w4a16:group_size=64",), True)
    assert loop.parse("fp32|dynamic-int8|magnitude") == ("fp32", ("dynamic-int8", "magnitude"), False)
    assert loop.label("fp32|w8a8|compile") == "fp32 + w8a8 + compile"


def test_the_script_times_every_way_on_tiny(tmp_path):
    out_json, out_md = tmp_path / "loop.json", tmp_path / "loop.md"
    cmd = [sys.executable, str(ROOT / "bench" / "generate_loop.py"), "--model", "tiny", "--config", "fp32",
           "--config", "fp32|w8a8|compile", "--new-tokens", "4", "--rounds", "1", "--threads", "1",
           "--json", str(out_json), "--markdown", str(out_md)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out_json.read_text())
    assert [r["config"] for r in result["rows"]] == ["fp32", "fp32|w8a8|compile"]
    for row in result["rows"]:
        assert list(row["ms_per_step"]) == ["plain loop", "generate, fixed length", "generate, min_new_tokens"]
        assert all(math.isfinite(v) for v in row["ms_per_step"].values())  # a sign would be a timing assertion
        assert row["overhead_ms"]["plain loop"] == 0
    text = out_md.read_text()
    assert "`python bench/generate_loop.py --model tiny --new-tokens 4 --rounds 1`" in text
    table = [line for line in text.splitlines() if line.startswith("| ")]
    assert len(table) == 2 + 2 * 3  # header, rule, three ways per configuration
    assert all(line.count("|") == 6 for line in table)  # five cells: no pipe inside a cell


def test_bad_arguments_are_refused():
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "generate_loop.py"), "--new-tokens", "1"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "--new-tokens must be at least 2" in done.stderr


def test_loops_that_decode_different_tokens_are_not_compared(loop, monkeypatch):
    def fake_timers(model, tokenizer, compiled, new_tokens):
        return {way: (lambda n, i=i: (0.01 * n, [i] * n)) for i, way in enumerate(loop.WAYS)}

    monkeypatch.setattr(loop, "timers", fake_timers)
    with pytest.raises(SystemExit, match="fp32: the decode loops disagree on the tokens"):
        loop.measure("tiny", "fp32", new_tokens=3, rounds=1)
