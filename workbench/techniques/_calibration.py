"""Calibration text for the techniques that observe activations (static quantization ranges, Wanda)."""

from __future__ import annotations

import torch

from workbench.techniques.base import ApplyContext
from workbench.textio import calibration_text, encode


def calibration_batches(ctx: ApplyContext, tokens: int, seq_len: int = 128) -> list[torch.Tensor]:
    """A slice of the reference corpus's training split, tokenized, as (1, seq_len) id tensors on ctx.device."""
    ids = encode(ctx.tokenizer, calibration_text())
    vocab = getattr(ctx.model.config, "vocab_size", None)
    if vocab:
        ids = [i for i in ids if i < vocab]
    n = max(1, min(tokens, len(ids)) // seq_len)
    return [torch.tensor([ids[i * seq_len:(i + 1) * seq_len]], device=ctx.device) for i in range(n)]  # (1, T)
