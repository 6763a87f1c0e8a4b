"""The technique registry: one config dataclass per technique, one handler per config type, and spec parsing.

Below `workbench.config` (a RunConfig holds parsed technique configs): nothing here imports the config, the
result or the text modules, so the import graph stays acyclic.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import pkgutil
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from workbench.errors import ConfigError
from workbench.options import check_fields, option
from workbench.techniques._targets import block_weights

KINDS = ("quant", "prune")


@dataclass(frozen=True)
class Expectation:
    """What a technique's default settings must do to `tiny`, checked by tests/test_techniques.py."""

    max_kl: float | None = option(None, "Upper bound on the mean KL(unmodified || modified) per position.",
                                  minimum=0.0)
    min_kl: float = option(0.0, "Lower bound on that KL: a technique that silently changes nothing fails.",
                           minimum=0.0)
    raises_perplexity: bool = option(False, "Destructive settings: perplexity must end above the unmodified "
                                     "model's.")

    def __post_init__(self) -> None:
        check_fields(self)
        if self.max_kl is None and not self.raises_perplexity:
            raise ValueError("an expectation needs max_kl or raises_perplexity=True")
        if self.max_kl is not None and self.min_kl >= self.max_kl:
            raise ValueError(f"min_kl must be below max_kl ({self.max_kl:g}); got {self.min_kl:g}")

    def check(self, kl: float, perplexity: float, baseline_perplexity: float) -> str | None:
        """Why these measurements miss the expectation, in one sentence (None: they meet it)."""
        if self.max_kl is not None and kl > self.max_kl:
            return f"KL {kl:.4g} is above the declared max_kl {self.max_kl:g}"
        if kl < self.min_kl:
            return f"KL {kl:.4g} is below the declared min_kl {self.min_kl:g}: the model barely changed"
        if self.raises_perplexity and not perplexity > baseline_perplexity:
            return f"perplexity {perplexity:.4g} is not above the unmodified model's {baseline_perplexity:.4g}"
        return None


@dataclass(frozen=True)
class TechniqueConfig:
    """Base of every technique config: fields are its parameters (help text in their metadata)."""

    name: ClassVar[str] = ""
    kind: ClassVar[str] = ""  # "quant" | "prune"
    simulated: ClassVar[bool] = False  # True: changes accuracy only (fake quant, masks), never speed
    summary: ClassVar[str] = ""  # one line for listings and tooltips
    packs_weights: ClassVar[bool] = False  # replaces float weights by packed/quantized storage
    needs_float_weights: ClassVar[bool] = False  # reads or edits float weights (pruning, fake quant)
    engines: ClassVar[tuple[str, ...]] = ("hf",)  # the engines that can apply it (`workbench techniques --engine`)
    expect: ClassVar[Expectation | None] = None  # each technique declares its own (numbers measured on `tiny`)
    # Read by the hf engine's compile plan (workbench.engines.hf_compile), never by name:
    breaks_cuda_graphs: ClassVar[str | None] = None  # why its kernels cannot be captured in a CUDA graph (None: can)
    breaks_compile: ClassVar[str | None] = None  # why torch.compile cannot run its layers at all (None: it can)

    def __post_init__(self) -> None:
        check_fields(self)
        self.validate()

    def validate(self) -> None:
        """Cross-field checks; raise ValueError naming the allowed values."""

    @classmethod
    def unavailable(cls, device: torch.device) -> str | None:
        """Why this technique cannot run on `device` (None: it can)."""
        return None

    def spec(self) -> str:
        """Canonical `NAME:key=value,...` with every parameter spelled out."""
        params = ",".join(f"{k}={_fmt(v)}" for k, v in self.params().items())
        return f"{self.name}:{params}" if params else self.name

    def to_text(self) -> str:
        """How JSON and the store write a technique: its canonical spec (see `workbench.serde`)."""
        return self.spec()

    @classmethod
    def from_text(cls, text: str) -> TechniqueConfig:
        """Inverse of `to_text`: the spec parsed and validated (ConfigError when it is not a `cls`)."""
        config = parse_spec(text)
        if not isinstance(config, cls):
            raise ConfigError(f"{text!r} is a {config.name} technique, not a {cls.name or cls.__name__}")
        return config

    def label(self) -> str:
        """Short form for tables and legends: the name and the parameters that differ from the defaults."""
        changed = [f"{f.name}={_fmt(getattr(self, f.name))}" for f in dataclasses.fields(self)
                   if getattr(self, f.name) != f.default]
        return f"{self.name}:{','.join(changed)}" if changed else self.name

    def params(self) -> dict[str, Any]:
        """Parameter values by name."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def notes(self) -> str:
        """What a user should know about the numbers this technique produces."""
        return ""

    def speed_warning(self, device_type: str, batch: int, compiled: bool) -> str | None:
        """Why this technique is known to decode slower than the unquantized model on `device_type` at `batch`
        sequences (compiled: the decode step is compiled), with what to do instead; None when it is not."""
        return None

    def load_time_config(self, dtype: str, skip: tuple[str, ...] = (), offload: bool = False) -> Any | None:
        """A transformers quantization config with which `from_pretrained` quantizes this technique's layers as
        it reads them, leaving the modules named in `skip` (and, with `offload`, those a device map puts on the
        CPU or disk) in `dtype`; None: the technique is applied after loading (the default)."""
        return None

    def after_load_time(self, model: torch.nn.Module, dtype: str) -> list[str]:
        """Finish, on a model `from_pretrained` quantized with `load_time_config`, what the handler would also
        have set (kernel flags), and return notes for the result."""
        return []

    def packed_bytes(self, out_features: int, in_features: int) -> int | None:
        """Bytes one (out, in) block Linear weight takes once this technique is applied (codes and scales);
        None: the technique keeps float weights."""
        return None

    def model_problem(self, model: torch.nn.Module) -> str | None:
        """Why this technique cannot act on `model` (None: it can).

        `model` may be built on the meta device: only module types and shapes may be read, no values.
        The default: the model needs Linear or GPT-2 Conv1D layers in its blocks.
        """
        if not block_weights(model):
            return "it acts on the Linear (or GPT-2 Conv1D) layers of the blocks, and this model has none"
        return None

    def conflicts_with(self, earlier: TechniqueConfig | None, dtype: str) -> str | None:
        """Why this technique cannot follow `earlier` (or, with None, run in `dtype`); None if fine."""
        return None

    def conflicts_before(self, later: TechniqueConfig, dtype: str) -> str | None:
        """Why `later` cannot follow this technique; None if fine."""
        return None


@dataclass
class ApplyContext:
    """What a handler may use: the live model, tokenizer, device, dtype, progress and notes."""

    model: torch.nn.Module
    tokenizer: Any
    device: torch.device
    dtype: str
    on_progress: Callable[[str, float | None], None]
    notes: list[str] = dataclasses.field(default_factory=list)


Handler = Callable[[TechniqueConfig, ApplyContext], torch.nn.Module | None]
REGISTRY: dict[str, type[TechniqueConfig]] = {}
_NOT_TECHNIQUES = ("base", "apply", "rules")  # the package's own machinery, not technique files
_HANDLERS: dict[type[TechniqueConfig], Handler] = {}


def register(cls: type[TechniqueConfig]) -> type[TechniqueConfig]:
    """Class decorator: make a technique config known by its `name`."""
    if cls.kind not in KINDS or not cls.name:
        raise TypeError(f"{cls.__name__} needs a name and a kind in {KINDS}")
    REGISTRY[cls.name] = cls
    return cls


def register_handler(config_type: type[TechniqueConfig]) -> Callable[[Handler], Handler]:
    """Decorator: the function that applies `config_type` to a model (returns a new model or None)."""
    def wrap(fn: Handler) -> Handler:
        _HANDLERS[config_type] = fn
        return fn
    return wrap


def handler_for(config: TechniqueConfig) -> Handler:
    """The handler registered for this config's type."""
    return _HANDLERS[type(config)]


