"""Computed speed conclusions: every branch of the verdict line, from synthetic results and plain numbers."""

from __future__ import annotations

import pytest

from workbench.config import RunConfig
from workbench.measure.latency import CV_WARN
from workbench.result import LatencyStats, Percentiles, RunResult
from workbench.verdict import LINE, Verdict, speed_metrics, speed_verdict, verdict_from_numbers


def _run(decode: float | None, cv: float | None = 0.03, warnings: tuple[str, ...] = (), tpot_ms: float = 10.0,
         status: str = "ok", latency: bool = True) -> RunResult:
    """A result with only what a verdict reads, round-tripped through JSON as the store does."""
    p = Percentiles(tpot_ms, tpot_ms * 1.1, tpot_ms * 1.2)
    lat = LatencyStats(p, p, p, p, 500.0, decode, cv, 1, 3, 8, 16, 1,
                       decode_tokens_per_s_per_sequence=decode, cold_start_s=2.0)
    result = RunResult(RunConfig(), None, (), None, sections={"latency": lat if latency else None},
                       warnings=warnings, status=status)
    return RunResult.from_dict(result.to_dict())


def test_a_faster_run_that_was_expected_faster_is_consistent_and_shows_both_cvs():
    v = speed_verdict("int8 vs fp32", _run(143.0, cv=0.03), _run(100.0, cv=0.04), "faster")
    assert isinstance(v, Verdict) and v.consistent and v.outcome == "faster" and not v.busy
    assert v.ratio == pytest.approx(1.43) and v.cvs == (0.03, 0.04)
    assert str(v) == "int8 vs fp32: 1.43× decode tokens/s (CV 3 %, 4 %) — faster, as expected"
    assert "\n" not in str(v)


def test_a_contradiction_on_a_busy_machine_says_so_with_the_cv():
    noisy = f"CV 35% > {CV_WARN:.0%}: noisy machine, latency spread is wide"
    v = speed_verdict("int8 vs fp32", _run(59.0, cv=0.35, warnings=(noisy,)), _run(100.0, cv=0.04), "faster")
    assert not v.consistent and v.outcome == "slower" and v.busy
    assert "0.59× decode tokens/s (CV 35 %, 4 %) — slower, which contradicts the expectation (faster)" in v.text
    assert "this machine was busy (CV 35 % > 10 %); rerun with more repeats" in v.text
    assert noisy in v.warnings and "noisy machine" not in v.text  # the CV warning is restated, not repeated


def test_a_contradiction_on_a_calm_machine_lists_the_warnings_and_never_blames_the_machine():
    v = speed_verdict("compiled vs eager", _run(80.0, warnings=("transformers did not compile the decode step",)),
                      _run(100.0), "faster")
    assert not v.consistent and not v.busy
    assert "contradicts the expectation (faster); warnings: transformers did not compile the decode step" in v.text
    assert "busy" not in v.text
    bare = speed_verdict("compiled vs eager", _run(80.0), _run(100.0), "faster")
    assert bare.text.endswith("contradicts the expectation (faster); no warning explains it")


def test_a_busy_probe_without_a_high_cv_counts_as_a_busy_machine():
    probe = ("roofline bound uncertain: 9.1 GB/s from the sum, the best of 1 busy probe(s) within a day. Uncertain: "
             "other processes used 1.8 of 2 CPUs during the probe, so the bound may be too low")
    v = speed_verdict("a vs b", _run(50.0), _run(100.0, warnings=(probe,)), "same")
    assert v.busy and not v.consistent and probe in v.warnings
    assert "this machine was busy (other processes used 1.8 of 2 CPUs during a probe); rerun" in v.text
    assert "roofline bound uncertain" not in v.text  # restated by the reason, not listed again


