"""Data-parallel distillation on 2 CPU ranks (gloo): synchronous vs asynchronous (local SGD) updates, stragglers."""

from __future__ import annotations

import contextlib
import inspect
import io
import json

import pytest
import torch

from workbench.distill import DistillConfig, DistillResult, DistillStart, distill
from workbench.errors import ConfigError
from workbench.events import MetricEvent, TrainEvent

STEPS, K = 12, 4
# Tiny and short: each launch starts 2 ranks that each load the teacher; a small text file skips the corpus build.
SMALL = dict(steps=STEPS, batch_size=4, seq_len=64, lr=1e-3, warmup_steps=0, eval_every=4, eval_tokens=512,
             eval_context=128, data_parallel=2, straggler_ms=20.0, straggler_rank=1, threads=1)


@pytest.fixture(scope="module")
def students_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("students")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WORKBENCH_STUDENTS_DIR", str(root))
        yield root


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    """Python source to train on (the teacher learned Python): enough tokens for two shards."""
    path = tmp_path_factory.mktemp("text") / "train.txt"
    path.write_text(inspect.getsource(inspect) + inspect.getsource(json.decoder), encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def sync_run(students_root, text_file):
    """Synchronous ranks, rank 1 sleeping 20 ms per step: (result, events)."""
    events = []
    result = distill(DistillConfig(name="dp-sync", text=text_file, sync="sync", **SMALL), events.append)
    return result, events


@pytest.fixture(scope="module")
def async_run(students_root, text_file):
    """Local SGD averaged every K steps with the same straggler, through the CLI: the --json result."""
    from workbench.cli import main

    flags = ["--name", "dp-async", "--text", text_file, "--sync", "async", "--average-every", str(K)]
    for key, value in SMALL.items():
        flags += [f"--{key.replace('_', '-')}", str(value)]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["distill", *flags, "--json"])
    assert code == 0, out.getvalue()
    return DistillResult.from_dict({k: v for k, v in json.loads(out.getvalue()).items() if k != "recovered"})


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_both_modes_lower_the_heldout_loss(mode, sync_run, async_run):
    result = sync_run[0] if mode == "sync" else async_run
    assert result.status == "ok" and result.steps_done == STEPS
    assert [p.step for p in result.curve] == [0, 4, 8, 12]
    assert result.curve[-1].heldout_loss < result.curve[0].heldout_loss
    assert result.final_perplexity < result.start_perplexity
    walls = [p.wall_s for p in result.curve[1:]]
    assert all(w is not None and w > 0 for w in walls) and walls == sorted(walls)  # loss against wall time
    assert result.parallel.world_size == 2 and result.parallel.sync == mode
    assert [r.steps_done for r in result.parallel.ranks] == [STEPS, STEPS]


def test_sync_ranks_are_bit_identical_and_meet_every_step(sync_run):
    par = sync_run[0].parallel
    assert par.identical and par.average_every is None and par.backend == "gloo"
    for stats in par.ranks:
        assert stats.collectives == STEPS and stats.blocked_at == tuple(range(1, STEPS + 1))
        assert stats.pre_average_checksum is None
    fast, slow = par.ranks
    assert slow.straggler_s > 0 and fast.straggler_s == 0.0  # only rank 1 slept


def test_async_ranks_drift_between_averagings_and_agree_after(async_run):
    par = async_run.parallel
    assert par.sync == "async" and par.average_every == K
    before = {r.pre_average_checksum for r in par.ranks}
    assert len(before) == 2  # each rank stepped on its own windows: different weights before averaging
    assert par.identical  # ...and bit-identical right after it (the last step averages)
    for stats in par.ranks:
        # the fast rank does its K local steps without meeting anyone: one collective per K steps
        assert stats.blocked_at == (4, 8, 12) and stats.collectives == STEPS // K


def test_results_round_trip_and_are_saved(sync_run, async_run, students_root):
    result, events = sync_run
    for r in (result, async_run):
        assert DistillResult.from_dict(json.loads(r.to_json())) == r
        card = json.loads((students_root / r.name / "distill.json").read_text())
        assert DistillResult.from_dict(card).parallel == r.parallel
    metrics = {e.section: e.value for e in events if isinstance(e, MetricEvent)}
    assert isinstance(metrics["start"], DistillStart) and metrics["result"] == result
    checks = [e.step for e in events if isinstance(e, TrainEvent) and e.heldout_loss is not None]
    assert checks == [4, 8, 12]


