"""Latency: per-token timestamps from inside `generate`, and the statistics built from them."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from workbench.events import OnEvent, TokenEvent
from workbench.result import LatencyStats, Percentiles, RepeatTiming
from workbench.textio import IncrementalDecoder

CV_WARN = 0.10


class TokenClock:
    """A `generate` streamer that timestamps every new token (and asks generate to stop on request).

    `generate` hands each step's tokens to `put` after moving them to the CPU, which waits for the
    device, so `perf_counter` there is when the token exists. The first `put` is the prompt.
    """

    def __init__(self, device: torch.device, on_token: Callable[[int, float, list[int]], None] | None = None) -> None:
        self.device = device
        self.on_token = on_token
        self.start = 0.0
        self.stamps: list[float] = []
        self.tokens: list[list[int]] = []  # per step: the new token of every row
        self._prompt_seen = False

    def begin(self) -> None:
        """Call right before `generate`: waits for queued device work, then starts the clock."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.stamps.clear()
        self.tokens.clear()
        self._prompt_seen = False
        self.start = time.perf_counter()

    def put(self, value: torch.Tensor) -> None:
        """Called by `generate` with the prompt first, then with each step's new tokens (B,)."""
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        now = time.perf_counter()
        # (B,): one step of every row; (B, n): n steps at once (assisted generation accepts several draft tokens
        # per forward of the model), all stamped now: they exist from this moment, which is what TTFT/TPOT count
        steps = value.reshape(value.shape[0], -1).T if value.dim() == 2 else value.reshape(1, -1)  # (n, B)
        for row_tokens in steps.tolist():
            self.stamps.append(now)
            self.tokens.append(row_tokens)
            if self.on_token is not None:
                self.on_token(len(self.stamps) - 1, (now - self.start) * 1e3, row_tokens)

    def end(self) -> None:
        """Called by `generate` when it finishes."""

    def timing(self, end: float) -> RepeatTiming:
        """This call's timing, `end` being when `generate` returned."""
        token_ms = tuple((s - self.start) * 1e3 for s in self.stamps)
        return RepeatTiming(ttft_ms=token_ms[0] if token_ms else (end - self.start) * 1e3,
                            e2e_ms=(end - self.start) * 1e3, token_ms=token_ms)


class StopOnRequest:
    """A stopping criterion: ends `generate` after the current token once `should_stop()` is true."""

    def __init__(self, should_stop: Callable[[], bool]) -> None:
        self.should_stop = should_stop
        self.triggered = False

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        stop = bool(self.should_stop())
        self.triggered |= stop
        return torch.full((input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device)


def percentiles(values: list[float]) -> Percentiles | None:
    """p50/p90/p99 by linear interpolation (numpy's default), None for no values."""
    if not values:
        return None
    xs = sorted(values)

    def q(p: float) -> float:
        pos = (len(xs) - 1) * p
        lo = int(pos)
        hi = min(lo + 1, len(xs) - 1)
        return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)

    return Percentiles(q(0.5), q(0.9), q(0.99))


def decode_tokens_per_s(t: RepeatTiming, batch: int) -> float | None:
    """batch x (N - 1) tokens over the decode time E2E - TTFT (None with fewer than 2 tokens)."""
    n = len(t.token_ms)
    decode_ms = t.e2e_ms - t.ttft_ms
    return batch * (n - 1) / (decode_ms / 1e3) if n >= 2 and decode_ms > 0 else None


