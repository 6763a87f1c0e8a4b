"""The `hf` engine: PyTorch through Hugging Face transformers (`from_pretrained`, `generate`)."""

from __future__ import annotations

import gc
import shutil
from collections.abc import Iterator
from typing import Any

import torch

from workbench.engines.base import Engine, EngineContext, Generation, register
from workbench.engines.hf_compile import (WITHOUT_CUDA_GRAPHS, CompilePlan, compile_config, fresh_compile_state,
                                          plan_compile, was_compiled)
from workbench.engines.hf_generate import Generator
from workbench.engines.hf_kvquant import KVQuant
from workbench.engines.hf_speculative import Speculation, own_greedy
from workbench.engines.hf_load import LoadPlan, plan_load
from workbench.events import StageEvent
from workbench.measure.accuracy import EvalWindows, decode_consistency, window_logprobs
from workbench.measure.latency import TokenClock
from workbench.measure.estimate import LoadPath, RunEstimate, check_fits, estimate_run
from workbench.measure.memory import available_bytes, parameter_count, weight_bytes
from workbench.measure.roofline import bytes_per_step
from workbench.models.checks import check_techniques_fit
from workbench.models.loader import Loaded, count_params, kv_bytes_per_token, load_model
from workbench.models.sources import TORCH_DTYPES, text_config
from workbench.parallel.placement import (Placement, module_bytes, offload_dir, parse_device_map, parse_max_memory,
                                          place)
from workbench.paths import compile_cache
from workbench.result import ModelInfo, TechniqueRecord
from workbench.techniques.base import TechniqueConfig
from workbench.techniques.apply import apply_techniques
from workbench.techniques.rules import speed_warnings


def check_memory(ctx: EngineContext, prompt_ids: list[list[int]], windows: EvalWindows | None,
                 path: LoadPath | None = None) -> RunEstimate:
    """Refuse, with every term of the estimate, a run the memory cannot hold; `path` says how the weights load
    (default: PyTorch weights at the run's dtype). Returns the estimate."""
    cfg = ctx.config
    params = count_params(ctx.model_config, cfg.trust_remote_code) if path is None else 0
    est = estimate_run(text_config(ctx.model_config), params=params, dtype_bytes=TORCH_DTYPES[cfg.dtype].itemsize,
                       kv_per_token=kv_bytes_per_token(ctx.model_config, cfg.dtype), batch=len(prompt_ids),
                       prompt_tokens=len(prompt_ids[0]), new_tokens=cfg.max_new_tokens,
                       eval_batch_tokens=8 * (windows.context if windows else 0),
                       eager=cfg.attn_implementation == "eager", path=path)
    check_fits(est, available_bytes(ctx.device), "the GPU" if ctx.device.type == "cuda" else "this machine")
    return est


