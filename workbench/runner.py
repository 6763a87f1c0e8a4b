"""`run(config) -> RunResult`: load, apply, warm up, measure, evaluate — composing the trackers."""

from __future__ import annotations

import datetime as dt
import gc
import logging
import time
import traceback
from collections.abc import Callable
from typing import Any

import psutil
import torch

from workbench.config import RunConfig
from workbench.errors import ConfigError, RunFailed, WorkbenchError
from workbench.events import (MetricEvent, OnEvent, RepeatEvent, StageEvent, TokenProgress, WarningEvent,
                              never_stop, no_event)
from workbench.execution import resolve_device, set_interop_threads, threads
from workbench.generation import Generation, Generator
from workbench.measure import baseline as baseline_cache
from workbench.measure import env as envinfo
from workbench.measure.accuracy import (Baseline, EvalWindows, decode_consistency, evaluate, greedy_match,
                                        make_windows)
from workbench.measure.latency import decode_tokens_per_s, latency_warnings, summarize
from workbench.measure.memory import (GpuPeak, HostPeak, available_bytes, check_fits, estimate_run, host_rss,
                                     memory_stats, parameter_count, weight_bytes)
from workbench.measure.roofline import bytes_per_step, memory_bandwidth, roofline
from workbench.models.loader import Loaded, count_params, kv_bytes_per_token, load_model
from workbench.models.sources import TORCH_DTYPES, fingerprint, resolve
from workbench.parallel.coordinator import Coordinator
from workbench.parallel.distributed import cpu_cores
from workbench.parallel.placement import Placement, parse_device_map, parse_max_memory, place
from workbench.result import (AccuracyStats, LatencyStats, ModelInfo, ParallelInfo, RankInfo,
                              RepeatTiming, RunResult, TechniqueRecord)
from workbench.techniques import apply_techniques, check_combination
from workbench.textio import build_prompts, heldout_ids, tokenizer_limit_warning

logger = logging.getLogger(__name__)
# Below this share of decoded tokens in the top 10 of one forward over the same text, the decode path is wrong.
DECODE_CONSISTENCY_MIN = 0.5
DECODE_WRONG = "decode looks wrong"


def decode_looks_wrong(result: RunResult) -> bool:
    """True when the run's decoded tokens disagreed with its own forward pass (its speed is of wrong output)."""
    return any(w.startswith(DECODE_WRONG) for w in result.warnings)


