"""How busy the device is during a decode step: one profiled, untimed `generate` call after the timed ones.

A decode step's wall time (TPOT) is the device's work plus whatever keeps the device waiting: Python in
`generate` and the model's modules, the dispatcher, kernel launches. The share of the step the device
spends working tells which limit holds: well below 1, the step is bound by launching work, not by the
device's bandwidth or compute.

**Why the profiler, not CUDA events.** An event pair recorded around a step on the stream measures when the
stream reached each event, not whether the GPU was working in between: a launch-bound GPU runs each small
kernel as soon as it is enqueued and idles until the next, and events around the step cannot see those idle
gaps. The PyTorch profiler (kineto; CUPTI on CUDA) records every kernel's own start and end on the device,
so the union of the kernel intervals (memcpy / memset included) is the time the GPU really worked.
**On the CPU** the same profiler records every PyTorch operator (aten op) on its own timeline; the union of
their intervals (on one thread: the sum of their self times) is the time spent in kernels, and the rest of
the step is Python and dispatch overhead, the CPU's analogue of launch-bound.

**What is profiled.** One extra call after the timed ones (it never touches the timed numbers), with the
profiler's schedule stepped by the token clock so each profiler step is exactly one decode step: at most
`PROFILED_STEPS` steps in the middle of the call (the KV cache at about its mean length, as the bytes per
step assume) are recorded, the rest of the call runs unprofiled. Profiling slows the call itself, so the
device time per recorded step is divided by the TPOT the timed calls measured (p50), not by the profiled
step's own wall time; the share is capped at 1 (profiling also stretches the kernels a little).

It is optional: an engine whose kernels the PyTorch profiler cannot see (llama.cpp's, in C++) says why
(`Engine.profile_refusal`), and a profiler that fails leaves the share unknown, with the reason.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch.autograd import DeviceType

from workbench.measure.latency import TokenClock

logger = logging.getLogger(__name__)

# torch <= 2.12 warns "Profiler clears events at the end of each cycle" even when the schedule has one cycle, as
# here (fixed by pytorch#180387). Its advice, acc_events=True, makes the profiler build its FunctionEvent tree as the
# trace stops: 2-4 s per run on the CPU, several times the profiled call itself. The events are read from the kineto
# results instead (`spans`), so the warning is spurious. The filter is put back before every profiled call: code that
# restores the warning filters (pytest around each test, `warnings.catch_warnings`) would drop one made at import.
_SPURIOUS = dict(message="Warning: Profiler clears events at the end of each cycle", category=UserWarning)

PROFILED_STEPS = 16  # at most this many decode steps are recorded (a short trace keeps the extra call cheap)
_STEP = "ProfilerStep"  # the profiler's own annotation of each step (its name ends with the step number)


@dataclass(frozen=True)
class Busy:
    """The device's working share of a decode step, or why it is unknown."""

    share: float | None  # device time per decode step / measured TPOT, capped at 1; None: unknown
    device_ms_per_step: float | None  # kernel time per recorded decode step
    steps: int  # decode steps recorded
    device: str  # "GPU" | "CPU": whose time was measured
    why: str = ""  # why the share is unknown
    failed: bool = False  # the profiler itself failed (a warning), rather than not applying here


class ProfiledClock(TokenClock):
    """A token clock that advances the profiler's schedule at every new token (one profiler step per decode step)."""

    def __init__(self, device: torch.device, profiler: Any) -> None:
        super().__init__(device)
        self.profiler = profiler

    def put(self, value: torch.Tensor) -> None:
        seen = len(self.stamps)
        super().put(value)
        if len(self.stamps) > seen:  # a new token (the prompt's put is not a step)
            self.profiler.step()


def window(new_tokens: int) -> tuple[int, int]:
    """(first recorded profiler step, steps recorded): step i runs from token i to token i + 1, step 0 is the
    prefill; the recorded steps sit in the middle of the call's `new_tokens - 1` decode steps."""
    decode = new_tokens - 1
    active = min(decode, PROFILED_STEPS)
    return 1 + (decode - active) // 2, active


