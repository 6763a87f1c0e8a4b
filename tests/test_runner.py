"""The runner end to end on the reference model: every DESIGN key, events, stop, batching, presets."""

from __future__ import annotations

import json

import pytest

from workbench.events import MetricEvent, RepeatEvent, StageEvent, TokenEvent, WarningEvent
from workbench.result import RunResult
from workbench.runner import run

DESIGN_KEYS = {
    "config": None,
    "model": {"name", "params", "weight_bytes", "random_weights", "dtype", "device"},
    "latency": {"ttft_ms", "tpot_ms", "itl_ms", "e2e_ms", "prefill_tokens_per_s", "decode_tokens_per_s", "cv",
                "warmup", "repeats", "new_tokens"},
    "memory": {"weights_bytes", "kv_cache_bytes", "load_peak_host_bytes", "peak_host_bytes",
               "peak_gpu_allocated_bytes", "peak_gpu_reserved_bytes"},
    "accuracy": {"perplexity", "next_token_accuracy", "kl_vs_baseline", "top1_agreement_vs_baseline",
                 "greedy_match_vs_baseline", "eval_tokens", "definition"},
    "roofline": {"bandwidth_bytes_per_s", "bytes_per_token", "decode_bound_tokens_per_s", "fraction_of_bound", "bound",
                 "explanation"},
    "techniques": None,
    "env": {"python", "torch", "transformers", "cpu", "threads", "gpu", "driver", "workbench_version", "git_commit"},
    "warnings": None,
}


def check_design_keys(data: dict) -> None:
    for key, inner in DESIGN_KEYS.items():
        assert key in data, key
        if inner:
            assert data[key] is not None, key
            assert inner <= set(data[key]), (key, inner - set(data[key]))
    for q in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
        assert set(data["latency"][q]) == {"p50", "p90", "p99"}


@pytest.fixture(scope="module")
def full_run():
    from workbench.config import RunConfig

    events = []
    cfg = RunConfig(model="tiny", warmup=1, repeats=3, min_duration_s=0.0, max_new_tokens=8, eval_tokens=400,
                    eval_context=64)
    return run(cfg, events.append), events


def test_result_has_every_design_key_and_round_trips(full_run):
    result, _ = full_run
    data = json.loads(result.to_json())
    check_design_keys(data)
    assert RunResult.from_dict(data) == result
    assert result.status == "ok"


def test_measurements_are_consistent(full_run):
    r, _ = full_run
    assert r.latency.repeats == 3 and r.latency.new_tokens == 8 and r.latency.warmup == 1
    assert all(len(s.token_ms) == 8 for s in r.latency.samples)
    assert r.latency.ttft_ms.p50 <= r.latency.e2e_ms.p50
    assert r.model.params == 6_163_712 and r.model.weight_bytes == r.memory.weights_bytes
    assert r.memory.weights_bytes == r.model.params * 4  # fp32, tied embedding counted once
    assert r.memory.kv_cache_bytes > 0 and r.memory.load_peak_host_bytes > r.memory.weights_bytes
    assert r.roofline.decode_bound_tokens_per_s > 0 and r.roofline.fraction_of_bound > 0
    # the unmodified fp32 model agrees with its own baseline
    assert r.accuracy.kl_vs_baseline == pytest.approx(0.0, abs=1e-5)
    assert r.accuracy.top1_agreement_vs_baseline == 1.0 and r.accuracy.greedy_match_vs_baseline == 1.0
    assert r.env.threads >= 1 and r.env.torch


def test_events_cover_stages_and_every_token(full_run):
    r, events = full_run
    starts = [e.stage for e in events if isinstance(e, StageEvent) and e.state == "start"]
    assert [s for s in starts if s != "baseline"] == ["load", "warmup", "measure", "evaluate"]
    tokens = [e for e in events if isinstance(e, TokenEvent)]
    assert len(tokens) == (1 + 3) * 8
    measured = [e for e in tokens if e.phase == "measure" and e.repeat == 0]
    assert [e.index for e in measured] == list(range(8))
    assert "".join(e.text for e in measured) == r.output_text
    assert len([e for e in events if isinstance(e, RepeatEvent)]) == 3
    sections = {e.section for e in events if isinstance(e, MetricEvent)}
    assert {"model", "latency", "memory", "accuracy", "roofline"} <= sections