def _is_oom(error: BaseException) -> bool:
    text = str(error).lower()
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in text or "can't allocate memory" in text


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
        self.loaded: Loaded | None = None
        self.generator: Generator | None = None
        self.placement: Placement | None = None
        self.model_info: ModelInfo | None = None
        self.memory: dict[str, Any] = {}
        self.latency: LatencyStats | None = None
        self.accuracy: AccuracyStats | None = None
        self.roofline = None
        self.techniques: tuple[TechniqueRecord, ...] = ()
        self.samples: list[RepeatTiming] = []
        self.first: Generation | None = None  # the first complete generate call (outputs, greedy match)
        self.reference_forward: Callable[..., Any] | None = None  # the model's uncompiled forward (decode check)
        self.cold_start_s: float | None = None
        self.kv_bytes: int | None = None
        self.busy: float | None = None

    # ------------------------------------------------------------------ helpers
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

    # ------------------------------------------------------------------ stages
    def prepare(self) -> None:
        """Everything that can fail before a weight is read: source, device, combination, memory estimate."""
        cfg = self.config
        self.source = resolve(cfg.model)
        self.device = resolve_device(cfg.device)
        check_combination(cfg.techniques, self.device)
        from workbench.models.checks import check_causal_lm, check_techniques_fit
        from workbench.models.loader import load_tokenizer
        from workbench.models.sources import load_config

        model_config = load_config(self.source, cfg.trust_remote_code)
        check_causal_lm(model_config, cfg.model)  # an encoder (BERT) would load as garbage-generating LMHead
        check_techniques_fit(model_config, cfg.techniques, cfg.model, cfg.trust_remote_code)
        self.tokenizer = load_tokenizer(self.source, cfg.trust_remote_code)
        text_config = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
        self.max_positions = getattr(text_config, "max_position_embeddings", None) or 1 << 20
        self.prompt_ids = self.coord.my_rows(build_prompts(cfg, self.tokenizer, text_config.vocab_size))
        total = len(self.prompt_ids[0]) + cfg.max_new_tokens
        if total > self.max_positions:
            raise ConfigError(f"prompt ({len(self.prompt_ids[0])} tokens) + max_new_tokens ({cfg.max_new_tokens}) "
                              f"= {total} exceeds the model's context of {self.max_positions} tokens")
        limit_warning = tokenizer_limit_warning(self.tokenizer, total, self.max_positions)
        if limit_warning and not self.source.random_weights:  # presets borrow the reference tokenizer
            self.warn(limit_warning)
        self.want_accuracy = cfg.eval_tokens > 0 and not self.source.random_weights
        self.windows: EvalWindows | None = None
        if self.want_accuracy:
            self.windows = make_windows(heldout_ids(self.tokenizer), min(cfg.eval_context, self.max_positions),
                                        cfg.eval_tokens)
        est = estimate_run(text_config, params=count_params(model_config, cfg.trust_remote_code),
                           dtype_bytes=TORCH_DTYPES[cfg.dtype].itemsize,
                           kv_per_token=kv_bytes_per_token(model_config, cfg.dtype), batch=len(self.prompt_ids),
                           prompt_tokens=len(self.prompt_ids[0]), new_tokens=cfg.max_new_tokens,
                           eval_batch_tokens=8 * (self.windows.context if self.windows else 0),
                           eager=cfg.attn_implementation == "eager")
        if not cfg.device_map:  # a device map is there precisely to run what does not fit in one place
            check_fits(est, available_bytes(self.device), "the GPU" if self.device.type == "cuda" else "this machine")
        self.warn_threads()
        if self.source.random_weights:
            self.warn("random weights (preset): speed and memory only; accuracy is not measured", "accuracy")
        problem = set_interop_threads(cfg.interop_threads)
        if problem:
            self.warn(problem)

    def warn_threads(self) -> None:
        """Warn when more intra-op threads are asked for than this process has CPU cores."""
        cores = cpu_cores()
        if self.config.threads and self.config.threads > cores:
            self.warn(f"threads {self.config.threads} is more than the {cores} CPU cores this process may use: the "
                      "threads take turns on the cores, so the timings are slower and noisier than they would be "
                      f"with {cores} threads")

    def load_baseline(self) -> None:
        """The unmodified model's predictions: from the cache, or computed once (not timed)."""
        self.baseline: Baseline | None = None
        self.baseline_greedy: list[int] | None = None
        if not self.want_accuracy:
            return
        cfg = self.config
        keys = baseline_cache.BaselineKeys.make(fingerprint(self.source), self.windows, self.prompt_ids[0],
                                                cfg.max_new_tokens)
        base, greedy = baseline_cache.load_cached(keys)
        if base is None or greedy is None:
            self.stage("baseline", "start", "computing the unmodified model's predictions once (cached afterwards)")
            base, greedy = baseline_cache.compute(
                keys, lambda: load_model(self.source, baseline_cache.BASELINE_DTYPE, self.device,
                                         trust_remote_code=cfg.trust_remote_code, seed=cfg.seed,
                                         allow_pickle=cfg.allow_pickle).model,
                self.windows, self.prompt_ids[0], cfg.max_new_tokens, self.tokenizer.pad_token_id,
                self.stop_requested)
            self.stage("baseline", "end")
        self.baseline, self.baseline_greedy = base, greedy

    def load(self) -> None:
        cfg = self.config
        self.stage("load", "start", f"loading {cfg.model} ({cfg.dtype}) on {self.device}")
        gc.collect()
        self.memory["idle_host_bytes"] = host_rss()
        with HostPeak() as host, GpuPeak(self.device) as gpu:
            torch.manual_seed(cfg.seed)
            self.loaded = load_model(self.source, cfg.dtype, self.device, trust_remote_code=cfg.trust_remote_code,
                                     seed=cfg.seed, attn_implementation=cfg.attn_implementation,
                                     extra=self.coord.load_kwargs(), allow_pickle=cfg.allow_pickle)
        self.memory.update(load_peak_host_bytes=host.peak, host_method=host.method)
        self.memory["load_gpu"] = gpu.peaks
        self.stage("load", "end")

    def apply(self) -> None:
        """Techniques in order, then placement over devices (device_map), then compilation."""
        cfg = self.config
        if cfg.techniques:
            self.stage("apply", "start", ", ".join(cfg.techniques))
            self.techniques = apply_techniques(self.loaded, cfg, self.on_event)
            self.stage("apply", "end")
        model = self.loaded.model
        self.model_info = ModelInfo(
            name=self.source.display_name, params=parameter_count(model), weight_bytes=weight_bytes(model),
            random_weights=self.source.random_weights, dtype=cfg.dtype, device=str(self.device),
            architecture=type(model).__name__, source=self.source.kind)
        self.on_event(MetricEvent("model", self.model_info))
        if cfg.device_map:
            memory = parse_max_memory(cfg.max_memory) if cfg.max_memory else None
            model, self.placement = place(model, parse_device_map(cfg.device_map), self.device, memory)
        self.reference_forward = model.forward  # uncompiled: what the decode path must agree with
        if cfg.compile:
            from workbench.paths import compile_cache

            compile_cache()
            model.forward = torch.compile(model.forward, dynamic=False)
        self.loaded.model = model
        self.generator = Generator(model, self.tokenizer, self.device, cfg, self.prompt_ids, self.on_event,
                                   self.stop_requested)

    # ------------------------------------------------------------------ generation
    def generate_once(self, phase: str, repeat: int, progress: Callable[[int, float], None] | None = None,
                      interruptible: bool = False) -> RepeatTiming:
        """One timed call; keeps the first complete one's tokens and the KV cache's size."""
        gen = self.generator.generate(phase, repeat, want_cache=self.kv_bytes is None, progress=progress,
                                      interruptible=interruptible)
        if self.cold_start_s is None:
            self.cold_start_s = gen.timing.e2e_ms / 1e3
        if gen.kv_bytes is not None:
            self.kv_bytes = gen.kv_bytes
        if self.first is None and len(gen.timing.token_ms) == self.config.max_new_tokens:
            self.first = gen
        return gen.timing

    def warmup_and_measure(self) -> None:
        cfg = self.config
        with HostPeak() as host, GpuPeak(self.device) as gpu:
            if cfg.warmup:
                self.warm_up()
            if not self.stopped:
                self.coord.barrier()  # distributed ranks start measuring together, so their throughputs overlap
                cpu0, wall0 = psutil.Process().cpu_times(), time.perf_counter()
                self.measure()
                cpu1, wall = psutil.Process().cpu_times(), time.perf_counter() - wall0
                used = (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system)
                self.busy = used / (wall * torch.get_num_threads()) if wall > 0 else None
        self.memory.update(peak_host_bytes=host.peak, run_gpu=gpu.peaks)

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
        cfg, batch = self.config, len(self.prompt_ids)
        self.stage("measure", "start", f">= {cfg.repeats} runs and >= {cfg.min_duration_s:g} s")
        partial: RepeatTiming | None = None
        fraction = 0.0
        while not self.stop_requested():
            # a timed call of a big batch can take minutes: narrated every few seconds (a quick one never is)
            progress = TokenProgress(self.stage, "measure", cfg.max_new_tokens * batch, fraction=fraction,
                                     prefix=f"timed run {len(self.samples) + 1}: ", every_s=self.NARRATE_EVERY_S,
                                     ends=False)
            timing = self.generate_once("measure", len(self.samples), progress.for_steps(0, batch))
            if self.stopped and len(timing.token_ms) < cfg.max_new_tokens:
                partial = timing
                break
            self.samples.append(timing)
            self.on_event(RepeatEvent(len(self.samples) - 1, timing.ttft_ms, timing.e2e_ms,
                                      decode_tokens_per_s(timing, batch)))
            spent = sum(s.e2e_ms for s in self.samples) / 1e3
            fraction = min(len(self.samples) / cfg.repeats, spent / cfg.min_duration_s if cfg.min_duration_s else 1.0)
            self.stage("measure", "progress", f"{len(self.samples)} runs, {spent:.1f} s", min(1.0, fraction))
            if self.coord.any(fraction >= 1.0 or len(self.samples) >= cfg.max_repeats):
                break
        samples = self.samples or ([partial] if partial and partial.token_ms else [])
        if samples:
            self.latency = summarize(samples, batch=batch, prompt_tokens=len(self.prompt_ids[0]), warmup=cfg.warmup,
                                     cold_start_s=self.cold_start_s)
            for w in latency_warnings(self.latency, cfg.max_new_tokens if not self.stopped else 0):
                self.warn(w, "latency")
            self.on_event(MetricEvent("latency", self.latency))
        self.stage("measure", "end")

    def evaluate(self) -> None:
        self.check_decode()
        if not self.want_accuracy or self.windows is None:
            return
        self.stage("evaluate", "start", f"{self.windows.scored_tokens} held-out tokens")
        acc = evaluate(self.loaded.model, self.windows, self.device, self.baseline, self.narrated_stop("evaluate"))
        if acc is not None:
            match = greedy_match(self.first.rows[0], self.baseline_greedy) if self.baseline_greedy and self.first else None
            self.accuracy = AccuracyStats(**{**acc.__dict__, "greedy_match_vs_baseline": match})
            self.on_event(MetricEvent("accuracy", self.accuracy))
        self.stage("evaluate", "end")

    def narrated_stop(self, stage: str, batch_windows: int = 8) -> Callable[[], bool]:
        """`stop_requested` for a loop over evaluation windows that polls it after each batch of windows: each
        poll also narrates the held-out tokens scored so far (throttled)."""
        rows, total = self.windows.ids.shape[0], self.windows.scored_tokens
        progress, polls = TokenProgress(self.stage, stage, total, every_s=self.NARRATE_EVERY_S, ends=False), [0]

        def should_stop() -> bool:
            polls[0] += 1
            progress.update(min(rows, polls[0] * batch_windows) * total // rows)
            return self.stop_requested()
        return should_stop

    def check_decode(self) -> None:
        """Warn when the tokens decoded one at a time disagree with one uncompiled forward over the same text."""
        if self.reference_forward is None or self.first is None or not self.first.rows or not self.first.rows[0]:
            return
        share = decode_consistency(self.reference_forward, self.prompt_ids[0], self.first.rows[0], self.device)
        if share is not None and share < DECODE_CONSISTENCY_MIN:
            self.warn(f"{DECODE_WRONG}: only {share:.0%} of the generated tokens are among the top 10 of one "
                      "uncompiled forward pass over the same text, so the speed measured is that of wrong output "
                      "(a miscompiled or broken kernel on the one-token path); do not trust this configuration",
                      "accuracy")

    # ------------------------------------------------------------------ assembly
    def finish_metrics(self) -> None:
        self.memory_stats = memory_stats(self.memory, self.model_info.weight_bytes if self.model_info else None,
                                         self.kv_bytes)
        self.on_event(MetricEvent("memory", self.memory_stats))
        if self.model_info and self.latency and self.latency.decode_tokens_per_s:
            bandwidth, method = memory_bandwidth(self.device)
            per_step = bytes_per_step(self.loaded.model, self.model_info.weight_bytes, self.kv_bytes,
                                      len(self.prompt_ids[0]), self.config.max_new_tokens)
            self.roofline = roofline(bandwidth, per_step, len(self.prompt_ids), self.latency.decode_tokens_per_s, method)
            self.on_event(MetricEvent("roofline", self.roofline))

    def parallel_info(self) -> ParallelInfo:
        """This process's share of the work (distributed launchers merge the ranks' infos)."""
        decode = self.latency.decode_tokens_per_s if self.latency else None
        rank = RankInfo(self.coord.rank, str(getattr(self, "device", "cpu")), torch.get_num_threads(),
                        len(getattr(self, "prompt_ids", [])), self.busy, decode)
        placement = self.placement.device_map if self.placement else {}
        return ParallelInfo(kind="split" if self.placement else self.coord.kind, world_size=self.coord.world_size,
                            backend=self.coord.backend, placement=placement,
                            bytes_by_device=self.placement.bytes_by_device if self.placement else {},
                            ranks=(rank,), aggregate_decode_tokens_per_s=decode)

    def result(self) -> RunResult:
        status = "stopped" if self.stopped else "ok"
        if self.stopped:
            self.warnings.append("stopped on request: partial result")
        outputs = tuple(self.generator.decode(row) for row in self.first.rows) if self.first else ()
        return RunResult(
            config=self.config, model=self.model_info, latency=self.latency,
            memory=getattr(self, "memory_stats", None), accuracy=self.accuracy, roofline=self.roofline,
            techniques=self.techniques, env=envinfo.capture(getattr(self, "device", torch.device("cpu"))),
            warnings=tuple(self.warnings), status=status, output_text=outputs[0] if outputs else "",
            outputs=outputs, parallel=self.parallel_info(), started_at=self.started_at,
            duration_s=time.perf_counter() - self.t0)

    def release(self) -> None:
        """Drop the model and give memory back (also after errors)."""
        import shutil

        self.loaded = self.generator = self.reference_forward = None
        if self.placement and self.placement.offload_dir:
            shutil.rmtree(self.placement.offload_dir, ignore_errors=True)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


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
            if r.loaded is not None and r.model_info is not None:
                r.finish_metrics()
            return r.result()
    except WorkbenchError:
        raise
    except Exception as e:
        if _is_oom(e):
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
    r = _Run(config.replace(tensor_parallel=1, data_parallel=1), on_event, should_stop, coordinator)
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
    if config.tensor_parallel > 1 or config.data_parallel > 1:
        from workbench.parallel.launch import run_distributed

        return run_distributed(config, on_event, should_stop)
    return run_local(config, on_event, should_stop)
