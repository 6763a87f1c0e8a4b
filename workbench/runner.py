"""`run(config) -> RunResult`: prepare, load, apply, warm up, measure, evaluate — one engine, every tracker.

The engine (`workbench.engines`) runs the model; the trackers (`workbench.measure.trackers`) measure the
phases they wrap and each builds its section of the result; the runner orders the phases, times the
tokens with an engine-independent clock, narrates progress and assembles whatever was reached.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import time
import traceback
from collections.abc import Callable, Iterator
from typing import Any

import torch

from workbench.config import RunConfig
from workbench.engines.base import Engine, EngineContext, engine_class
from workbench.errors import RunFailed, WorkbenchError, is_oom
from workbench.events import (MetricEvent, OnEvent, RepeatEvent, StageEvent, TokenProgress, WarningEvent,
                              never_stop, no_event)
from workbench.execution import CpuBusy, resolve_device, set_interop_threads, threads, threads_warning
from workbench.measure import baseline as baseline_cache
from workbench.measure import env as envinfo
from workbench.measure import tracker
from workbench.measure.accuracy import EVAL_BATCH, Baseline, EvalWindows, decode_warning, score
from workbench.measure.latency import TimedCalls, TokenClock, decode_tokens_per_s, token_reporter
from workbench.models.checks import check_causal_lm
from workbench.models.loader import load_tokenizer
from workbench.models.sources import load_config, resolve
from workbench.parallel.coordinator import Coordinator
from workbench.result import ModelInfo, RepeatTiming, RunResult, TechniqueRecord
from workbench.techniques import check_combination
from workbench.textio import IncrementalDecoder, plan_workload

logger = logging.getLogger(__name__)


class _Run:
    """One run's state; each stage is a method, and `result()` assembles whatever was reached."""

    NARRATE_EVERY_S = 5.0  # progress of a long timed call or evaluation: at most one event this often

    def __init__(self, config: RunConfig, on_event: OnEvent, should_stop: Callable[[], bool],
                 coordinator: Coordinator | None = None) -> None:
        self.config, self.should_stop = config, should_stop
        self.coord = coordinator or Coordinator()
        self.on_event = on_event if self.coord.emits else no_event
        self.t0 = time.perf_counter()
        self.started_at = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        self.warnings: list[str] = []
        self.stopped = False
        self.engine: Engine | None = None
        self.model_info: ModelInfo | None = None
        self.techniques: tuple[TechniqueRecord, ...] = ()
        self.calls = TimedCalls(config.max_new_tokens)
        self.busy: float | None = None
        self.windows: EvalWindows | None = None
        self.baseline: Baseline | None = None
        self.baseline_greedy: list[int] | None = None
        self.scores: Any = None  # the engine's scores of the evaluation windows (AccuracyStats without greedy match)
        self.sections: dict[str, Any] = {}
        self.trackers = [cls(self) for cls in tracker.trackers()]

    def stage(self, name: str, state: str, message: str = "", fraction: float | None = None) -> None:
        self.on_event(StageEvent(name, state, message, fraction, time.perf_counter() - self.t0))

    def warn(self, message: str, section: str = "run") -> None:
        self.warnings.append(message)
        self.on_event(WarningEvent(message, section))

    def stop_requested(self) -> bool:
        """Polled after every token and between stages; every rank gets the same answer."""
        if not self.stopped:
            self.stopped = self.coord.any(bool(self.should_stop()))
        return self.stopped

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Run a phase inside every tracker's context; then the trackers ready after it build their sections."""
        with tracker.entered(self.trackers, name):
            yield
        for t in self.trackers:
            if t.ready_after == name:
                self.sections[t.section] = value = t.finish()
                if value is not None:
                    self.on_event(MetricEvent(t.section, value))

    def prepare(self) -> None:
        """Everything that can fail before a weight is read: source, device, combination, memory estimate."""
        cfg = self.config
        self.source = resolve(cfg.model)
        self.device = resolve_device(cfg.device)
        check_combination(cfg.techniques, self.device)
        model_config = load_config(self.source, cfg.trust_remote_code)
        check_causal_lm(model_config, cfg.model)  # any engine needs a causal LM
        self.engine = engine_class(cfg.engine)(EngineContext(cfg, self.source, self.device, model_config,
                                                             self.on_event, self.stop_requested,
                                                             self.coord.load_kwargs(),
                                                             getattr(self.coord, "make_generator", None)))
        self.engine.check()
        self.tokenizer = load_tokenizer(self.source, cfg.trust_remote_code)
        self.want_accuracy = cfg.eval_tokens > 0 and not self.source.random_weights
        work = plan_workload(cfg, self.tokenizer, model_config, self.want_accuracy, self.coord.my_rows)
        self.prompt_ids, self.windows = work.prompt_ids, work.windows
        if work.warning and not self.source.random_weights:  # presets borrow the reference tokenizer
            self.warn(work.warning)
        self.engine.plan(self.tokenizer, self.prompt_ids, self.windows)
        if self.source.random_weights:
            self.warn("random weights (preset): speed and memory only; accuracy is not measured", "accuracy")
        for problem in (threads_warning(cfg.threads), set_interop_threads(cfg.interop_threads)):
            if problem:
                self.warn(problem)

    def load_baseline(self) -> None:
        """The unmodified model's predictions (PyTorch, fp32): from the cache, or computed once (not timed)."""
        if not self.want_accuracy:
            return
        try:
            self.baseline, self.baseline_greedy = baseline_cache.for_run(
                self.source, self.config, self.device, self.windows, self.prompt_ids[0], self.tokenizer.pad_token_id,
                self.stop_requested, lambda state, message: self.stage("baseline", state, message))
        except baseline_cache.BaselineTooLarge as e:  # the run goes on; what needs the baseline stays null
            self.warn(str(e), "accuracy")

    def load(self) -> None:
        cfg = self.config
        self.stage("load", "start", f"loading {cfg.model} ({cfg.dtype}) on {self.device}")
        with self.phase("load"):
            self.engine.load()
        self.stage("load", "end")

    def apply(self) -> None:
        """The engine applies the techniques in order (then places and compiles the model)."""
        cfg = self.config
        if cfg.techniques:
            self.stage("apply", "start", ", ".join(cfg.technique_specs))
        self.techniques = self.engine.apply()
        self.take_engine_warnings()
        if cfg.techniques:
            self.stage("apply", "end")
        self.model_info = self.engine.info()
        self.on_event(MetricEvent("model", self.model_info))

    def generate_once(self, phase: str, repeat: int, progress: Callable[[int, float], None] | None = None,
                      interruptible: bool = False) -> RepeatTiming:
        """One generate call, recorded in `self.calls`."""
        clock = TokenClock(self.device, token_reporter(self.on_event, self.tokenizer, phase, repeat,
                                                       self.config.token_events, progress))
        timing = self.calls.record(self.engine.generate(clock, want_cache=self.calls.kv_bytes is None,
                                                        interruptible=interruptible))
        self.take_engine_warnings()
        return timing

    def take_engine_warnings(self) -> None:
        """What the engine chose that the result must say (a compile fallback, a technique known to be slow here)."""
        for message in self.engine.take_warnings():
            self.warn(message)

    def warmup_and_measure(self) -> None:
        with self.phase("run"):
            if self.config.warmup:
                self.warm_up()
            if not self.stopped:
                self.coord.barrier()  # distributed ranks start measuring together, so their throughputs overlap
                with CpuBusy() as busy, self.phase("measure"):
                    self.measure()
                self.busy = busy.share

    def warm_up(self) -> None:
        """The untimed runs, narrated token by token (a big batch can take minutes) and stoppable inside a forward."""
        cfg, batch = self.config, len(self.prompt_ids)
        self.stage("warmup", "start", f"{cfg.warmup} untimed run(s) of batch {batch} x {len(self.prompt_ids[0])} "
                   f"prompt + {cfg.max_new_tokens} new tokens" + (" (compiling)" if cfg.compile else ""))
        # Layer hooks would be traced into a compiled graph, and a distributed stop check is a collective.
        interruptible = not cfg.compile and self.coord.world_size == 1
        progress = TokenProgress(self.stage, "warmup", cfg.warmup * cfg.max_new_tokens * batch)
        for i in range(cfg.warmup):
            if self.stop_requested():
                break
            self.generate_once("warmup", i, progress.for_steps(i * cfg.max_new_tokens * batch, batch), interruptible)
        self.stage("warmup", "end")

    def measure(self) -> None:
        """Timed calls until repeats and min_duration_s are both reached (or a stop keeps the partial call)."""
        cfg, batch = self.config, len(self.prompt_ids)
        self.stage("measure", "start", f">= {cfg.repeats} runs and >= {cfg.min_duration_s:g} s")
        fraction = 0.0
        while not self.stop_requested():
            # a timed call of a big batch can take minutes: narrated every few seconds (a quick one never is)
            progress = TokenProgress(self.stage, "measure", cfg.max_new_tokens * batch, fraction=fraction,
                                     prefix=f"timed run {len(self.calls.samples) + 1}: ", every_s=self.NARRATE_EVERY_S,
                                     ends=False)
            timing = self.generate_once("measure", len(self.calls.samples), progress.for_steps(0, batch))
            if self.stopped and len(timing.token_ms) < cfg.max_new_tokens:
                self.calls.partial = timing
                break
            self.calls.samples.append(timing)
            self.on_event(RepeatEvent(len(self.calls.samples) - 1, timing.ttft_ms, timing.e2e_ms,
                                      decode_tokens_per_s(timing, batch)))
            spent = sum(s.e2e_ms for s in self.calls.samples) / 1e3
            fraction = min(len(self.calls.samples) / cfg.repeats, spent / cfg.min_duration_s if cfg.min_duration_s else 1.0)
            self.stage("measure", "progress", f"{len(self.calls.samples)} runs, {spent:.1f} s", min(1.0, fraction))
            if self.coord.any(fraction >= 1.0 or len(self.calls.samples) >= cfg.max_repeats):
                break
        self.stage("measure", "end")

    def evaluate(self) -> None:
        """The decode check, then the engine's log-probabilities of the held-out windows, scored."""
        with self.phase("evaluate"):
            self.check_decode()
            if not self.want_accuracy or self.windows is None:
                return
            self.stage("evaluate", "start", f"{self.windows.scored_tokens} held-out tokens")
            total, batches = self.windows.scored_tokens, -(-self.windows.ids.shape[0] // EVAL_BATCH)
            progress = TokenProgress(self.stage, "evaluate", total, every_s=self.NARRATE_EVERY_S, ends=False)
            self.scores = score(self.engine.logprobs(self.windows), self.windows, self.baseline,
                                progress.polled(self.stop_requested, batches))
            self.stage("evaluate", "end")

    def check_decode(self) -> None:
        """Warn when the tokens decoded one at a time disagree with one uncompiled forward over the same text."""
        if self.calls.first is not None and self.calls.first.rows and self.calls.first.rows[0]:
            warning = decode_warning(self.engine.decode_consistency(self.prompt_ids[0], self.calls.first.rows[0]))
            if warning:
                self.warn(warning, "accuracy")
            self.take_engine_warnings()  # e.g. speculative output that differs from the model's own greedy output

    def result(self) -> RunResult:
        status = "stopped" if self.stopped else "ok"
        if self.stopped:
            self.warnings.append("stopped on request: partial result")
        outputs = tuple(IncrementalDecoder(self.tokenizer).decode(row) for row in self.calls.first.rows) if self.calls.first else ()
        latency = self.sections.get("latency")
        parallel = self.coord.info(str(getattr(self, "device", "cpu")), torch.get_num_threads(),
                                   len(getattr(self, "prompt_ids", [])), self.busy,
                                   latency.decode_tokens_per_s if latency else None,
                                   self.engine.placement() if self.engine else None)
        return RunResult(
            config=self.config, model=self.model_info, techniques=self.techniques,
            env=envinfo.capture(getattr(self, "device", torch.device("cpu"))),
            sections={name: self.sections.get(name) for name in tracker.sections()},
            warnings=tuple(self.warnings), status=status, output_text=outputs[0] if outputs else "",
            outputs=outputs, parallel=parallel, started_at=self.started_at,
            duration_s=time.perf_counter() - self.t0)

    def release(self) -> None:
        """Drop the model and give memory back (also after errors)."""
        if self.engine is not None:
            self.engine.release()


def run_local(config: RunConfig, on_event: OnEvent = no_event, should_stop: Callable[[], bool] = never_stop,
              coordinator: Coordinator | None = None) -> RunResult:
    """Run in this process (as one rank of a distributed run when given its coordinator)."""
    r = _Run(config, on_event, should_stop, coordinator)
    stage = "prepare"
    try:
        with threads(config.threads):
            for stage, step in (("prepare", r.prepare), ("baseline", r.load_baseline), ("load", r.load),
                                ("apply", r.apply), ("measure", r.warmup_and_measure), ("evaluate", r.evaluate)):
                if stage != "prepare" and r.stop_requested():
                    break
                step()
            if r.model_info is not None:
                with r.phase("finish"):
                    pass
            return r.result()
    except WorkbenchError:
        raise
    except Exception as e:
        if is_oom(e):
            traceback.clear_frames(e.__traceback__)  # the failed frames' locals (the model, its tensors) go too
            r.release()
            raise RunFailed(f"out of memory during {stage}: {str(e).splitlines()[0][:160]}; memory was freed — "
                            "try a smaller batch, fewer tokens, or a lower-precision dtype") from e
        raise
    finally:
        r.release()


def precompute_baseline(config: RunConfig, on_event: OnEvent = no_event,
                        should_stop: Callable[[], bool] = never_stop, coordinator: Coordinator | None = None) -> None:
    """Prepare a run and make sure the unmodified model's predictions are cached (before ranks start).

    `coordinator` (a single-process one) picks the prompt rows of the rank whose cache entries to fill.
    """
    r = _Run(config.replace(tensor_parallel=1, data_parallel=1, pipeline_parallel=1, micro_batches=1), on_event,
             should_stop, coordinator)
    try:
        with threads(config.threads):
            r.prepare()
            r.load_baseline()
    finally:
        r.release()


def run(config: RunConfig, on_event: OnEvent = no_event, should_stop: Callable[[], bool] = never_stop) -> RunResult:
    """Run one configuration and return its result (status "stopped" with what was reached if stopped).

    Tensor- and data-parallel runs start their ranks as separate processes (torch.distributed);
    rank 0's events and the merged result come back here. Raises WorkbenchError (one user-facing
    sentence) for bad settings, missing models, runs that would not fit, and out-of-memory
    failures; memory is released in every case.
    """
    if config.tensor_parallel > 1 or config.data_parallel > 1 or config.pipeline_parallel > 1:
        from workbench.parallel.launch import run_distributed

        return run_distributed(config, on_event, should_stop)
    return run_local(config, on_event, should_stop)
