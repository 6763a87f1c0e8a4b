"""Which layers the techniques act on: the Linear layers of the transformer blocks."""

from __future__ import annotations

import torch


def block_linears(model: torch.nn.Module, include_lm_head: bool = False) -> list[tuple[str, torch.nn.Linear]]:
    """(name, module) of every nn.Linear except the output projection (unless asked for), in model order.

    What packed-kernel quantizers can convert; GPT-2's Conv1D layers are not nn.Linear.
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return [(name, m) for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and (include_lm_head or m is not head)]


def block_weights(model: torch.nn.Module, include_lm_head: bool = False) -> list[tuple[str, torch.nn.Module]]:
    """(name, module) of every block Linear or GPT-2 Conv1D, in model order; embeddings and lm_head excluded.

    What float-weight techniques (pruning, fake quant) edit; a weight tied to the embeddings is left
    alone unless `include_lm_head`.
    """
    from transformers.pytorch_utils import Conv1D

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    tied = {id(getattr(m, "weight", None)) for m in (head, embed) if m is not None}
    return [(name, m) for name, m in model.named_modules()
            if isinstance(m, (torch.nn.Linear, Conv1D))
            and ((include_lm_head and m is head) or (m is not head and id(m.weight) not in tied))]


def weight_matrix(module: torch.nn.Module) -> torch.Tensor:
    """The module's weight as an (out, in) view that edits it in place (Conv1D stores (in, out))."""
    w = module.weight.data
    return w if isinstance(module, torch.nn.Linear) else w.t()  # (out, in)


def require_linears(model: torch.nn.Module, technique: str) -> list[tuple[str, torch.nn.Linear]]:
    """`block_linears`, or a one-sentence ConfigError when the model has none to convert."""
    from workbench.errors import ConfigError

    layers = block_linears(model)
    if not layers:
        others = len(block_weights(model))
        raise ConfigError(f"{technique} converts nn.Linear layers and {type(model).__name__} has none"
                          + (f" (its {others} projection layers are GPT-2-style Conv1D)" if others else ""))
    return layers