@register
class HFEngine(Engine):
    """A transformers model on one device (or split by a device map), techniques applied in place."""

    name = "hf"

    def __init__(self, ctx: EngineContext) -> None:
        super().__init__(ctx)
        self.loaded: Loaded | None = None
        self.generator: Generator | None = None
        self.split: Placement | None = None
        self.reference_forward: Any = None  # the model's uncompiled forward (the decode check's reference)
        self.model_info: ModelInfo | None = None
        self.compile_plan = CompilePlan(None)
        self.load_plan = LoadPlan(LoadPath("", 0, 0))
        self.estimate: RunEstimate | None = None
        self.compile_checked = False  # whether a generate call has shown that transformers compiled the step
        cfg = ctx.config  # decode-time techniques: a draft model (speculative decoding), a quantized KV cache
        self.speculation = Speculation(cfg.draft_model, cfg.draft_tokens, cfg.trust_remote_code) if cfg.draft_model \
            else None
        self.kv_quant = KVQuant(cfg.kv_backend, cfg.kv_bits, cfg.dtype) if cfg.kv_cache == "quantized" else None

    def check(self) -> None:
        """A technique the architecture lacks (GPT-2's Conv1D, fused projections) is refused from the config."""
        super().check()
        cfg = self.ctx.config
        check_techniques_fit(self.ctx.model_config, cfg.techniques, cfg.model, cfg.trust_remote_code)

    @classmethod
    def refusal(cls, technique: type[TechniqueConfig]) -> str:
        return (f"{technique.name} quantizes a GGUF file for llama.cpp, which PyTorch does not run; choose "
                "--engine llamacpp")

    def plan(self, tokenizer: Any, prompt_ids: list[list[int]], windows: EvalWindows | None) -> None:
        """How the weights will load (quantized, placed while loading); a run the memory cannot hold that way is
        refused with every term of the estimate."""
        super().plan(tokenizer, prompt_ids, windows)
        ctx = self.ctx
        if self.speculation is not None:  # a draft of another vocabulary is refused before a weight is read
            self.speculation.plan(tokenizer, ctx.model_config)
        if self.kv_quant is not None:
            self.kv_quant.plan(ctx.model_config, len(prompt_ids), len(prompt_ids[0]), ctx.config.max_new_tokens)
        self.load_plan = plan_load(ctx.config, ctx.model_config, ctx.device, ctx.load_kwargs)
        if not ctx.config.device_map:  # a device map is there precisely to run what does not fit in one place
            self.estimate = check_memory(ctx, prompt_ids, windows, self.load_plan.path if self.load_plan.path.name
                                         else None)

    def load(self) -> None:
        """Read the weights, quantizing and placing them as they are read where the load plan says so."""
        ctx, cfg, plan = self.ctx, self.ctx.config, self.load_plan
        torch.manual_seed(cfg.seed)
        folder = offload_dir(cfg.offload_folder) if plan.device_map and "disk" in plan.device_map.values() else None
        if plan.device_map:
            self.split = Placement(plan.device_map, dict(plan.split_bytes), folder)
        peak = self.estimate.describe(str(ctx.device)) if self.estimate else None
        ctx.on_event(StageEvent("load", "progress", plan.describe(peak)))
        self.loaded = load_model(ctx.source, cfg.dtype, ctx.device, trust_remote_code=cfg.trust_remote_code,
                                 seed=cfg.seed, attn_implementation=cfg.attn_implementation, extra=ctx.load_kwargs,
                                 allow_pickle=cfg.allow_pickle, at_load=plan.kwargs(cfg.dtype, folder) or None)
        if plan.device_map:
            self.split.bytes_by_device = module_bytes(self.loaded.model, plan.device_map)
        if self.speculation is not None:
            self.speculation.load(cfg.dtype, ctx.device, cfg.seed, cfg.attn_implementation)

    def apply(self) -> tuple[TechniqueRecord, ...]:
        """Techniques in order, then placement over devices (device_map), then compilation."""
        cfg, plan = self.ctx.config, self.load_plan
        done = (plan.record(self.loaded.model, cfg.dtype),) if plan.technique else ()  # applied while loading
        records = done + (apply_techniques(self.loaded, cfg, self.ctx.on_event, start=len(done))
                          if len(cfg.techniques) > len(done) else ())
        self.model_info = ModelInfo(
            name=self.ctx.source.display_name, params=parameter_count(self.loaded.model),
            weight_bytes=weight_bytes(self.loaded.model), random_weights=self.ctx.source.random_weights,
            dtype=cfg.dtype, device=str(self.ctx.device), architecture=type(self.loaded.model).__name__,
            source=self.ctx.source.kind)
        model = self.loaded.model
        if cfg.device_map and self.split is None:  # techniques changed the whole model first: placed now
            memory = parse_max_memory(cfg.max_memory) if cfg.max_memory else None
            model, self.split = place(model, parse_device_map(cfg.device_map), self.ctx.device, memory,
                                      cfg.offload_folder)
        self.reference_forward = model.forward  # never compiled: transformers compiles only the decode step
        self.loaded.model = model
        make = self.ctx.make_generator or Generator  # a pipeline stage runs its own layers only
        self.generator = make(model, self.tokenizer, self.ctx.device, cfg, self.prompt_ids,
                              self.ctx.stop_requested, self._plan_compile(model))
        self.generator.decoding = self.speculation or self.kv_quant
        return records

    def _plan_compile(self, model: torch.nn.Module) -> Any:
        """The decode step's CompileConfig (None: uncompiled); the plan's and the techniques' speed warnings."""
        cfg, device_type = self.ctx.config, self.ctx.device.type
        self.compile_plan = plan_compile(cfg.compile, cfg.compile_mode, device_type, cfg.techniques,
                                         getattr(model, "hf_quantizer", None))
        self.pending_warnings += [*self.compile_plan.warnings,
                                  *speed_warnings(cfg.techniques, device_type, len(self.prompt_ids),
                                                  self.compile_plan.mode is not None)]
        if self.compile_plan.mode is not None:
            compile_cache()
            fresh_compile_state()
        return compile_config(self.compile_plan, device_type)

    def info(self) -> ModelInfo:
        return self.model_info

    def generate(self, clock: TokenClock, *, want_cache: bool, interruptible: bool) -> Generation:
        generation = self.generator.generate(clock, want_cache=want_cache, interruptible=interruptible)
        if self.compile_plan.mode is not None and not self.compile_checked and generation.rows and generation.rows[0]:
            self.compile_checked = True
            if not was_compiled(self.loaded.model):  # transformers' own conditions for compiling were not met
                self.pending_warnings.append("transformers did not compile the decode step (its conditions for "
                                             "compiling in generate were not met), so the timings are uncompiled")
        return generation

    def logprobs(self, windows: EvalWindows) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self.kv_quant is not None:  # through the quantized cache, or the cache would not be measured at all
            return self.kv_quant.window_logprobs(self.loaded.model, windows, self.ctx.device)
        return window_logprobs(self.loaded.model, windows, self.ctx.device)

    def decode_consistency(self, prompt: list[int], generated: list[int]) -> float | None:
        if self.speculation is not None:  # assisted output must be the model's own greedy output
            warning = self.speculation.check_greedy(
                own_greedy(self.loaded.model, self.tokenizer, prompt, len(generated), self.ctx.device), generated)
            self.pending_warnings += [warning] if warning else []
        return decode_consistency(self.reference_forward, prompt, generated, self.ctx.device)

    def bytes_per_step(self, prompt_tokens: int, new_tokens: int, kv_bytes: int | None) -> int:
        return bytes_per_step(self.loaded.model, self.model_info.weight_bytes, kv_bytes, prompt_tokens, new_tokens)

    def compiled_mode(self) -> str | None:
        """The mode plan_compile settled on (None: uncompiled)."""
        return self.compile_plan.mode

    def uses_cuda_graphs(self) -> bool:
        return self.ctx.device.type == "cuda" and self.compile_plan.mode in WITHOUT_CUDA_GRAPHS

    def profile_refusal(self) -> str | None:
        return None  # PyTorch operators: the profiler sees every kernel

    def placement(self) -> Placement | None:
        return self.split

    def release(self) -> None:
        self.loaded = self.generator = self.reference_forward = None
        if self.speculation is not None:
            self.speculation.release()
        if self.split and self.split.offload_dir:
            shutil.rmtree(self.split.offload_dir, ignore_errors=True)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
