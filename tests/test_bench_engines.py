"""bench/engines.py's pieces that decide what it reports: llama-bench's output, the targets, the tables.

No timing is asserted: the rows below are made up, and only the verdicts drawn from them are checked.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def engines(bench_script):
    return bench_script("engines")


def _speed(config, rate, speedup, fraction=0.5, plain=None, sound=True):
    return {"config": config, "decode_tokens_per_s": rate, "speedup": speedup, "fraction_of_roofline": fraction,
            "plain_loop_tokens_per_s": plain, "fidelity_ratio": rate / plain if plain else None,
            "weights_bytes": 1 << 20, "decode_sound": sound}


def _acc(config, perplexity, kl, sound=True):
    return {"config": config, "perplexity": perplexity, "kl_vs_baseline": kl, "top1_agreement": 1.0,
            "greedy_match": 1.0, "eval_tokens": 4096, "weights_bytes": 1 << 20, "decode_sound": sound}


SPEED = [_speed("PyTorch fp32 eager", 25.0, 1.0), _speed("llama.cpp F32", 40.0, 1.6, plain=41.0),
         _speed("llama.cpp Q8_0", 90.0, 3.6, plain=80.0), _speed("llama.cpp Q2_K", 200.0, 8.0, fraction=1.2)]
ACC = [_acc("PyTorch fp32 eager", 40.0, 0.0), _acc("llama.cpp F32", 40.1, 0.0004), _acc("llama.cpp Q8_0", 40.3, 0.02),
       _acc("llama.cpp Q2_K", 60.0, 0.9)]


def _verdicts(rows):
    return {r["target"].split(" (")[0]: r["met"] for r in rows}


def test_parse_llama_bench_takes_the_generation_test(engines):
    out = json.dumps([{"n_prompt": 512, "n_gen": 0, "avg_ts": 900.0},
                      {"n_prompt": 0, "n_gen": 128, "avg_ts": 88.7}])
    assert engines.parse_llama_bench(out, 128) == 88.7
    with pytest.raises(ValueError, match="no tg64"):
        engines.parse_llama_bench(out, 64)


def test_find_llama_bench_looks_where_dev_sh_builds_it(engines, tmp_path, monkeypatch):
    monkeypatch.setenv("WORKBENCH_WHEELS", str(tmp_path))
    assert engines.find_llama_bench() is None
    binary = tmp_path / "llama-bench-avx512" / "llama-bench"
    binary.parent.mkdir()
    binary.write_text("")
    assert engines.find_llama_bench() == binary


def test_every_gguf_type_and_both_pytorch_baselines_are_benchmarked(engines):
    from workbench.techniques.gguf import GGUF_TYPES

    specs = {c.techniques for c in engines.CONFIGS if c.engine == "llamacpp"}
    assert {(f"gguf:type={t}",) for t in GGUF_TYPES} | {()} == specs
    assert {c.dtype for c in engines.CONFIGS if c.engine == "llamacpp" and not c.techniques} == {"fp32", "fp16", "bf16"}
    assert [c.engine for c in engines.CONFIGS[:3]] == ["hf", "hf", "hf"]


def test_every_configuration_makes_a_valid_run_for_speed_and_accuracy(engines):
    """A compiled configuration needs a warm-up call in its accuracy run too (RunConfig refuses compile without)."""
    for c in engines.CONFIGS:
        speed = c.run_config(engines.SPEED_MODEL, 2, max_new_tokens=128, warmup=1, repeats=3, eval_tokens=0)
        acc = c.run_config("tiny", 2, max_new_tokens=8, warmup=c.accuracy_warmup(), repeats=1, eval_tokens=4096,
                           eval_context=256)
        assert speed.compile == acc.compile == dict(c.execution).get("compile", False)
    assert {c.label for c in engines.CONFIGS if c.execution} == {"PyTorch w8a8 + torch.compile",
                                                                 "PyTorch w4a16 + torch.compile",
                                                                 "PyTorch w4a8 + torch.compile"}


def test_targets_met_and_missed(engines):
    lb = {"tokens_per_s": 95.0, "status": "ok"}
    v = _verdicts(engines.targets(SPEED, ACC, lb))
    assert v["conversion: F32 perplexity vs PyTorch fp32"] is True  # 0.25 % apart
    assert v["conversion: F32 KL vs PyTorch fp32"] is True
    assert v["conversion: Q8_0 KL vs PyTorch fp32"] is False  # 0.02 >= 0.01
    assert v["fidelity: llama.cpp F32 decode, workbench / plain loop"] is True
    assert v["fidelity: llama.cpp Q8_0 decode, workbench / plain loop"] is False  # 1.125
    assert v["llama.cpp Q8_0 decode, workbench / llama-bench tg"] is True  # 90 / 95
    assert v["highest fraction of the roofline"] is False  # Q2_K at 120 %


def test_the_budget_winner_is_the_fastest_within_five_percent(engines):
    """Q2_K is fastest but 50 % worse; Q8_0 (+0.75 %) wins at 3.6x. A decode that disagrees with itself never wins."""
    best = engines.budget_target(SPEED, ACC)
    assert (best["measured"], best["met"], best["note"]) == (3.6, True, "llama.cpp Q8_0")
    unsound = [dict(r, decode_sound=r["config"] != "llama.cpp Q8_0") for r in SPEED]
    best = engines.budget_target(unsound, ACC)
    assert (best["measured"], best["met"], best["note"]) == (1.6, False, "llama.cpp F32")


def test_missing_llama_bench_is_reported_not_measured(engines):
    lb = {"tokens_per_s": None, "status": engines.NOT_BUILT, "runs": []}
    rows = engines.targets(SPEED, ACC, lb)
    row = next(r for r in rows if "llama-bench" in r["target"])
    assert row["met"] is None and row["note"] == engines.NOT_BUILT
    result = {"cpu": "cpu", "threads": 2, "platform": "linux", "date": "today", "bandwidth": "20 GB/s",
              "rounds": 3, "new_tokens": 128, "targets": rows, "accuracy": ACC,
              "speed": {"model": "preset:llama-124m", "rows": SPEED, "llama_bench": lb}}
    text = engines.markdown(result)
    assert "| llama-bench Q8_0 | not built: run `bash dev.sh llama-bench` |" in text
    assert "| not measured |" in text and "| **missed** |" in text
    assert "| llama.cpp Q8_0 | 90.0 | 3.60x | 50% |" in text


def test_plain_loop_times_a_gguf_file(engines):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (bash dev.sh setup builds it)")
    from workbench.config import RunConfig
    from workbench.engines.llamacpp import prepared_gguf

    cfg = RunConfig(model="tiny", engine="llamacpp", techniques=("gguf:type=Q8_0",), max_new_tokens=8, eval_tokens=0)
    path, prompt = engines.gguf_file(cfg, {})
    assert path.exists() and path == prepared_gguf(cfg)
    assert len(prompt) > 1
    assert engines.plain_decode(path, prompt, 8, 1, 1) > 0


def test_importing_one_engine_module_first_still_finds_every_engine():
    """bench/engines.py and notebook 06 import workbench.engines.llamacpp (prepared_gguf) before any run."""
    code = ("import workbench.engines.llamacpp\nfrom workbench.engines.base import engine_class\n"
            "print(engine_class('hf').name, engine_class('llamacpp').name)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.split() == ["hf", "llamacpp"]
