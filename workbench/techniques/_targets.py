"""Which layers the techniques act on: the Linear layers of the transformer blocks."""

from __future__ import annotations

import torch

from workbench.errors import ConfigError


def block_linears(model: torch.nn.Module, include_lm_head: bool = False) -> list[tuple[str, torch.nn.Linear]]:
    """(name, module) of every nn.Linear except the output projection (unless asked for), in model order.

    What packed-kernel quantizers convert (after `linearize_conv1d` for GPT-2's Conv1D layers).
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


def linear_from_conv1d(conv: torch.nn.Module) -> torch.nn.Linear:
    """The nn.Linear that computes what a GPT-2 Conv1D computes: x @ W + b with W (in, out) is x @ W.T + b."""
    in_f, out_f = conv.weight.shape  # Conv1D stores (in, out)
    w = conv.weight.data
    linear = torch.nn.Linear(in_f, out_f, bias=conv.bias is not None, device="meta", dtype=w.dtype)
    linear.weight = torch.nn.Parameter(w.t().contiguous(), requires_grad=conv.weight.requires_grad)  # (out, in)
    if conv.bias is not None:
        linear.bias = torch.nn.Parameter(conv.bias.data, requires_grad=conv.bias.requires_grad)
    return linear.train(conv.training)


def linearize_conv1d(model: torch.nn.Module) -> int:
    """Swap every block Conv1D (GPT-2's projections) for the equivalent nn.Linear, in place; return how many."""
    convs = [(name, m) for name, m in block_weights(model) if not isinstance(m, torch.nn.Linear)]
    for name, conv in convs:
        model.set_submodule(name, linear_from_conv1d(conv))
    return len(convs)


def require_linears(model: torch.nn.Module, technique: str,
                    notes: list[str] | None = None) -> list[tuple[str, torch.nn.Linear]]:
    """`block_linears` after GPT-2 Conv1D layers became nn.Linear, or a one-sentence ConfigError if none.

    Packed-kernel quantizers convert nn.Linear only; a Conv1D is a transposed Linear, so it is rebuilt as
    one first (same outputs) and a note says so.
    """
    converted = linearize_conv1d(model)
    if converted and notes is not None:
        notes.append(f"{converted} GPT-2 Conv1D layers rebuilt as equivalent nn.Linear (transposed weights) "
                     "before quantization")
    layers = block_linears(model)
    if not layers:
        raise ConfigError(f"{technique} converts nn.Linear layers and {type(model).__name__} has none")
    return layers
