"""The `hf` engine: PyTorch through Hugging Face transformers (`from_pretrained`, `generate`)."""

from __future__ import annotations

import gc
import shutil
from collections.abc import Iterator
from typing import Any

import torch

from workbench.engines.base import Engine, EngineContext, Generation, register
from workbench.engines.hf_generate import Generator
from workbench.measure.accuracy import EvalWindows, decode_consistency, window_logprobs
from workbench.measure.latency import TokenClock
from workbench.measure.memory import available_bytes, check_fits, estimate_run, parameter_count, weight_bytes
from workbench.measure.roofline import bytes_per_step
from workbench.models.checks import check_techniques_fit
from workbench.models.loader import Loaded, count_params, kv_bytes_per_token, load_model
from workbench.models.sources import TORCH_DTYPES, text_config
from workbench.parallel.placement import Placement, parse_device_map, parse_max_memory, place
from workbench.paths import compile_cache
from workbench.result import ModelInfo, TechniqueRecord
from workbench.techniques.base import TechniqueConfig
from workbench.techniques.apply import apply_techniques


def check_memory(ctx: EngineContext, prompt_ids: list[list[int]], windows: EvalWindows | None) -> None:
    """Refuse, with every term of the estimate, a run (PyTorch weights at the run's dtype) the memory cannot hold."""
    cfg = ctx.config
    est = estimate_run(text_config(ctx.model_config), params=count_params(ctx.model_config, cfg.trust_remote_code),
                       dtype_bytes=TORCH_DTYPES[cfg.dtype].itemsize,
                       kv_per_token=kv_bytes_per_token(ctx.model_config, cfg.dtype), batch=len(prompt_ids),
                       prompt_tokens=len(prompt_ids[0]), new_tokens=cfg.max_new_tokens,
                       eval_batch_tokens=8 * (windows.context if windows else 0),
                       eager=cfg.attn_implementation == "eager")
    check_fits(est, available_bytes(ctx.device), "the GPU" if ctx.device.type == "cuda" else "this machine")


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
        """A run the memory cannot hold is refused with every term of the estimate."""
        super().plan(tokenizer, prompt_ids, windows)
        if not self.ctx.config.device_map:  # a device map is there precisely to run what does not fit in one place
            check_memory(self.ctx, prompt_ids, windows)

    def load(self) -> None:
        ctx, cfg = self.ctx, self.ctx.config
        torch.manual_seed(cfg.seed)
        self.loaded = load_model(ctx.source, cfg.dtype, ctx.device, trust_remote_code=cfg.trust_remote_code,
                                 seed=cfg.seed, attn_implementation=cfg.attn_implementation, extra=ctx.load_kwargs,
                                 allow_pickle=cfg.allow_pickle)

    def apply(self) -> tuple[TechniqueRecord, ...]:
        """Techniques in order, then placement over devices (device_map), then compilation."""
        cfg = self.ctx.config
        records = apply_techniques(self.loaded, cfg, self.ctx.on_event) if cfg.techniques else ()
        self.model_info = ModelInfo(
            name=self.ctx.source.display_name, params=parameter_count(self.loaded.model),
            weight_bytes=weight_bytes(self.loaded.model), random_weights=self.ctx.source.random_weights,
            dtype=cfg.dtype, device=str(self.ctx.device), architecture=type(self.loaded.model).__name__,
            source=self.ctx.source.kind)
        model = self.loaded.model
        if cfg.device_map:
            memory = parse_max_memory(cfg.max_memory) if cfg.max_memory else None
            model, self.split = place(model, parse_device_map(cfg.device_map), self.ctx.device, memory)
        self.reference_forward = model.forward
        if cfg.compile:
            compile_cache()
            model.forward = torch.compile(model.forward, dynamic=False)
        self.loaded.model = model
        self.generator = Generator(model, self.tokenizer, self.ctx.device, cfg, self.prompt_ids,
                                   self.ctx.stop_requested)
        return records

    def info(self) -> ModelInfo:
        return self.model_info

    def generate(self, clock: TokenClock, *, want_cache: bool, interruptible: bool) -> Generation:
        return self.generator.generate(clock, want_cache=want_cache, interruptible=interruptible)

    def logprobs(self, windows: EvalWindows) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return window_logprobs(self.loaded.model, windows, self.ctx.device)

    def decode_consistency(self, prompt: list[int], generated: list[int]) -> float | None:
        return decode_consistency(self.reference_forward, prompt, generated, self.ctx.device)

    def bytes_per_step(self, prompt_tokens: int, new_tokens: int, kv_bytes: int | None) -> int:
        return bytes_per_step(self.loaded.model, self.model_info.weight_bytes, kv_bytes, prompt_tokens, new_tokens)

    def placement(self) -> Placement | None:
        return self.split

    def release(self) -> None:
        self.loaded = self.generator = self.reference_forward = None
        if self.split and self.split.offload_dir:
            shutil.rmtree(self.split.offload_dir, ignore_errors=True)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
