"""`w4a16`: 4-bit weights in groups, bf16 activations, on PyTorch's own CPU int4 kernel.

Each Linear's weight is cut into groups of `group_size` inputs per output row; each group keeps 4-bit codes
0..15 with a scale and a zero point (asymmetric round-to-nearest: min and max of the group map to 0 and 15),
packed two codes per byte by `aten._convert_weight_to_int4pack_for_cpu`. Every call runs
`aten._weight_int4pack_mm_for_cpu`, which unpacks the codes in registers and multiplies them by bf16
activations (the kernel is vectorized for bf16 only: with fp32 activations it runs about 40 times slower, so
inputs are rounded to bf16 and outputs converted back). It is gpt-fast's int4 weight-only recipe on the CPU
kernel; every step is an aten operator, so `torch.compile` takes the whole decode step as one graph.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from workbench.options import option
from workbench.techniques._targets import lm_head_help, swap_linears
from workbench.techniques.base import ApplyContext, Expectation, TechniqueConfig, register, register_handler

logger = logging.getLogger(__name__)
GROUP_SIZES = (32, 64, 128, 256)
ROWS_MULTIPLE = 16  # the packing takes out_features in multiples of 16: other layers get zero rows, sliced off
TINY = torch.finfo(torch.float32).tiny  # a constant group gets this scale, not a division by zero


def group_codes(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes (out, in) int32 in 0..15, scale (out, in / g), zero (out, in / g)) with, per group,
    weight ≈ (codes - 8) * scale + zero: the kernel's convention (tinygemm's)."""
    out_f, in_f = weight.shape
    groups = weight.detach().float().reshape(out_f, in_f // group_size, group_size)  # (out, in/g, g)
    lo, hi = groups.amin(dim=-1), groups.amax(dim=-1)  # (out, in/g)
    scale = ((hi - lo) / 15).clamp(min=TINY)  # (out, in/g)
    codes = torch.round((groups - lo[..., None]) / scale[..., None]).clamp(0, 15).to(torch.int32)  # (out, in/g, g)
    return codes.reshape(out_f, in_f), scale, lo + 8 * scale


class W4A16Linear(torch.nn.Module):
    """y = x_bf16 @ ((codes - 8) * scale + zero).T + b, per group of `group_size` inputs."""

    def __init__(self, linear: torch.nn.Linear, group_size: int) -> None:
        super().__init__()
        out_f, in_f = linear.out_features, linear.in_features
        rows = -(-out_f // ROWS_MULTIPLE) * ROWS_MULTIPLE
        weight = torch.nn.functional.pad(linear.weight.detach().float(), (0, 0, 0, rows - out_f))  # (rows, in)
        codes, scale, zero = group_codes(weight, group_size)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)  # (rows, in / 2) uint8
        self.register_buffer("packed", packed)
        self.register_buffer("scales_and_zeros",
                             torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16))
        # (in / g, rows, 2)
        self.bias = None if linear.bias is None else torch.nn.Parameter(linear.bias.detach(), requires_grad=False)
        self.in_features, self.out_features, self.group_size = in_f, out_f, group_size
        self._workbench_param_count = out_f * in_f  # the codes are a buffer: parameters() does not see them

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., in) -> (..., out), in x's dtype."""
        rows = x.reshape(-1, self.in_features).to(torch.bfloat16)  # (N, in)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(rows, self.packed, self.group_size,
                                                        self.scales_and_zeros)  # (N, rows)
        y = y[:, :self.out_features].to(x.dtype).reshape(*x.shape[:-1], self.out_features)  # (..., out)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        """Shapes and the group size."""
        return f"in_features={self.in_features}, out_features={self.out_features}, 4-bit, group_size={self.group_size}"


@register
@dataclass(frozen=True)
class W4A16Config(TechniqueConfig):
    """4-bit grouped weights, bf16 activations, PyTorch's CPU int4 kernel: compiles with the whole model."""

    name = "w4a16"
    kind = "quant"
    simulated = False
    packs_weights = True
    summary = "4-bit weights in groups with bf16 activations on PyTorch's CPU int4 kernel; compiles in one graph (CPU)"
    expect = Expectation(max_kl=0.1, min_kl=0.01)  # tiny: KL 0.0398, perplexity 57.01 vs 56.11

    group_size: int = option(32, "Inputs per quantization group (smaller: more accurate, more scales).",
                             choices=GROUP_SIZES)
    lm_head: bool = option(True, lm_head_help("4-bit"))

    @classmethod
    def unavailable(cls, device: torch.device) -> str | None:
        """CPU only (the kernel is `aten._weight_int4pack_mm_for_cpu`)."""
        if device.type != "cpu":
            return ("w4a16 runs PyTorch's CPU int4 kernel; on a CUDA GPU use torchao-int4-weight (tinygemm) "
                    "with compile")
        if not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):
            return f"this PyTorch ({torch.__version__}) has no CPU int4 kernel (_weight_int4pack_mm_for_cpu)"
        return None

    def packed_bytes(self, out_features: int, in_features: int) -> int:
        """Half a byte per weight (rows padded to 16) plus a bf16 scale and zero point per group."""
        rows = -(-out_features // ROWS_MULTIPLE) * ROWS_MULTIPLE
        return rows * in_features // 2 + rows * (in_features // self.group_size) * 4

    def notes(self) -> str:
        """What the numbers mean."""
        return (f"w4a16: 4-bit weights in groups of {self.group_size} inputs with a bf16 scale and zero point each "
                "(asymmetric round-to-nearest), bf16 activations; a layer whose in_features the group size does "
                "not divide stays float" + ("; the output projection too" if self.lm_head else ""))


@register_handler(W4A16Config)
def apply_w4a16(config: W4A16Config, ctx: ApplyContext) -> None:
    """Swap every block Linear whose in_features the group size divides (and the head, if asked), in place."""
    def make(linear: torch.nn.Linear) -> W4A16Linear | None:
        return W4A16Linear(linear, config.group_size) if linear.in_features % config.group_size == 0 else None

    head = swap_linears(ctx.model, config.name, ctx.notes, config.lm_head, make, ctx.on_progress)
    count = sum(isinstance(m, W4A16Linear) for m in ctx.model.modules())
    ctx.notes.append(f"{count} Linear layers quantized to 4-bit weights in groups of {config.group_size} ({head}; "
                     f"embeddings kept in {ctx.dtype})")