def _fmt(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _coerce(raw: str, hint: Any, key: str, name: str) -> Any:
    """Turn the text of `key=value` into the field's type."""
    types = [a for a in (typing.get_args(hint) or (hint,)) if a is not type(None)]
    if raw.lower() in ("none", "null") and type(None) in typing.get_args(hint):
        return None
    for tp in types:
        try:
            if tp is bool:
                if raw.lower() in ("true", "1", "yes", "on"):
                    return True
                if raw.lower() in ("false", "0", "no", "off"):
                    return False
                continue
            if tp in (int, float, str):
                return tp(raw)
        except ValueError:
            continue
    expected = " or ".join(getattr(t, "__name__", str(t)) for t in types)
    raise ConfigError(f"{name}: {key}={raw!r} is not a valid {expected}")


@functools.cache
def _import_technique_modules() -> None:
    """Import every technique file of this package once: each registers its config and handler."""
    for info in pkgutil.iter_modules([str(Path(__file__).parent)]):
        if not info.name.startswith("_") and info.name not in _NOT_TECHNIQUES:
            importlib.import_module(f"{__package__}.{info.name}")


def load_all() -> dict[str, type[TechniqueConfig]]:
    """The registry, with every technique module of this package imported."""
    _import_technique_modules()
    return REGISTRY


def parse_spec(spec: str) -> TechniqueConfig:
    """`NAME` or `NAME:key=value,key=value` -> the validated config (ConfigError on anything wrong)."""
    if not isinstance(spec, str):
        raise ConfigError(f"a technique is a spec such as 'sim:bits=4' (NAME or NAME:key=value,...); got {spec!r}")
    load_all()
    text = spec.strip()
    # a registered name may contain ':' (e.g. "2:4"): the longest one followed by the end or ':' wins
    named = [n for n in REGISTRY if text == n or text.startswith(n + ":")]
    name = max(named, key=len) if named else text.partition(":")[0]
    rest = text[len(name) + 1:]
    cls = REGISTRY.get(name)
    if cls is None:
        raise ConfigError(f"unknown technique {name!r}; known: {', '.join(sorted(REGISTRY)) or 'none'}")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for item in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, raw = item.partition("=")
        key = key.strip().replace("-", "_")
        if not eq or key not in fields:
            raise ConfigError(f"{name}: unknown parameter {key!r}; parameters: {', '.join(sorted(fields)) or 'none'}")
        kwargs[key] = _coerce(raw.strip(), hints[key], key, name)
    try:
        return cls(**kwargs)
    except ValueError as e:
        raise ConfigError(f"{name}: {e}") from None
