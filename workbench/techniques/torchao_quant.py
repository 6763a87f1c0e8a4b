"""`torchao-int8-weight`, `torchao-int8-dynamic`, `torchao-int4-weight`: torchao `quantize_` on the block Linears.

torchao swaps each Linear's weight for a tensor subclass (Int8Tensor, Int4TilePackedTo4dTensor)
whose `F.linear` runs the quantized kernel: int8 weight-only (per-row scales, activations stay
float), int8 dynamic (activations quantized per token at run time, int8 x int8 matmul), int4
weight-only (groups of `group_size` inputs with a scale and zero point each, tinygemm kernel).
"""

from __future__ import annotations

import importlib.util
import logging
import warnings
from dataclasses import dataclass
from types import ModuleType
from typing import Any, ClassVar

import torch

from workbench.options import option
from workbench.techniques._targets import require_linears
from workbench.techniques.base import ApplyContext, Expectation, TechniqueConfig, register, register_handler

logger = logging.getLogger(__name__)
INT4_GROUP_SIZES = (32, 64, 128, 256)


def _torchao() -> ModuleType:
    """Import torchao with its import-time probes ("Failed to load ... .so", "no triton") kept quiet."""
    for name in ("torchao", "torch.utils._pytree"):  # _pytree: torch's deprecation notice about torchao's enums
        noisy = logging.getLogger(name)
        if noisy.level == logging.NOTSET:  # respect an explicit choice
            noisy.setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import torchao.quantization as quantization

    return quantization


def _unavailable(device: torch.device) -> str | None:
    """Why torchao cannot run on `device` (None: it can); the device first, as installing cannot change it."""
    if device.type not in ("cpu", "cuda"):
        return f"the workbench runs torchao on cpu or cuda only, not {device.type}"
    if importlib.util.find_spec("torchao") is None:
        return "torchao is not installed (pip install torchao)"
    return None


@dataclass(frozen=True)
class _TorchaoConfig(TechniqueConfig):
    """Shared behaviour: availability, and the torchao config object `quantize_` is given."""

    kind = "quant"
    simulated = False
    packs_weights = True
    eager_cost: ClassVar[str] = ""  # why its uncompiled CUDA decode step is slower than the unquantized model's

    @classmethod
    def unavailable(cls, device: torch.device) -> str | None:
        """Needs torchao, on cpu or cuda."""
        return _unavailable(device)

    def speed_warning(self, device_type: str, batch: int, compiled: bool) -> str | None:
        """On CUDA torchao pays off in a compiled decode step only (gpt-fast's recipe)."""
        if device_type == "cuda" and not compiled:
            return (f"{self.name} without compile decodes slower than the unquantized model on CUDA: "
                    f"{self.eager_cost}; turn compile on (static KV cache)")
        return None

    def ao_config(self) -> Any:
        """The torchao workflow config for `quantize_`."""
        raise NotImplementedError

    def load_time_config(self, dtype: str, skip: tuple[str, ...] = (), offload: bool = False) -> Any:
        """The same `ao_config`, applied by `from_pretrained` to each Linear as it reads its weight."""
        from transformers import TorchAoConfig

        _torchao()  # its import-time chatter kept quiet
        return TorchAoConfig(self.ao_config(), modules_to_not_convert=list(skip))

    def packed_bytes(self, out_features: int, in_features: int) -> int:
        """int8 codes plus a float32 scale and an int8 zero point per output row."""
        return out_features * in_features + 5 * out_features


@register
@dataclass(frozen=True)
class TorchaoInt8WeightConfig(_TorchaoConfig):
    """int8 weight-only: per-output-row symmetric int8 weights, float activations."""

    name = "torchao-int8-weight"
    summary = "torchao int8 weight-only: int8 weights with per-row scales, float activations"
    expect = Expectation(max_kl=0.0008, min_kl=0.0001)  # tiny: KL 0.000307, perplexity 56.17 vs 56.11
    eager_cost = "every call converts each int8 weight matrix to the activation dtype before a float matmul"

    def ao_config(self) -> Any:
        """Int8WeightOnlyConfig, per-row (torchao's default granularity)."""
        return _torchao().Int8WeightOnlyConfig(set_inductor_config=False)

    def notes(self) -> str:
        """What the numbers mean."""
        return ("torchao int8 weight-only: 1 byte per weight plus a float32 scale and an int8 zero point per "
                "row; in eager mode every call converts the int8 weight back to floats before the matmul, "
                "so without torch.compile it is slower than the unquantized model, on CPU especially")


