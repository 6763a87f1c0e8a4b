"""`w8a8`: int8 weights and int8 activations on `torch._int_mm`, so the whole decode step compiles as one graph.

Each Linear keeps int8 codes with one scale per output row; every call quantizes its input per token
(symmetric, 8 bits, the range measured on the fly), multiplies int8 by int8 into int32 with `torch._int_mm`
(oneDNN's s8 x s8 GEMM: fast with AVX-512 VNNI or AVX-VNNI, slower than fp32 without them, and the run then
says so), and scales the result back. It is what `dynamic-int8` does, with two differences that matter: every
step is a plain aten operator, so `torch.compile` takes the whole decode step as one graph (fbgemm's packed
modules split it), and each token gets its own 8-bit activation range instead of one 7-bit range per tensor.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from workbench.execution import cpu_flags
from workbench.options import option
from workbench.techniques._targets import lm_head_help, swap_linears
from workbench.techniques.base import ApplyContext, Expectation, TechniqueConfig, register, register_handler

logger = logging.getLogger(__name__)
QMAX = 127  # symmetric codes in [-127, 127]: zero is exact and the range is the same on both sides
TINY = torch.finfo(torch.float32).tiny  # an all-zero row or input gets this scale, not a division by zero


def row_codes(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 codes (out, in), float32 scale (out,)) with weight ≈ codes * scale[:, None]."""
    w = weight.detach().float()  # (out, in)
    scale = w.abs().amax(dim=1).clamp(min=TINY) / QMAX  # (out,)
    codes = torch.round(w / scale[:, None]).clamp(-QMAX, QMAX).to(torch.int8)  # (out, in)
    return codes.contiguous(), scale


class W8A8Linear(torch.nn.Module):
    """y = (round(x / sx) @ codes.T) * sx * scale + b, with sx = max|x| / 127 per token."""

    def __init__(self, linear: torch.nn.Linear) -> None:
        super().__init__()
        codes, scale = row_codes(linear.weight)
        self.register_buffer("codes", codes)  # (out, in) int8
        self.register_buffer("scale", scale)  # (out,) float32
        self.bias = None if linear.bias is None else torch.nn.Parameter(linear.bias.detach(), requires_grad=False)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self._workbench_param_count = codes.numel()  # the codes are a buffer: parameters() does not see them

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., in) -> (..., out), in x's dtype."""
        rows = x.reshape(-1, self.in_features).float()  # (N, in)
        sx = rows.abs().amax(dim=1, keepdim=True).clamp(min=TINY) / QMAX  # (N, 1)
        xq = torch.round(rows / sx).clamp(-QMAX, QMAX).to(torch.int8)  # (N, in)
        acc = torch._int_mm(xq, self.codes.t())  # (N, out) int32
        y = (acc.float() * sx * self.scale).to(x.dtype).reshape(*x.shape[:-1], self.out_features)  # (..., out)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        """Shapes."""
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 codes, per-row scales"


@register
@dataclass(frozen=True)
class W8A8Config(TechniqueConfig):
    """int8 weights per row, int8 activations per token, `torch._int_mm`: compiles with the whole model."""

    name = "w8a8"
    kind = "quant"
    simulated = False
    packs_weights = True
    summary = "int8 weights (per row) and activations (per token) on torch._int_mm; compiles in one graph (CPU)"
    expect = Expectation(max_kl=0.006, min_kl=0.0005)  # tiny: KL 0.00244, perplexity 56.26 vs 56.11

    lm_head: bool = option(True, lm_head_help("int8"))

    @classmethod
    def unavailable(cls, device: torch.device) -> str | None:
        """CPU only: on CUDA `torch._int_mm` needs more than 16 rows, so batch-1 decoding cannot use it."""
        if device.type != "cpu":
            return ("w8a8 runs torch._int_mm on the CPU; on CUDA that kernel needs more than 16 rows, so batch-1 "
                    "decoding cannot use it (use torchao-int8-weight with compile there)")
        return None

    def speed_warning(self, device_type: str, batch: int, compiled: bool) -> str | None:
        """Slower than float on an x86 CPU without VNNI, where `torch._int_mm` has no fast int8 path."""
        flags = cpu_flags()
        if device_type == "cpu" and "avx2" in flags and not flags & {"avx512_vnni", "avx_vnni"}:
            return ("this CPU has no VNNI int8 dot-product instructions (AVX-512 VNNI or AVX-VNNI), and there "
                    "torch._int_mm multiplies int8 matrices slower than the fp32 matmul: use w4a8 or dynamic-int8")
        return None

    def packed_bytes(self, out_features: int, in_features: int) -> int:
        """int8 codes plus a float32 scale per output row."""
        return out_features * in_features + 4 * out_features

    def notes(self) -> str:
        """What the numbers mean."""
        return ("w8a8: 1 byte per weight plus a float32 scale per row; every call quantizes the activations to "
                "8 bits with one range per token and multiplies int8 by int8 (torch._int_mm, int32 sums)"
                + ("; the output projection too" if self.lm_head else ""))


@register_handler(W8A8Config)
def apply_w8a8(config: W8A8Config, ctx: ApplyContext) -> None:
    """Swap every block Linear (and the output projection, if asked) for a W8A8Linear, in place."""
    head = swap_linears(ctx.model, config.name, ctx.notes, config.lm_head, W8A8Linear, ctx.on_progress)
    count = sum(isinstance(m, W8A8Linear) for m in ctx.model.modules())
    ctx.notes.append(f"{count} Linear layers quantized to int8 weights and per-token int8 activations ({head}; "
                     f"embeddings kept in {ctx.dtype})")
