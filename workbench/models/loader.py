"""Load a model and tokenizer from a source; count parameters and KV bytes from its config alone."""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from workbench.errors import ModelSourceError
from workbench.models.checks import check_causal_lm
from workbench.models.preset_weights import build_preset, preset_folder, preset_shards
from workbench.models.sources import TINY_DIR, TORCH_DTYPES, ModelSource, _hub_kwargs, load_config, text_config

logger = logging.getLogger(__name__)

_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_PICKLE_HINT = "pickle files can carry code: pass --allow-pickle only if you trust where it came from"


@dataclass
class Loaded:
    """A live model and its tokenizer (core-internal: never handed to the UI)."""

    model: torch.nn.Module
    tokenizer: Any
    source: ModelSource
    device: torch.device


def load_tokenizer(source: ModelSource, trust_remote_code: bool = False) -> Any:
    """The source's tokenizer; presets borrow the reference tokenizer (their ids past it decode as <id>)."""
    from transformers import AutoTokenizer

    where = str(TINY_DIR) if source.kind in ("preset", "reference") else source.location
    try:
        tok = AutoTokenizer.from_pretrained(where, trust_remote_code=trust_remote_code, **_hub_kwargs(source))
    except (OSError, ValueError, KeyError) as e:
        raise ModelSourceError(f"cannot load the tokenizer of {source.spec!r}: {str(e).splitlines()[0]}") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return tok


def refuse_pickle(source: ModelSource) -> None:
    """Refuse a local folder whose only weights are a pickle checkpoint (before anything is read)."""
    folder = Path(source.location)
    if source.kind == "preset" or not folder.is_dir() or any(folder.glob("*.safetensors")):
        return
    pickles = sorted(f.name for f in folder.iterdir() if f.suffix in _PICKLE_SUFFIXES)
    if pickles:
        raise ModelSourceError(f"{source.spec!r} has only a pickle checkpoint ({pickles[0]}), no safetensors "
                               f"weights; {_PICKLE_HINT}")


def _weights_error(source: ModelSource, error: Exception, allow_pickle: bool = False) -> ModelSourceError:
    """Turn a loader exception into one sentence."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    low = text.lower()
    if "safetensor" in type(error).__name__.lower() or "header" in low or "deserializ" in low or "incomplete" in low:
        return ModelSourceError(f"the weights of {source.spec!r} are corrupt or truncated ({text})")
    if "mismatched_sizes" in low:
        return ModelSourceError(f"the weights of {source.spec!r} do not match its config.json (some layers have "
                                "other shapes than the config describes)")
    if "size mismatch" in low or "shape" in low:
        return ModelSourceError(f"the weights of {source.spec!r} do not match its config.json ({text})")
    if ("no file named" in low or "does not appear to have" in low) and not allow_pickle and source.kind == "hub":
        return ModelSourceError(f"{source.spec!r} has no safetensors weights (model.safetensors); if it ships only "
                                f"a pickle checkpoint (pytorch_model.bin), {_PICKLE_HINT}")
    if "no file named" in low or "does not appear to have" in low:
        return ModelSourceError(f"{source.spec!r} has no weights file (model.safetensors) next to its config")
    return ModelSourceError(f"cannot load the weights of {source.spec!r}: {text}")


def load_model(source: ModelSource, dtype: str, device: torch.device, *, trust_remote_code: bool = False,
               seed: int = 0, attn_implementation: str = "sdpa", extra: dict[str, Any] | None = None,
               allow_pickle: bool = False, at_load: dict[str, Any] | None = None) -> Loaded:
    """Load weights (or build a preset with seeded random weights) onto `device` in `dtype`.

    Only safetensors weights load unless `allow_pickle` (then transformers reads a pickle checkpoint with
    `torch.load(weights_only=True)`). `extra` goes to `from_pretrained` as is (e.g. a tensor-parallel
    `distributed_config`). `at_load` holds the `from_pretrained` arguments that quantize the weights as they
    are read (`quantization_config`) or place them over devices (`device_map`, `offload_folder`); a preset
    then loads from its seeded weights written block by block, so neither host nor device holds it whole.
    """
    from transformers import AutoModelForCausalLM

    torch_dtype = TORCH_DTYPES[dtype]
    if source.kind == "preset" and not extra and not at_load:
        model = build_preset(source, dtype, seed, device, attn_implementation)
    else:
        check_causal_lm(load_config(source, trust_remote_code), source.spec)  # before a weight is read
        kwargs: dict[str, Any] = {"dtype": torch_dtype, "trust_remote_code": trust_remote_code,
                                  "attn_implementation": attn_implementation, **_hub_kwargs(source), **(extra or {}),
                                  **(at_load or {})}
        if not allow_pickle:
            refuse_pickle(source)
            kwargs["use_safetensors"] = True
        if not extra and "device_map" not in kwargs and (device.type == "cuda" or at_load):
            kwargs["device_map"] = {"": device}
        try:
            with contextlib.ExitStack() as scratch:
                location = source.location
                if source.kind == "preset" and extra:  # from_config cannot shard: the same seeded weights, as a folder
                    location = scratch.enter_context(preset_folder(source, dtype, seed, attn_implementation))
                elif source.kind == "preset":
                    location = scratch.enter_context(preset_shards(source, dtype, seed, device, kwargs.get("offload_folder")))
                model = AutoModelForCausalLM.from_pretrained(location, **kwargs)
        except ModelSourceError:
            raise
        except ValueError as e:
            if "trust_remote_code" in str(e):
                raise ModelSourceError(f"{source.spec!r} needs its own Python code to run; pass "
                                       "--trust-remote-code only if you trust its authors") from None
            raise _weights_error(source, e, allow_pickle) from None
        except Exception as e:  # noqa: BLE001 - OSError, RuntimeError, safetensors' own SafetensorError...
            raise _weights_error(source, e, allow_pickle) from None
        if not extra and not at_load:
            model.to(device)
    model.eval()
    return Loaded(model, load_tokenizer(source, trust_remote_code), source, device)


def attention_shape(config: Any) -> tuple[int, int, int, int]:
    """(layers, query heads, key/value heads, head size) of a model's config (GPT-2's names map through its
    attribute_map)."""
    text = text_config(config)
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    return text.num_hidden_layers, heads, kv_heads, getattr(text, "head_dim", None) or text.hidden_size // heads


def kv_bytes_per_token(config: Any, dtype: str) -> int:
    """K and V of every layer for one token of one sequence."""
    layers, _, kv_heads, head_dim = attention_shape(config)
    return 2 * layers * kv_heads * head_dim * _BYTES[dtype]


def count_params(config: Any, trust_remote_code: bool = False) -> int:
    """Exact parameter count, from a model built on the meta device (no memory used)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    return sum(p.numel() for p in model.parameters())
