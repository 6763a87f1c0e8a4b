"""Progress events: small frozen dataclasses passed to an `on_event` callback (no tensors, no models)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

STAGES = ("baseline", "load", "apply", "warmup", "measure", "evaluate")


@dataclass(frozen=True)
class StageEvent:
    """A stage started, progressed or ended; `fraction` is the stage's progress in 0..1 when known."""

    stage: str
    state: str  # "start" | "progress" | "end"
    message: str = ""
    fraction: float | None = None
    elapsed_s: float = 0.0


@dataclass(frozen=True)
class TokenEvent:
    """One generated token: `t_ms` after its `generate` call started, `gap_ms` after the previous token
    (TTFT for the first); `text` is row 0's new text."""

    phase: str  # "warmup" | "measure"
    repeat: int
    index: int
    t_ms: float
    text: str
    gap_ms: float = 0.0


@dataclass(frozen=True)
class RepeatEvent:
    """One timed `generate` call finished."""

    repeat: int
    ttft_ms: float
    e2e_ms: float
    decode_tokens_per_s: float | None


@dataclass(frozen=True)
class MetricEvent:
    """A section of a result is ready: for a run, `section` is a tracker's section (or `model`) and `value`
    its dataclass; distillation sends `start` (DistillStart) and `result` (DistillResult)."""

    section: str
    value: Any


@dataclass(frozen=True)
class WarningEvent:
    """Something qualifies the numbers (noisy machine, random weights, early EOS...); `section` names
    the RunResult part it qualifies (latency, accuracy, memory) or "run"."""

    message: str
    section: str = "run"


@dataclass(frozen=True)
class TrainEvent:
    """One training step (reference build, distillation): losses in nats per token.

    `loss` is the cross-entropy on the step's training batch, `heldout_loss` the cross-entropy on the
    held-out text (log of its perplexity; None between checks), `kl` the distillation term
    KL(teacher ‖ student) at the distillation temperature (None outside distillation).
    """

    step: int
    steps: int
    loss: float
    heldout_loss: float | None
    tokens_per_s: float
    lr: float
    kl: float | None = None


Event = StageEvent | TokenEvent | RepeatEvent | MetricEvent | WarningEvent | TrainEvent
OnEvent = Callable[[Any], None]


class TokenProgress:
    """Throttled progress StageEvents of a long stage: "tokens done / total, elapsed, time left".

    With `ends` the first update is sent at once (for generation: the prompt's forward is done) and the last
    (done == total) always; in between, and without `ends` throughout, at most one per `every_s`. `fraction`
    fixes the events' fraction (e.g. the measure stage's share of timed runs) instead of done / total.
    """

    def __init__(self, stage: Callable[..., None], name: str, total: int, *, prefix: str = "",
                 every_s: float = 1.0, fraction: float | None = None, ends: bool = True) -> None:
        self.stage, self.name, self.total, self.prefix, self.every_s = stage, name, max(1, total), prefix, every_s
        self.fraction, self.ends = fraction, ends
        self.started = time.perf_counter()
        self.last = float("-inf") if ends else self.started

    def for_steps(self, offset: int, per_step: int) -> Callable[[int, float], None]:
        """A generate progress callback: after `steps` tokens per row, `offset + steps * per_step` are done."""
        return lambda steps, _elapsed: self.update(offset + steps * per_step)

    def polled(self, should_stop: Callable[[], bool], polls: int) -> Callable[[], bool]:
        """`should_stop` for a loop that polls it `polls` times in all: each poll also narrates its share of total."""
        count = [0]

        def poll() -> bool:
            count[0] += 1
            self.update(min(polls, count[0]) * self.total // polls)
            return should_stop()
        return poll

    def update(self, done: int) -> None:
        """`done` of `total` tokens are through."""
        now = time.perf_counter()
        if not (self.ends and done >= self.total) and now - self.last < self.every_s:
            return
        self.last = now
        elapsed = now - self.started
        left = elapsed / done * (self.total - done) if done else float("nan")
        self.stage(self.name, "progress", f"{self.prefix}{done:,}/{self.total:,} tokens, {elapsed:.0f} s elapsed, "
                   f"about {left:.0f} s left", self.fraction if self.fraction is not None else done / self.total)


def no_event(event: Any) -> None:
    """The default `on_event`: ignore everything."""


def never_stop() -> bool:
    """The default `should_stop`: never."""
    return False
