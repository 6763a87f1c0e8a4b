"""Which layers the techniques act on: the Linear layers of the transformer blocks."""

from __future__ import annotations

from collections.abc import Callable

import torch

from workbench.errors import ConfigError


def lm_head_help(copy: str, lookup: str = "float") -> str:
    """The help of a quantizer's `lm_head` option, whose tied head gets its own `copy` ("int8", "4-bit")."""
    return (f"Also quantize the output projection. A head tied to the embeddings gets its own {copy} copy (the "
            f"embedding lookup stays {lookup} and reads one row per token), so decode reads far fewer bytes per "
            "token at the cost of that copy's memory.")


def block_linears(model: torch.nn.Module, include_lm_head: bool = False) -> list[tuple[str, torch.nn.Linear]]:
    """(name, module) of every nn.Linear except the output projection (unless asked for), in model order.

    What packed-kernel quantizers convert (after `linearize_conv1d` for GPT-2's Conv1D layers).
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return [(name, m) for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and (include_lm_head or m is not head)]


def output_head(model: torch.nn.Module) -> tuple[str | None, bool]:
    """(module name of the output projection, whether it shares its weight with the input embeddings); (None,
    False) when the output projection is not an nn.Linear."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, torch.nn.Linear):
        return None, False
    name = next(n for n, m in model.named_modules() if m is head)
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    return name, embed is not None and getattr(embed, "weight", None) is head.weight


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


def swap_linears(model: torch.nn.Module, technique: str, notes: list[str], lm_head: bool,
                 make: Callable[[torch.nn.Linear], torch.nn.Module | None],
                 on_progress: Callable[[str, float | None], None]) -> str:
    """Replace every block Linear (and, with `lm_head`, the output projection) by `make(linear)`, in place; a layer
    for which `make` returns None stays as it is. Returns what happened to the output projection, for the notes.

    A quantized head tied to the input embeddings gets its own copy (the lookup keeps the float table), and its
    parameters are counted once, as the embedding's (`_workbench_param_count` = 0).
    """
    layers = dict(require_linears(model, technique, notes))
    head_name, tied = output_head(model) if lm_head else (None, False)
    if head_name is not None:
        layers[head_name] = model.get_submodule(head_name)
    on_progress("quantizing Linear weights", 0.0)
    for i, (name, linear) in enumerate(layers.items()):
        new = make(linear)
        if new is not None:
            model.set_submodule(name, new)
        on_progress("quantizing Linear weights", (i + 1) / len(layers))
    if head_name is None:
        return "the output projection kept in float"
    if model.get_submodule(head_name) is layers[head_name]:
        return "the output projection kept in float (its shape does not fit the kernel)"
    if tied:
        model.get_submodule(head_name)._workbench_param_count = 0  # counted once, as the embedding
        return "the output projection quantized too, as its own copy of the tied embeddings"
    return "the output projection quantized too"