def test_warnings_that_only_mention_busy_or_energy_do_not_make_the_machine_busy():
    share = "busy share per decode step unknown: the PyTorch profiler failed; the bound is decided without it"
    energy = "no energy counter is readable on this machine: RAPL is not readable; energy is null"
    v = speed_verdict("a vs b", _run(50.0, warnings=(share, energy)), _run(100.0), "faster")
    assert not v.busy and "this machine was busy" not in v.text
    assert v.text.endswith(f"contradicts the expectation (faster); warnings: {share}")


def test_same_speed_within_the_tolerance_and_a_tolerance_of_its_own():
    v = speed_verdict("a vs b", _run(105.0), _run(100.0), "same")
    assert v.consistent and v.outcome == "same" and "the same speed within ±10 %, as expected" in v.text
    same = speed_verdict("a vs b", _run(150.0), _run(100.0), "same")
    assert "faster, which contradicts the expectation (the same speed within ±10 %); no warning" in same.text
    wider = speed_verdict("a vs b", _run(125.0), _run(100.0), "faster", tolerance=0.3)
    assert wider.outcome == "same" and not wider.consistent
    assert "contradicts the expectation (faster)" in wider.text


def test_an_expected_slowdown_is_consistent():
    v = speed_verdict("fp32 vs int8", _run(60.0), _run(100.0), "slower")
    assert v.consistent and v.text.endswith("— slower, as expected")


def test_a_consistent_verdict_on_a_busy_machine_warns_that_the_ratio_is_rough():
    v = speed_verdict("a vs b", _run(200.0, cv=0.2), _run(100.0), "faster")
    assert v.consistent and v.busy and "as expected, though this machine was busy (CV 20 % > 10 %)" in v.text


def test_lower_is_better_for_times():
    v = speed_verdict("a vs b", _run(100.0, tpot_ms=5.0), _run(100.0, tpot_ms=10.0), "faster", metric="tpot_ms_p50")
    assert v.ratio == pytest.approx(0.5) and v.outcome == "faster" and "0.50× TPOT p50 ms" in v.text
    cold = speed_verdict("a vs b", _run(100.0), _run(100.0), "same", metric="cold_start_s")
    assert cold.consistent and "cold start (s)" in cold.text


def test_per_sequence_and_prefill_metrics_are_read_from_the_latency_section():
    v = speed_verdict("a vs b", _run(300.0), _run(100.0), "faster", metric="decode_tokens_per_s_per_sequence")
    assert v.ratio == pytest.approx(3.0) and "decode tokens/s per sequence" in v.text
    assert speed_verdict("a vs b", _run(1.0), _run(1.0), "same", metric="prefill_tokens_per_s").consistent


def test_warnings_of_both_runs_appear_once_and_random_weights_are_left_out():
    shared = "only 2 timed repeat(s): percentiles are rough"
    rw = "random weights (preset): speed and memory only; accuracy is not measured"
    v = speed_verdict("a vs b", _run(150.0, warnings=(shared, rw)), _run(100.0, warnings=(shared,)), "faster")
    assert v.warnings == (shared, rw) and v.text.count(shared) == 1 and "random weights" not in v.text


def test_unknown_cvs_are_said_to_be_unknown():
    v = verdict_from_numbers("a vs b", 2.0, 1.0, "faster", quantity="speed-up")
    assert v.cvs == () and "2.00× speed-up (CV unknown) — faster, as expected" in v.text
    one = verdict_from_numbers("a vs b", 2.0, 1.0, "faster", cvs=(0.02, None))
    assert "(CV 2 %, ?)" in one.text


def test_numbers_with_their_own_direction_and_warnings():
    v = verdict_from_numbers("pipeline vs one process", 30.0, 20.0, "faster", better="lower", cvs=(0.5,),
                             warnings=("a straggler",), quantity="wall s")
    assert v.outcome == "slower" and v.busy and "CV 50 % > 10 %" in v.text and "warnings: a straggler" in v.text


def test_long_warnings_are_shortened_in_the_line_but_kept_whole():
    long = "x" * 400
    v = verdict_from_numbers("a vs b", 1.0, 2.0, "faster", warnings=(long,))
    assert v.warnings == (long,) and long not in v.text and "…" in v.text


