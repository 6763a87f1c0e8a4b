"""Write a loaded transformers causal LM (Llama, Mistral, Qwen2 layouts) as a GGUF file for llama.cpp.

Tensor names come from the `gguf` package's `TensorNameMap`; hyperparameters from the model's config,
checked against the tensors (structured pruning changes the config's sizes, the same for every layer).
Two layout details: llama.cpp's `llama` architecture rotates interleaved pairs (x0, x1), (x2, x3)... while
transformers' Llama rotates halves (x_i, x_{i+d/2}) (`rotate_half`), so the Q and K rows of every head are
re-ordered (first half and second half interleaved), which changes nothing in Q·K; `qwen2` rotates halves
in llama.cpp too (NEOX), so it is written as is. Llama 3's rope scaling becomes the `rope_freqs` tensor
(the factor every frequency is divided by). Norms and 1-D tensors stay F32, as llama.cpp's converter writes
them. The file is written tensor by tensor to a temporary file next to `path` and renamed into place; a stop
request (checked between tensors) or an error removes the temporary file, so nothing half-written remains.
This module registers no engine (the `llamacpp` engine calls it).
"""

from __future__ import annotations

import logging
import math
import os
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from workbench.engines.gguf_vocab import add_vocab, tokenizer_kind_problem, tokenizer_problem
from workbench.errors import ConfigError
from workbench.models.sources import text_config

logger = logging.getLogger(__name__)
__all__ = ["ARCHITECTURES", "ExportStopped", "export_problem", "gguf_tensor_bytes", "tokenizer_kind_problem",
           "tokenizer_problem", "write_gguf"]

ARCHITECTURES: dict[str, str] = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "llama",
                                 "Qwen2ForCausalLM": "qwen2"}
_BY_MODEL_TYPE = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
ROPE_TYPES = {"llama": ("default", "linear", "llama3"), "qwen2": ("default", "linear")}
DTYPES = ("fp32", "fp16", "bf16")
_SKIPPED = ("rotary_emb.inv_freq",)  # buffers recomputed by llama.cpp


class ExportStopped(Exception):
    """The export was stopped on request; its temporary file was removed."""


def _arch_class(config: Any) -> str | None:
    """The transformers class name of a config (presets built from a config class have no `architectures`)."""
    archs = getattr(config, "architectures", None) or []
    return archs[0] if archs else _BY_MODEL_TYPE.get(getattr(config, "model_type", None))


def rope_parameters(config: Any) -> dict[str, Any]:
    """rope_theta and scaling: `rope_parameters` (transformers 5), else `rope_theta` + `rope_scaling`."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    if not params:
        params = {"rope_theta": getattr(config, "rope_theta", 10000.0), **(getattr(config, "rope_scaling", None) or {})}
    params.setdefault("rope_type", params.get("type", "default"))
    return params


def head_dim(config: Any) -> int:
    """Per-head size: `head_dim` when the config has one, else hidden / heads."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def export_problem(model_config: Any) -> str | None:
    """Why a model with this config cannot be written as GGUF (one sentence), from the config alone; None if it can."""
    config = text_config(model_config)
    cls = _arch_class(config)
    if cls not in ARCHITECTURES:
        what = cls or f"{getattr(config, 'model_type', None) or 'unknown'} ({type(config).__name__})"
        return (f"the GGUF writer cannot represent {what} models; supported architectures: "
                f"{', '.join(sorted(ARCHITECTURES))}")
    arch = ARCHITECTURES[cls]
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"the GGUF writer supports SiLU MLPs only, this {cls} uses {config.hidden_act}"
    if getattr(config, "num_local_experts", None) or getattr(config, "num_experts", None):
        return f"the GGUF writer does not write mixture-of-experts {cls} models"
    rope = rope_parameters(config).get("rope_type", "default")
    if rope not in ROPE_TYPES[arch]:
        return (f"the GGUF writer cannot represent {rope!r} rope scaling on {cls} (supported: "
                f"{', '.join(ROPE_TYPES[arch])})")
    if arch == "qwen2" and getattr(config, "use_sliding_window", False):
        return "the GGUF writer cannot represent Qwen2's sliding-window attention"
    if arch == "qwen2" and head_dim(config) * config.num_attention_heads != config.hidden_size:
        return ("llama.cpp's qwen2 layout needs heads × head size = hidden size, which this model no longer has "
                "(structured head pruning); prune MLP channels only for the llamacpp engine")
    return None


