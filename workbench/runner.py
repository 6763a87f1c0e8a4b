"""`run(config) -> RunResult`: load, apply, warm up, measure, evaluate — composing the trackers."""

from __future__ import annotations

import contextlib
import datetime as dt
import gc
import logging
import time
from collections.abc import Callable
from typing import Any

import torch

from workbench.config import RunConfig
from workbench.errors import ConfigError, RunFailed, WorkbenchError
from workbench.events import (MetricEvent, OnEvent, RepeatEvent, StageEvent, TokenEvent, WarningEvent,
                              never_stop, no_event)
from workbench.measure import baseline as baseline_cache
from workbench.measure import env as envinfo
from workbench.measure.accuracy import Baseline, EvalWindows, evaluate, greedy_match, make_windows
from workbench.measure.latency import StopOnRequest, TokenClock, decode_tokens_per_s, latency_warnings, summarize
from workbench.measure.memory import GpuPeak, HostPeak, available_bytes, cache_bytes, host_rss, parameter_count, weight_bytes
from workbench.measure.roofline import memory_bandwidth, roofline
from workbench.models.loader import Loaded, check_fits, estimate, load_model
from workbench.models.sources import fingerprint, resolve
from workbench.result import (AccuracyStats, LatencyStats, MemoryStats, ModelInfo, RepeatTiming, RunResult,
                              TechniqueRecord)
from workbench.textio import IncrementalDecoder, build_prompts, heldout_ids
from workbench.techniques import apply_techniques, check_combination

logger = logging.getLogger(__name__)


