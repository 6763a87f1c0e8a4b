"""Decode-time techniques: speculative decoding (draft acceptance, forwards per token) and the quantized KV cache.

Both sections come from the `hf` engine's counters (`engines.hf_speculative`, `engines.hf_kvquant`): the engine
runs the model, the counters (forward hooks) and the cache's own storage say what happened.
"""

from __future__ import annotations

from dataclasses import dataclass

from workbench.measure.tracker import Axis, Column, Tracker, register
from workbench.report import human_bytes, num


@dataclass(frozen=True)
class SpeculativeStats:
    """One measured assisted-generation call: how many draft tokens the model accepted, and its forwards.

    acceptance_rate = accepted draft tokens / proposed draft tokens; tokens_per_target_forward = new tokens /
    forwards of the model (1 without a draft; at most draft_tokens + 1). Proposed tokens are the draft's forwards
    (one token each); accepted = new tokens - the model's forwards (each forward adds one token of its own).
    """

    draft_model: str
    draft_tokens: int
    acceptance_rate: float | None
    tokens_per_target_forward: float | None
    target_forwards: int
    draft_forwards: int
    new_tokens: int
    draft_params: int = 0
    draft_weight_bytes: int = 0
    matches_target_greedy: bool | None = None  # the output equals the model's own greedy output (checked once)


@dataclass(frozen=True)
class KVQuantStats:
    """A quantized KV cache: its backend and bits, its real bytes against the same cache unquantized."""

    backend: str
    bits: int
    residual_length: int
    group_size: int
    kv_cache_bytes: int | None
    unquantized_bytes: int | None  # the same positions in the run's dtype
    kl_method: str


@register
class SpeculativeTracker(Tracker):
    """The `speculative` section: draft acceptance and forwards (None without a draft model)."""

    section, stats, ready_after, order = "speculative", SpeculativeStats, "evaluate", 60
    axes = (Axis("acceptance_rate", "draft acceptance", "", "higher", lambda s: s.acceptance_rate),)
    columns = (Column("acceptance_rate", "REAL", lambda s: s.acceptance_rate),)

    def finish(self) -> SpeculativeStats | None:
        speculation = getattr(self.run.engine, "speculation", None)
        return speculation.stats() if speculation is not None else None

    @classmethod
    def rows(cls, s: SpeculativeStats) -> list[tuple[str, str]]:
        match = {True: "yes", False: "NO", None: "not checked"}[s.matches_target_greedy]
        return [("draft", f"{s.draft_model} ({human_bytes(s.draft_weight_bytes)}), {s.draft_tokens} tokens/step"),
                ("draft acceptance", num(s.acceptance_rate, ".1%")),
                ("tokens per forward of the model", num(s.tokens_per_target_forward, ".2f")),
                ("forwards: model / draft", f"{s.target_forwards} / {s.draft_forwards}"),
                ("output = model's own greedy output", match)]


@register
class KVQuantTracker(Tracker):
    """The `kv_quant` section: the quantized cache's settings and real bytes (None with an unquantized cache)."""

    section, stats, ready_after, order = "kv_quant", KVQuantStats, "evaluate", 61

    def finish(self) -> KVQuantStats | None:
        kv = getattr(self.run.engine, "kv_quant", None)
        return kv.stats(self.run.calls.kv_bytes) if kv is not None else None

    @classmethod
    def rows(cls, s: KVQuantStats) -> list[tuple[str, str]]:
        ratio = (f" ({s.kv_cache_bytes / s.unquantized_bytes:.0%} of unquantized)"
                 if s.kv_cache_bytes and s.unquantized_bytes else "")
        return [("KV cache quantization", f"{s.backend} {s.bits}-bit, groups of {s.group_size}, newest "
                                          f"{s.residual_length} positions unquantized"),
                ("KV cache bytes", human_bytes(s.kv_cache_bytes) + ratio)]
