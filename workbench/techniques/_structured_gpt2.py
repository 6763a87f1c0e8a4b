"""GPT-2's layout for `structured`: MLP channels cut out of its Conv1D projections (weights stored (in, out)).

GPT-2 can lose MLP channels (`n_inner` in its config describes the new width, so save_pretrained /
from_pretrained round-trip) but not attention heads: its config derives the head size from
n_embd / n_head, so a model with fewer heads of the same size cannot be described or reloaded.
"""

from __future__ import annotations

import torch

GPT2_HEADS = ("on GPT-2, structured removes MLP channels only (its config derives the head size from n_embd / "
              "n_head, so a model with fewer heads could not be described or reloaded); use "
              "structured:heads_ratio=0,mlp_ratio=R")


def gpt2_blocks(model: torch.nn.Module) -> list[torch.nn.Module] | None:
    """The transformer blocks of a GPT-2 model (MLP c_fc / c_proj as Conv1D), or None for any other layout."""
    from transformers.pytorch_utils import Conv1D

    if getattr(getattr(model, "config", None), "model_type", "") != "gpt2":
        return None
    blocks = getattr(getattr(model, "transformer", None), "h", None)
    if blocks is None or not all(isinstance(getattr(getattr(b, "mlp", None), n, None), Conv1D)
                                 for b in blocks for n in ("c_fc", "c_proj")):
        return None
    return list(blocks)


def conv1d_subset(src: torch.nn.Module, rows: torch.Tensor | None = None,
                  cols: torch.Tensor | None = None) -> torch.nn.Module:
    """A new, smaller Conv1D holding the chosen input rows and/or output columns of `src` (weight (in, out))."""
    from transformers.pytorch_utils import Conv1D

    w = src.weight.data  # (in, out)
    w = w.index_select(0, rows) if rows is not None else w  # (in', out)
    w = w.index_select(1, cols) if cols is not None else w.clone()  # (in', out')
    with torch.device("meta"):
        new = Conv1D(w.shape[1], w.shape[0])  # Conv1D(nf=out, nx=in)
    new.weight = torch.nn.Parameter(w.contiguous(), requires_grad=src.weight.requires_grad)
    b = src.bias.data.index_select(0, cols) if cols is not None else src.bias.data.clone()  # (out',)
    new.bias = torch.nn.Parameter(b, requires_grad=src.bias.requires_grad)
    return new


def prune_gpt2_mlp(mlp: torch.nn.Module, kept: torch.Tensor) -> int:
    """Keep only the intermediate channels `kept` of one GPT-2 MLP; channels left."""
    mlp.c_fc = conv1d_subset(mlp.c_fc, cols=kept)  # (E, inter')
    mlp.c_proj = conv1d_subset(mlp.c_proj, rows=kept)  # (inter', E)
    return kept.numel()