def test_async_stop_is_agreed_at_the_next_averaging(students_root, text_file):
    """A stop request reaches the ranks between averagings: they all stop at the same averaging (no rank is left
    waiting in a collective), and the saved weights are that average."""
    seen = []
    config = DistillConfig(name="dp-stop", text=text_file, sync="async", average_every=K,
                           **{**SMALL, "steps": 40, "straggler_ms": 0.0})
    result = distill(config, seen.append, should_stop=lambda: sum(isinstance(e, TrainEvent) for e in seen) >= 2)
    assert result.status == "stopped" and result.steps_done < 40 and result.steps_done % K == 0
    assert [r.steps_done for r in result.parallel.ranks] == [result.steps_done] * 2 and result.parallel.identical
    assert result.curve[-1].step == result.steps_done  # checked once more at the stop


def test_cli_and_app_show_where_each_rank_spent_its_time(sync_run, async_run):
    from widgets.distill import FIELDS, ranks_html
    from workbench.cli.distill import format_distill

    assert {"data_parallel", "sync", "average_every", "straggler_ms", "straggler_rank"} <= set(FIELDS)
    text = format_distill(sync_run[0])
    assert "sync: gradients averaged every step, 2 ranks (gloo); final weights bit-identical: yes" in text
    assert "waiting s" in text and text.count("\n1 ") + text.count("\n0 ") >= 2  # one row per rank
    page = ranks_html(async_run.parallel)
    assert "weights averaged every 4 steps" in page and page.count("<tr><td>") == 2


@pytest.mark.parametrize("changes, message", [
    (dict(sync="async"), "needs data_parallel of 2 or more"),
    (dict(straggler_ms=5.0), "needs data_parallel of 2 or more"),
    (dict(data_parallel=2, straggler_rank=2), "straggler_rank must be -1 or one of the ranks 0..1"),
    (dict(data_parallel=2, straggler_ms=-1.0), "straggler_ms must be in"),
    (dict(data_parallel=2, sync="async", average_every=0), "average_every must be in 1"),
    (dict(data_parallel=2, batch_size=5), "must be a multiple of data_parallel 2"),
    (dict(data_parallel=2, sync="sometimes"), "sync must be one of sync, async"),
])
def test_bad_distributed_settings_fail_on_construction(changes, message):
    with pytest.raises(ValueError, match=message) as err:
        DistillConfig(**changes)
    assert "\n" not in str(err.value)


def test_ranks_the_machine_cannot_hold_are_refused_before_launch(monkeypatch):
    import workbench.parallel.distributed as distributed

    monkeypatch.setattr(distributed, "cpu_cores", lambda: 1)  # the check workbench run's ranks use too
    with pytest.raises(ConfigError, match="needs 2 CPU cores"):
        distill(DistillConfig(data_parallel=2, device="cpu"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ConfigError, match="needs 2 GPUs on this machine, but it has 1"):
        distill(DistillConfig(data_parallel=2, device="cuda"))
    with pytest.raises(ConfigError, match="each rank takes its own GPU"):
        distill(DistillConfig(data_parallel=2, device="cuda:0"))


def test_cli_refuses_a_straggler_outside_the_ranks(capsys):
    from workbench.cli import main

    assert main(["distill", "--data-parallel", "2", "--straggler-rank", "3"]) == 2
    assert "straggler_rank must be -1 or one of the ranks" in capsys.readouterr().err


@pytest.mark.gpu
def test_sync_ranks_on_two_gpus_stay_identical(tmp_path, monkeypatch):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 CUDA GPUs")
    monkeypatch.setenv("WORKBENCH_STUDENTS_DIR", str(tmp_path))
    result = distill(DistillConfig(name="dp-gpu", device="cuda", **{**SMALL, "threads": None}))
    assert result.parallel.backend == "nccl" and result.parallel.identical
    assert result.curve[-1].heldout_loss < result.curve[0].heldout_loss