@register
@dataclass(frozen=True)
class TorchaoInt8DynamicConfig(_TorchaoConfig):
    """int8 dynamic: int8 per-row weights, activations quantized per token at run time."""

    name = "torchao-int8-dynamic"
    summary = "torchao int8 dynamic: int8 weights and per-token int8 activations, int8 matmul"
    expect = Expectation(max_kl=0.0055, min_kl=0.0007)  # tiny: KL 0.00222, perplexity 56.19 vs 56.11
    eager_cost = "every call quantizes the activations in separate kernels before the int8 matmul"
    INT_MM_MIN_ROWS: ClassVar[int] = 17  # torch._int_mm on CUDA: "self.size(0) needs to be greater than 16"

    def speed_warning(self, device_type: str, batch: int, compiled: bool) -> str | None:
        """At batch <= 16 on CUDA torchao's int8 matmul falls back to float32 (torchao.kernel.intmm.safe_int_mm)."""
        if device_type == "cuda" and batch < self.INT_MM_MIN_ROWS:
            return (f"torchao-int8-dynamic is slow at batch {batch} on CUDA (4.7 vs 142 tokens/s for bf16 on tiny, "
                    "uncompiled, H200): PyTorch's int8 matmul needs more than 16 rows, and with fewer torchao falls "
                    "back to a float32 matmul over a float32 copy of every weight, made on every call. At small "
                    "batches use torchao-int8-weight with compile; int8 dynamic pays off above batch 16")
        return super().speed_warning(device_type, batch, compiled)

    def ao_config(self) -> Any:
        """Int8DynamicActivationInt8WeightConfig, per-row weights and per-token activations."""
        return _torchao().Int8DynamicActivationInt8WeightConfig(set_inductor_config=False)

    def notes(self) -> str:
        """What the numbers mean."""
        return ("torchao int8 dynamic: 1 byte per weight plus a float32 scale and an int8 zero point per "
                "row; every call quantizes the activations per token, which in eager mode costs more than "
                "the int8 matmul saves — torchao targets torch.compile, so in eager mode expect it slower "
                "than the unquantized model, on CPU especially")


@register
@dataclass(frozen=True)
class TorchaoInt4WeightConfig(_TorchaoConfig):
    """int4 weight-only: groups of inputs share a bf16 scale and zero point; tinygemm CUDA kernel."""

    name = "torchao-int4-weight"
    summary = "torchao int4 weight-only (tinygemm): grouped 4-bit weights, bf16, CUDA only"
    # Not measured (CUDA only). Estimated from its CPU analogue, sim:bits=4,symmetric=false,granularity=per-group
    # on a bf16 copy of tiny: KL 0.0597, perplexity 57.25 vs 56.11.
    expect = Expectation(max_kl=0.15, min_kl=0.02)
    eager_cost = ("each Linear goes through torchao's Python dispatch and pads and casts its input around the "
                  "tinygemm kernel, CPU work added to a step that is already launch-bound (39.9 vs 73.9 tokens/s "
                  "for bf16 on Llama-3.2-1B, H200)")

    group_size: int = option(128, "Inputs per quantization group (smaller: more accurate, more scales).",
                             choices=INT4_GROUP_SIZES)

    @classmethod
    def unavailable(cls, device: torch.device) -> str | None:
        """CUDA with tensor cores (compute capability >= 8.0) only; the device is checked before the install."""
        if device.type != "cuda":
            return "torchao int4 weight-only kernels need a CUDA GPU"
        if torch.version.hip is None and torch.cuda.get_device_capability(device) < (8, 0):
            return "torchao's int4 tinygemm kernel needs a CUDA GPU of compute capability 8.0 or newer"
        return _unavailable(device)

    def conflicts_with(self, earlier: TechniqueConfig | None, dtype: str) -> str | None:
        """tinygemm packs bf16 weights only."""
        if earlier is None and dtype != "bf16":
            return (f"torchao int4 weight-only (tinygemm) needs bf16 weights on a CUDA GPU; use --dtype bf16 "
                    f"(got {dtype})")
        return None

    def packed_bytes(self, out_features: int, in_features: int) -> int:
        """tinygemm pads in_features to a multiple of 1024 and out_features to 8: half a byte per padded weight
        plus a bf16 scale and zero point per group of each row."""
        rows, cols = -(-out_features // 8) * 8, -(-in_features // 1024) * 1024
        return rows * cols // 2 + (cols // self.group_size) * rows * 4

    def ao_config(self) -> Any:
        """Int4WeightOnlyConfig in tinygemm's tile-packed format (built into PyTorch's CUDA build)."""
        ao = _torchao()
        from torchao.quantization.quantize_.workflows import Int4PackingFormat

        return ao.Int4WeightOnlyConfig(group_size=self.group_size, set_inductor_config=False,
                                       int4_packing_format=Int4PackingFormat.TILE_PACKED_TO_4D)

    def notes(self) -> str:
        """What the numbers mean."""
        return (f"torchao int4 weight-only: 4-bit weights in groups of {self.group_size} with a bf16 scale and "
                "zero point each, tinygemm kernel; tinygemm pads in_features to a multiple of 1024 (and "
                "out_features to 8), so narrow layers store more than 0.5 byte per weight")


def _apply_torchao(config: _TorchaoConfig, ctx: ApplyContext) -> None:
    """Run torchao's quantize_ over the block Linears (the output projection stays float)."""
    ao = _torchao()
    layers = [m for _, m in require_linears(ctx.model, config.name, ctx.notes)]
    targets = {id(m) for m in layers}
    ctx.on_progress("quantizing Linear weights", 0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ao.quantize_(ctx.model, config.ao_config(), filter_fn=lambda module, fqn: id(module) in targets)
    ctx.on_progress("done", 1.0)
    done = sum(type(m.weight) not in (torch.Tensor, torch.nn.Parameter) for m in layers)
    note = f"{done} of {len(layers)} Linear layers quantized (output projection and embeddings kept in {ctx.dtype})"
    if done < len(layers):  # torchao skips, without a word, layers whose in_features the group size does not divide
        note += "; the others have in_features that torchao's group size does not divide and stay float"
    ctx.notes.append(note)


for _cls in (TorchaoInt8WeightConfig, TorchaoInt8DynamicConfig, TorchaoInt4WeightConfig):
    register_handler(_cls)(_apply_torchao)
