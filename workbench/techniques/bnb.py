"""`bnb-int8`, `bnb-nf4`, `bnb-fp4`: real bitsandbytes quantization of the block Linear layers.

LLM.int8() (Dettmers et al. 2022): int8 weights with one absmax scale per output row (SCB); input
columns holding an activation above `threshold` are multiplied in fp16, the rest in int8.
NF4 / FP4 (QLoRA, Dettmers et al. 2023): 4-bit codes, one absmax per block of 64 weights; with
double quantization the absmaxes are themselves quantized to 8 bits in blocks of 256.
As the first technique of a run the layers are quantized while `from_pretrained` reads them
(`load_time_config`: a BitsAndBytesConfig), so a model whose float weights do not fit still loads; after
other techniques (pruning) the loaded layers are converted in place.
"""

from __future__ import annotations

import importlib.util
import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any, ClassVar

import torch

from workbench.options import option
from workbench.techniques._targets import require_linears
from workbench.techniques.base import ApplyContext, Expectation, TechniqueConfig, register, register_handler

logger = logging.getLogger(__name__)
COMPUTE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
BLOCKSIZE = 64  # bitsandbytes' 4-bit absmax block (its default, which the workbench keeps)
CPU_PACK_BLOCK = 32  # bnb's avx512-bf16 CPU kernel packs rows in blocks of 32 (asserts out_features % 32 == 0)


def _bnb() -> ModuleType:
    """Import bitsandbytes with its per-matmul and import-time chatter kept off the user's stderr."""
    noisy = logging.getLogger("bitsandbytes")
    if noisy.level == logging.NOTSET:  # respect an explicit choice; otherwise it logs on every int8 matmul
        noisy.setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import bitsandbytes

    return bitsandbytes


def _unavailable(device: torch.device) -> str | None:
    """Why bitsandbytes cannot run on `device` (None: it can); the device first, as installing cannot change it."""
    if device.type not in ("cpu", "cuda"):
        return f"the workbench runs bitsandbytes on cpu or cuda only, not {device.type}"
    if device.type == "cuda" and torch.version.hip is None and torch.cuda.get_device_capability(device) < (5, 0):
        return "bitsandbytes needs a CUDA GPU of compute capability 5.0 or newer"
    if importlib.util.find_spec("bitsandbytes") is None:
        return "bitsandbytes is not installed (pip install bitsandbytes)"
    return None


def _float_weight(layer: torch.nn.Linear) -> torch.Tensor:
    """The layer's effective weight as a plain dense tensor (pruning masks and sparse formats resolved)."""
    w = layer.weight.detach()
    return w.to_dense() if w.layout != torch.strided or type(w) is not torch.Tensor else w


def _bias(layer: torch.nn.Linear) -> torch.nn.Parameter | None:
    """A detached copy of the layer's bias (or None)."""
    return None if layer.bias is None else torch.nn.Parameter(layer.bias.detach().clone(), requires_grad=False)


def _replace_linears(ctx: ApplyContext, name: str, make: Callable[[torch.nn.Linear], torch.nn.Module]) -> int:
    """Swap every block Linear for `make(layer)` (already on ctx.device, in eval mode); return how many."""
    layers = require_linears(ctx.model, name, ctx.notes)
    for i, (layer_name, layer) in enumerate(layers):
        ctx.model.set_submodule(layer_name, make(layer).eval())
        ctx.on_progress(f"quantized {layer_name}", (i + 1) / len(layers))
    return len(layers)