def llama3_rope_factors(rope: dict[str, Any], dim: int) -> torch.Tensor:
    """(dim/2,) float32: by how much Llama 3's rope scaling divides each rotary frequency (llama.cpp's rope_freqs).

    Long wavelengths (beyond original context / low_freq_factor) are slowed by `factor`, short ones (below
    original context / high_freq_factor) kept, and those between blended linearly in 1/wavelength.
    """
    inv_freq = 1.0 / rope["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)  # (dim/2,)
    low, high = rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old = rope.get("original_max_position_embeddings", 8192)
    wavelen = 2 * math.pi / inv_freq
    smooth = ((old / wavelen - low) / (high - low)).clamp(0.0, 1.0)
    kept = (1 - smooth) / rope["factor"] + smooth  # share of the frequency kept
    return (1.0 / kept).float()


def interleave_heads(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of every head re-ordered from halves (x_0..x_{d/2-1}, x_{d/2}..) to pairs (x_0, x_{d/2}, x_1, ...)."""
    rows = w.shape[0]
    return w.reshape(heads, 2, rows // heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


@dataclass
class _Tensor:
    """One tensor to write: its GGUF name, the torch tensor (after any re-ordering), and its GGML type."""

    name: str
    data: torch.Tensor
    qtype: Any  # gguf.GGMLQuantizationType

    def array(self) -> Any:
        """The data as the numpy array the file holds (BF16 as raw 16-bit words)."""
        import gguf

        t = self.data.detach().to("cpu").contiguous()
        if self.qtype == gguf.GGMLQuantizationType.F32:
            return t.float().numpy()
        if self.qtype == gguf.GGMLQuantizationType.F16:
            return t.to(torch.float16).numpy()
        return t.to(torch.bfloat16).view(torch.int16).numpy()

    @property
    def nbytes(self) -> int:
        import gguf

        return self.data.numel() * (4 if self.qtype == gguf.GGMLQuantizationType.F32 else 2)


def _layout_problem(model: torch.nn.Module, config: Any) -> str | None:
    """One sentence when a layer's q/k/v/MLP sizes differ from the config's (GGUF holds one size for all layers)."""
    hd, heads = head_dim(config), config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    want = {"q_proj": heads * hd, "k_proj": kv * hd, "v_proj": kv * hd, "gate_proj": config.intermediate_size}
    for i, layer in enumerate(model.model.layers):
        for attr, rows in want.items():
            part = getattr(layer.self_attn if attr.endswith(("q_proj", "k_proj", "v_proj")) else layer.mlp, attr)
            if part.weight.shape[0] != rows:
                return (f"layer {i}'s {attr} has {part.weight.shape[0]} rows where the config implies {rows}; GGUF's "
                        "layout holds one size for every layer")
    return None


def _plan(model: torch.nn.Module, config: Any, arch: str, dtype: str) -> list[_Tensor]:
    """Every tensor of the file, in order, with its GGUF name and type."""
    import gguf

    wanted = {"fp32": gguf.GGMLQuantizationType.F32, "fp16": gguf.GGMLQuantizationType.F16,
              "bf16": gguf.GGMLQuantizationType.BF16}[dtype]
    model_arch = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}[arch]
    names = gguf.get_tensor_name_map(model_arch, config.num_hidden_layers)
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    tied = bool(getattr(config, "tie_word_embeddings", False))
    plan: list[_Tensor] = []
    rope = rope_parameters(config)
    if rope["rope_type"] == "llama3":
        plan.append(_Tensor(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight",
                            llama3_rope_factors(rope, head_dim(config)), gguf.GGMLQuantizationType.F32))
    for hf_name, data in model.state_dict().items():
        if hf_name.endswith(_SKIPPED) or (tied and hf_name == "lm_head.weight"):
            continue
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ConfigError(f"the model has a tensor {hf_name!r} that llama.cpp's {arch} layout has no place for")
        if arch == "llama" and ".self_attn.q_proj." in hf_name:
            data = interleave_heads(data, heads)
        elif arch == "llama" and ".self_attn.k_proj." in hf_name:
            data = interleave_heads(data, kv)
        one_d = data.dim() <= 1 or name.endswith("_norm.weight")
        plan.append(_Tensor(name, data, gguf.GGMLQuantizationType.F32 if one_d else wanted))
    return plan


def _add_hparams(writer: Any, config: Any, arch: str, dtype: str, name: str, vocab_size: int) -> None:
    """The metadata llama.cpp's loader reads for the llama / qwen2 architectures."""
    import gguf

    writer.add_name(name)
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_file_type({"fp32": gguf.LlamaFileType.ALL_F32, "fp16": gguf.LlamaFileType.MOSTLY_F16,
                          "bf16": gguf.LlamaFileType.MOSTLY_BF16}[dtype])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_vocab_size(vocab_size)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    writer.add_key_length(head_dim(config))
    writer.add_value_length(head_dim(config))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_dimension_count(head_dim(config))
    rope = rope_parameters(config)
    writer.add_rope_freq_base(float(rope["rope_theta"]))
    if rope["rope_type"] == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))


def write_gguf(model: torch.nn.Module, tokenizer: Any, path: Path, *, dtype: str, name: str,
               stop_requested: Callable[[], bool] = lambda: False) -> None:
    """Write `model` (a transformers causal LM on CPU) and `tokenizer` to `path` as GGUF with F32 / F16 / BF16
    weights (`dtype` fp32 / fp16 / bf16); ConfigError (one sentence) when they cannot be represented,
    ExportStopped when `stop_requested()` turns true. Either way nothing is left at `path` or beside it."""
    import gguf

    if dtype not in DTYPES:
        raise ConfigError(f"unknown GGUF export dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    config = text_config(model.config)
    why = export_problem(config) or _layout_problem(model, config) or tokenizer_kind_problem(tokenizer)
    if why:
        raise ConfigError(why)
    arch = ARCHITECTURES[_arch_class(config)]
    plan = _plan(model, config, arch, dtype)
    vocab_size = model.get_input_embeddings().weight.shape[0]
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    writer = gguf.GGUFWriter(tmp, arch)
    try:
        _add_hparams(writer, config, arch, dtype, name, vocab_size)
        try:
            add_vocab(writer, tokenizer, vocab_size)
        except ValueError as e:
            raise ConfigError(f"the tokenizer cannot be written into the GGUF file: {e}") from None
        for t in plan:
            writer.add_tensor_info(t.name, tuple(t.data.shape), None, t.nbytes, raw_dtype=t.qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for t in plan:
            if stop_requested():
                raise ExportStopped(f"the GGUF export of {name} was stopped")
            writer.write_tensor_data(t.array())
        writer.close()
        os.replace(tmp, path)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    logger.info("wrote %s (%s, %d tensors) to %s", name, dtype, len(plan), path)


def gguf_tensor_bytes(path: Path) -> int:
    """Sum of the tensor data bytes of a GGUF file (the weights llama.cpp holds), from its header alone."""
    from workbench.engines.gguf_cache import read_layout

    return sum(read_layout(Path(path)).tensor_bytes.values())
