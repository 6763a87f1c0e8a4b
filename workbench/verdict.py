"""Speed conclusions computed from measurements, not asserted: a ratio against what was expected, with the
CV of both runs and their warnings beside it, and a plain reason when the measurement contradicts the expectation.

`speed_verdict(label, result, baseline, expect)` compares two `RunResult`s on a speed metric;
`verdict_from_numbers(label, value, base, expect)` compares two numbers (a speed-up computed elsewhere, a time).
`print(verdict)` prints one line, e.g. "dynamic-int8 vs fp32: 1.43× decode tokens/s (CV 3 %, 4 %) — faster, as
expected", or "… 0.59× decode tokens/s (CV 35 %, 4 %) — slower, which contradicts the expectation (faster): this
machine was busy (CV 35 % > 10 %); rerun with more repeats on a calm machine".
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from workbench.analysis import METRICS
from workbench.measure.latency import CV_WARN
from workbench.result import RunResult

logger = logging.getLogger(__name__)

EXPECTS = ("faster", "slower", "same")
# What every verdict line looks like (tests find the lines in executed notebooks with it)
LINE = re.compile(r"^.+: \d+\.\d\d× .*\(CV [^)]*\) — (faster|slower|the same speed)", re.MULTILINE)
BETTER = ("higher", "lower")
# A probe's warning that other processes were busy (measure.probes.busy_reason); a high CV is read from the runs
_BUSY = re.compile(r"other processes used [\d.]+ of \d+ CPUs")
# Warnings the verdict line restates (the CV) or that do not bear on speed (random weights, no energy counter)
_NOT_LISTED = ("CV ", "random weights", "no energy counter")
_MAX_WARNING_CHARS = 140


@dataclass(frozen=True)
class _SpeedMetric:
    """A speed number of a run: how to name it, which direction is faster, how to read it."""

    quantity: str
    better: str  # "higher" | "lower"


# LatencyStats speed attributes that are not comparison axes in analysis.METRICS
_LATENCY_EXTRAS = {"decode_tokens_per_s_per_sequence": _SpeedMetric("decode tokens/s per sequence", "higher"),
                   "cold_start_s": _SpeedMetric("cold start (s)", "lower")}
_SPEED_UNITS = ("ms", "tokens/s", "s")


def speed_metrics() -> list[str]:
    """The metric names `speed_verdict` accepts: analysis.METRICS speed keys and latency speed attributes."""
    return [k for k, m in METRICS.items() if m.unit in _SPEED_UNITS] + list(_LATENCY_EXTRAS)


@dataclass(frozen=True)
class Verdict:
    """A measured speed ratio against an expectation. `ratio` = value / baseline of the metric as measured
    (for times, below 1 is faster); `cvs` the runs' coefficients of variation (None: unknown); `text` one line."""

    label: str
    ratio: float
    expect: str
    consistent: bool
    cvs: tuple[float | None, ...]
    warnings: tuple[str, ...]
    text: str
    outcome: str = ""  # "faster" | "slower" | "same": what the measurement says, within the tolerance
    busy: bool = False  # a CV above CV_WARN or a warning says the machine was busy while measuring

    def __str__(self) -> str:
        return self.text


def _check(expect: str, tolerance: float, better: str) -> None:
    if expect not in EXPECTS:
        raise ValueError(f"expect must be one of {', '.join(EXPECTS)}; got {expect!r}.")
    if not isinstance(tolerance, (int, float)) or not 0 < tolerance < 1:
        raise ValueError(f"tolerance must be a fraction between 0 and 1 (0.10 is ±10 %); got {tolerance!r}.")
    if better not in BETTER:
        raise ValueError(f"better must be one of {', '.join(BETTER)}; got {better!r}.")


def _number(name: str, value: object, label: str) -> float:
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{label}: the {name} must be a positive number to compare speeds; got {value!r}.")
    return float(value)


def _pct(cv: float | None) -> str:
    return "?" if cv is None else f"{cv * 100:.0f} %"


def _cv_text(cvs: Sequence[float | None]) -> str:
    return "CV " + ", ".join(_pct(c) for c in cvs) if any(c is not None for c in cvs) else "CV unknown"


def _busy_reason(cvs: Sequence[float | None], warnings: Sequence[str]) -> str | None:
    """Why the machine counts as busy (the highest CV over CV_WARN, else a busy warning), or None."""
    high = [c for c in cvs if c is not None and c > CV_WARN]
    if high:
        return f"CV {_pct(max(high))} > {CV_WARN * 100:.0f} %"
    said = next((m.group(0) for w in warnings if (m := _BUSY.search(w))), None)
    return f"{said} during a probe" if said else None