def test_dtype_changes_are_measured_against_the_fp32_baseline(fast):
    r = run(fast(dtype="bf16"))
    assert r.memory.weights_bytes == r.model.params * 2
    assert r.accuracy.kl_vs_baseline > 0  # bf16 rounding moves the distribution a little


def test_stop_ends_within_one_token_and_keeps_a_partial_result(fast):
    events, seen = [], {"n": 0}

    def on_event(e):
        events.append(e)
        if isinstance(e, TokenEvent) and e.phase == "measure":
            seen["n"] += 1

    r = run(fast(max_new_tokens=200, repeats=5), on_event, should_stop=lambda: seen["n"] >= 3)
    assert r.status == "stopped"
    assert seen["n"] <= 4  # the token that saw the request, at most one more
    assert r.latency is not None and r.latency.repeats == 1  # the partial repeat is kept
    assert r.accuracy is None and any("stopped" in w for w in r.warnings)


def test_stop_before_loading_returns_an_empty_stopped_result(fast):
    r = run(fast(), should_stop=lambda: True)
    assert r.status == "stopped" and r.model is None and r.latency is None


def test_batch_rows_get_distinct_prompts(fast):
    r = run(fast(batch_size=3, prompt_tokens=12, eval_tokens=0))
    assert r.latency.batch_size == 3 and r.latency.prompt_tokens == 12
    assert r.accuracy is None  # eval_tokens=0 skips accuracy


def test_token_events_can_be_switched_off(fast):
    events = []
    run(fast(token_events=False, eval_tokens=0), events.append)
    assert not any(isinstance(e, TokenEvent) for e in events)


def test_preset_has_random_weights_and_no_accuracy(fast):
    events = []
    r = run(fast(model="preset:smollm2-135m", max_new_tokens=3, eval_tokens=400), events.append)
    assert r.model.random_weights and r.model.params == 134_515_008
    assert r.accuracy is None
    assert any("random weights" in w for w in r.warnings)
    assert any(isinstance(e, WarningEvent) and "random weights" in e.message for e in events)
    assert "<" in r.output_text or r.output_text  # ids past the borrowed tokenizer show as <id>


def test_a_broken_one_token_decode_path_is_flagged(fast, monkeypatch):
    """A kernel that is wrong only for one-token steps (as a miscompiled decode can be) gets a warning."""
    import workbench.engines.hf as hf

    class BrokenDecode(hf.Generator):
        def __init__(self, model, *args, **kwargs):
            forward = model.forward

            def one_token_wrong(*a, **k):
                out = forward(*a, **k)
                if k["input_ids"].shape[1] == 1:
                    out.logits = -out.logits  # the least likely token wins
                return out

            model.forward = one_token_wrong
            super().__init__(model, *args, **kwargs)

    monkeypatch.setattr(hf, "Generator", BrokenDecode)
    events = []
    r = run(fast(max_new_tokens=8, eval_tokens=0), events.append)
    # only the first token, which comes from the (sound) multi-token prefill, is right: 1 of 8
    assert any(w.startswith("decode looks wrong: only 12% of the generated tokens") for w in r.warnings), r.warnings
    assert any(isinstance(e, WarningEvent) and "decode looks wrong" in e.message for e in events)


def test_a_sound_decode_path_gets_no_decode_warning(full_run):
    result, _ = full_run
    assert not any("decode looks wrong" in w for w in result.warnings)


PROGRESS = r"^[\d,]+/[\d,]+ tokens, \d+ s elapsed, about \d+ s left$"


