"""`wanda`: pruning by weights and activations (Sun et al. 2023, "A Simple and Effective Pruning Approach").

score_ij = |W_ij| · ‖X_j‖₂, where ‖X_j‖₂ is the L2 norm of input channel j of the layer over every
calibration token (collected with forward pre-hooks on the Linear inputs). Within each output row the
k = round(sparsity × in_features) lowest-scoring weights are zeroed, in place. Unlike the paper's
block-by-block procedure, the norms come from one pass over the dense model. The input-norm
collector is shared by `2:4` (scores=wanda) and `structured`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from workbench.options import option
from workbench.techniques.base import ApplyContext, Expectation, TechniqueConfig, register, register_handler
from workbench.techniques._calibration import calibration_batches
from workbench.techniques._targets import block_weights, weight_matrix
from workbench.techniques.magnitude import DENSE_NOTE, sparsity_note, zero_count

logger = logging.getLogger(__name__)
CALIBRATION_SEQ_LEN = 128


@torch.inference_mode()
def input_norms(ctx: ApplyContext, modules: dict[str, torch.nn.Module], tokens: int,
                progress: float = 0.5) -> tuple[dict[str, torch.Tensor], int]:
    """‖X_j‖₂ of every input channel of each module over the calibration text, and the tokens used."""
    sums: dict[str, torch.Tensor] = {}

    def observer(name: str):
        def hook(module: torch.nn.Module, args: tuple) -> None:
            x = args[0].detach().float()  # (B, T, in)
            sq = x.pow(2).reshape(-1, x.shape[-1]).sum(dim=0)  # (in,)
            sums[name] = sq if name not in sums else sums[name] + sq
        return hook

    context = getattr(ctx.model.config, "max_position_embeddings", None) or CALIBRATION_SEQ_LEN
    seq_len = min(CALIBRATION_SEQ_LEN, context)
    batches = calibration_batches(ctx, tokens, seq_len)
    handles = [m.register_forward_pre_hook(observer(n)) for n, m in modules.items()]
    try:
        for i, ids in enumerate(batches):
            ctx.model(input_ids=ids, use_cache=False)
            ctx.on_progress("collecting activation norms", progress * (i + 1) / len(batches))
    finally:
        for h in handles:
            h.remove()
    used = sum(ids.numel() for ids in batches)
    return {n: s.sqrt() for n, s in sums.items()}, used


def wanda_scores(module: torch.nn.Module, norm: torch.Tensor) -> torch.Tensor:
    """|W| · ‖X_j‖₂ for every weight of the module, as (out, in)."""
    w = weight_matrix(module).float()  # (out, in)
    return w.abs() * norm.to(w.device)[None, :]  # (out, in)


def prune_rows(module: torch.nn.Module, scores: torch.Tensor, k: int) -> None:
    """Zero, in every output row, the k weights with the lowest scores."""
    if k:
        idx = torch.topk(scores, k, dim=1, largest=False).indices  # (out, k)
        keep = torch.ones_like(scores, dtype=torch.bool).scatter_(1, idx, False)  # (out, in)
        weight_matrix(module).masked_fill_(~keep, 0)


@register
@dataclass(frozen=True)
class WandaConfig(TechniqueConfig):
    """Wanda: zero the weights with the lowest |W|·‖X‖ in every output row, from calibration activations."""

    name = "wanda"
    kind = "prune"
    engines = ("hf", "llamacpp")  # pruned float weights survive the GGUF export
    simulated = True
    needs_float_weights = True
    summary = "activation-aware unstructured pruning (|W|·‖X‖ per output row): changes accuracy, not speed"
    expect = Expectation(max_kl=1.0, raises_perplexity=True)  # 50 %; tiny: KL 0.409, perplexity 63.18 vs 56.11

    sparsity: float = option(0.5, "Share of weights set to zero in every output row of each block Linear (0..0.99).",
                             group="Pruning", minimum=0.0, maximum=0.99)
    calibration_tokens: int = option(2048, "Calibration tokens run through the model to measure the input "
                                     "norms ‖X_j‖.", group="Pruning", minimum=128, maximum=1_000_000)

    def notes(self) -> str:
        """What the numbers mean."""
        return (f"{self.sparsity:.0%} of every output row zeroed by score |W|·‖X_j‖₂ (input-channel norms from "
                f"calibration text, one pass over the dense model); {DENSE_NOTE}")


@register_handler(WandaConfig)
def apply_wanda(config: WandaConfig, ctx: ApplyContext) -> None:
    """Collect input norms over calibration text, then prune every output row to the target sparsity."""
    targets = dict(block_weights(ctx.model))
    norms, used = input_norms(ctx, targets, config.calibration_tokens)
    with torch.no_grad():
        for i, (name, module) in enumerate(targets.items()):
            in_features = weight_matrix(module).shape[1]
            norm = norms.get(name, torch.ones(in_features))  # a layer the text never reached: plain |W|
            prune_rows(module, wanda_scores(module, norm), round(config.sparsity * in_features))
            ctx.on_progress(f"pruned {name}", 0.5 + 0.5 * (i + 1) / len(targets))
    zeros, total = zero_count(list(targets.values()))
    missing = [n for n in targets if n not in norms]
    ctx.notes.append(sparsity_note(zeros, total, config.sparsity, f"{len(targets)} layers, per output row")
                     + f"; {used:,} calibration tokens"
                     + (f"; {len(missing)} layers saw no activations (scored by |W| alone)" if missing else ""))
    logger.info("wanda: %d of %d weights zero from %d calibration tokens", zeros, total, used)
