"""Timed `generate` calls on a loaded model: fixed length, greedy, per-token events, stop within one token."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from workbench.config import RunConfig
from workbench.events import OnEvent, TokenEvent
from workbench.measure.latency import StopOnRequest, TokenClock
from workbench.measure.memory import cache_bytes
from workbench.result import RepeatTiming
from workbench.textio import IncrementalDecoder


@dataclass
class Generation:
    """One call's timing, every row's new tokens, and (when asked) the KV cache's bytes."""

    timing: RepeatTiming
    rows: list[list[int]]
    kv_bytes: int | None = None


class Generator:
    """Runs the run's prompts through `model.generate`, exactly max_new_tokens greedy tokens each time."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any, device: torch.device, config: RunConfig,
                 prompt_ids: list[list[int]], on_event: OnEvent, stop_requested: Callable[[], bool]) -> None:
        from transformers import GenerationConfig

        self.model, self.tokenizer, self.device, self.config = model, tokenizer, device, config
        self.on_event, self.stop_requested = on_event, stop_requested
        self.ids = torch.tensor(prompt_ids, dtype=torch.long, device=device)  # (B, T)
        n = config.max_new_tokens
        self.gen_kwargs = dict(max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                               eos_token_id=tokenizer.eos_token_id, disable_compile=True,
                               cache_implementation="static" if config.kv_cache == "static" else None)
        self.generation_config = GenerationConfig

    def _on_token(self, phase: str, repeat: int) -> Callable[[int, float, list[int]], None] | None:
        if not self.config.token_events:
            return None
        decoder, last = IncrementalDecoder(self.tokenizer), [0.0]

        def on_token(index: int, t_ms: float, row_tokens: list[int]) -> None:
            self.on_event(TokenEvent(phase, repeat, index, t_ms, decoder.push(row_tokens[0]), t_ms - last[0]))
            last[0] = t_ms
        return on_token

    def generate(self, phase: str, repeat: int, want_cache: bool = False) -> Generation:
        """One timed call; `want_cache` also returns the KV cache's size (returned by generate)."""
        from transformers import StoppingCriteriaList

        clock = TokenClock(self.device, self._on_token(phase, repeat))
        gen = self.generation_config(**self.gen_kwargs, return_dict_in_generate=want_cache)
        mask = torch.ones_like(self.ids)
        clock.begin()
        with torch.inference_mode():
            out = self.model.generate(input_ids=self.ids, attention_mask=mask, generation_config=gen, streamer=clock,
                                      stopping_criteria=StoppingCriteriaList([StopOnRequest(self.stop_requested)]))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        timing = clock.timing(time.perf_counter())
        kv = cache_bytes(getattr(out, "cache", None) or getattr(out, "past_key_values", None)) if want_cache else None
        rows = [list(row) for row in zip(*clock.tokens)] if clock.tokens else [[] for _ in range(self.ids.shape[0])]
        return Generation(timing, rows, kv)

    def decode(self, ids: list[int]) -> str:
        """Text of one row's tokens (ids the tokenizer does not know shown as <id>)."""
        return IncrementalDecoder(self.tokenizer).decode(ids)