def _short(warning: str) -> str:
    return warning if len(warning) <= _MAX_WARNING_CHARS else warning[:_MAX_WARNING_CHARS - 1].rstrip() + "…"


def _listed(warnings: Sequence[str], busy: str | None, none: str = "") -> str:
    """The warnings not restated already (the CV, the busy reason) nor beside the point (random weights)."""
    shown = [_short(w) for w in warnings if not w.startswith(_NOT_LISTED) and not (busy and _BUSY.search(w))]
    return "; warnings: " + " | ".join(shown) if shown else none


def _outcome(ratio: float, better: str, tolerance: float) -> str:
    speed = ratio if better == "higher" else 1 / ratio  # above 1: faster
    return "faster" if speed > 1 + tolerance else "slower" if speed < 1 - tolerance else "same"


def _phrase(outcome: str, tolerance: float) -> str:
    return f"the same speed within ±{tolerance * 100:.0f} %" if outcome == "same" else outcome


def _text(label: str, ratio: float, quantity: str, expect: str, outcome: str, tolerance: float,
          cvs: Sequence[float | None], warnings: Sequence[str], busy: str | None) -> str:
    head = f"{label}: {ratio:.2f}× {quantity}".rstrip() + f" ({_cv_text(cvs)}) — {_phrase(outcome, tolerance)}"
    if outcome == expect:
        rough = f", though this machine was busy ({busy}): the size of the ratio is rough" if busy else ""
        return head + ", as expected" + rough + _listed(warnings, busy)
    head += f", which contradicts the expectation ({_phrase(expect, tolerance)})"
    if busy:
        return head + f": this machine was busy ({busy}); rerun with more repeats on a calm machine" \
            + _listed(warnings, busy)
    return head + _listed(warnings, busy, "; no warning explains it")


def verdict_from_numbers(label: str, value: float, base: float, expect: str, *, cvs: Iterable[float | None] = (),
                         warnings: Iterable[str] = (), tolerance: float = 0.10, better: str = "higher",
                         quantity: str = "") -> Verdict:
    """`value` against `base` (higher is faster unless `better="lower"`, e.g. for times); `quantity` names them."""
    _check(expect, tolerance, better)
    ratio = _number("value", value, label) / _number("baseline", base, label)
    cvs, notes = tuple(cvs), tuple(dict.fromkeys(warnings))  # the runs' warnings, each once, in order
    outcome, busy = _outcome(ratio, better, tolerance), _busy_reason(cvs, notes)
    text = _text(label, ratio, quantity, expect, outcome, tolerance, cvs, notes, busy)
    logger.debug("verdict: %s", text)
    return Verdict(label, ratio, expect, outcome == expect, cvs, notes, text, outcome, busy is not None)


def _metric(metric: str) -> _SpeedMetric:
    if metric in _LATENCY_EXTRAS:
        return _LATENCY_EXTRAS[metric]
    m = METRICS.get(metric)
    if m is None or m.unit not in _SPEED_UNITS:
        raise ValueError(f"metric must be one of {', '.join(speed_metrics())}; got {metric!r}.")
    return _SpeedMetric(f"{m.label} {m.unit}", m.better)


def _read(result: RunResult, metric: str) -> float | None:
    if metric in _LATENCY_EXTRAS:
        return getattr(result.latency, metric, None) if result.latency is not None else None
    return METRICS[metric].value(result)


def speed_verdict(label: str, result: RunResult, baseline: RunResult, expect: str, *,
                  metric: str = "decode_tokens_per_s", tolerance: float = 0.10) -> Verdict:
    """`result` against `baseline` on a speed `metric` (see `speed_metrics()`), with both runs' CVs and warnings."""
    m = _metric(metric)
    _check(expect, tolerance, m.better)
    value, base = _read(result, metric), _read(baseline, metric)
    if base is None or base == 0:
        raise ValueError(f"{label}: the baseline run has no {m.quantity} to compare against (status "
                         f"{baseline.status!r}); measure it again.")
    if value is None:
        raise ValueError(f"{label}: the run has no {m.quantity} to compare (status {result.status!r}); "
                         "measure it again.")
    cvs = tuple(r.latency.cv if r.latency is not None else None for r in (result, baseline))
    return verdict_from_numbers(label, value, base, expect, cvs=cvs, warnings=(*result.warnings, *baseline.warnings),
                                tolerance=tolerance, better=m.better, quantity=m.quantity)
