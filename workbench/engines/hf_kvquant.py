"""A quantized KV cache on the `hf` engine: transformers' `QuantizedCache` (KIVI-style, group-wise integers).

Keys and values are stored as `kv_bits` integers in groups of `GROUP_SIZE` with a scale and zero point each,
except the newest `RESIDUAL_LENGTH` positions, kept unquantized until they fill up and are folded in (the
whole cache is then re-quantized). The prompt is quantized right after prefill. Backends (both accepted by
transformers 5.17 and 5.24): hqq (1, 2, 3, 4 or 8 bits, plain PyTorch ops: fast to start) and quanto (2 or 4
bits; optimum-quanto builds a C++ extension the first time, which took 532 s on a 2-core CPU under load).
`auto` picks hqq, which covers every `--kv-bits` and starts at once.

Accuracy: a forward over a whole evaluation window uses no cache, so it cannot see the cache's quantization.
The KL of a quantized-cache run is measured teacher-forced instead: each window goes through the model
`EVAL_CHUNK` tokens at a time into a fresh quantized cache, as decoding feeds it, and the log-probabilities of
every chunk (which attend to the quantized earlier positions) are scored against the unmodified model's.
"""

from __future__ import annotations

import contextlib
import importlib.util
import inspect
import logging
from collections.abc import Iterator
from typing import Any

import torch

from workbench.errors import ConfigError
from workbench.measure.accuracy import EVAL_BATCH, EvalWindows
from workbench.measure.trackers.decoding import KVQuantStats
from workbench.models.loader import kv_bytes_per_token

logger = logging.getLogger(__name__)

RESIDUAL_LENGTH = 128  # transformers' default: the newest positions kept unquantized
GROUP_SIZE = 64  # transformers' default q_group_size
DEFAULT_BITS = 4
EVAL_CHUNK = 16  # tokens per teacher-forced forward of the accuracy pass (divides RESIDUAL_LENGTH)
BACKEND_BITS = {"hqq": (1, 2, 3, 4, 8), "quanto": (2, 4)}
BACKEND_INSTALL = {"hqq": ("hqq", "hqq==0.2.8.post1"), "quanto": ("optimum.quanto", "optimum-quanto==0.2.7")}


def resolve_backend(backend: str) -> str:
    """The backend that runs: `auto` is hqq (every bit width, no compile at first use)."""
    return "hqq" if backend == "auto" else backend


def check_backend(backend: str, bits: int) -> None:
    """Refuse (one sentence) bits the backend cannot store, or a backend that is not installed."""
    if bits not in BACKEND_BITS[backend]:
        raise ConfigError(f"kv_backend {backend} stores {' or '.join(map(str, BACKEND_BITS[backend]))} bits, not "
                          f"{bits}; use kv_backend hqq")
    module, requirement = BACKEND_INSTALL[backend]
    if importlib.util.find_spec(module.split(".")[0]) is None or importlib.util.find_spec(module) is None:
        raise ConfigError(f"kv_cache quantized with kv_backend {backend} needs the {requirement.split('==')[0]} "
                          f"package: pip install {requirement}")


def cache_argument(model: torch.nn.Module) -> str:
    """The name the model's forward takes its cache by (`cache` from transformers 5.2x, else `past_key_values`)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


class KVQuant:
    """A run's quantized KV cache: checked before loading, a fresh cache per `generate` call, the accuracy pass."""

    def __init__(self, backend: str, bits: int | None, dtype: str) -> None:
        self.backend, self.bits, self.dtype = resolve_backend(backend), bits or DEFAULT_BITS, dtype
        self.model_config: Any = None
        self.positions = 0  # cached positions x rows of the last call (for the unquantized size)

    def plan(self, model_config: Any, batch: int, prompt_tokens: int, new_tokens: int) -> None:
        """Refuse what QuantizedCache cannot hold, before a weight is read."""
        check_backend(self.backend, self.bits)
        try:
            self._new(model_config)
        except ValueError as e:  # e.g. sliding-window layers: only full attention is supported
            raise ConfigError(f"kv_cache quantized: {str(e).splitlines()[0]}") from None
        self.model_config = model_config
        self.positions = batch * (prompt_tokens + new_tokens - 1)  # the last token's keys are never cached

    def _new(self, model_config: Any) -> Any:
        from transformers.cache_utils import QuantizedCache

        return QuantizedCache(backend=self.backend, config=model_config, nbits=self.bits, q_group_size=GROUP_SIZE,
                              residual_length=RESIDUAL_LENGTH)

    def config_kwargs(self) -> dict[str, Any]:
        """GenerationConfig settings; the cache_config dict is new each call (transformers 5.17 pops its keys)."""
        return {"cache_implementation": "quantized",
                "cache_config": {"backend": self.backend, "nbits": self.bits, "q_group_size": GROUP_SIZE,
                                 "residual_length": RESIDUAL_LENGTH}}

    def call_kwargs(self) -> dict[str, Any]:
        return {}

    @contextlib.contextmanager
    def around(self, model: torch.nn.Module, expected_tokens: int) -> Iterator[list[int]]:
        yield []

    def stats(self, kv_bytes: int | None) -> KVQuantStats:
        """The section of the result: the cache's real bytes against the same positions unquantized."""
        per_token = kv_bytes_per_token(self.model_config, self.dtype) if self.model_config is not None else 0
        return KVQuantStats(backend=self.backend, bits=self.bits, residual_length=RESIDUAL_LENGTH,
                            group_size=GROUP_SIZE, kv_cache_bytes=kv_bytes,
                            unquantized_bytes=per_token * self.positions or None,
                            kl_method=f"teacher-forced: each evaluation window fed {EVAL_CHUNK} tokens at a time "
                                      "through a fresh quantized cache, scored against the unmodified model")

    @torch.inference_mode()
    def window_logprobs(self, model: torch.nn.Module, windows: EvalWindows, device: torch.device,
                        batch_size: int = EVAL_BATCH) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(log_probs (B, S, V) float32, targets (B, S)) like `accuracy.window_logprobs`, each window decoded
        through a quantized cache `EVAL_CHUNK` tokens at a time."""
        s, name = windows.stride, cache_argument(model)
        for start in range(0, windows.ids.shape[0], batch_size):
            rows = windows.ids[start:start + batch_size].to(device)  # (B, C)
            cache, parts = self._new(model.config), []
            for i in range(0, rows.shape[1], EVAL_CHUNK):
                out = model(input_ids=rows[:, i:i + EVAL_CHUNK], use_cache=True, **{name: cache})
                parts.append(out.logits.float())  # (B, chunk, V)
            logits = torch.cat(parts, dim=1)  # (B, C, V)
            yield torch.log_softmax(logits[:, -s - 1:-1], dim=-1), rows[:, -s:]
