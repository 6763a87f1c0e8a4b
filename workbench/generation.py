"""Timed `generate` calls on a loaded model: fixed length, greedy, per-token events, stop within one token."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from workbench.config import RunConfig
from workbench.events import OnEvent, TokenEvent
from workbench.measure.latency import StopOnRequest, TokenClock
from workbench.measure.memory import cache_bytes
from workbench.result import RepeatTiming
from workbench.textio import IncrementalDecoder


class _Interrupted(Exception):
    """Raised by a layer hook to leave `generate` mid-forward when a stop was requested."""


@contextlib.contextmanager
def _stop_between_layers(model: torch.nn.Module, stop_requested: Callable[[], bool], enabled: bool) -> Iterator[None]:
    """While active, every layer of the model's layer lists checks for a stop request before it runs."""
    if not enabled:
        yield
        return

    def check(module: torch.nn.Module, args: Any) -> None:
        if stop_requested():
            raise _Interrupted

    layers = [m for lst in model.modules() if isinstance(lst, torch.nn.ModuleList) for m in lst]
    handles = [layer.register_forward_pre_hook(check) for layer in layers]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


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

    def _on_token(self, phase: str, repeat: int,
                  progress: Callable[[int, float], None] | None) -> Callable[[int, float, list[int]], None] | None:
        if not self.config.token_events and progress is None:
            return None
        decoder, last = IncrementalDecoder(self.tokenizer), [0.0]

        def on_token(index: int, t_ms: float, row_tokens: list[int]) -> None:
            if self.config.token_events:
                self.on_event(TokenEvent(phase, repeat, index, t_ms, decoder.push(row_tokens[0]), t_ms - last[0]))
                last[0] = t_ms
            if progress is not None:
                progress(index + 1, t_ms / 1e3)
        return on_token

    def generate(self, phase: str, repeat: int, want_cache: bool = False,
                 progress: Callable[[int, float], None] | None = None, interruptible: bool = False) -> Generation:
        """One timed call; `want_cache` also returns the KV cache's size (returned by generate).

        `progress(steps_done, elapsed_s)` is called after every token. `interruptible` also checks for a stop
        request before every layer (hooks, so only for untimed calls): a long prefill stops within one layer.
        """
        from transformers import StoppingCriteriaList

        clock = TokenClock(self.device, self._on_token(phase, repeat, progress))
        gen = self.generation_config(**self.gen_kwargs, return_dict_in_generate=want_cache)
        mask = torch.ones_like(self.ids)
        out = None
        clock.begin()
        with torch.inference_mode(), _stop_between_layers(self.model, self.stop_requested, interruptible):
            try:
                out = self.model.generate(input_ids=self.ids, attention_mask=mask, generation_config=gen,
                                          streamer=clock,
                                          stopping_criteria=StoppingCriteriaList([StopOnRequest(self.stop_requested)]))
            except _Interrupted:
                pass  # stopped inside a forward: the tokens before it are all there is
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        timing = clock.timing(time.perf_counter())
        kv = None
        if want_cache and out is not None:  # an interrupted call returns no cache
            kv = cache_bytes(getattr(out, "cache", None) or getattr(out, "past_key_values", None))
        rows = [list(row) for row in zip(*clock.tokens)] if clock.tokens else [[] for _ in range(self.ids.shape[0])]
        return Generation(timing, rows, kv)

    def decode(self, ids: list[int]) -> str:
        """Text of one row's tokens (ids the tokenizer does not know shown as <id>)."""
        return IncrementalDecoder(self.tokenizer).decode(ids)
