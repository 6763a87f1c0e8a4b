"""Frozen result dataclasses: what a run measured, with the JSON layout of DESIGN.md."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from typing import Any

from workbench.config import RunConfig
from workbench.measure import tracker
from workbench.serde import from_dict, to_dict


@dataclass(frozen=True)
class Percentiles:
    """p50 / p90 / p99 of one latency quantity, in milliseconds."""

    p50: float
    p90: float
    p99: float


@dataclass(frozen=True)
class ModelInfo:
    """The loaded model as measured after all techniques were applied."""

    name: str
    params: int
    weight_bytes: int
    random_weights: bool
    dtype: str
    device: str
    architecture: str = ""
    source: str = ""


@dataclass(frozen=True)
class RepeatTiming:
    """One measured `generate` call: times in ms from its start; `token_ms[i]` when token i appeared."""

    ttft_ms: float
    e2e_ms: float
    token_ms: tuple[float, ...]


@dataclass(frozen=True)
class LatencyStats:
    """Latency percentiles and throughput over the measured repeats (warm-up excluded)."""

    ttft_ms: Percentiles | None
    tpot_ms: Percentiles | None
    itl_ms: Percentiles | None
    e2e_ms: Percentiles | None
    prefill_tokens_per_s: float | None
    decode_tokens_per_s: float | None
    cv: float | None
    warmup: int
    repeats: int
    new_tokens: int
    prompt_tokens: int = 0
    batch_size: int = 1
    measured_s: float = 0.0
    samples: tuple[RepeatTiming, ...] = ()
    decode_tokens_per_s_per_sequence: float | None = None
    cold_start_s: float | None = None


@dataclass(frozen=True)
class MemoryStats:
    """Bytes: real weight storage, KV cache, host high-water marks (load vs run), GPU allocator peaks."""

    weights_bytes: int | None
    kv_cache_bytes: int | None
    load_peak_host_bytes: int | None
    peak_host_bytes: int | None
    peak_gpu_allocated_bytes: int | None
    peak_gpu_reserved_bytes: int | None
    idle_host_bytes: int | None = None
    gpu_used_bytes_nvml: int | None = None
    load_peak_gpu_allocated_bytes: int | None = None
    host_method: str = ""


@dataclass(frozen=True)
class AccuracyStats:
    """Quality on held-out text, and agreement with the unmodified model."""

    perplexity: float | None
    next_token_accuracy: float | None
    kl_vs_baseline: float | None
    top1_agreement_vs_baseline: float | None
    greedy_match_vs_baseline: float | None
    eval_tokens: int | None
    definition: str


@dataclass(frozen=True)
class RooflineStats:
    """Decode speed against the memory-bandwidth bound (every weight byte is read once per step), and which
    limit holds: launching the kernels, the device's bandwidth, or its compute."""

    bandwidth_bytes_per_s: float | None
    bytes_per_token: int | None
    decode_bound_tokens_per_s: float | None
    fraction_of_bound: float | None
    method: str = ""
    bound: str | None = None  # "bandwidth" | "launch" | "compute" | None (no bound): the limit that holds
    explanation: str = ""  # one sentence on the bound that holds and why, then how the bandwidth was probed
    uncertain: bool = False  # the probe ran while other processes were busy: the bound may be too low
    busy_share: float | None = None  # device (kernel) time per decode step / measured TPOT; None: unknown
    kernel_fraction_of_bound: float | None = None  # fraction_of_bound / busy_share: the kernels' share of it
    arithmetic_intensity: float | None = None  # FLOPs per byte read of one decode step
    ridge_flop_per_byte: float | None = None  # the device's peak FLOP/s / its read bandwidth
    peak_flops_per_s: float | None = None  # the probed peak of a large matmul in the run's dtype


@dataclass(frozen=True)
class TechniqueRecord:
    """One applied technique: its parameters, whether it only simulates, and what to know about it."""

    name: str
    kind: str
    params: dict[str, Any]
    simulated: bool
    notes: str = ""


@dataclass(frozen=True)
class RankInfo:
    """One process of a run: where it ran, how much of the batch it took, how busy it was."""

    rank: int
    device: str
    threads: int
    rows: int
    busy: float | None  # CPU seconds used / (wall seconds x threads) while measuring; GPU: NVML utilisation
    decode_tokens_per_s: float | None = None


@dataclass(frozen=True)
class ParallelInfo:
    """How the run was spread: one process, a device map, tensor-parallel or data-parallel ranks."""

    kind: str  # "single" | "split" | "tensor" | "data" | "pipeline"
    world_size: int
    backend: str | None
    placement: dict[str, str]  # module -> device (cpu, cuda:N, disk); empty when everything is on one device
    bytes_by_device: dict[str, int]
    ranks: tuple[RankInfo, ...]
    aggregate_decode_tokens_per_s: float | None = None


@dataclass(frozen=True)
class EnvInfo:
    """Where the run happened."""

    python: str
    torch: str
    transformers: str
    cpu: str
    threads: int
    gpu: str | None
    driver: str | None
    workbench_version: str
    git_commit: str | None
    platform: str = ""


@dataclass(frozen=True)
class RunResult:
    """Everything one run measured. `status` is ok, stopped (partial) or error.

    `sections` holds each tracker's dataclass by section name (`latency`, `memory`, `accuracy`, `roofline`,
    `energy`, ...; None where not measured); each is also an attribute (`result.latency`) and a top-level
    key of the JSON.
    """

    config: RunConfig
    model: ModelInfo | None
    techniques: tuple[TechniqueRecord, ...]
    env: EnvInfo | None
    sections: dict[str, Any] = field(default_factory=dict)
    warnings: tuple[str, ...] = ()
    status: str = "ok"
    error: str | None = None
    output_text: str = ""
    outputs: tuple[str, ...] = ()
    parallel: ParallelInfo | None = None
    started_at: str = ""
    duration_s: float = 0.0
    run_id: int | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        """Every registered section is present (None where not measured)."""
        object.__setattr__(self, "sections", {**{name: None for name in tracker.sections()}, **self.sections})

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_") or name == "sections" or name not in tracker.sections():
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        return self.__dict__.get("sections", {}).get(name)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict with the DESIGN.md keys (for JSON and the store): every section a top-level key."""
        data = to_dict(self)
        sections = data.pop("sections")
        head = {k: data.pop(k) for k in ("config", "model")}
        return {**head, **{name: sections.get(name) for name in tracker.sections()}, **data}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunResult:
        """Inverse of `to_dict` (a section a run stored before its tracker existed is None)."""
        data, known = dict(data), tracker.sections()
        sections = {name: from_dict(kind, data[name]) if data.get(name) is not None else None
                    for name, kind in known.items() if name in data}
        for name in known:
            data.pop(name, None)
        return replace(from_dict(cls, data), sections=sections)

    def to_json(self, **kwargs: Any) -> str:
        """One JSON object."""
        return json.dumps(self.to_dict(), **kwargs)

    def with_id(self, run_id: int) -> RunResult:
        """The same result carrying the store's row id."""
        return replace(self, run_id=run_id)
