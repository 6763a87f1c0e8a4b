"""`static-int8`: int8 weights and int8 activations whose ranges are calibrated once, on a real int8 CPU kernel.

Each block Linear becomes a `StaticInt8Linear`: its input is quantized with a scale and zero point fixed
from calibration text (`torch.quantize_per_tensor`, one range per layer), multiplied by the int8 per-channel
weight in PyTorch's quantized CPU engine (fbgemm / oneDNN, `torch.ao.nn.quantized.Linear`, int8 x int8 ->
int32), requantized to int8 with a calibrated output range, and dequantized to fp32 for the next float op.
Nothing about the ranges is computed at run time: that is what makes it static, and what `dynamic-int8`
(same engine, same weights, a range measured from every call's input) does not do. Activations use 7 bits
(`reduce_range`, codes 0..127) as both of PyTorch's x86 qconfigs do, so that AVX2 CPUs without VNNI cannot
overflow the 16-bit intermediate sums, and so that the comparison with `dynamic-int8` changes one thing only.

Why a module swap and not PT2E: `torchao.quantization.pt2e` (prepare_pt2e / convert_pt2e with the
X86InductorQuantizer, lowered by inductor) quantizes a graph captured with `torch.export`. The workbench decodes
with transformers' `generate` over a KV cache that grows every step, evaluates with the same live model, and
compiles (when asked) the live model's decode step with torch.compile (workbench/engines/hf_compile.py): an
exported graph fixes the cache's structure and sequence shapes, so it could serve neither the evaluation nor
the generate loop without a second decoder implementation. Swapping the Linears keeps a normal transformers
model that every path of the runner already handles; attention and the norms stay fp32, as in PT2E's x86 recipe
for decoders, which quantizes Linears (and convolutions) only.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from workbench.options import option
from workbench.techniques._calibration import calibration_batches
from workbench.techniques._targets import require_linears
from workbench.techniques.base import ApplyContext, Expectation, TechniqueConfig, register, register_handler
from workbench.techniques.dynamic_int8 import DynamicInt8Config, _quiet_deprecation

logger = logging.getLogger(__name__)
OBSERVERS = ("minmax", "histogram")


@register
@dataclass(frozen=True)
class StaticInt8Config(TechniqueConfig):
    """Static int8: activation ranges calibrated once; int8 x int8 matmul in PyTorch's quantized CPU engine."""

    name = "static-int8"
    kind = "quant"
    simulated = False
    packs_weights = True
    summary = "static int8: int8 weights, activations quantized with ranges calibrated once, CPU int8 kernels"
    expect = Expectation(max_kl=0.12, min_kl=0.015)  # tiny: KL 0.0431, perplexity 56.78 vs 56.11 (histogram: 0.0243)

    calibration_tokens: int = option(1024, "Calibration tokens (reference corpus, training split) from which each "
                                     "layer's input and output ranges are fixed.", minimum=128, maximum=1_000_000)
    observer: str = option("minmax", "How a range is chosen from the calibration activations: minmax (every value "
                           "observed fits, outliers widen it) or histogram (the range that minimizes the "
                           "quantization error over the observed histogram; clips rare outliers).",
                           choices=OBSERVERS)

    @classmethod
    def unavailable(cls, device: torch.device) -> str | None:
        """The same engine as dynamic-int8: CPU only, with a quantized engine compiled in."""
        return DynamicInt8Config.unavailable(device)

    def conflicts_with(self, earlier: TechniqueConfig | None, dtype: str) -> str | None:
        """PyTorch's quantized Linear takes and returns fp32 only."""
        if earlier is None and dtype != "fp32":
            return f"PyTorch static int8 works on fp32 models only; use --dtype fp32 (got {dtype})"
        return None

    def notes(self) -> str:
        """What the numbers mean."""
        return (f"static int8 ({self.observer} ranges from {self.calibration_tokens} calibration tokens): int8 "
                "per-channel weights; each Linear's input is quantized with one range fixed at calibration (7 "
                "bits, as fbgemm requires on CPUs without VNNI) and its output requantized with another — no "
                "range is measured at run time; the matmul is the quantized engine's int8 kernel")


