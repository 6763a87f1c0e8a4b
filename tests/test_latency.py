"""Latency definitions on controlled cases, and the token clock inside a real `generate`."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from workbench.measure.latency import (StopOnRequest, TokenClock, decode_tokens_per_s, latency_warnings, percentiles,
                                       summarize)
from workbench.result import RepeatTiming


def test_percentiles_match_numpy_linear_interpolation():
    values = [5.0, 1.0, 9.0, 3.0, 7.0, 2.0, 100.0]
    p = percentiles(values)
    assert p.p50 == pytest.approx(np.percentile(values, 50))
    assert p.p90 == pytest.approx(np.percentile(values, 90))
    assert p.p99 == pytest.approx(np.percentile(values, 99))
    assert percentiles([]) is None


def test_definitions_on_a_scripted_run():
    # token i appears at 10 + 2*i ms; generate returns at 20 ms (5 tokens)
    a = RepeatTiming(ttft_ms=10.0, e2e_ms=20.0, token_ms=(10.0, 12.0, 14.0, 16.0, 18.0))
    b = RepeatTiming(ttft_ms=20.0, e2e_ms=40.0, token_ms=(20.0, 24.0, 28.0, 32.0, 36.0))
    s = summarize([a, b], batch=2, prompt_tokens=100, warmup=1)
    assert s.ttft_ms.p50 == pytest.approx(15.0)  # median of 10 and 20
    assert s.e2e_ms.p50 == pytest.approx(30.0)
    # TPOT = (E2E - TTFT) / (N - 1): (20-10)/4 = 2.5 and (40-20)/4 = 5
    assert s.tpot_ms.p50 == pytest.approx(3.75)
    # ITL: gaps 2,2,2,2 and 4,4,4,4
    assert s.itl_ms.p50 == pytest.approx(3.0)
    assert s.itl_ms.p99 == pytest.approx(4.0)
    # decode tokens/s = batch * (N-1) / (E2E - TTFT): 2*4/0.010 = 800 and 2*4/0.020 = 400 -> median 600
    assert s.decode_tokens_per_s == pytest.approx(600.0)
    # prefill tokens/s = batch * prompt / median TTFT = 200 / 0.015
    assert s.prefill_tokens_per_s == pytest.approx(200 / 0.015)
    assert s.cv == pytest.approx(np.std([20.0, 40.0]) / np.mean([20.0, 40.0]))
    assert (s.repeats, s.warmup, s.new_tokens, s.batch_size) == (2, 1, 5, 2)
    assert s.measured_s == pytest.approx(0.060)


def test_single_token_has_no_tpot_or_decode_rate():
    t = RepeatTiming(ttft_ms=5.0, e2e_ms=5.5, token_ms=(5.0,))
    s = summarize([t], batch=1, prompt_tokens=3, warmup=0)
    assert s.tpot_ms is None and s.itl_ms is None and s.decode_tokens_per_s is None
    assert decode_tokens_per_s(t, 1) is None


def test_warnings_for_noise_and_early_end():
    steady = [RepeatTiming(10.0, 20.0, (10.0, 20.0))] * 3
    assert latency_warnings(summarize(steady, batch=1, prompt_tokens=1, warmup=0), 2) == []
    noisy = [RepeatTiming(10.0, 20.0, (10.0, 20.0)), RepeatTiming(10.0, 60.0, (10.0, 60.0)),
             RepeatTiming(10.0, 20.0, (10.0, 20.0))]
    assert any("CV" in w for w in latency_warnings(summarize(noisy, batch=1, prompt_tokens=1, warmup=0), 2))
    short = [RepeatTiming(10.0, 20.0, (10.0, 20.0))] * 3
    assert any("ended early" in w for w in latency_warnings(summarize(short, batch=1, prompt_tokens=1, warmup=0), 4))


def test_token_clock_inside_generate(tiny):
    seen = []
    clock = TokenClock(torch.device("cpu"), lambda i, t, toks: seen.append((i, t, toks)))
    ids = torch.tensor([[1, 2, 3, 4]])
    clock.begin()
    out = tiny.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=7, min_new_tokens=7,
                              do_sample=False, streamer=clock, pad_token_id=0)
    timing = clock.timing(clock.stamps[-1] + 0.001)
    assert len(timing.token_ms) == 7 == len(seen)
    assert list(timing.token_ms) == sorted(timing.token_ms)
    assert [s[2][0] for s in seen] == out[0, 4:].tolist()
    assert timing.ttft_ms == timing.token_ms[0] <= timing.e2e_ms


def test_stop_request_ends_generate_within_one_token(tiny):
    from transformers import StoppingCriteriaList

    clock = TokenClock(torch.device("cpu"))
    flag = {"stop": False}

    def on_token(i, t, toks):
        if i == 2:
            flag["stop"] = True

    clock.on_token = on_token
    ids = torch.tensor([[1, 2, 3]])
    clock.begin()
    tiny.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=50, min_new_tokens=50,
                        do_sample=False, streamer=clock, pad_token_id=0,
                        stopping_criteria=StoppingCriteriaList([StopOnRequest(lambda: flag["stop"])]))
    assert len(clock.stamps) <= 4  # the token that saw the request, at most one more
