"""`RunConfig`: what one run does. Frozen, validated on construction, help text on every field."""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from workbench.models.presets import PRESETS
from workbench.options import check_field, check_fields, option
from workbench.parallel.placement import parse_device_map, parse_max_memory
from workbench.serde import from_dict, to_dict
from workbench.techniques.base import TechniqueConfig
from workbench.techniques.rules import check_techniques

__all__ = ["RunConfig", "DTYPES", "COMPILE_MODES", "DEFAULT_PROMPT", "spell_fields", "option", "check_field",
           "check_fields"]

DTYPES = ("fp32", "fp16", "bf16")
DEFAULT_PROMPT = "The for statement is used to"
_DEVICE_RE = re.compile(r"^(auto|cpu|cuda|cuda:\d+)$")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")
KV_CACHES = ("dynamic", "static", "quantized")
KV_BITS = (2, 4, 8)
KV_BACKENDS = ("auto", "hqq", "quanto")


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
    engine: str = option("hf", "Inference engine: hf (PyTorch through Hugging Face transformers) or llamacpp "
                         "(the same model exported to GGUF and run by llama.cpp; batch 1). `workbench techniques "
                         "--engine E` lists what each engine can apply.", group="Execution",
                         choices=("hf", "llamacpp"))
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
                           "prompt + new tokens; needed by compile) or quantized (keys and values stored in kv_bits "
                           "integers, transformers' QuantizedCache; the newest 128 positions stay unquantized).",
                           group="Execution", choices=KV_CACHES)
    kv_bits: int | None = option(None, "Bits per stored key/value with kv_cache quantized: 2, 4 or 8 (default 4).",
                                 group="Execution", choices=KV_BITS)
    kv_backend: str = option("auto", "Quantizer of a quantized KV cache: hqq (1-8 bits, pure PyTorch), quanto (2 or 4 "
                             "bits; builds a C++ extension on first use, minutes on a CPU) or auto (hqq).",
                             group="Execution", choices=KV_BACKENDS)
    draft_model: str | None = option(None, "Speculative decoding: a small model with the same tokenizer (same "
                                     "model-spec grammar as model) proposes draft_tokens tokens, the model checks "
                                     "them in one forward (transformers' assisted generation; batch 1).",
                                     group="Execution")
    draft_tokens: int = option(4, "Tokens the draft model proposes per step of the model (fixed; speculative "
                               "decoding only).", group="Execution", minimum=1, maximum=64)
    compile: bool = option(False, "Compile the one-token decode step with torch.compile, Hugging Face's recipe (static "
                           "KV cache; prefill runs uncompiled); the first call compiles, its time is reported as cold "
                           "start apart from the warm latency.", group="Execution")
    compile_mode: str | None = option(None, "torch.compile mode with compile: default, reduce-overhead (CUDA graphs: "
                                      "the step replayed as one launch) or max-autotune (searches kernels, slow to "
                                      "compile; CUDA graphs too). Default: reduce-overhead on CUDA, default on CPU.",
                                      group="Execution", choices=COMPILE_MODES)
    device_map: str | None = option(None, "Split the model across devices: auto, balanced or sequential "
                                    "(accelerate), or an explicit map 'LAYERS=DEVICE;...', e.g. "
                                    "'model.layers.0-2=cpu;model.layers.3-5=disk' (disk: offloaded to files, "
                                    "loaded per use). Default: everything on --device.", group="Parallelism")
    max_memory: str | None = option(None, "Memory cap per device for an automatic device_map, e.g. "
                                    "'cpu=2GiB,cuda:0=10GiB' (devices it does not name keep what is free).",
                                    group="Parallelism")
    offload_folder: str | None = option(None, "Folder for the layers a device_map offloads to disk (a per-run "
                                        "folder inside it, removed after the run). Default: the system's "
                                        "temporary folder.", group="Parallelism")
    tensor_parallel: int = option(1, "Ranks that each hold a slice of every layer (torch.distributed: gloo on "
                                  "CPU, nccl on GPU), through transformers' tensor-parallel plan.",
                                  group="Parallelism", minimum=1, maximum=1024)
    data_parallel: int = option(1, "Replicas in separate processes; each takes a share of the batch and of the "
                                "CPU cores (or one GPU each).", group="Parallelism", minimum=1, maximum=1024)
    pipeline_parallel: int = option(1, "Pipeline stages: the decoder layers split into this many contiguous "
                                    "stages, one rank each (torch.distributed: gloo on CPU, nccl on GPU); the "
                                    "batch flows through them in micro_batches.", group="Parallelism",
                                    minimum=1, maximum=1024)
    micro_batches: int = option(1, "Micro-batches the batch splits into for pipeline_parallel (GPipe): stages "
                                "idle (N-1)/(M+N-1) of each step, so M must be at least the stage count N and "
                                "divide batch_size.", group="Parallelism", minimum=1, maximum=4096)
    eval_tokens: int = option(2048, "Held-out tokens scored for perplexity and agreement, rounded up to whole "
                              "windows (0: skip accuracy).", group="Accuracy", minimum=0, maximum=1_000_000)
    eval_context: int = option(256, "Tokens per evaluation window (capped at the model's context).",
                               group="Accuracy", minimum=2, maximum=131072)
    techniques: tuple[TechniqueConfig, ...] = option(
        (), "Compression techniques applied in order after loading, each NAME or NAME:key=value,... (see "
        "`workbench techniques`) or a technique config; held parsed, written as canonical specs in JSON.",
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
            name = self.model.split(":", 1)[1]
            if name not in PRESETS:
                raise ValueError(f"unknown preset {name!r}; presets: {', '.join(sorted(PRESETS))}")
        if not _DEVICE_RE.match(self.device):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N; got {self.device!r}")
        if self.prompt is not None and self.prompt_tokens is not None:
            raise ValueError("give either prompt or prompt_tokens, not both")
        if self.prompt is not None and not self.prompt.strip():
            raise ValueError("prompt is empty: give some text, or prompt_tokens=N")
        self._check_decoding()  # first: its compile refusals say why, where _check_parallelism's would not
        self._check_parallelism()
        self._parse_techniques()

    def _parse_techniques(self) -> None:
        """Specs parsed once, configs kept, the whole list checked as a combination (ConfigError naming a conflict)."""
        items = self.techniques
        if isinstance(items, (str, TechniqueConfig)):
            items = (items,)
        if not isinstance(items, (list, tuple)):
            raise ValueError(f"techniques must be a list of specs such as 'sim:bits=4'; got {items!r}")
        object.__setattr__(self, "techniques", check_techniques(items, self.dtype, self.device))

    @property
    def technique_specs(self) -> tuple[str, ...]:
        """The techniques' canonical specs (`sim:bits=8,...`), as JSON, the store and tables write them."""
        return tuple(t.spec() for t in self.techniques)

    def _check_parallelism(self) -> None:
        """Settings that exclude each other, refused with the reason."""
        if self.tensor_parallel > 1 and self.data_parallel > 1:
            raise ValueError("choose tensor_parallel or data_parallel, not both")
        if self.device_map and (self.tensor_parallel > 1 or self.data_parallel > 1):
            raise ValueError("device_map splits one process's model; it does not combine with tensor_parallel "
                             "or data_parallel")
        self._check_pipeline()
        if self.data_parallel > self.batch_size:
            raise ValueError(f"data_parallel {self.data_parallel} splits the batch between replicas: batch_size "
                             f"must be at least {self.data_parallel}; got {self.batch_size}")
        if self.max_memory and self.device_map not in ("auto", "balanced", "sequential"):
            raise ValueError("max_memory caps an automatic device_map: set device_map to auto, balanced or "
                             "sequential")
        if self.offload_folder is not None and not self.device_map:
            raise ValueError("offload_folder holds the layers a device_map offloads to disk: set device_map too")
        if self.device_map:
            parse_device_map(self.device_map)
        if self.max_memory:
            parse_max_memory(self.max_memory)
        if self.compile_mode is not None and not self.compile:
            raise ValueError(f"compile is off, so compile_mode {self.compile_mode} would do nothing: turn compile on "
                             "or leave compile_mode unset")
        if self.compile:
            if self.kv_cache != "static":
                raise ValueError("compile needs kv_cache=static (a fixed-shape cache compiles once)")
            if self.warmup < 1:
                raise ValueError("compile needs warmup >= 1: the first call compiles, and is reported as cold start")
            if self.device_map:
                raise ValueError("compile does not work with a device_map's offload hooks; drop one of them")

    def _check_pipeline(self) -> None:
        """pipeline_parallel / micro_batches: what the GPipe schedule of `workbench.parallel.pipeline` needs."""
        n, m = self.pipeline_parallel, self.micro_batches
        if n == 1:
            if m > 1:
                raise ValueError(f"micro_batches {m} splits the batch between pipeline stages: set "
                                 "pipeline_parallel to 2 or more, or leave micro_batches at 1")
            return
        if self.tensor_parallel > 1 or self.data_parallel > 1 or self.device_map:
            raise ValueError("pipeline_parallel does not combine with tensor_parallel, data_parallel or a "
                             "device_map: choose one way to split the run")
        if self.engine != "hf":
            raise ValueError(f"the {self.engine} engine runs in one process: pipeline_parallel needs engine hf")
        if self.compile or self.kv_cache != "dynamic":
            raise ValueError("pipeline_parallel keeps a dynamic KV cache per stage and runs uncompiled: use "
                             "kv_cache dynamic without compile")
        if m < n:
            raise ValueError(f"micro_batches {m} < pipeline_parallel {n} would leave the stages idle "
                             f"{(n - 1) / (m + n - 1):.0%} of each step (bubble (N-1)/(M+N-1)); micro_batches "
                             f"must be at least {n}")
        if self.batch_size < m:
            raise ValueError(f"batch_size {self.batch_size} is smaller than micro_batches {m}: each micro-batch "
                             "needs at least one prompt")
        if self.batch_size % m:
            raise ValueError(f"batch_size {self.batch_size} must be a multiple of micro_batches {m} (each "
                             f"micro-batch takes batch_size / micro_batches prompts)")

    def _check_decoding(self) -> None:
        """Speculative decoding and a quantized KV cache: what transformers' assisted generation and
        QuantizedCache accept (see `workbench.engines.hf_speculative` and `hf_kvquant`)."""
        if self.kv_cache != "quantized":
            if self.kv_bits is not None:
                raise ValueError(f"kv_bits {self.kv_bits} sets the bits of a quantized KV cache: set kv_cache to "
                                 "quantized, or leave kv_bits unset")
            if self.kv_backend != "auto":
                raise ValueError(f"kv_backend {self.kv_backend} quantizes the KV cache: set kv_cache to quantized")
        else:
            if self.kv_backend == "quanto" and self.kv_bits == 8:
                raise ValueError("kv_backend quanto stores 2 or 4 bits; for kv_bits 8 use kv_backend hqq or auto")
            if self.compile:
                raise ValueError("compile needs a fixed-shape static KV cache, and a quantized KV cache grows and is "
                                 "re-quantized as it fills: choose one of compile and kv_cache quantized")
            if self.engine != "hf":
                raise ValueError("kv_cache quantized is transformers' QuantizedCache: it needs engine hf")
        if self.draft_model is None:
            return
        if not self.draft_model.strip():
            raise ValueError("draft_model is empty: give a model spec such as student:NAME, or leave it unset")
        if self.engine != "hf":
            raise ValueError("draft_model uses transformers' assisted generation: it needs engine hf (llama.cpp "
                             "runs one model)")
        if self.batch_size > 1:
            raise ValueError(f"draft_model: transformers' assisted generation takes one sequence at a time, so "
                             f"batch_size must be 1; got {self.batch_size}")
        if (self.tensor_parallel > 1 or self.data_parallel > 1 or getattr(self, "pipeline_parallel", 1) > 1
                or self.device_map):
            raise ValueError("draft_model runs the model and its draft in one process on one device: it does not "
                             "combine with tensor_parallel, data_parallel, pipeline_parallel or a device_map")
        if self.compile:
            raise ValueError("draft_model: the model checks draft_tokens + 1 tokens per step, a shape the compiled "
                             "one-token decode step does not have; choose one of compile and draft_model")
        if self.kv_cache == "quantized":
            raise ValueError("draft_model with kv_cache quantized: measure one decode-time technique at a time")

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (JSON edge); each technique as its canonical spec string."""
        return to_dict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunConfig:
        """Inverse of `to_dict` (technique specs parsed); validates like the constructor."""
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