def union_us(intervals: Iterable[tuple[float, float]]) -> float:
    """Total length of the union of (start, end) intervals (overlapping kernels or nested operators count once)."""
    total, end = 0.0, float("-inf")
    for lo, hi in sorted(intervals):
        if hi <= end:
            continue
        total += hi - max(lo, end)
        end = hi
    return total


@dataclass(frozen=True)
class Span:
    """One recorded event: an operator or kernel (`work`), or an annotation such as the profiler's step."""

    name: str
    device: DeviceType
    start_us: float
    end_us: float
    work: bool  # an operator (CPU) or a kernel / memcpy / memset (GPU); not an annotation, Python or async event


def spans(profiler: Any) -> list[Span]:
    """The events of a finished profile, read from its kineto results (building the profiler's FunctionEvent
    tree, `profiler.events()`, takes seconds for a few thousand operators; it is the fallback)."""
    results = getattr(getattr(profiler, "profiler", None), "kineto_results", None)
    if results is None:
        return [Span(e.name, e.device_type, e.time_range.start, e.time_range.end,
                     not (e.is_user_annotation or e.is_async or getattr(e, "is_python_function", False)))
                for e in profiler.events()]
    no = lambda: False  # noqa: E731 - an older torch's events lack the newer flags
    return [Span(e.name(), e.device_type(), e.start_ns() / 1e3, e.end_ns() / 1e3,
                 not (getattr(e, "is_user_annotation", no)() or e.is_async() or getattr(e, "is_python_function", no)()))
            for e in results.events()]


def device_time(events: Iterable[Span], cuda: bool) -> tuple[float, int]:
    """(microseconds the device worked inside the recorded steps, recorded steps) of a profile's events."""
    events = list(events)
    steps = [e for e in events if e.name.startswith(_STEP) and e.device == DeviceType.CPU]
    if not steps:
        return 0.0, 0
    lo, hi = min(e.start_us for e in steps), max(e.end_us for e in steps)
    kind = DeviceType.CUDA if cuda else DeviceType.CPU
    work = [(max(e.start_us, lo), min(e.end_us, hi)) for e in events
            if e.device == kind and e.work and not e.name.startswith(_STEP)]
    return union_us((a, b) for a, b in work if b > a), len(steps)


def profile_decode(engine: Any, device: torch.device, new_tokens: int, tpot_ms: float | None) -> Busy:
    """One untimed `engine.generate` with the profiler over a window of decode steps: the device's share of TPOT."""
    who = "GPU" if device.type == "cuda" else "CPU"
    why = engine.profile_refusal()
    if why:
        return Busy(None, None, 0, who, why)
    if new_tokens < 2:
        return Busy(None, None, 0, who, "one new token has no decode step to profile")
    if not tpot_ms:
        return Busy(None, None, 0, who, "no time per output token was measured")
    first, active = window(new_tokens)
    warnings.filterwarnings("ignore", **_SPURIOUS)  # first in the list, once (an equal filter is moved, not added)
    activity = torch.profiler.ProfilerActivity
    activities = [activity.CPU, activity.CUDA] if who == "GPU" else [activity.CPU]
    got: dict[str, Any] = {}
    try:
        profiler = torch.profiler.profile(
            activities=activities, schedule=torch.profiler.schedule(wait=first - 1, warmup=1, active=active, repeat=1),
            on_trace_ready=lambda p: got.update(events=device_time(spans(p), who == "GPU")))
        with profiler:
            engine.generate(ProfiledClock(device, profiler), want_cache=False, interruptible=False)
    except Exception as e:  # noqa: BLE001 - optional: any failure leaves the share unknown, with the reason
        logger.warning("profiling a decode step failed: %s", e)
        return Busy(None, None, 0, who, f"the PyTorch profiler failed ({type(e).__name__}: {e})"[:300], failed=True)
    busy_us, steps = got.get("events", (0.0, 0))
    if not steps:
        return Busy(None, None, 0, who, "the profiler recorded no decode step (the call stopped early)")
    if busy_us <= 0:  # e.g. CUPTI missing: the profiler ran but saw no kernel
        return Busy(None, None, steps, who, f"the PyTorch profiler saw no {who} kernels", failed=True)
    per_step_ms = busy_us / steps / 1e3
    return Busy(min(1.0, per_step_ms / tpot_ms), per_step_ms, steps, who)
