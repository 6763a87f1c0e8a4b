"""`RunConfig`: what one run does. Frozen, validated on construction, help text on every field."""

from __future__ import annotations

import dataclasses
import json
import re
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from workbench.serde import from_dict, to_dict

DTYPES = ("fp32", "fp16", "bf16")
DEFAULT_PROMPT = "The for statement is used to"
_DEVICE_RE = re.compile(r"^(auto|cpu|cuda|cuda:\d+)$")


def option(default: Any, help: str, *, group: str = "Run", choices: tuple | None = None,
           minimum: float | None = None, maximum: float | None = None, flag: str | None = None,
           **extra: Any) -> Any:
    """A dataclass field whose metadata feeds validation, the CLI's --help and the widgets' tooltips."""
    meta = {"help": help, "group": group, "choices": choices, "min": minimum, "max": maximum,
            "flag": flag, **extra}
    if isinstance(default, (list, dict)):
        raise TypeError("use tuples for sequence defaults: configs are frozen")
    return field(default=default, metadata=meta)


def check_field(obj: Any, f: dataclasses.Field) -> None:
    """Raise ValueError naming the allowed values when obj.<f> breaks its metadata's bounds."""
    value, meta = getattr(obj, f.name), f.metadata
    if value is None:
        return
    choices = meta.get("choices")
    if choices and value not in choices:
        raise ValueError(f"{f.name} must be one of {', '.join(map(str, choices))}; got {value!r}")
    lo, hi = meta.get("min"), meta.get("max")
    if (lo is not None or hi is not None) and isinstance(value, (int, float)) and not isinstance(value, bool):
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            rng = f"{lo if lo is not None else '-inf'}..{hi if hi is not None else 'inf'}"
            raise ValueError(f"{f.name} must be in {rng}; got {value}")


_SCALARS = {int: "an integer", float: "a number", str: "text", bool: "true or false"}


def _check_type(obj: Any, f: dataclasses.Field, hint: Any) -> None:
    """Raise ValueError when a scalar field holds a value of the wrong type (e.g. from JSON)."""
    value = getattr(obj, f.name)
    if typing.get_origin(hint) not in (None, typing.Union, types.UnionType):
        return  # containers are checked by the class itself
    allowed = [a for a in (typing.get_args(hint) or (hint,)) if a in _SCALARS]
    if value is None or not allowed:
        return
    ok = any(isinstance(value, a) and not (a in (int, float) and isinstance(value, bool)) for a in allowed)
    if float in allowed and isinstance(value, int) and not isinstance(value, bool):
        ok = True
    if not ok:
        raise ValueError(f"{f.name} must be {_SCALARS[allowed[0]]}; got {value!r}")


def _check_text(obj: Any, f: dataclasses.Field) -> None:
    """Raise ValueError when text holds a lone surrogate (undecodable bytes from argv, a broken widget value)."""
    value = getattr(obj, f.name)
    for text in value if isinstance(value, tuple) else (value,):
        if isinstance(text, str):
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as e:
                raise ValueError(f"{f.name} is not valid Unicode text: character {e.start} is a lone surrogate "
                                 "(undecodable bytes?); give UTF-8 text") from None


def check_fields(obj: Any) -> None:
    """Validate every field of a dataclass instance against its type and metadata."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        _check_type(obj, f, hints[f.name])
        _check_text(obj, f)
        check_field(obj, f)


# A one-word field name is a setting only as a sentence's first word ("model must be ..."), before "=" or ">=",
# or after "either"; elsewhere ("the model's context") it is an ordinary word.
_AS_SETTING = r"(?:^{0}(?=\s)|(?<![\w-]){0}(?=\s*>?=)|(?<=either ){0}(?!\w))"


def spell_fields(message: str, cls: type, spell: Callable[[str], str]) -> str:
    """`message` with `cls`'s field names as the user sees them: `spell("max_new_tokens")` is a CLI flag
    (`--max-new-tokens`) or a widget's label (`max new tokens`)."""
    for name in sorted((f.name for f in dataclasses.fields(cls)), key=len, reverse=True):
        pattern = rf"(?<![\w-]){name}(?!\w)" if "_" in name else _AS_SETTING.format(name)
        message = re.sub(pattern, lambda _: spell(name), message)
    return message


