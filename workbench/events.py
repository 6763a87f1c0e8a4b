"""Progress events: small frozen dataclasses passed to an `on_event` callback (no tensors, no models)."""

from __future__ import annotations

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
    """A section of the result is ready (`section` names a RunResult field; `value` its dataclass)."""

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


def no_event(event: Any) -> None:
    """The default `on_event`: ignore everything."""


def never_stop() -> bool:
    """The default `should_stop`: never."""
    return False