def resolve_device(spec: str) -> torch.device:
    """auto -> cuda if available else cpu; refuse devices this machine does not have."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {spec!r} asked for, but this machine has no CUDA GPU (use cpu or auto)")
        if (device.index or 0) >= torch.cuda.device_count():
            raise ConfigError(f"device {spec!r} does not exist: this machine has {torch.cuda.device_count()} "
                              f"GPU(s), cuda:0..cuda:{torch.cuda.device_count() - 1}")
    return device


def _is_oom(error: BaseException) -> bool:
    text = str(error).lower()
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in text or "can't allocate memory" in text


class _Run:
    """One run's state; each stage is a method, and `result()` assembles whatever was reached."""

    def __init__(self, config: RunConfig, on_event: OnEvent, should_stop: Callable[[], bool]) -> None:
        self.config, self.on_event, self.should_stop = config, on_event, should_stop
        self.t0 = time.perf_counter()
        self.started_at = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        self.warnings: list[str] = []
        self.stopped = False
        self.loaded: Loaded | None = None
        self.model_info: ModelInfo | None = None
        self.memory: dict[str, Any] = {}
        self.latency: LatencyStats | None = None
        self.accuracy: AccuracyStats | None = None
        self.roofline = None
        self.techniques: tuple[TechniqueRecord, ...] = ()
        self.samples: list[RepeatTiming] = []
        self.output_text = ""
        self.first_tokens: list[int] = []
        self.kv_bytes: int | None = None

    # ------------------------------------------------------------------ helpers
    def stage(self, name: str, state: str, message: str = "", fraction: float | None = None) -> None:
        self.on_event(StageEvent(name, state, message, fraction, time.perf_counter() - self.t0))

    def warn(self, message: str, section: str = "run") -> None:
        self.warnings.append(message)
        self.on_event(WarningEvent(message, section))

    def stop_requested(self) -> bool:
        if not self.stopped and self.should_stop():
            self.stopped = True
        return self.stopped

    # ------------------------------------------------------------------ stages
    def prepare(self) -> None:
        """Everything that can fail before a weight is read: source, device, combination, memory estimate."""
        cfg = self.config
        self.source = resolve(cfg.model)
        self.device = resolve_device(cfg.device)
        check_combination(cfg.techniques, self.device)
        from workbench.models.loader import load_tokenizer
        from workbench.models.sources import load_config

        model_config = load_config(self.source, cfg.trust_remote_code)
        self.tokenizer = load_tokenizer(self.source, cfg.trust_remote_code)
        text_config = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
        self.max_positions = getattr(text_config, "max_position_embeddings", None) or 1 << 20
        self.vocab_size = text_config.vocab_size
        self.prompt_ids = build_prompts(cfg, self.tokenizer, self.vocab_size)
        total = len(self.prompt_ids[0]) + cfg.max_new_tokens
        if total > self.max_positions:
            raise ConfigError(f"prompt ({len(self.prompt_ids[0])} tokens) + max_new_tokens ({cfg.max_new_tokens}) "
                              f"= {total} exceeds the model's context of {self.max_positions} tokens")
        self.want_accuracy = cfg.eval_tokens > 0 and not self.source.random_weights
        self.windows: EvalWindows | None = None
        if self.want_accuracy:
            ctx = min(cfg.eval_context, self.max_positions)
            self.windows = make_windows(heldout_ids(self.tokenizer), ctx, cfg.eval_tokens)
        est = estimate(self.source, dtype=cfg.dtype, batch=cfg.batch_size, tokens=total,
                       eval_batch_tokens=8 * (self.windows.context if self.windows else 0),
                       trust_remote_code=cfg.trust_remote_code)
        check_fits(est, available_bytes(self.device), "the GPU" if self.device.type == "cuda" else "this machine",
                   cfg.batch_size)
        if self.source.random_weights:
            self.warn("random weights (preset): speed and memory only; accuracy is not measured", "accuracy")

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
                                         trust_remote_code=cfg.trust_remote_code, seed=cfg.seed).model,
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
                                     seed=cfg.seed)
        self.memory.update(load_peak_host_bytes=host.peak, host_method=host.method)
        self.memory["load_gpu"] = gpu.peaks
        self.stage("load", "end")

    def apply(self) -> None:
        if self.config.techniques:
            self.stage("apply", "start", ", ".join(self.config.techniques))
            self.techniques = apply_techniques(self.loaded, self.config, self.on_event)
            self.stage("apply", "end")
        model = self.loaded.model
        self.model_info = ModelInfo(
            name=self.source.display_name, params=parameter_count(model), weight_bytes=weight_bytes(model),
            random_weights=self.source.random_weights, dtype=self.config.dtype, device=str(self.device),
            architecture=type(model).__name__, source=self.source.kind)
        self.on_event(MetricEvent("model", self.model_info))

    # ------------------------------------------------------------------ generation
    def _inputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.tensor(self.prompt_ids, dtype=torch.long, device=self.device)  # (B, T)
        return ids, torch.ones_like(ids)

    def generate_once(self, phase: str, repeat: int) -> RepeatTiming:
        """One `generate` call of exactly max_new_tokens greedy tokens, timed per token."""
        from transformers import GenerationConfig, StoppingCriteriaList

        cfg, model = self.config, self.loaded.model
        decoder = IncrementalDecoder(self.tokenizer) if cfg.token_events else None

        last = [0.0]

        def on_token(index: int, t_ms: float, row_tokens: list[int]) -> None:
            self.on_event(TokenEvent(phase, repeat, index, t_ms, decoder.push(row_tokens[0]), t_ms - last[0]))
            last[0] = t_ms

        clock = TokenClock(self.device, on_token if decoder else None)
        want_cache = self.kv_bytes is None
        gen = GenerationConfig(max_new_tokens=cfg.max_new_tokens, min_new_tokens=cfg.max_new_tokens, do_sample=False,
                               pad_token_id=self.tokenizer.pad_token_id, eos_token_id=self.tokenizer.eos_token_id,
                               return_dict_in_generate=want_cache)
        ids, mask = self._inputs()
        clock.begin()
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=mask, generation_config=gen, streamer=clock,
                                 stopping_criteria=StoppingCriteriaList([StopOnRequest(self.stop_requested)]))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        timing = clock.timing(time.perf_counter())
        if want_cache:
            self.kv_bytes = cache_bytes(getattr(out, "cache", None) or getattr(out, "past_key_values", None))
        if not self.first_tokens:
            self.first_tokens = [step[0] for step in clock.tokens]
            self.output_text = self.tokenizer_decode(self.first_tokens)
        return timing

    def tokenizer_decode(self, ids: list[int]) -> str:
        return IncrementalDecoder(self.tokenizer).decode(ids)

    def warmup_and_measure(self) -> None:
        cfg = self.config
        with HostPeak() as host, GpuPeak(self.device) as gpu:
            if cfg.warmup:
                self.stage("warmup", "start", f"{cfg.warmup} untimed run(s)")
                for i in range(cfg.warmup):
                    if self.stop_requested():
                        break
                    self.generate_once("warmup", i)
                    self.stage("warmup", "progress", fraction=(i + 1) / cfg.warmup)
                self.stage("warmup", "end")
            if not self.stopped:
                self.measure()
        self.memory.update(peak_host_bytes=host.peak, run_gpu=gpu.peaks)

    def measure(self) -> None:
        cfg = self.config
        self.stage("measure", "start", f">= {cfg.repeats} runs and >= {cfg.min_duration_s:g} s")
        partial: RepeatTiming | None = None
        while not self.stop_requested():
            timing = self.generate_once("measure", len(self.samples))
            if self.stopped and len(timing.token_ms) < cfg.max_new_tokens:
                partial = timing
                break
            self.samples.append(timing)
            self.on_event(RepeatEvent(len(self.samples) - 1, timing.ttft_ms, timing.e2e_ms,
                                      decode_tokens_per_s(timing, cfg.batch_size)))
            spent = sum(s.e2e_ms for s in self.samples) / 1e3
            fraction = min(len(self.samples) / cfg.repeats, spent / cfg.min_duration_s if cfg.min_duration_s else 1.0)
            self.stage("measure", "progress", f"{len(self.samples)} runs, {spent:.1f} s", min(1.0, fraction))
            if fraction >= 1.0 or len(self.samples) >= cfg.max_repeats:
                break
        samples = self.samples or ([partial] if partial and partial.token_ms else [])
        if samples:
            self.latency = summarize(samples, batch=cfg.batch_size, prompt_tokens=len(self.prompt_ids[0]),
                                     warmup=cfg.warmup)
            for w in latency_warnings(self.latency, cfg.max_new_tokens if not self.stopped else 0):
                self.warn(w, "latency")
            self.on_event(MetricEvent("latency", self.latency))
        self.stage("measure", "end")

    def evaluate(self) -> None:
        if not self.want_accuracy or self.windows is None:
            return
        self.stage("evaluate", "start", f"{self.windows.scored_tokens} held-out tokens")
        acc = evaluate(self.loaded.model, self.windows, self.device, self.baseline, self.stop_requested)
        if acc is not None:
            match = greedy_match(self.first_tokens, self.baseline_greedy) if self.baseline_greedy else None
            self.accuracy = AccuracyStats(**{**acc.__dict__, "greedy_match_vs_baseline": match})
            self.on_event(MetricEvent("accuracy", self.accuracy))
        self.stage("evaluate", "end")

    # ------------------------------------------------------------------ assembly
    def _bytes_per_step(self) -> int:
        """Weights read by one decode step (an untied input embedding only reads B rows) + mean KV cache."""
        model = self.loaded.model
        read = self.model_info.weight_bytes
        emb, out = model.get_input_embeddings(), model.get_output_embeddings()
        if emb is not None and out is not None and emb.weight is not getattr(out, "weight", None):
            read -= emb.weight.numel() * emb.weight.element_size()
        prompt, n = len(self.prompt_ids[0]), self.config.max_new_tokens
        kv_mean = (self.kv_bytes or 0) * (prompt + n / 2) / (prompt + n)
        return int(read + kv_mean)

    def finish_metrics(self) -> None:
        load_gpu, run_gpu = self.memory.get("load_gpu"), self.memory.get("run_gpu")
        self.memory_stats = MemoryStats(
            weights_bytes=self.model_info.weight_bytes if self.model_info else None,
            kv_cache_bytes=self.kv_bytes,
            load_peak_host_bytes=self.memory.get("load_peak_host_bytes"),
            peak_host_bytes=self.memory.get("peak_host_bytes"),
            peak_gpu_allocated_bytes=run_gpu.allocated if run_gpu else None,
            peak_gpu_reserved_bytes=run_gpu.reserved if run_gpu else None,
            idle_host_bytes=self.memory.get("idle_host_bytes"),
            gpu_used_bytes_nvml=run_gpu.nvml_used if run_gpu else None,
            load_peak_gpu_allocated_bytes=load_gpu.allocated if load_gpu else None,
            host_method=self.memory.get("host_method", ""))
        self.on_event(MetricEvent("memory", self.memory_stats))
        if self.model_info and self.latency and self.latency.decode_tokens_per_s:
            bandwidth, method = memory_bandwidth(self.device)
            self.roofline = roofline(bandwidth, self._bytes_per_step(), self.config.batch_size,
                                     self.latency.decode_tokens_per_s, method)
            self.on_event(MetricEvent("roofline", self.roofline))

    def result(self) -> RunResult:
        status = "stopped" if self.stopped else "ok"
        if self.stopped:
            self.warnings.append("stopped on request: partial result")
        return RunResult(
            config=self.config, model=self.model_info, latency=self.latency,
            memory=getattr(self, "memory_stats", None), accuracy=self.accuracy, roofline=self.roofline,
            techniques=self.techniques, env=envinfo.capture(getattr(self, "device", torch.device("cpu"))),
            warnings=tuple(self.warnings), status=status, output_text=self.output_text,
            started_at=self.started_at, duration_s=time.perf_counter() - self.t0)

    def release(self) -> None:
        """Drop the model and give memory back (also after errors)."""
        self.loaded = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