class StaticInt8Linear(torch.nn.Module):
    """fp32 in, fp32 out: quantize with the calibrated input range, int8 Linear, dequantize."""

    def __init__(self, linear: torch.nn.Linear, act_in: torch.nn.Module, act_out: torch.nn.Module) -> None:
        super().__init__()
        from torch.ao import quantization as tq
        from torch.ao.nn import quantized as nnq

        weight_observer = tq.default_per_channel_weight_observer()  # symmetric int8, one scale per output row
        weight_observer(linear.weight.detach())
        w_scale, w_zero = weight_observer.calculate_qparams()
        w_q = torch.quantize_per_channel(linear.weight.detach(), w_scale.float(), w_zero.long(), 0, torch.qint8)
        in_scale, in_zero = act_in.calculate_qparams()
        out_scale, out_zero = act_out.calculate_qparams()
        self.in_scale, self.in_zero = float(in_scale), int(in_zero)
        self.qlinear = nnq.Linear(linear.in_features, linear.out_features, dtype=torch.qint8)
        self.qlinear.set_weight_bias(w_q, None if linear.bias is None else linear.bias.detach())
        self.qlinear.scale, self.qlinear.zero_point = float(out_scale), int(out_zero)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self._workbench_param_count = linear.weight.numel() + (0 if linear.bias is None else linear.bias.numel())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., in) fp32 -> (..., out) fp32 through int8 codes with fixed scales."""
        x_q = torch.quantize_per_tensor(x.contiguous(), self.in_scale, self.in_zero, torch.quint8)  # (..., in)
        return self.qlinear(x_q).dequantize()  # (..., out)

    def extra_repr(self) -> str:
        """Shapes and the fixed input range."""
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"input scale={self.in_scale:.4g}, zero point={self.in_zero}")


def _observer_factory(kind: str) -> Callable[[int], torch.nn.Module]:
    """A new per-tensor affine quint8 observer of the chosen kind, for codes 0..qmax."""
    from torch.ao.quantization.observer import HistogramObserver, MinMaxObserver

    cls = MinMaxObserver if kind == "minmax" else HistogramObserver
    return lambda qmax: cls(dtype=torch.quint8, qscheme=torch.per_tensor_affine, quant_min=0, quant_max=qmax)


@torch.inference_mode()
def _calibrate(config: StaticInt8Config, ctx: ApplyContext,
               layers: list[tuple[str, torch.nn.Linear]]) -> dict[str, tuple[torch.nn.Module, torch.nn.Module]]:
    """Run the calibration text through the model and observe every layer's input and output."""
    make = _observer_factory(config.observer)
    observers = {name: (make(127), make(255)) for name, _ in layers}  # input: 7 bits; output: 8 bits

    def hook(name: str) -> Callable:
        def observe(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> None:
            observers[name][0](args[0].detach().float())
            observers[name][1](output.detach().float())
        return observe

    handles = [layer.register_forward_hook(hook(name)) for name, layer in layers]
    try:
        batches = calibration_batches(ctx, config.calibration_tokens)
        for i, ids in enumerate(batches):
            ctx.model(input_ids=ids, use_cache=False)
            ctx.on_progress("calibrating activation ranges", 0.8 * (i + 1) / len(batches))
    finally:
        for handle in handles:
            handle.remove()
    return observers


@register_handler(StaticInt8Config)
def apply_static_int8(config: StaticInt8Config, ctx: ApplyContext) -> None:
    """Calibrate, then swap every block Linear for a StaticInt8Linear (in place)."""
    layers = require_linears(ctx.model, config.name, ctx.notes)
    observers = _calibrate(config, ctx, layers)
    with _quiet_deprecation():
        for i, (name, layer) in enumerate(layers):
            ctx.model.set_submodule(name, StaticInt8Linear(layer, *observers[name]))
            ctx.on_progress(f"quantized {name}", 0.8 + 0.2 * (i + 1) / len(layers))
        first = ctx.model.get_submodule(layers[0][0])
        with torch.inference_mode():  # PyTorch warns once per process that quantized tensors are deprecated
            first(torch.zeros(1, first.in_features, device=ctx.device))
    ctx.notes.append(f"{len(layers)} Linear layers quantized statically (output projection and embeddings kept in "
                     f"fp32); quantized engine {torch.backends.quantized.engine}")
