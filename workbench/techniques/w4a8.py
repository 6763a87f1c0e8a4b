"""`w4a8`: 4-bit weights times 8-bit activations with integer dot products, on the workbench's own CPU kernel.

llama.cpp's recipe for CPU decoding, as a PyTorch operator. Each Linear's weight is cut into blocks of 32 inputs
per output row; a block keeps 32 codes 0..15 (asymmetric: its minimum and maximum map to 0 and 15) with an fp16
scale and minimum, 0.625 bytes per weight. Every call quantizes its input in blocks of 32 to int8 and multiplies
codes by int8 activations with integer instructions (AVX2 `maddubs`), 32 weights in a handful of instructions,
where `w4a16` converts every weight to bf16 first. The kernel is C (`workbench/native/q4q8.c`), built with the
system C compiler at first use; it is called as `torch.ops.workbench.q4q8_linear`, so `torch.compile` keeps the
whole decode step in one graph.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from workbench import native
from workbench.options import option
from workbench.techniques._targets import lm_head_help, swap_linears
from workbench.techniques.base import ApplyContext, Expectation, TechniqueConfig, register, register_handler

logger = logging.getLogger(__name__)
BLOCK = native.BLOCK
FP16_MAX = torch.finfo(torch.float16).max  # scales and minimums are fp16: a larger weight stays float


def block_codes(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(packed codes (out, in / 2) uint8, fp16 scales (out, in / 32), fp16 minimums (out, in / 32)) with, per
    block of 32 inputs, weight ≈ code * scale + minimum; byte j of a block holds code j (low nibble) and j + 16."""
    out_f, in_f = weight.shape
    blocks = weight.detach().float().reshape(out_f, in_f // BLOCK, BLOCK)  # (out, in/32, 32)
    lo, hi = blocks.amin(dim=-1), blocks.amax(dim=-1)  # (out, in/32)
    scale, low = ((hi - lo) / 15).half(), lo.half()  # rounded first, so the codes fit the stored numbers
    step = scale.float().clamp(min=torch.finfo(torch.float16).tiny)[..., None]  # a constant block: codes 0
    codes = torch.round((blocks - low.float()[..., None]) / step).clamp(0, 15).to(torch.uint8)  # (out, in/32, 32)
    packed = codes[..., :BLOCK // 2] | (codes[..., BLOCK // 2:] << 4)  # (out, in/32, 16)
    return packed.reshape(out_f, in_f // 2).contiguous(), scale.contiguous(), low.contiguous()


def dequantize(packed: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor) -> torch.Tensor:
    """The (out, in) float32 weight the codes stand for (what the kernel multiplies by)."""
    out_f = packed.shape[0]
    pairs = packed.reshape(out_f, -1, BLOCK // 2)  # (out, in/32, 16)
    codes = torch.cat([pairs & 0x0F, pairs >> 4], dim=-1).float()  # (out, in/32, 32)
    return (codes * scales.float()[..., None] + mins.float()[..., None]).reshape(out_f, -1)  # (out, in)


class W4A8Linear(torch.nn.Module):
    """y = q8(x) · (codes * scale + minimum) + b, blocks of 32 inputs, on `torch.ops.workbench.q4q8_linear`."""

    def __init__(self, linear: torch.nn.Linear) -> None:
        super().__init__()
        packed, scales, mins = block_codes(linear.weight)
        self.register_buffer("packed", packed)  # (out, in / 2) uint8
        self.register_buffer("scales", scales)  # (out, in / 32) fp16
        self.register_buffer("mins", mins)  # (out, in / 32) fp16
        self.bias = None if linear.bias is None else torch.nn.Parameter(linear.bias.detach(), requires_grad=False)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self._workbench_param_count = linear.out_features * linear.in_features  # buffers: parameters() misses them

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., in) -> (..., out), in x's dtype."""
        rows = x.reshape(-1, self.in_features).float()  # (N, in)
        y = torch.ops.workbench.q4q8_linear(rows, self.packed, self.scales, self.mins)  # (N, out) float32
        y = y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)  # (..., out)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        """Shapes."""
        return f"in_features={self.in_features}, out_features={self.out_features}, 4-bit x int8, blocks of {BLOCK}"


@register
@dataclass(frozen=True)
class W4A8Config(TechniqueConfig):
    """4-bit weights, int8 activations, integer dot products on the workbench's CPU kernel (llama.cpp's recipe)."""

    name = "w4a8"
    kind = "quant"
    simulated = False
    packs_weights = True
    summary = ("4-bit weights times int8 activations with integer dot products (llama.cpp's CPU recipe) on the "
               "workbench's own kernel; compiles in one graph (CPU)")
    expect = Expectation(max_kl=0.1, min_kl=0.01)  # tiny: KL 0.0403, perplexity 56.81 vs 56.11 (w4a16: 0.0398)

    lm_head: bool = option(True, lm_head_help("4-bit"))

    @classmethod
    def unavailable(cls, device: torch.device) -> str | None:
        """CPU only, and a C compiler to build the kernel."""
        if device.type != "cpu":
            return "w4a8 runs the workbench's CPU kernel; on a CUDA GPU use torchao-int4-weight with compile"
        return native.unavailable()

    def speed_warning(self, device_type: str, batch: int, compiled: bool) -> str | None:
        """Slower than float where the CPU lacks AVX2 + FMA + F16C (the kernel runs portable C)."""
        if device_type == "cpu" and not native.cpu_vector_flags():
            return ("the w4a8 kernel runs its portable C loop here (no AVX2, FMA or F16C, or "
                    f"{native.PORTABLE_ENV}=1), slower than the float model's matmuls: use w4a16 or dynamic-int8")
        return None

    def packed_bytes(self, out_features: int, in_features: int) -> int:
        """Half a byte per weight plus an fp16 scale and minimum per block of 32."""
        return out_features * in_features // 2 + out_features * (in_features // BLOCK) * 4

    def notes(self) -> str:
        """What the numbers mean."""
        return ("w4a8: 4-bit weights in blocks of 32 inputs with an fp16 scale and minimum each (asymmetric "
                "round-to-nearest); every call quantizes the activations to int8 in blocks of 32 and sums codes "
                "times activations in integers; a layer whose in_features 32 does not divide, or with a weight "
                "beyond fp16's range, stays float"
                + ("; the output projection too" if self.lm_head else ""))


@register_handler(W4A8Config)
def apply_w4a8(config: W4A8Config, ctx: ApplyContext) -> None:
    """Build the kernel, then swap every block Linear whose in_features fits it (and the head, if asked)."""
    native.library()  # a build failure stops here, before any layer changes
    widest = native.max_in_features()

    def make(linear: torch.nn.Linear) -> W4A8Linear | None:
        fits = linear.in_features % BLOCK == 0 and linear.in_features <= widest
        return W4A8Linear(linear) if fits and float(linear.weight.detach().abs().max()) <= FP16_MAX else None

    head = swap_linears(ctx.model, config.name, ctx.notes, config.lm_head, make, ctx.on_progress)
    count = sum(isinstance(m, W4A8Linear) for m in ctx.model.modules())
    kernel = "AVX2" if native.vectorized() else "portable C"
    ctx.notes.append(f"{count} Linear layers quantized to 4-bit weights times int8 activations in blocks of {BLOCK} "
                     f"({head}; embeddings kept in {ctx.dtype}; kernel: {kernel})")
