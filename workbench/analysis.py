"""Comparing runs: named metrics, the Pareto frontier, side-by-side comparison, run descriptions."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from workbench.measure import tracker
from workbench.result import RunResult


@dataclass(frozen=True)
class Metric:
    """A number read from a result, with its label, unit and which direction is better."""

    key: str
    label: str
    unit: str
    better: str  # "lower" | "higher"
    get: Callable[[RunResult], float | None]

    def value(self, result: RunResult) -> float | None:
        """The metric of one result (None when the run did not measure it)."""
        try:
            v = self.get(result)
        except AttributeError:  # a section is None (stopped run, random weights, no GPU)
            return None
        return None if v is None else float(v)


def _section_metric(section: str, axis: tracker.Axis) -> Metric:
    return Metric(axis.key, axis.label, axis.unit, axis.better, lambda r: axis.get(r.sections.get(section)))


METRICS: dict[str, Metric] = {m.key: m for m in (
    [_section_metric(t.section, a) for t in tracker.trackers() for a in t.axes]
    + [Metric("params", "parameters", "", "lower", lambda r: r.model.params)])}


def dominates(a: Sequence[float], b: Sequence[float], better: Sequence[str]) -> bool:
    """a is at least as good as b everywhere and strictly better somewhere."""
    ge = [(x <= y) if d == "lower" else (x >= y) for x, y, d in zip(a, b, better)]
    gt = [(x < y) if d == "lower" else (x > y) for x, y, d in zip(a, b, better)]
    return all(ge) and any(gt)


def pareto_front(points: Sequence[Sequence[float]], better: Sequence[str]) -> list[int]:
    """Indices of the points no other point dominates (O(n^2): runs are counted in hundreds)."""
    return [i for i, p in enumerate(points)
            if not any(dominates(q, p, better) for j, q in enumerate(points) if j != i)]


def frontier(results: Sequence[RunResult], keys: Sequence[str]) -> list[int]:
    """Positions (in `results`) of the runs on the Pareto frontier of these metrics.

    Runs missing any of the metrics (stopped, random weights) take no part.
    """
    metrics = [METRICS[k] for k in keys]
    rows = [(i, [m.value(r) for m in metrics]) for i, r in enumerate(results)]
    usable = [(i, v) for i, v in rows if all(x is not None for x in v)]
    front = pareto_front([v for _, v in usable], [m.better for m in metrics])
    return [usable[j][0] for j in front]


@dataclass(frozen=True)
class ComparisonRow:
    """One metric of two runs side by side; ratio = b / a, and which run is better."""

    key: str
    label: str
    unit: str
    a: float | None
    b: float | None
    ratio: float | None
    better: str | None  # "a", "b", "same" or None


def compare(a: RunResult, b: RunResult, keys: Sequence[str] | None = None) -> list[ComparisonRow]:
    """The metrics of two runs side by side."""
    rows = []
    for key in keys or METRICS:
        m = METRICS[key]
        va, vb = m.value(a), m.value(b)
        ratio = vb / va if va not in (None, 0) and vb is not None else None
        winner = None
        if va is not None and vb is not None:
            winner = "same" if va == vb else ("a" if (va < vb) == (m.better == "lower") else "b")
        rows.append(ComparisonRow(key, m.label, m.unit, va, vb, ratio, winner))
    return rows


# Settings that change how long or how often a run measures, not what a decode step costs
_NOT_THE_WORKLOAD = ("batch_size", "warmup", "repeats", "min_duration_s", "max_repeats", "token_events", "seed",
                     "eval_tokens", "eval_context")


def _workload(r: RunResult) -> tuple[str, str | None, str | None]:
    data = {k: v for k, v in r.config.to_dict().items() if k not in _NOT_THE_WORKLOAD}
    return repr(sorted(data.items())), r.env.cpu if r.env else None, r.env.gpu if r.env else None


def batch_series(results: Sequence[RunResult], anchor: RunResult) -> list[RunResult]:
    """The finished runs of `anchor`'s settings on its machine that differ only in batch size (and in how long they
    measured): the newest at each batch size, by batch size. `anchor` itself is among them when it finished."""
    key = _workload(anchor)
    newest: dict[int, RunResult] = {}
    for r in results:
        if r.status == "ok" and _workload(r) == key:
            b = r.config.batch_size
            if b not in newest or (r.run_id or 0) > (newest[b].run_id or 0):
                newest[b] = r
    return [newest[b] for b in sorted(newest)]


def technique_labels(specs: Sequence[str]) -> str:
    """Short labels of technique specs joined with ' + ' (specs that no longer parse are shown as stored)."""
    from workbench.errors import WorkbenchError
    from workbench.techniques import parse_spec

    labels = []
    for spec in specs:
        try:
            labels.append(parse_spec(spec).label())
        except WorkbenchError:
            labels.append(spec)
    return " + ".join(labels)


def describe(r: RunResult) -> str:
    """A run's settings in one line (hover text, table rows)."""
    cfg = r.config
    techniques = " + ".join(t.label() for t in cfg.techniques) or "no technique"
    return (f"run {r.run_id if r.run_id is not None else '-'}: {cfg.model} {cfg.dtype} on "
            f"{r.model.device if r.model else cfg.device} ({cfg.engine} engine); {techniques}; batch {cfg.batch_size}, "
            f"{cfg.max_new_tokens} new tokens" + ("" if r.status == "ok" else f" ({r.status})"))
