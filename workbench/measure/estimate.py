"""The memory a run will need, estimated from the model's config before anything is allocated."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from workbench.report import human_bytes

_GIB = 1 << 30


@dataclass(frozen=True)
class LoadPath:
    """How the weights reach the device: a name ("bf16", "bf16 then bnb-nf4", "bnb-nf4 while loading"), the bytes
    they hold once loaded and changed, and the bytes held at the load's peak."""

    name: str
    weights: int
    load_peak: int
    quantized: str = ""  # "while loading" | "after loading" | "" (the weights load as they are)


@dataclass(frozen=True)
class RunEstimate:
    """Bytes a run needs at its peak, from the config alone (before anything is allocated).

    Loading peaks at `load_peak` (the float weights, when a quantization is applied after loading).
    Generation holds the weights, the KV cache of every row (prompt + new tokens), the prefill's largest
    activations (MLP and attention scores of one layer, fp32 worst case) and the last position's logits
    (the model's, generate's fp32 copy and the logits processors' copy: 3 x batch x vocab x 4 bytes).
    Evaluation comes after generation has freed its cache, so the larger of the two counts.
    """

    weights: int
    kv_cache: int
    activations: int
    logits: int
    evaluation: int
    batch: int
    tokens: int
    vocab: int
    path: str = ""
    load_peak: int = 0
    quantized: str = ""  # as in LoadPath

    @property
    def running(self) -> int:
        """The peak once loaded: weights plus the larger of generation and evaluation."""
        return self.weights + max(self.kv_cache + self.activations + self.logits, self.evaluation)

    @property
    def total(self) -> int:
        """The peak: loading's or running's, whichever is larger."""
        return max(self.load_peak, self.running)

    def describe(self, where: str) -> str:
        """The path and its peak, e.g. "bnb-nf4 while loading: 4.9 GiB peak on cuda:0"."""
        return f"{self.path or 'weights'}: {human_bytes(self.total)} peak on {where}"


def estimate_run(text_config: Any, *, params: int, dtype_bytes: int, kv_per_token: int, batch: int,
                 prompt_tokens: int, new_tokens: int, eval_batch_tokens: int, eager: bool = False,
                 path: LoadPath | None = None) -> RunEstimate:
    """A run's peak memory from its model config (hidden/intermediate size, heads, vocabulary) and workload.

    `eager` attention materialises one layer's (B, H, T, T) scores; sdpa's fused kernels do not. `path`
    (default: the weights loaded as they are, params x dtype_bytes) says what loading holds.
    """
    tokens = prompt_tokens + new_tokens
    width = max(text_config.hidden_size * 4, getattr(text_config, "intermediate_size", 0) or 0)
    heads = text_config.num_attention_heads
    mlp = batch * tokens * width * 4 * 3  # (B, T, I) fp32, three live at once (gate, up, activation)
    scores = batch * heads * prompt_tokens * prompt_tokens * 4 if eager else 0  # (B, H, T, T) of one layer
    vocab = text_config.vocab_size
    path = path or LoadPath("", params * dtype_bytes, params * dtype_bytes)
    return RunEstimate(weights=path.weights, kv_cache=kv_per_token * batch * tokens,
                       activations=mlp + scores, logits=3 * batch * vocab * 4,
                       evaluation=eval_batch_tokens * vocab * 4 * 3, batch=batch, tokens=tokens, vocab=vocab,
                       path=path.name, load_peak=path.load_peak, quantized=path.quantized)


def _advice(est: RunEstimate, available: int) -> str:
    """What to change, from which term does not fit."""
    if est.load_peak > 0.9 * available and est.running <= 0.9 * available:
        return ("loading holds the float weights before quantizing them: make the quantization the first technique "
                "so it is applied while loading, or use --device-map auto to offload layers")
    if est.weights <= 0.9 * available:
        return "lower --batch-size, the token counts, or the dtype"
    if est.quantized == "while loading":
        return ("even quantized the weights do not fit: use --device-map auto (with --max-memory) to offload layers "
                "to the CPU or disk, or a smaller model")
    return ("the weights alone do not fit: use a lower-precision dtype, a 4-bit quantization such as bnb-nf4 (applied "
            "while loading), a smaller model, or --device-map auto to offload layers to the CPU or disk")


def check_fits(est: RunEstimate, available: int, where: str) -> None:
    """Refuse (InsufficientMemory), with the numbers, a run whose estimate exceeds 90% of what is available."""
    from workbench.errors import InsufficientMemory

    if est.total <= 0.9 * available:
        return
    path = f" ({est.path})" if est.quantized else ""  # a plain load needs no name
    loading = (f"loading peaks at {est.load_peak / _GIB:.1f} GiB, " if est.load_peak > est.running else "")
    raise InsufficientMemory(
        f"this run{path} needs about {est.total / _GIB:.1f} GiB on {where} ({loading}weights {est.weights / _GIB:.1f} GiB, "
        f"KV cache {est.kv_cache / _GIB:.1f} GiB for batch {est.batch} x {est.tokens} tokens, activations "
        f"{est.activations / _GIB:.1f} GiB, logits {est.logits / _GIB:.1f} GiB for batch {est.batch} x vocabulary "
        f"{est.vocab} in fp32, evaluation {est.evaluation / _GIB:.1f} GiB) but only {available / _GIB:.1f} GiB is "
        f"free; {_advice(est, available)}")