def test_warmup_reports_tokens_done_elapsed_and_time_left(fast):
    """A big batch's warm-up can take minutes: it narrates progress through StageEvents (CLI and app show them)."""
    import re

    events = []
    run(fast(warmup=2, max_new_tokens=5, batch_size=2, eval_tokens=0), events.append)
    progress = [e for e in events if isinstance(e, StageEvent) and e.stage == "warmup" and e.state == "progress"]
    assert progress and all(re.match(PROGRESS, e.message) for e in progress), progress
    assert progress[0].message.startswith("2/20 tokens")  # the first token of run 1 (prefill done), batch 2
    assert progress[-1].message.startswith("20/20 tokens") and progress[-1].fraction == 1.0
    assert [e.fraction for e in progress] == sorted(e.fraction for e in progress)


def test_stop_during_warmup_stops_inside_the_prefill(fast):
    """Stop requested once the first warm-up call has started: its prompt's forward ends at the next layer."""
    events, state = [], {"warm": False, "asked": 0}

    def on_event(e):
        events.append(e)
        if isinstance(e, StageEvent) and e.stage == "warmup" and e.state == "start":
            state["warm"] = True

    def should_stop():  # False for the check before the first call, True from inside it on
        if state["warm"]:
            state["asked"] += 1
        return state["asked"] > 1

    r = run(fast(warmup=3, max_new_tokens=8, eval_tokens=0), on_event, should_stop=should_stop)
    assert r.status == "stopped" and r.latency is None
    assert not [e for e in events if isinstance(e, TokenEvent)]  # not even the first token of the first call
    assert not [e for e in events if isinstance(e, StageEvent) and e.stage == "measure"]
    assert any("stopped" in w for w in r.warnings)


def test_stop_between_warmup_tokens(fast):
    """A stop after the first warm-up token ends the call at once; the model's layers run unhooked afterwards."""
    events, seen = [], {"n": 0}

    def on_event(e):
        events.append(e)
        if isinstance(e, TokenEvent):
            seen["n"] += 1

    r = run(fast(warmup=2, max_new_tokens=50, eval_tokens=0), on_event, should_stop=lambda: seen["n"] >= 1)
    assert r.status == "stopped" and seen["n"] <= 2


def test_more_threads_than_cores_is_a_warning(fast, monkeypatch):
    import os

    import workbench.execution as execution

    assert execution.cpu_cores() == len(os.sched_getaffinity(0))
    monkeypatch.setattr(execution, "cpu_cores", lambda: 1)
    events = []
    r = run(fast(threads=2, eval_tokens=0), events.append)
    assert r.status == "ok"
    text = "threads 2 is more than the 1 CPU cores this process may use"
    assert any(w.startswith(text) for w in r.warnings)
    assert any(isinstance(e, WarningEvent) and e.message.startswith(text) for e in events)  # the app shows these
    assert not any("CPU cores" in w for w in run(fast(threads=1, eval_tokens=0)).warnings)


def test_long_timed_runs_and_evaluation_narrate_their_tokens(fast, monkeypatch):
    """Timed calls and evaluation narrate tokens done / total when they last (here: always, throttle 0 s)."""
    import re

    import workbench.runner as runner

    monkeypatch.setattr(runner._Run, "NARRATE_EVERY_S", 0.0)
    events = []
    r = run(fast(repeats=2, max_new_tokens=4, batch_size=2, eval_tokens=300, eval_context=32), events.append)
    progress = [e for e in events if isinstance(e, StageEvent) and e.state == "progress"]
    timed = [e.message for e in progress if e.stage == "measure" and e.message.startswith("timed run")]
    assert timed and all(re.match(r"timed run \d+: [\d,]+/8 tokens, \d+ s elapsed, about \d+ s left$", m) for m in timed)
    scored = [e.message for e in progress if e.stage == "evaluate"]
    total = r.accuracy.eval_tokens
    assert scored and scored[-1].startswith(f"{total:,}/{total:,} tokens")
    assert all(re.match(PROGRESS, m) for m in scored)
    assert any(e.message == "2 runs, " + e.message.split(", ")[1] for e in progress if e.stage == "measure"
               and not e.message.startswith("timed"))  # the per-run progress is still there
