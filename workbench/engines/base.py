"""The `Engine` interface: what the runner needs of an inference engine, and the engine registry.

An engine loads a model source with a dtype on a device, applies its techniques, generates a fixed number
of greedy tokens for the run's prompts (reporting each token to an engine-independent `TokenClock` and
checking for a stop request), yields log-probabilities of evaluation windows (scored against the cached fp32
baseline by `workbench.measure.accuracy.score`), and says what it holds in memory. The runner times, tracks
and assembles; the engine only runs the model.
"""

from __future__ import annotations

import abc
import importlib
import pkgutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from workbench.config import RunConfig
from workbench.errors import ConfigError
from workbench.events import OnEvent
from workbench.measure.accuracy import EvalWindows
from workbench.measure.flops import decode_flops
from workbench.measure.latency import TokenClock
from workbench.models.sources import ModelSource
from workbench.result import ModelInfo, RepeatTiming, TechniqueRecord
from workbench.techniques.base import TechniqueConfig, load_all


@dataclass
class Generation:
    """One call's timing, every row's new tokens, and (when asked) the KV cache's bytes."""

    timing: RepeatTiming
    rows: list[list[int]]
    kv_bytes: int | None = None


@dataclass
class EngineContext:
    """What every engine is built with: the run's settings and the runner's callbacks."""

    config: RunConfig
    source: ModelSource
    device: torch.device
    model_config: Any  # the source's transformers config
    on_event: OnEvent
    stop_requested: Callable[[], bool]
    load_kwargs: dict[str, Any]  # from the coordinator (a tensor-parallel plan)
    make_generator: Callable[..., Any] | None = None  # from the coordinator: a pipeline's generator (hf engine)


class Engine(abc.ABC):
    """One inference engine; today's `hf` (PyTorch through transformers) is the reference."""

    name: ClassVar[str]

    def __init__(self, ctx: EngineContext) -> None:
        self.ctx = ctx
        self.tokenizer: Any = None
        self.prompt_ids: list[list[int]] = []  # (B, T) this process's prompt rows
        self.pending_warnings: list[str] = []  # what the engine chose that the result must say (a fallback)

    @classmethod
    def can_apply(cls, technique: str) -> str | None:
        """None when this engine can apply the named technique (its config lists the engine), else why not."""
        config = load_all().get(technique)
        if config is None or cls.name in config.engines:
            return None
        return cls.refusal(config)

    @classmethod
    def refusal(cls, technique: type[TechniqueConfig]) -> str:
        """Why this engine cannot apply a technique made for other engines (one sentence)."""
        return f"{technique.name} runs on the {' and '.join(technique.engines)} engine only"

    def check(self) -> None:
        """What the model's config alone can refuse, before the tokenizer loads (ConfigError: one sentence)."""
        for technique in self.ctx.config.techniques:
            why = self.can_apply(technique.name)
            if why:
                raise ConfigError(f"the {self.name} engine cannot apply {technique.name}: {why}")

    def plan(self, tokenizer: Any, prompt_ids: list[list[int]], windows: EvalWindows | None) -> None:
        """The workload is known: keep what generation needs, refuse what cannot run (before a weight is read)."""
        self.tokenizer, self.prompt_ids = tokenizer, prompt_ids

    @abc.abstractmethod
    def load(self) -> None:
        """Load the weights onto the device."""

    @abc.abstractmethod
    def apply(self) -> tuple[TechniqueRecord, ...]:
        """Apply the run's techniques in order, then whatever the engine does before running (placement, compile)."""

    @abc.abstractmethod
    def info(self) -> ModelInfo:
        """The model as it will run (after techniques): parameters and the real bytes of its weights."""

    @abc.abstractmethod
    def generate(self, clock: TokenClock, *, want_cache: bool, interruptible: bool) -> Generation:
        """Exactly max_new_tokens greedy tokens for every prompt row; each step goes to `clock.put`, the stop
        check is polled after every token (and, when `interruptible`, inside long forwards)."""

    @abc.abstractmethod
    def logprobs(self, windows: EvalWindows) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(log-probabilities (W, S, V) float32, targets (W, S)) of the scored positions, batch by batch."""

    def decode_consistency(self, prompt: list[int], generated: list[int]) -> float | None:
        """Share of the decoded tokens in the top 10 of one forward over the same text (None: not checked)."""
        return None

    @abc.abstractmethod
    def bytes_per_step(self, prompt_tokens: int, new_tokens: int, kv_bytes: int | None) -> int:
        """Bytes one decode step reads (the roofline's numerator)."""

    def flops_per_step(self, prompt_tokens: int, new_tokens: int, batch: int) -> float:
        """FLOPs of one decode step (the roofline's arithmetic intensity is this over `bytes_per_step`)."""
        return decode_flops(self.info().params, self.ctx.model_config, batch, prompt_tokens, new_tokens)

    def profile_refusal(self) -> str | None:
        """None when the PyTorch profiler sees this engine's kernels (its busy share per decode step can be
        measured), else why not (one sentence)."""
        return f"the {self.name} engine's kernels run outside PyTorch, where its profiler cannot see them"

    def compiled_mode(self) -> str | None:
        """The torch.compile mode the decode step actually runs with (None: uncompiled, after any fallback)."""
        return None

    def uses_cuda_graphs(self) -> bool:
        """Whether the decode step replays CUDA graphs (after any fallback)."""
        return False

    def take_warnings(self) -> list[str]:
        """The warnings gathered since the last call (one sentence each), handed over once."""
        taken, self.pending_warnings = self.pending_warnings, []
        return taken

    def placement(self) -> Any:
        """Where the model's modules live when split over devices (a `parallel.placement.Placement`), else None."""
        return None

    def release(self) -> None:
        """Drop the model and give its memory back (also after errors)."""


ENGINES: dict[str, type[Engine]] = {}
_all_imported = False


def register(cls: type[Engine]) -> type[Engine]:
    """Class decorator: make an engine selectable by `RunConfig.engine`."""
    ENGINES[cls.name] = cls
    return cls


def engines() -> dict[str, type[Engine]]:
    """Every engine, by name (importing the engine modules of this package on first use: one engine module
    imported directly, e.g. for `prepared_gguf`, registers only itself)."""
    global _all_imported
    if not _all_imported:
        package = importlib.import_module("workbench.engines")
        for info in pkgutil.iter_modules(package.__path__):
            importlib.import_module(f"{package.__name__}.{info.name}")
        _all_imported = True
    return ENGINES


def engine_class(name: str) -> type[Engine]:
    """The engine registered as `name` (ConfigError naming the known ones otherwise)."""
    engines()
    try:
        return ENGINES[name]
    except KeyError:
        raise ConfigError(f"unknown engine {name!r}; known: {', '.join(sorted(ENGINES))}") from None