@contextlib.contextmanager
def _threads(n: int | None):
    """Set PyTorch's intra-op threads for the block, then restore them."""
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run(config: RunConfig, on_event: OnEvent = no_event, should_stop: Callable[[], bool] = never_stop) -> RunResult:
    """Run one configuration and return its result (status "stopped" with what was reached if stopped).

    Raises WorkbenchError (one user-facing sentence) for bad settings, missing models, runs that
    would not fit, and out-of-memory failures; memory is released in every case.
    """
    r = _Run(config, on_event, should_stop)
    stage = "prepare"
    try:
        with _threads(config.threads):
            for stage, step in (("prepare", r.prepare), ("baseline", r.load_baseline), ("load", r.load),
                                ("apply", r.apply), ("measure", r.warmup_and_measure), ("evaluate", r.evaluate)):
                if r.stop_requested() and stage not in ("prepare",):
                    break
                step()
            if r.loaded is not None and r.model_info is not None:
                r.finish_metrics()
            return r.result()
    except WorkbenchError:
        raise
    except Exception as e:
        if _is_oom(e):
            r.release()
            raise RunFailed(f"out of memory during {stage}: {str(e).splitlines()[0][:160]}; memory was freed — "
                            "try a smaller batch, fewer tokens, or a lower-precision dtype") from e
        raise
    finally:
        r.release()