@pytest.mark.parametrize("value,cvs,warnings,expect", [
    (143.0, (0.03, 0.04), (), "faster"), (59.0, (0.35, 0.04), ("CV 35% > 10%: noisy machine",), "faster"),
    (100.0, (None, None), ("only 1 timed repeat(s): percentiles are rough",), "same"), (1234.5, (), (), "slower")])
def test_every_line_matches_the_pattern_the_notebook_tests_search_for(value, cvs, warnings, expect):
    v = verdict_from_numbers("x: y vs z", value, 100.0, expect, cvs=cvs, warnings=warnings, quantity="tokens/s")
    assert LINE.match(v.text)
    assert len(LINE.findall(f"noise\n{v}\nmore noise\n")) == 1
    assert not LINE.search(f"{value / 100:.2f}x eager (expected faster)")  # a hand-made ratio line is not a verdict


@pytest.mark.parametrize("expect", ["quicker", "", "Faster"])
def test_an_unknown_expectation_is_one_sentence(expect):
    with pytest.raises(ValueError, match=r"^expect must be one of faster, slower, same; got .*\.$"):
        verdict_from_numbers("a vs b", 1.0, 1.0, expect)
    with pytest.raises(ValueError, match="expect must be one of"):
        speed_verdict("a vs b", _run(1.0), _run(1.0), expect)


@pytest.mark.parametrize("metric", ["perplexity", "weights_bytes", "tokens", ""])
def test_an_unknown_or_non_speed_metric_is_one_sentence_naming_the_allowed_ones(metric):
    with pytest.raises(ValueError, match=r"^metric must be one of ttft_ms_p50, .*decode_tokens_per_s.*; got"):
        speed_verdict("a vs b", _run(1.0), _run(1.0), "faster", metric=metric)
    assert metric not in speed_metrics()


@pytest.mark.parametrize("base", [None, 0, 0.0, -1.0, float("nan"), "fast"])
def test_a_missing_or_zero_baseline_number_is_one_sentence(base):
    with pytest.raises(ValueError, match=r"^a vs b: the baseline must be a positive number to compare speeds; got"):
        verdict_from_numbers("a vs b", 1.0, base, "faster")


def test_a_zero_or_missing_value_is_one_sentence():
    with pytest.raises(ValueError, match=r"^a vs b: the value must be a positive number"):
        verdict_from_numbers("a vs b", 0.0, 1.0, "faster")


def test_a_baseline_run_without_the_metric_is_one_sentence():
    with pytest.raises(ValueError, match=r"^a vs b: the baseline run has no decode tokens/s to compare against "
                                         r"\(status 'stopped'\); measure it again\.$"):
        speed_verdict("a vs b", _run(1.0), _run(None, status="stopped"), "faster")
    with pytest.raises(ValueError, match="the baseline run has no decode tokens/s"):
        speed_verdict("a vs b", _run(1.0), _run(1.0, latency=False, status="error"), "faster")
    with pytest.raises(ValueError, match="the baseline run has no decode tokens/s"):
        speed_verdict("a vs b", _run(1.0), _run(0.0), "faster")
    with pytest.raises(ValueError, match=r"^a vs b: the run has no decode tokens/s to compare"):
        speed_verdict("a vs b", _run(None), _run(1.0), "faster")


@pytest.mark.parametrize("tolerance", [0, 1.0, -0.1, "0.1"])
def test_a_bad_tolerance_is_one_sentence(tolerance):
    with pytest.raises(ValueError, match=r"^tolerance must be a fraction between 0 and 1"):
        verdict_from_numbers("a vs b", 1.0, 1.0, "same", tolerance=tolerance)


def test_a_bad_direction_is_one_sentence():
    with pytest.raises(ValueError, match=r"^better must be one of higher, lower; got 'up'\.$"):
        verdict_from_numbers("a vs b", 1.0, 1.0, "same", better="up")
