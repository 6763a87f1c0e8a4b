"""Checks made from a model's config alone, before any weight is read.

Is it a causal language model at all (an encoder such as BERT loads as `BertLMHeadModel` and generates
noise), and can every requested technique act on its layers? The second question is answered on a model
built on the meta device: its module types and shapes, no memory and no weights.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from workbench.errors import ConfigError
from workbench.techniques.base import TechniqueConfig

logger = logging.getLogger(__name__)
CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")


def _mappings() -> tuple[dict[str, str], dict[str, str]]:
    """transformers' model_type -> class name tables for causal and masked language models."""
    from transformers.models.auto.modeling_auto import (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                                                        MODEL_FOR_MASKED_LM_MAPPING_NAMES)

    return dict(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES), dict(MODEL_FOR_MASKED_LM_MAPPING_NAMES)


def _kind(config: Any, name: str, masked: dict[str, str]) -> str:
    """What a non-causal model is, in a word or two ("encoder", "encoder-decoder model", ...)."""
    if getattr(config, "is_encoder_decoder", False):
        return f"{name} encoder-decoder model"
    if getattr(config, "model_type", None) in masked and not getattr(config, "is_decoder", False):
        return f"{name} encoder"
    if name.endswith("Model"):
        return f"{name} (a base model without a language-model head)"
    return f"{name} model"


def not_causal_reason(config: Any) -> str | None:
    """Why `config` does not describe a causal language model (None: it does).

    Decided by the config's `architectures` when it lists any (one of them must be a class that
    AutoModelForCausalLM maps to, or end in ForCausalLM / LMHeadModel), else by `model_type` (it must map to
    a causal-LM class; an encoder type such as bert also needs `is_decoder`). Remote code that maps
    AutoModelForCausalLM in `auto_map` counts as causal.
    """
    if "AutoModelForCausalLM" in (getattr(config, "auto_map", None) or {}):
        return None
    causal, masked = _mappings()
    archs = [a for a in (getattr(config, "architectures", None) or []) if isinstance(a, str)]
    if archs:
        if any(a in causal.values() or a.endswith(CAUSAL_SUFFIXES) for a in archs):
            return None
        return f"is a {_kind(config, archs[0], masked)}, not a causal language model"
    model_type = getattr(config, "model_type", "") or type(config).__name__
    if model_type not in causal:
        return f"is a {model_type!r} model, which transformers cannot load as a causal language model"
    if model_type in masked and not getattr(config, "is_decoder", False):
        return f"is a {model_type} encoder (is_decoder is false in its config), not a causal language model"
    return None


def check_causal_lm(config: Any, spec: str) -> None:
    """Refuse, in one sentence, a model that is not a causal language model (ConfigError)."""
    reason = not_causal_reason(config)
    if reason:
        raise ConfigError(f"{spec!r} {reason}; the workbench measures text generation, so give a model whose "
                          "config.json lists a causal-LM architecture (such as LlamaForCausalLM)")


def meta_model(config: Any, trust_remote_code: bool = False) -> torch.nn.Module | None:
    """The model built on the meta device (module types and shapes, no memory), or None if it cannot be built."""
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except Exception as e:  # noqa: BLE001 - the checks are skipped; loading reports any real problem
        logger.info("cannot build %s on the meta device (%s): technique checks happen after loading",
                    type(config).__name__, str(e).splitlines()[0] if str(e) else type(e).__name__)
        return None


def check_techniques_fit(config: Any, techniques: tuple[TechniqueConfig, ...], spec: str,
                         trust_remote_code: bool = False) -> None:
    """Refuse, before loading, a technique the model's layers do not allow (checked on the meta device)."""
    if not techniques:
        return
    model = meta_model(config, trust_remote_code)
    if model is None:
        return
    for cfg in techniques:
        problem = cfg.model_problem(model)
        if problem:
            raise ConfigError(f"{cfg.name} cannot be applied to {spec!r} ({type(model).__name__}): {problem}")