@dataclass(frozen=True)
class RunConfig:
    """One inference run: the model, how it is executed and measured, and which techniques apply."""

    model: str = option("tiny", "Model source: 'tiny' (the shipped reference model), 'preset:NAME' "
                        "(a real architecture with random weights: speed and memory only), 'student:NAME' "
                        "(a student saved by `workbench distill`), a Hugging Face hub id, or a local folder.",
                        group="Model")
    dtype: str = option("fp32", "Weight and activation dtype.", group="Model", choices=DTYPES)
    device: str = option("auto", "Where to run: auto (CUDA if present, else CPU), cpu, cuda or cuda:N.",
                         group="Execution")
    trust_remote_code: bool = option(False, "Allow a hub model to run its own Python code (off: "
                                     "only architectures built into transformers load).", group="Model")
    allow_pickle: bool = option(False, "Allow a pickle checkpoint (pytorch_model.bin) when a model has no "
                                "safetensors weights; pickle files can carry code, so only for sources you trust "
                                "(off: safetensors only).", group="Model")
    prompt: str | None = option(None, "Prompt text (default: a short sentence in the reference "
                                "corpus's style). Exclusive with prompt_tokens.", group="Workload")
    prompt_tokens: int | None = option(None, "Use a prompt of exactly this many tokens (cut from the "
                                       "held-out text) instead of prompt text.", group="Workload",
                                       minimum=1, maximum=131072)
    max_new_tokens: int = option(32, "Tokens generated per sequence; greedy, fixed length (EOS does "
                                 "not stop it).", group="Workload", minimum=1, maximum=32768)
    batch_size: int = option(1, "Sequences generated at once.", group="Workload", minimum=1, maximum=4096)
    warmup: int = option(1, "Untimed runs before measuring.", group="Measurement", minimum=0, maximum=100)
    repeats: int = option(5, "Minimum number of timed runs.", group="Measurement", minimum=1, maximum=10000)
    min_duration_s: float = option(2.0, "Keep repeating until the timed runs add up to at least this "
                                   "many seconds.", group="Measurement", minimum=0.0, maximum=3600.0)
    max_repeats: int = option(200, "Never more timed runs than this, whatever min_duration_s says.",
                              group="Measurement", minimum=1, maximum=100000)
    threads: int | None = option(None, "Intra-op CPU threads (default: PyTorch's choice).",
                                 group="Execution", minimum=1, maximum=1024)
    interop_threads: int | None = option(None, "Inter-op CPU threads (PyTorch allows setting them once per "
                                         "process: later runs in the same process keep the first value).",
                                         group="Execution", minimum=1, maximum=1024)
    attn_implementation: str = option("sdpa", "Attention kernel: sdpa (PyTorch scaled_dot_product_attention) "
                                      "or eager (plain matmuls, what the model code spells out).",
                                      group="Execution", choices=("sdpa", "eager"))
    kv_cache: str = option("dynamic", "KV cache: dynamic (grows each token) or static (preallocated for "
                           "prompt + new tokens; needed by compile).", group="Execution",
                           choices=("dynamic", "static"))
    compile: bool = option(False, "torch.compile the model's forward (static KV cache); the first call compiles, "
                           "its time is reported as cold start apart from the warm latency.", group="Execution")
    device_map: str | None = option(None, "Split the model across devices: auto, balanced or sequential "
                                    "(accelerate), or an explicit map 'LAYERS=DEVICE;...', e.g. "
                                    "'model.layers.0-2=cpu;model.layers.3-5=disk' (disk: offloaded to files, "
                                    "loaded per use). Default: everything on --device.", group="Parallelism")
    max_memory: str | None = option(None, "Memory cap per device for an automatic device_map, e.g. "
                                    "'cpu=2GiB,cuda:0=10GiB'.", group="Parallelism")
    tensor_parallel: int = option(1, "Ranks that each hold a slice of every layer (torch.distributed: gloo on "
                                  "CPU, nccl on GPU), through transformers' tensor-parallel plan.",
                                  group="Parallelism", minimum=1, maximum=1024)
    data_parallel: int = option(1, "Replicas in separate processes; each takes a share of the batch and of the "
                                "CPU cores (or one GPU each).", group="Parallelism", minimum=1, maximum=1024)
    eval_tokens: int = option(2048, "Held-out tokens scored for perplexity and agreement, rounded up to whole "
                              "windows (0: skip accuracy).", group="Accuracy", minimum=0, maximum=1_000_000)
    eval_context: int = option(256, "Tokens per evaluation window (capped at the model's context).",
                               group="Accuracy", minimum=2, maximum=131072)
    techniques: tuple[str, ...] = option((), "Compression techniques applied in order after loading, "
                                         "each NAME or NAME:key=value,... (see `workbench techniques`).",
                                         group="Techniques")
    token_events: bool = option(True, "Emit an event per generated token (live plots); off to "
                                "measure without it.", group="Measurement",
                                help_off="Emit no per-token events (no live per-token plot), to measure without "
                                "their cost.")
    seed: int = option(0, "Random seed (random-weight presets, sampled prompts).", group="Workload",
                       minimum=0)

    def __post_init__(self) -> None:
        check_fields(self)
        if not isinstance(self.model, str) or not self.model.strip():
            raise ValueError("model must be 'tiny', 'preset:NAME', a hub id or a folder; got an empty value")
        if self.model.startswith("preset:"):
            from workbench.models.presets import PRESETS

            name = self.model.split(":", 1)[1]
            if name not in PRESETS:
                raise ValueError(f"unknown preset {name!r}; presets: {', '.join(sorted(PRESETS))}")
        if not _DEVICE_RE.match(self.device):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N; got {self.device!r}")
        if self.prompt is not None and self.prompt_tokens is not None:
            raise ValueError("give either prompt or prompt_tokens, not both")
        if self.prompt is not None and not self.prompt.strip():
            raise ValueError("prompt is empty: give some text, or prompt_tokens=N")
        self._check_parallelism()
        if isinstance(self.techniques, (list, str)):
            object.__setattr__(self, "techniques", tuple([self.techniques] if isinstance(self.techniques, str)
                                                         else self.techniques))
        from workbench.techniques import normalize_specs

        object.__setattr__(self, "techniques", normalize_specs(self.techniques, self.dtype, self.device))

    def _check_parallelism(self) -> None:
        """Settings that exclude each other, refused with the reason."""
        if self.tensor_parallel > 1 and self.data_parallel > 1:
            raise ValueError("choose tensor_parallel or data_parallel, not both")
        if self.device_map and (self.tensor_parallel > 1 or self.data_parallel > 1):
            raise ValueError("device_map splits one process's model; it does not combine with tensor_parallel "
                             "or data_parallel")
        if self.data_parallel > self.batch_size:
            raise ValueError(f"data_parallel {self.data_parallel} splits the batch between replicas: batch_size "
                             f"must be at least {self.data_parallel}; got {self.batch_size}")
        if self.max_memory and self.device_map not in ("auto", "balanced", "sequential"):
            raise ValueError("max_memory caps an automatic device_map: set device_map to auto, balanced or "
                             "sequential")
        if self.device_map:
            from workbench.parallel.placement import parse_device_map

            parse_device_map(self.device_map)
        if self.max_memory:
            from workbench.parallel.placement import parse_max_memory

            parse_max_memory(self.max_memory)
        if self.compile:
            if self.kv_cache != "static":
                raise ValueError("compile needs kv_cache=static (a fixed-shape cache compiles once)")
            if self.warmup < 1:
                raise ValueError("compile needs warmup >= 1: the first call compiles, and is reported as cold start")
            if self.device_map:
                raise ValueError("compile does not work with a device_map's offload hooks; drop one of them")

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (JSON edge)."""
        return to_dict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunConfig:
        """Inverse of `to_dict`; validates like the constructor."""
        return from_dict(cls, data)

    def to_json(self) -> str:
        """JSON text."""
        return json.dumps(self.to_dict())

    @classmethod
    def from_json(cls, text: str) -> RunConfig:
        """Inverse of `to_json`."""
        return cls.from_dict(json.loads(text))

    def replace(self, **changes: Any) -> RunConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)
