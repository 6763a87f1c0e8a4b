"""`dynamic-int8`: PyTorch eager-mode dynamic int8 quantization of the block Linears (CPU).

`torch.ao.quantization.quantize_dynamic` swaps each Linear for a DynamicQuantizedLinear: the
weight is stored as int8 in fbgemm/onednn's prepacked format, and every call quantizes the
activations (one range per tensor, measured on the fly, 7 bits on fbgemm), runs an int8 x int8 ->
int32 matmul, and dequantizes the result to fp32. The API is deprecated in favour of torchao, but
in CPU eager mode it is still the fastest int8 path in PyTorch.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from workbench.options import option
from workbench.techniques._targets import lm_head_help, output_head, require_linears
from workbench.techniques.base import ApplyContext, Expectation, TechniqueConfig, register, register_handler

logger = logging.getLogger(__name__)
GRANULARITIES = ("per-tensor", "per-channel")


@contextlib.contextmanager
def _quiet_deprecation() -> Iterator[None]:
    """Hide torch.ao.quantization's deprecation warnings (the user chose this path knowingly)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", message=r"(?s).*(deprecated|will be removed)", category=UserWarning)
        yield


@register
@dataclass(frozen=True)
class DynamicInt8Config(TechniqueConfig):
    """PyTorch dynamic int8: int8 weights, activations quantized on the fly, fbgemm/onednn CPU kernels."""

    name = "dynamic-int8"
    kind = "quant"
    simulated = False
    packs_weights = True
    summary = "PyTorch dynamic int8 (quantize_dynamic): int8 weights and activations, CPU kernels, fp32 only"
    expect = Expectation(max_kl=0.12, min_kl=0.015)  # measured on tiny: KL 0.0463, perplexity 57.08 vs 56.11

    granularity: str = option("per-channel", "Weight scales: one per output channel (more accurate) or one "
                              "per tensor.", choices=GRANULARITIES)
    lm_head: bool = option(False, lm_head_help("int8", "fp32"))

    @classmethod
    def unavailable(cls, device: torch.device) -> str | None:
        """CPU only, with a quantized engine compiled in."""
        if device.type != "cpu":
            return "PyTorch's dynamic int8 kernels (fbgemm / onednn) run on the CPU only"
        if not any(e != "none" for e in torch.backends.quantized.supported_engines):
            return "this PyTorch build has no quantized CPU engine (fbgemm, onednn, x86 or qnnpack)"
        return None

    def conflicts_with(self, earlier: TechniqueConfig | None, dtype: str) -> str | None:
        """Dynamic int8 Linear takes and returns fp32 only."""
        if earlier is None and dtype != "fp32":
            return f"PyTorch dynamic int8 works on fp32 models only; use --dtype fp32 (got {dtype})"
        return None

    def notes(self) -> str:
        """What the numbers mean."""
        return (f"PyTorch dynamic int8 ({self.granularity} weight scales): 1 byte per weight in the CPU "
                "backend's prepacked format (counted from its unpacked int8 copy); every call quantizes the "
                "activations with one range per tensor and, as fbgemm does for safety, only 7 bits — most of "
                "its accuracy loss; the int8 matmul pays off at larger batches and layers, less at batch 1")


@register_handler(DynamicInt8Config)
def apply_dynamic_int8(config: DynamicInt8Config, ctx: ApplyContext) -> None:
    """Swap every block Linear for torch.ao's DynamicQuantizedLinear (in place)."""
    from torch.ao import quantization as tq

    qconfig = tq.per_channel_dynamic_qconfig if config.granularity == "per-channel" else tq.default_dynamic_qconfig
    layers = require_linears(ctx.model, config.name, ctx.notes)
    counts = {name: layer.weight.numel() + (layer.bias.numel() if layer.bias is not None else 0)
              for name, layer in layers}
    head_name, tied = output_head(ctx.model) if config.lm_head else (None, False)
    if head_name is not None:
        counts[head_name] = 0 if tied else ctx.model.get_submodule(head_name).weight.numel()  # tied: counted once
    ctx.on_progress("quantizing Linear weights", 0.0)
    with _quiet_deprecation():
        tq.quantize_dynamic(ctx.model, {name: qconfig for name in counts}, dtype=torch.qint8, inplace=True)
    for name, count in counts.items():  # the packed module hides its weight from parameters()
        ctx.model.get_submodule(name)._workbench_param_count = count
    ctx.on_progress("done", 1.0)
    kept = ("embeddings kept in fp32, the output projection quantized" + (" (untied from them)" if tied else "")
            if head_name else "output projection and embeddings kept in fp32")
    ctx.notes.append(f"{len(counts)} Linear layers quantized ({kept}); quantized engine "
                     f"{torch.backends.quantized.engine}")
