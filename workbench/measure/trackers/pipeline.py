"""Pipeline: each stage's busy time over the timed calls, and the measured bubble next to GPipe's prediction."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from workbench.measure.tracker import Tracker, register


@dataclass(frozen=True)
class StageBusy:
    """One pipeline stage: its rank, its decoder layers, and the compute time of its forwards."""

    stage: int
    first_layer: int
    last_layer: int
    busy_s: float  # perf_counter around the stage's forwards, summed over the timed calls


@dataclass(frozen=True)
class PipelineStats:
    """How busy the stages of a pipeline-parallel run were over its timed calls."""

    stages: tuple[StageBusy, ...]
    micro_batches: int
    steps: int  # pipelined steps (one per generated token) over the timed calls
    wall_s: float  # their wall time (the slowest rank's)
    measured_bubble: float | None  # 1 - sum(busy) / (N x wall)
    predicted_bubble: float  # (N - 1) / (M + N - 1)


@register
class PipelineTracker(Tracker):
    """Reads the pipeline generator's counters, reset when the timed calls start; ranks merge their stages."""

    section, stats, ready_after, order = "pipeline", PipelineStats, "measure", 60

    def _generator(self) -> object | None:
        generator = getattr(self.run.engine, "generator", None)
        return generator if hasattr(generator, "stage_stats") else None

    @contextlib.contextmanager
    def _reset(self) -> Iterator[None]:
        generator = self._generator()
        if generator is not None:
            generator.reset_counters()
        yield

    def around(self, phase: str) -> contextlib.AbstractContextManager[None]:
        return self._reset() if phase == "measure" else contextlib.nullcontext()

    def finish(self) -> PipelineStats | None:
        generator = self._generator()
        if generator is None:
            return None
        stage, layers, counters = generator.stage_stats()
        return _stats((StageBusy(stage, layers[0], layers[-1], counters.busy_s),),
                      self.run.config.micro_batches, counters.steps, counters.wall_s,
                      self.run.config.pipeline_parallel)

    @classmethod
    def merge(cls, values: Sequence[PipelineStats | None], kind: str) -> PipelineStats | None:
        """Every rank brings its own stage; the wall time is the slowest rank's."""
        present = [v for v in values if v is not None]
        if not present or len(present) < len(values):
            return None
        stages = tuple(sorted((s for v in present for s in v.stages), key=lambda s: s.stage))
        return _stats(stages, present[0].micro_batches, present[0].steps, max(v.wall_s for v in present),
                      len(stages))

    @classmethod
    def rows(cls, p: PipelineStats) -> list[tuple[str, str]]:
        n = len(p.stages)
        measured = f"{p.measured_bubble:.0%}" if p.measured_bubble is not None else "unknown"
        busy = "; ".join(f"stage {s.stage} (layers {s.first_layer}-{s.last_layer}) {s.busy_s:.3f} s"
                         for s in p.stages)
        return [("pipeline", f"{n} stages x {p.micro_batches} micro-batches: bubble {measured} measured, "
                             f"{p.predicted_bubble:.0%} predicted ((N-1)/(M+N-1)) over {p.steps} steps, "
                             f"{p.wall_s:.3f} s"),
                ("stage busy", busy)]


def _stats(stages: tuple[StageBusy, ...], micro: int, steps: int, wall: float, n: int) -> PipelineStats:
    measured = 1.0 - sum(s.busy_s for s in stages) / (n * wall) if wall > 0 and len(stages) == n else None
    return PipelineStats(stages, micro, steps, wall, measured, (n - 1) / (micro + n - 1))
