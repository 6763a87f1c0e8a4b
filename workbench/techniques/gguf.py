"""`gguf`: llama.cpp's block quantization, applied by llama.cpp's own quantizer to the exported GGUF file.

Only the llamacpp engine runs it: the model (after any PyTorch pruning) is written as a GGUF file, which
`llama_model_quantize` turns into the chosen type. The weights stay packed in blocks of 32 (Q4_0, Q8_0,
IQ4_NL) or super-blocks of 256 (the K-quants) with a scale per block, and llama.cpp dequantizes them inside
its dot products, so a decode step reads only the packed bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from workbench.options import option
from workbench.techniques.base import ApplyContext, Expectation, TechniqueConfig, register, register_handler

# bits per weight of each type's blocks (llama.cpp's ggml type sizes: block bytes * 8 / block weights)
GGUF_TYPES: dict[str, str] = {
    "Q8_0": "8.5 bits per weight: blocks of 32 int8 weights with one fp16 scale",
    "Q6_K": "6.56 bits per weight: super-blocks of 256, 6-bit weights, 8-bit sub-block scales",
    "Q5_K_M": "about 5.7 bits per weight: Q5_K (5.5 bits) with the most sensitive tensors at Q6_K",
    "Q4_K_M": "about 4.9 bits per weight: Q4_K (4.5 bits) with the most sensitive tensors at Q6_K",
    "Q4_0": "4.5 bits per weight: blocks of 32 4-bit weights with one fp16 scale",
    "Q3_K_M": "about 3.9 bits per weight: Q3_K (3.44 bits) with the most sensitive tensors at Q4_K/Q5_K",
    "Q2_K": "about 2.6 bits per weight: 2-bit weights in super-blocks of 256 with 4-bit sub-block scales",
    "IQ4_NL": "4.5 bits per weight: blocks of 32 on a non-linear 4-bit grid",
}


@register
@dataclass(frozen=True)
class GGUFConfig(TechniqueConfig):
    """llama.cpp's block quantization of the exported GGUF (the llamacpp engine only)."""

    name = "gguf"
    kind = "quant"
    simulated = False
    packs_weights = True
    engines: ClassVar[tuple[str, ...]] = ("llamacpp",)
    summary = "llama.cpp GGUF quantization (Q8_0 … Q2_K, IQ4_NL) by llama.cpp's quantizer; llamacpp engine only"
    expect = Expectation(max_kl=0.01)  # tiny, default Q8_0: KL 0.00062, perplexity 9.552 vs 9.551 (bench/engines.py)

    type: str = option("Q8_0", "GGUF quantization type: " + "; ".join(f"{k}: {v}" for k, v in GGUF_TYPES.items()),
                       choices=tuple(GGUF_TYPES))

    def notes(self) -> str:
        """What the numbers mean."""
        return (f"{self.type} ({GGUF_TYPES[self.type]}) written by llama.cpp's quantizer; tensors too small or "
                "with rows not a multiple of the block size keep a wider type (llama.cpp's own fallback)")


@register_handler(GGUFConfig)
def apply_gguf(config: GGUFConfig, ctx: ApplyContext) -> None:
    """Reached only if a PyTorch engine were asked to run it, which the engines' checks refuse first."""
    raise RuntimeError("gguf quantization is applied by the llamacpp engine to the exported file, not to a "
                       "PyTorch model; run with --engine llamacpp")
