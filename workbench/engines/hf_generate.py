"""The `hf` engine's `generate` calls: fixed length, greedy, every step to the token clock, stop within one token."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch

from workbench.engines.base import Generation
from workbench.measure.latency import StopOnRequest, TokenClock
from workbench.measure.memory import cache_bytes


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


class NoEarlyEnd:
    """A logits processor that keeps EOS from winning any step: `min_new_tokens = max_new_tokens`, cheaply.

    transformers implements min_new_tokens with two processors (min_length and min_new_tokens) that each build a
    vocabulary-long mask with `torch.isin` and copy the logits on every step: 0.4 to 1.2 ms of an 8 ms step for
    the 124M preset's 50,257 tokens with `w4a16` compiled (`python bench/generate_loop.py`, README "Fixed-length
    decoding"). One indexed fill of the EOS column does the same: greedy decoding picks the same tokens.
    """

    def __init__(self, eos_token_id: int | None, device: torch.device) -> None:
        self.eos = None if eos_token_id is None else torch.tensor([eos_token_id], device=device)  # (1,)

    def __call__(self, input_ids: torch.Tensor | None, scores: torch.Tensor) -> torch.Tensor:
        """scores (B, V) with the EOS column at -inf (a new tensor, as transformers' processors return)."""
        return scores if self.eos is None else scores.index_fill(-1, self.eos, -math.inf)


def fixed_length(tokenizer: Any, new_tokens: int, device: torch.device) -> dict[str, Any]:
    """`generate` keyword arguments for exactly `new_tokens` greedy tokens that EOS cannot cut short.

    The timed paths (the runner, bench/fidelity.py's plain loop) both use it, so they do the same work per step.
    """
    from transformers import LogitsProcessorList

    return dict(max_new_tokens=new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
                logits_processor=LogitsProcessorList([NoEarlyEnd(tokenizer.eos_token_id, device)]))


class Generator:
    """Runs the run's prompts through `model.generate`, exactly max_new_tokens greedy tokens each time."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any, device: torch.device, config: Any,
                 prompt_ids: list[list[int]], stop_requested: Callable[[], bool], compile_config: Any = None) -> None:
        """`compile_config` (a transformers CompileConfig, see `hf_compile`): compile the decode step with it;
        None: never compile (transformers would otherwise compile a static-cache model on CUDA by itself)."""
        from transformers import GenerationConfig

        self.model, self.device, self.stop_requested = model, device, stop_requested
        self.ids = torch.tensor(prompt_ids, dtype=torch.long, device=device)  # (B, T)
        self.gen_kwargs = fixed_length(tokenizer, config.max_new_tokens, device)
        self.processors = self.gen_kwargs.pop("logits_processor")  # a `generate` argument, not a GenerationConfig field
        self.gen_kwargs.update(disable_compile=compile_config is None, compile_config=compile_config,
                               cache_implementation="static" if config.kv_cache == "static" else None)
        self.generation_config = GenerationConfig
        # a decode-time technique (hf_speculative.Speculation, hf_kvquant.KVQuant): its generate settings and a
        # context around each call (counting forwards); set by the engine after construction
        self.decoding: Any = None

    def generate(self, clock: TokenClock, want_cache: bool = False, interruptible: bool = False) -> Generation:
        """One timed call; `want_cache` also returns the KV cache's size (returned by generate).

        `clock` (a transformers streamer) gets every step's tokens. `interruptible` also checks for a stop
        request before every layer (hooks, so only for untimed calls): a long prefill stops within one layer.
        """
        from transformers import StoppingCriteriaList

        extra, call = (self.decoding.config_kwargs(), self.decoding.call_kwargs()) if self.decoding else ({}, {})
        gen = self.generation_config(**{**self.gen_kwargs, **extra}, return_dict_in_generate=want_cache)
        mask = torch.ones_like(self.ids)
        out = None
        around = (self.decoding.around(self.model, self.gen_kwargs["max_new_tokens"]) if self.decoding
                  else contextlib.nullcontext([]))
        clock.begin()
        with torch.inference_mode(), _stop_between_layers(self.model, self.stop_requested, interruptible), \
                around as produced:
            try:
                out = self.model.generate(input_ids=self.ids, attention_mask=mask, generation_config=gen,
                                          streamer=clock, logits_processor=self.processors, **call,
                                          stopping_criteria=StoppingCriteriaList([StopOnRequest(self.stop_requested)]))
            except _Interrupted:
                pass  # stopped inside a forward: the tokens before it are all there is
            produced.append(len(clock.tokens))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        timing = clock.timing(time.perf_counter())
        kv = None
        if want_cache and out is not None:  # an interrupted call returns no cache
            kv = cache_bytes(getattr(out, "cache", None) or getattr(out, "past_key_values", None))
        rows = [list(row) for row in zip(*clock.tokens)] if clock.tokens else [[] for _ in range(self.ids.shape[0])]
        return Generation(timing, rows, kv)
