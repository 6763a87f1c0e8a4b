"""Tensor- and data-parallel runs on torch.distributed (gloo, 2 CPU ranks), under our launcher and torchrun."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from workbench import errors
from workbench.config import RunConfig
from workbench.events import RepeatEvent, StageEvent, TokenEvent
from workbench.parallel import distributed as d
from workbench.runner import run

ROOT = Path(__file__).resolve().parents[1]
needs_two_cores = pytest.mark.skipif(d.cpu_cores() < 2, reason="needs 2 CPU cores (one per rank)")


def _torchrun(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc-per-node 2 ARGS` as users start it."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *args]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


# --- pure helpers -------------------------------------------------------------------------------------

def test_share_gives_every_row_to_exactly_one_rank():
    rows = list(range(7))
    for world in (1, 2, 3, 7):
        parts = [d.share(rows, r, world) for r in range(world)]
        assert [x for p in parts for x in p] == rows  # contiguous, in order, each once
        assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_more_ranks_than_cores_is_refused_in_one_sentence():
    too_many = d.cpu_cores() + 1
    with pytest.raises(errors.ConfigError, match=r"needs \d+ CPU cores \(one per rank\), but this machine has"):
        d.layout(RunConfig(model="tiny", device="cpu", data_parallel=too_many, batch_size=too_many))


def test_architecture_without_a_tensor_parallel_plan_is_refused():
    with pytest.raises(errors.ConfigError, match="has no tensor-parallel plan"):
        d._check_tensor_plan(RunConfig(model="preset:gpt2-124m", device="cpu"), 2)


def test_heads_must_split_evenly():
    with pytest.raises(errors.ConfigError, match=r"must divide tiny's 8 attention heads .* possible values: 2, 4, 8"):
        d._check_tensor_plan(RunConfig(model="tiny", device="cpu"), 3)


def test_a_gpu_that_does_not_exist_is_refused():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(errors.WorkbenchError, match="CUDA"):
        run(RunConfig(model="tiny", device="cuda", tensor_parallel=2))


def test_worker_refuses_a_world_that_does_not_match_the_config():
    from workbench.parallel.worker import _check_world, _Ctx

    with pytest.raises(errors.ConfigError, match="3 ranks were started but the run asks for data_parallel 2"):
        _check_world(_Ctx(RunConfig(model="tiny", data_parallel=2, batch_size=2), 0, 3, 0, 3))
    with pytest.raises(errors.ConfigError, match="give --tensor-parallel 2, --data-parallel 2 or --pipeline-parallel 2"):
        _check_world(_Ctx(RunConfig(model="tiny"), 0, 2, 0, 2))


def test_worker_outside_torchrun_explains_itself(monkeypatch):
    for key in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(errors.ConfigError, match="start ranks with torchrun"):
        d.world_from_env()


# --- real ranks -----------------------------------------------------------------------------------------

@needs_two_cores
def test_two_rank_tensor_parallel_logits_and_greedy_tokens_equal_one_process(tiny, tmp_path):
    out = tmp_path / "tp.pt"
    proc = _torchrun("tests/tp_logits.py", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    sharded = torch.load(out)
    with torch.no_grad():
        logits = tiny.model(sharded["ids"]).logits
        greedy = tiny.model.generate(sharded["ids"], max_new_tokens=12, do_sample=False)
    assert (sharded["logits"] - logits).abs().max().item() < 1e-4  # measured: 2e-6
    assert torch.equal(sharded["greedy"], greedy)


@needs_two_cores
def test_tensor_parallel_run_streams_live_and_matches_the_unsplit_model(fast):
    config = fast(device="cpu", tensor_parallel=2, max_new_tokens=8)
    seen: list = []
    result = run(config, on_event=seen.append)
    single = run(fast(device="cpu", max_new_tokens=8))
    assert result.status == "ok", result.error
    assert result.parallel.kind == "tensor" and result.parallel.world_size == 2
    assert result.parallel.backend == "gloo" and [r.rank for r in result.parallel.ranks] == [0, 1]
    assert all(r.busy is not None and 0 < r.busy <= 1.5 for r in result.parallel.ranks)
    assert result.outputs == single.outputs  # same greedy continuation
    assert result.accuracy.kl_vs_baseline < 1e-6 and result.accuracy.greedy_match_vs_baseline == 1.0
    tokens = [e for e in seen if isinstance(e, TokenEvent)]
    assert tokens and any(isinstance(e, RepeatEvent) for e in seen)
    assert {e.stage for e in seen if isinstance(e, StageEvent)} >= {"load", "measure", "evaluate"}
    assert result.config == config  # the caller's config, not a rank's


@needs_two_cores
def test_data_parallel_gives_every_prompt_exactly_one_answer(fast):
    config = fast(device="cpu", data_parallel=2, batch_size=5, eval_tokens=0)
    result = run(config)
    single = run(fast(device="cpu", batch_size=5, eval_tokens=0))
    assert result.status == "ok", result.error
    assert len(result.outputs) == 5
    assert [r.rows for r in result.parallel.ranks] == [3, 2]
    assert result.outputs == single.outputs  # each prompt's answer, in prompt order
    rates = [r.decode_tokens_per_s for r in result.parallel.ranks]
    assert result.parallel.aggregate_decode_tokens_per_s == pytest.approx(sum(rates))
    assert any("data parallel" in w for w in result.warnings)


@needs_two_cores
def test_stop_reaches_every_rank_and_returns_the_partial_result(fast):
    config = fast(device="cpu", data_parallel=2, batch_size=2, repeats=50, max_new_tokens=32, eval_tokens=0)
    tokens: list = []
    result = run(config, on_event=lambda e: tokens.append(e) if isinstance(e, TokenEvent) else None,
                 should_stop=lambda: len(tokens) >= 3)
    assert result.status == "stopped"
    assert result.latency is None or result.latency.repeats < 50


@needs_two_cores
def test_a_killed_rank_becomes_one_sentence_and_no_rank_outlives_the_run(fast):
    import psutil

    def ranks() -> list[psutil.Process]:
        return [p for p in psutil.Process().children(recursive=True)
                if "workbench.parallel.worker" in " ".join(p.cmdline())]

    def kill_rank_1(event) -> None:
        if isinstance(event, TokenEvent) and event.index == 1:
            for p in ranks():
                if p.environ().get("RANK") == "1":
                    p.kill()

    config = fast(device="cpu", data_parallel=2, batch_size=2, repeats=50, max_new_tokens=32, eval_tokens=0)
    with pytest.raises(errors.RunFailed, match=r"^rank 1 of 2 was killed by signal 9"):
        run(config, on_event=kill_rank_1)
    assert ranks() == []


@needs_two_cores
def test_the_worker_runs_under_torchrun_and_prints_one_json_result():
    proc = _torchrun("-m", "workbench.parallel.worker", "--model", "tiny", "--device", "cpu", "--data-parallel", "2",
                     "--batch-size", "3", "--max-new-tokens", "4", "--warmup", "0", "--repeats", "1",
                     "--min-duration-s", "0", "--eval-tokens", "0", "--no-store")
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    assert len(lines) == 1  # stdout carries only the result
    result = json.loads(lines[0])
    assert result["status"] == "ok" and len(result["outputs"]) == 3
    assert result["parallel"]["kind"] == "data" and len(result["parallel"]["ranks"]) == 2
