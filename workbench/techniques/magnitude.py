"""`magnitude`: unstructured L1 magnitude pruning of the transformer blocks' Linear weights.

The k = round(sparsity × n) weights with the smallest |w| are set to zero, in place: per Linear layer
(`scope=layer`, every layer loses exactly that share) or with one threshold over all pruned weights
(`scope=global`, layers end up uneven). Embeddings and the output projection are never pruned. No
masks or hooks stay behind: the model remains an ordinary dense model, so it is not any faster.
The zero-counting helpers here are shared by `wanda` and `2:4`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from workbench.options import option
from workbench.techniques._targets import block_weights
from workbench.techniques.base import ApplyContext, Expectation, TechniqueConfig, register, register_handler

logger = logging.getLogger(__name__)
SCOPES = ("layer", "global")
DENSE_NOTE = "simulated: zeros are stored as ordinary dense weights, and dense kernels do not get faster from zeros"


def zero_count(modules: list[torch.nn.Module]) -> tuple[int, int]:
    """(zeros, total) over the modules' weights."""
    zeros = sum(int((m.weight.data == 0).sum()) for m in modules)
    return zeros, sum(m.weight.numel() for m in modules)


def sparsity_note(zeros: int, total: int, target: float, what: str) -> str:
    """One sentence: the exact share of zeros achieved against the target."""
    return (f"{what}: {zeros:,} of {total:,} block Linear weights are zero = {zeros / max(1, total):.4%} "
            f"(target {target:.2%})")


@register
@dataclass(frozen=True)
class MagnitudeConfig(TechniqueConfig):
    """Unstructured magnitude pruning: zero the smallest |w| of the block Linear layers."""

    name = "magnitude"
    kind = "prune"
    engines = ("hf", "llamacpp")  # pruned float weights survive the GGUF export
    simulated = True
    needs_float_weights = True
    summary = "unstructured magnitude pruning (zeros in place): changes accuracy, not speed"
    expect = Expectation(max_kl=1.2, raises_perplexity=True)  # 50 %; tiny: KL 0.490, perplexity 66.96 vs 56.11

    sparsity: float = option(0.5, "Share of the block Linear weights set to zero (0..0.99).",
                             group="Pruning", minimum=0.0, maximum=0.99)
    scope: str = option("layer", "layer: every Linear loses exactly that share of its weights; global: one "
                        "|w| threshold over all pruned weights (layers end up uneven).", group="Pruning",
                        choices=SCOPES)

    def notes(self) -> str:
        """What the numbers mean."""
        return (f"{self.sparsity:.0%} of block Linear weights with the smallest |w| zeroed "
                f"({'one threshold per layer' if self.scope == 'layer' else 'one global threshold'}; "
                f"embeddings and lm_head kept); {DENSE_NOTE}")


def _prune_layer(w: torch.Tensor, k: int) -> None:
    """Zero exactly the k smallest |w| of one weight (ties broken by position)."""
    if k:
        idx = torch.topk(w.abs().flatten().float(), k, largest=False).indices  # (k,)
        w.view(-1)[idx] = 0


def _prune_global(weights: list[torch.Tensor], k: int) -> None:
    """Zero exactly the k smallest |w| over all weights together (one threshold)."""
    if not k:
        return
    scores = torch.cat([w.abs().flatten().float() for w in weights])  # (N,)
    threshold = torch.kthvalue(scores, k).values
    drop = scores < threshold  # (N,)
    ties = (scores == threshold).nonzero().flatten()[: k - int(drop.sum())]
    drop[ties] = True
    for w, part in zip(weights, torch.split(drop, [w.numel() for w in weights])):
        w.view(-1)[part] = 0


@register_handler(MagnitudeConfig)
def apply_magnitude(config: MagnitudeConfig, ctx: ApplyContext) -> None:
    """Zero the smallest-magnitude weights in place and record the exact sparsity reached."""
    modules = [m for _, m in block_weights(ctx.model)]
    weights = [m.weight.data for m in modules]
    with torch.no_grad():
        if config.scope == "global":
            _prune_global(weights, round(config.sparsity * sum(w.numel() for w in weights)))
        else:
            for i, w in enumerate(weights):
                _prune_layer(w, round(config.sparsity * w.numel()))
                ctx.on_progress(f"pruned {i + 1}/{len(weights)} layers", (i + 1) / len(weights))
    zeros, total = zero_count(modules)
    note = sparsity_note(zeros, total, config.sparsity, f"{len(modules)} layers, {config.scope} scope")
    if config.scope == "global" and modules:
        shares = [float((m.weight.data == 0).float().mean()) for m in modules]
        note += f"; per layer from {min(shares):.1%} to {max(shares):.1%}"
    ctx.notes.append(note)
    logger.info("magnitude: %d of %d weights zero", zeros, total)