def summarize(samples: list[RepeatTiming], *, batch: int, prompt_tokens: int, warmup: int,
              cold_start_s: float | None = None) -> LatencyStats:
    """Percentiles and throughput over the timed repeats.

    TTFT: start of `generate` to the first new token. TPOT: (E2E - TTFT) / (N - 1) per repeat.
    ITL: every gap between consecutive tokens of every repeat. Throughputs use the medians of
    the repeats: prefill = batch x prompt tokens / TTFT, decode = batch x (N - 1) / (E2E - TTFT).
    CV: standard deviation / mean of E2E over the repeats. Per sequence: decode tokens/s / batch
    (what each user sees). Cold start: the first `generate` call of the run (warm-up or not), which
    pays one-time costs such as compilation.
    """
    n = min((len(s.token_ms) for s in samples), default=0)
    ttft = [s.ttft_ms for s in samples]
    e2e = [s.e2e_ms for s in samples]
    tpot = [(s.e2e_ms - s.ttft_ms) / (len(s.token_ms) - 1) for s in samples if len(s.token_ms) >= 2]
    itl = [b - a for s in samples for a, b in zip(s.token_ms, s.token_ms[1:])]
    ttft_p50 = statistics.median(ttft) if ttft else None
    decode = [d for s in samples if (d := decode_tokens_per_s(s, batch)) is not None]
    decode_p50 = statistics.median(decode) if decode else None
    cv = statistics.pstdev(e2e) / statistics.fmean(e2e) if len(e2e) >= 2 and statistics.fmean(e2e) > 0 else None
    return LatencyStats(
        ttft_ms=percentiles(ttft), tpot_ms=percentiles(tpot), itl_ms=percentiles(itl), e2e_ms=percentiles(e2e),
        prefill_tokens_per_s=batch * prompt_tokens / (ttft_p50 / 1e3) if ttft_p50 else None,
        decode_tokens_per_s=decode_p50, cv=cv, warmup=warmup, repeats=len(samples), new_tokens=n,
        prompt_tokens=prompt_tokens, batch_size=batch, measured_s=sum(e2e) / 1e3, samples=tuple(samples),
        decode_tokens_per_s_per_sequence=decode_p50 / batch if decode_p50 else None, cold_start_s=cold_start_s)


def latency_warnings(stats: LatencyStats, expected_tokens: int) -> list[str]:
    """Plain-language caveats on the numbers."""
    out = []
    if stats.cv is not None and stats.cv > CV_WARN:
        out.append(f"CV {stats.cv:.0%} > {CV_WARN:.0%}: noisy machine, latency spread is wide")
    short = [len(s.token_ms) for s in stats.samples if len(s.token_ms) < expected_tokens]
    if short:
        out.append(f"generation ended early ({min(short)} of {expected_tokens} tokens) in {len(short)} "
                   "repeat(s): the model stopped before max_new_tokens")
    if stats.repeats < 3:
        out.append(f"only {stats.repeats} timed repeat(s): percentiles are rough")
    return out


def token_reporter(on_event: OnEvent, tokenizer: Any, phase: str, repeat: int, events: bool,
                   progress: Callable[[int, float], None] | None) -> Callable[[int, float, list[int]], None] | None:
    """A `TokenClock` callback: a TokenEvent per token (the first row's text, when `events`) and progress."""
    if not events and progress is None:
        return None
    decoder, last = IncrementalDecoder(tokenizer), [0.0]

    def on_token(index: int, t_ms: float, row_tokens: list[int]) -> None:
        if events:
            on_event(TokenEvent(phase, repeat, index, t_ms, decoder.push(row_tokens[0]), t_ms - last[0]))
            last[0] = t_ms
        if progress is not None:
            progress(index + 1, t_ms / 1e3)
    return on_token


@dataclass
class TimedCalls:
    """A run's generate calls: the complete timed ones, the one a stop cut short, the first complete one (its
    tokens are the run's output), the first call's duration (the cold start) and the KV cache's size."""

    new_tokens: int
    samples: list[RepeatTiming] = field(default_factory=list)
    partial: RepeatTiming | None = None
    first: Any = None  # an engines.base.Generation
    cold_start_s: float | None = None
    kv_bytes: int | None = None

    def record(self, gen: Any) -> RepeatTiming:
        """Note one call (an engine's Generation); return its timing."""
        if self.cold_start_s is None:
            self.cold_start_s = gen.timing.e2e_ms / 1e3
        if gen.kv_bytes is not None:
            self.kv_bytes = gen.kv_bytes
        if self.first is None and len(gen.timing.token_ms) == self.new_tokens:
            self.first = gen
        return gen.timing