@register
@dataclass(frozen=True)
class BnbInt8Config(TechniqueConfig):
    """LLM.int8(): int8 weights with per-row scales, outlier activation columns kept in fp16."""

    name = "bnb-int8"
    kind = "quant"
    simulated = False
    packs_weights = True
    summary = "bitsandbytes LLM.int8(): int8 weights, fp16 for outlier activation columns"
    expect = Expectation(max_kl=0.0025, min_kl=0.0003)  # measured on tiny: KL 0.00102, perplexity 56.26 vs 56.11
    # bitsandbytes 0.50 int8_vectorwise_quant: `outliers.any()` on the host, then argwhere (a data-dependent size)
    breaks_cuda_graphs = ("checks every layer's input for outlier columns on the host (a GPU-to-CPU sync) and "
                          "multiplies a data-dependent number of them, which a CUDA graph cannot capture")
    SLOW_UP_TO_BATCH: ClassVar[int] = 16  # measured at batch 1; the per-call costs shrink as the batch grows

    threshold: float = option(6.0, "Outlier threshold: input columns with any |activation| above it are "
                              "multiplied in fp16 instead of int8 (0 disables the decomposition).",
                              minimum=0.0, maximum=1000.0)

    @classmethod
    def unavailable(cls, device: torch.device) -> str | None:
        """Needs bitsandbytes, on cpu or cuda."""
        return _unavailable(device)

    def speed_warning(self, device_type: str, batch: int, compiled: bool) -> str | None:
        """At small batches on CUDA LLM.int8()'s per-call work costs more than the int8 matmul saves."""
        if device_type == "cuda" and batch <= self.SLOW_UP_TO_BATCH:
            return (f"bnb-int8 decodes slower than the unquantized model at batch {batch} on CUDA (34 vs 142 tokens/s "
                    "on tiny, H200): every Linear casts its input to fp16, quantizes it and checks it for outlier "
                    "columns (a GPU-to-CPU sync) before its int8 matmul, where the unquantized layer runs one matmul. "
                    "It saves memory, not time; for speed use torchao-int8-weight with compile")
        return None

    def load_time_config(self, dtype: str, skip: tuple[str, ...] = (), offload: bool = False) -> Any:
        """The same LLM.int8() layers, built by `from_pretrained` as it reads the weights."""
        from transformers import BitsAndBytesConfig

        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=self.threshold, llm_int8_has_fp16_weight=False,
                                  llm_int8_skip_modules=list(skip), llm_int8_enable_fp32_cpu_offload=offload)

    def packed_bytes(self, out_features: int, in_features: int) -> int:
        """int8 codes, a float32 scale per output row (SCB) and a format byte."""
        return out_features * in_features + 4 * out_features + 1

    def notes(self) -> str:
        """What the numbers mean."""
        return ("bitsandbytes LLM.int8(): 1 byte per weight plus a float32 scale per output row; "
                "activations are quantized to int8 on every call (inputs are cast to fp16 first) and "
                f"columns above |{self.threshold:g}| run in fp16, so int8 is usually slower than fp16/fp32 "
                "for small batches, on CPU especially")


def _int8_layer(config: BnbInt8Config, device: torch.device) -> Callable[[torch.nn.Linear], torch.nn.Module]:
    """Factory: Linear -> bnb Linear8bitLt quantized on `device`."""
    bnb = _bnb()

    def make(layer: torch.nn.Linear) -> torch.nn.Module:
        q = bnb.nn.Linear8bitLt(layer.in_features, layer.out_features, bias=layer.bias is not None,
                                has_fp16_weights=False, threshold=config.threshold, device="meta")
        # Int8Params only quantizes when moved off the CPU-resident float data, so start on the CPU.
        q.weight = bnb.nn.Int8Params(_float_weight(layer).cpu(), requires_grad=False, has_fp16_weights=False)
        q.bias = _bias(layer)
        return q.to(device)
    return make


@register_handler(BnbInt8Config)
def apply_bnb_int8(config: BnbInt8Config, ctx: ApplyContext) -> None:
    """Replace every block Linear by a bitsandbytes Linear8bitLt."""
    n = _replace_linears(ctx, config.name, _int8_layer(config, ctx.device))
    ctx.notes.append(f"{n} Linear layers converted to int8 (output projection and embeddings kept in {ctx.dtype})")


