"""`sim`: simulated k-bit quantization (fake quant) of weights and optionally activations, for teaching.

q = clamp(round(x / scale) + zero_point, qmin, qmax), then x̂ = (q - zero_point) * scale.
Symmetric: zero_point = 0, range [-2^(b-1), 2^(b-1) - 1], scale = max|x| / (2^(b-1) - 1).
Asymmetric: range [0, 2^b - 1], scale = (max - min) / (2^b - 1), zero_point = round(-min / scale),
with min <= 0 <= max so that zero stays exactly representable.
The weights are replaced by their dequantized values: accuracy changes, speed does not.

Activations (the inputs of each Linear) are fake-quantized when `activations` is not `none`. Two choices are
independent and spelled out separately, so that a comparison changes one of them at a time:
* *when* the range is fixed: `static` calibrates it once on calibration text, before the model serves any input;
  `dynamic` computes it from each call's own input at run time;
* *over what* one range spans (`act_granularity`): `tensor`, one range for the whole input of a call (all rows of
  the batch and all positions), or `token`, one range per token's activation vector.
`static` with `token` is refused: a token's range is known only once its activations exist, so a range per token
is dynamic by definition; calibration could only give a range per *position index*, which no position-invariant
decoder layer has a reason to share between texts. (In decode one call holds one token per row, so per-tensor
dynamic then spans the batch's rows, and at batch 1 it equals per-token.)
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

from workbench.errors import ConfigError
from workbench.options import option
from workbench.techniques._calibration import calibration_batches
from workbench.techniques._targets import block_weights, weight_matrix
from workbench.techniques.base import ApplyContext, Expectation, TechniqueConfig, register, register_handler

logger = logging.getLogger(__name__)
GRANULARITIES = ("per-tensor", "per-channel", "per-group")
ACT_MODES = ("none", "dynamic", "static")
ACT_GRANULARITIES = ("tensor", "token")


def qrange(bits: int, symmetric: bool) -> tuple[int, int]:
    """Integer range of a b-bit code."""
    return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if symmetric else (0, 2 ** bits - 1)


def qparams(lo: torch.Tensor, hi: torch.Tensor, bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero_point) from observed min/max (broadcastable tensors)."""
    qmin, qmax = qrange(bits, symmetric)
    if symmetric:
        scale = torch.maximum(lo.abs(), hi.abs()) / qmax
        zero = torch.zeros_like(scale)
    else:
        lo, hi = lo.clamp(max=0), hi.clamp(min=0)
        scale = (hi - lo) / (qmax - qmin)
        zero = (qmin - lo / scale.clamp_min(1e-12)).round().clamp(qmin, qmax)
    return scale.clamp_min(1e-12), zero


def fake_quant(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, symmetric: bool) -> torch.Tensor:
    """Quantize then dequantize: the value the integer code stands for."""
    qmin, qmax = qrange(bits, symmetric)
    q = torch.clamp(torch.round(x / scale) + zero, qmin, qmax)
    return (q - zero) * scale


def quantize_weight(w: torch.Tensor, bits: int, symmetric: bool, granularity: str, group_size: int) -> torch.Tensor:
    """Fake-quantize a (out, in) weight per tensor, per output channel, or per group of inputs in each row."""
    x = w.detach().float()  # (out, in)
    if granularity == "per-tensor":
        return fake_quant(x, *qparams(x.min(), x.max(), bits, symmetric), bits, symmetric).to(w.dtype)
    if granularity == "per-channel":
        lo, hi = x.amin(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)  # (out, 1)
        return fake_quant(x, *qparams(lo, hi, bits, symmetric), bits, symmetric).to(w.dtype)
    out_f, in_f = x.shape
    pad = (-in_f) % group_size  # a last, shorter group gets its own range
    xp = torch.nn.functional.pad(x, (0, pad), value=float("nan")).view(out_f, -1, group_size)  # (out, G, g)
    lo = torch.nan_to_num(xp, nan=float("inf")).amin(dim=2, keepdim=True)  # (out, G, 1)
    hi = torch.nan_to_num(xp, nan=float("-inf")).amax(dim=2, keepdim=True)
    deq = fake_quant(torch.nan_to_num(xp), *qparams(lo, hi, bits, symmetric), bits, symmetric)
    return deq.view(out_f, -1)[:, :in_f].to(w.dtype)


def sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB: 10 log10(|x|^2 / |x - x̂|^2) (inf when exact)."""
    noise = (reference.float() - approx.float()).pow(2).sum().item()
    signal = reference.float().pow(2).sum().item()
    return math.inf if noise == 0 else 10 * math.log10(signal / noise)


@register
@dataclass(frozen=True)
class SimQuantConfig(TechniqueConfig):
    """Simulated k-bit quantization: accuracy of a bit width / granularity / range choice, without kernels."""

    name = "sim"
    kind = "quant"
    simulated = True
    needs_float_weights = True
    summary = "simulated k-bit quantization (fake quant): changes accuracy, not speed"
    expect = Expectation(max_kl=0.0008, min_kl=0.0001)  # 8-bit; tiny: KL 0.000309, perplexity 56.17 vs 56.11

    bits: int = option(8, "Bits per weight (2..8).", minimum=2, maximum=8)
    symmetric: bool = option(True, "Symmetric range around zero (zero point 0); false: asymmetric min..max.")
    granularity: str = option("per-channel", "One range per tensor, per output channel, or per group of inputs.",
                              choices=GRANULARITIES)
    group_size: int = option(128, "Inputs per group (granularity per-group).", minimum=2, maximum=65536)
    activations: str = option("none", "Also fake-quantize Linear inputs: none; dynamic (range computed from each "
                              "call's input at run time); static (range fixed once from calibration text).",
                              choices=ACT_MODES)
    act_granularity: str = option("tensor", "What one activation range spans: tensor (the whole input of a call, "
                                  "per layer) or token (each token's vector; dynamic only — a calibrated range per "
                                  "token does not exist).", choices=ACT_GRANULARITIES)
    activation_bits: int = option(8, "Bits per activation (activations dynamic/static).", minimum=2, maximum=16)
    calibration_tokens: int = option(2048, "Calibration tokens for static activation ranges.", minimum=16,
                                     maximum=1_000_000)
    include_lm_head: bool = option(False, "Also quantize the output projection (tied to the embeddings in many models).")

    def validate(self) -> None:
        """A static range is calibrated once, so it cannot follow each token."""
        if self.activations == "static" and self.act_granularity == "token":
            raise ValueError("act_granularity=token needs activations=dynamic: a static range is calibrated once, "
                             "before any token is seen, so a range per token does not exist (use "
                             "act_granularity=tensor)")

    def notes(self) -> str:
        """What the numbers mean."""
        act = "" if self.activations == "none" else (
            f"; activations {self.activation_bits}-bit {self.activations}, one range per {self.act_granularity} "
            "(hooks add run-time overhead)")
        return (f"simulated: weights rounded to {self.bits}-bit {'symmetric' if self.symmetric else 'asymmetric'} "
                f"{self.granularity} codes and stored back as floats{act} — accuracy changes, speed and memory do not")


class _ActivationQuant:
    """Forward pre-hook: fake-quantize a Linear's input with a fixed range (static) or one computed from this call's
    input (dynamic), per token or over the whole tensor."""

    def __init__(self, bits: int, symmetric: bool, fixed: tuple[torch.Tensor, torch.Tensor] | None = None,
                 per_token: bool = False) -> None:
        self.bits, self.symmetric, self.fixed, self.per_token = bits, symmetric, fixed, per_token

    def __call__(self, module: torch.nn.Module, args: tuple) -> tuple:
        x = args[0]  # (B, T, in)
        if self.fixed is None and self.per_token:
            scale, zero = qparams(x.amin(-1, keepdim=True), x.amax(-1, keepdim=True), self.bits, self.symmetric)
        elif self.fixed is None:  # one range over every row and position of this call
            scale, zero = qparams(x.amin(), x.amax(), self.bits, self.symmetric)
        else:
            scale, zero = self.fixed
        return (fake_quant(x, scale.to(x.dtype), zero.to(x.dtype), self.bits, self.symmetric), *args[1:])


@torch.inference_mode()
def _calibrate_ranges(ctx: ApplyContext, layers: list[tuple[str, torch.nn.Module]],
                      tokens: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Min/max of every layer's input over the calibration text."""
    ranges: dict[str, list[torch.Tensor]] = {}

    def observer(name: str):
        def hook(module: torch.nn.Module, args: tuple) -> None:
            lo, hi = args[0].min().float(), args[0].max().float()
            old = ranges.get(name)
            ranges[name] = [lo, hi] if old is None else [torch.minimum(old[0], lo), torch.maximum(old[1], hi)]
        return hook

    handles = [m.register_forward_pre_hook(observer(n)) for n, m in layers]
    try:
        batches = calibration_batches(ctx, tokens)
        for i, ids in enumerate(batches):
            ctx.model(input_ids=ids, use_cache=False)
            ctx.on_progress("calibrating activation ranges", (i + 1) / len(batches) / 2)
    finally:
        for h in handles:
            h.remove()
    return {n: (lo, hi) for n, (lo, hi) in ranges.items()}


@register_handler(SimQuantConfig)
def apply_sim(config: SimQuantConfig, ctx: ApplyContext) -> None:
    """Round every block Linear's weight to the configured grid; add activation hooks if asked."""
    layers = block_weights(ctx.model, config.include_lm_head)
    if not layers:
        raise ConfigError(f"sim found no Linear layers to quantize in {type(ctx.model).__name__}")
    fixed = _calibrate_ranges(ctx, layers, config.calibration_tokens) if config.activations == "static" else {}
    sqnrs = []
    with torch.no_grad():
        for i, (name, layer) in enumerate(layers):
            w = weight_matrix(layer)  # (out, in)
            q = quantize_weight(w, config.bits, config.symmetric, config.granularity, config.group_size)
            sqnrs.append(sqnr_db(w, q))
            w.copy_(q)
            if config.activations != "none":
                rng = fixed.get(name)
                params = qparams(*rng, config.activation_bits, config.symmetric) if rng else None
                if config.activations == "dynamic" or params is not None:
                    layer.register_forward_pre_hook(_ActivationQuant(config.activation_bits, config.symmetric, params,
                                                                     config.act_granularity == "token"))
            ctx.on_progress(f"quantized {name}", 0.5 + 0.5 * (i + 1) / len(layers))
    finite = [s for s in sqnrs if math.isfinite(s)]
    ctx.notes.append(f"{len(layers)} Linear layers; weight SQNR mean {sum(finite) / max(1, len(finite)):.1f} dB, "
                     f"worst {min(finite, default=math.inf):.1f} dB")