@dataclass(frozen=True)
class _Bnb4bitConfig(TechniqueConfig):
    """Shared fields of the two 4-bit formats."""

    kind = "quant"
    simulated = False
    packs_weights = True
    quant_type = ""

    compute_dtype: str = option("fp32", "Dtype the 4-bit weights are dequantized to for the matmul "
                                "(bf16: on CPUs with AVX512-BF16, bitsandbytes' fused 4-bit kernel).",
                                choices=tuple(COMPUTE_DTYPES))
    double_quant: bool = option(True, "Double quantization: store the per-block absmax scales in 8 bits "
                                "(about 0.37 bit per weight less).")

    @classmethod
    def unavailable(cls, device: torch.device) -> str | None:
        """Needs bitsandbytes, on cpu or cuda."""
        return _unavailable(device)

    def speed_warning(self, device_type: str, batch: int, compiled: bool) -> str | None:
        """An uncompiled small-batch CUDA step is launch-bound, and every 4-bit Linear adds Python work to it."""
        if device_type == "cuda" and batch <= BnbInt8Config.SLOW_UP_TO_BATCH and not compiled:
            return (f"{self.name} decodes slower than the unquantized model at batch {batch} on CUDA uncompiled "
                    "(bnb-nf4: 35 vs 74 tokens/s on Llama-3.2-1B, H200): the step is launch-bound, and every Linear adds "
                    "bitsandbytes' Python dispatch to its 4-bit kernel. It saves memory, not time; for speed use "
                    "torchao-int4-weight with compile")
        return None

    def load_time_config(self, dtype: str, skip: tuple[str, ...] = (), offload: bool = False) -> Any:
        """The same 4-bit layers, built by `from_pretrained` as it reads the weights."""
        from transformers import BitsAndBytesConfig

        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=self.quant_type,
                                  bnb_4bit_use_double_quant=self.double_quant,
                                  bnb_4bit_compute_dtype=COMPUTE_DTYPES[self.compute_dtype],
                                  llm_int8_skip_modules=list(skip), llm_int8_enable_fp32_cpu_offload=offload)

    def after_load_time(self, model: torch.nn.Module, dtype: str) -> list[str]:
        """The fused CPU kernel only where it fits, as the handler decides (from_pretrained does not check)."""
        layers = [m for m in model.modules() if hasattr(m, "support_avx512bf16_for_cpu")]
        for layer in layers:
            layer.support_avx512bf16_for_cpu = layer.support_avx512bf16_for_cpu and _cpu_kernel_fits(self, layer, layer)
        return _fused_note(model, len(layers)) if self.compute_dtype == "bf16" and _on_cpu(model) else []

    def packed_bytes(self, out_features: int, in_features: int) -> int:
        """Two codes per byte, an absmax per block of 64 (8-bit and a float32 per 256 blocks when double-quantized)
        and the quantization state (code tables, about 1.3 kB per layer when double-quantized)."""
        n = out_features * in_features
        blocks = -(-n // BLOCKSIZE)
        scales = blocks + 4 * -(-blocks // 256) + 1280 if self.double_quant else 4 * blocks + 160
        return -(-n // 2) + scales

    def notes(self) -> str:
        """What the numbers mean."""
        return (f"bitsandbytes {self.quant_type.upper()}: 4-bit codes in blocks of 64 with an absmax each "
                f"({'8-bit, double-quantized' if self.double_quant else 'float32'}), computed in "
                f"{self.compute_dtype}; weights are dequantized on every call, so on CPU and at small batches "
                "4-bit saves memory rather than time")


def _cpu_kernel_fits(config: _Bnb4bitConfig, layer: torch.nn.Linear, q: torch.nn.Module) -> bool:
    """Whether bitsandbytes' fused AVX512-BF16 CPU kernel may take this layer.

    It computes in bf16 whatever compute_dtype says (so only compute_dtype=bf16 uses it), and its
    repacking asserts out_features % 32 == 0 and needs whole absmax blocks per row
    (in_features % blocksize == 0); other layers dequantize to compute_dtype and call a plain matmul.
    """
    return (config.compute_dtype == "bf16" and layer.out_features % CPU_PACK_BLOCK == 0
            and layer.in_features % q.weight.blocksize == 0)


def _4bit_layer(config: _Bnb4bitConfig, device: torch.device) -> Callable[[torch.nn.Linear], torch.nn.Module]:
    """Factory: Linear -> bnb Linear4bit quantized on `device`."""
    bnb = _bnb()
    compute = COMPUTE_DTYPES[config.compute_dtype]

    def make(layer: torch.nn.Linear) -> torch.nn.Module:
        q = bnb.nn.Linear4bit(layer.in_features, layer.out_features, bias=layer.bias is not None,
                              compute_dtype=compute, compress_statistics=config.double_quant,
                              quant_type=config.quant_type, device="meta")
        q.weight = bnb.nn.Params4bit(_float_weight(layer), requires_grad=False, compress_statistics=config.double_quant,
                                     quant_type=config.quant_type, module=q)
        q.bias = _bias(layer)
        q.support_avx512bf16_for_cpu = q.support_avx512bf16_for_cpu and _cpu_kernel_fits(config, layer, q)
        return q.to(device)
    return make


def _apply_4bit(config: _Bnb4bitConfig, ctx: ApplyContext) -> None:
    """Replace every block Linear by a bitsandbytes Linear4bit."""
    n = _replace_linears(ctx, config.name, _4bit_layer(config, ctx.device))
    ctx.notes.append(f"{n} Linear layers converted to {config.quant_type} (output projection and embeddings "
                     f"kept in {ctx.dtype})")
    if ctx.device.type == "cpu" and config.compute_dtype == "bf16":
        ctx.notes.extend(_fused_note(ctx.model, n))


def _on_cpu(model: torch.nn.Module) -> bool:
    """Whether the model's 4-bit layers run on the CPU."""
    return any(p.device.type == "cpu" for p in model.parameters())


def _fused_note(model: torch.nn.Module, n: int) -> list[str]:
    """How many of the `n` 4-bit layers use bitsandbytes' fused AVX512-BF16 CPU kernel."""
    fused = sum(bool(getattr(m, "support_avx512bf16_for_cpu", False)) for m in model.modules())
    return [f"{fused} of {n} layers use bitsandbytes' fused AVX512-BF16 CPU kernel; the others dequantize to bf16 "
            "and call a plain matmul" if fused else
            "no layer fits bitsandbytes' fused AVX512-BF16 CPU kernel (it needs that CPU feature, out_features "
            "divisible by 32 and in_features by 64): each call dequantizes to bf16"]


@register
@dataclass(frozen=True)
class BnbNf4Config(_Bnb4bitConfig):
    """QLoRA NF4: 4-bit NormalFloat codes (quantiles of a normal distribution), blockwise absmax."""

    name = "bnb-nf4"
    quant_type = "nf4"
    summary = "bitsandbytes NF4: 4-bit NormalFloat weights, blockwise absmax (QLoRA)"
    expect = Expectation(max_kl=0.12, min_kl=0.02)  # measured on tiny: KL 0.0504, perplexity 57.74 vs 56.11


@register
@dataclass(frozen=True)
class BnbFp4Config(_Bnb4bitConfig):
    """4-bit floating point codes (1 sign, 2 exponent, 1 mantissa bit), blockwise absmax."""

    name = "bnb-fp4"
    quant_type = "fp4"
    summary = "bitsandbytes FP4: 4-bit floating-point weights, blockwise absmax"
    expect = Expectation(max_kl=0.2, min_kl=0.03)  # measured on tiny: KL 0.0822, perplexity 58.45 vs 56.11


register_handler(BnbNf4Config)(_apply_4bit)
register_handler(BnbFp4Config)(_apply_4bit)
