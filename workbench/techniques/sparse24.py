"""`2:4`: semi-structured sparsity: in every group of 4 consecutive input weights, 2 are zero.

The two lowest-scoring weights of each group of 4 (along the input dimension of every output row) are
zeroed; scores are |W| (magnitude) or |W|·‖X_j‖₂ (wanda, from calibration text). On NVIDIA GPUs of
compute capability ≥ 8.0 (Ampere and later), fp16/bf16 weights are then converted to PyTorch's
semi-structured sparse tensors (`torch.sparse.to_sparse_semi_structured`), which store half the values
plus 2-bit metadata and run on the sparse tensor cores (cuSPARSELt/CUTLASS): a real speedup. Anywhere
else only the mask is applied: the accuracy effect of 2:4 sparsity, with no speedup.
Layers whose in_features is not a multiple of 4 are left dense.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from workbench.options import option
from workbench.techniques.base import ApplyContext, Expectation, TechniqueConfig, register, register_handler
from workbench.techniques._targets import block_weights, weight_matrix
from workbench.techniques.magnitude import sparsity_note, zero_count
from workbench.techniques.wanda import input_norms, wanda_scores

logger = logging.getLogger(__name__)
SCORES = ("magnitude", "wanda")
KERNEL_DTYPES = ("fp16", "bf16")
MASK_ONLY = "2:4 sparse kernels need CUDA compute capability ≥ 8.0; masks only: accuracy effect, no speedup"


def kernel_reason(device: torch.device, dtype: str) -> str | None:
    """Why real 2:4 kernels cannot be used for `device` and `dtype` (None: they can)."""
    if device.type != "cuda" or torch.cuda.get_device_capability(device) < (8, 0):
        return MASK_ONLY
    if dtype not in KERNEL_DTYPES:
        return f"2:4 sparse kernels need fp16 or bf16 weights, not {dtype}; masks only: accuracy effect, no speedup"
    return None


def mask_2to4(scores: torch.Tensor) -> torch.Tensor:
    """Keep-mask (out, in) that keeps the 2 highest scores of every group of 4 consecutive inputs."""
    out_f, in_f = scores.shape
    groups = scores.reshape(out_f, in_f // 4, 4)  # (out, in/4, 4)
    drop = torch.topk(groups, 2, dim=2, largest=False).indices  # (out, in/4, 2)
    keep = torch.ones_like(groups, dtype=torch.bool).scatter_(2, drop, False)  # (out, in/4, 4)
    return keep.reshape(out_f, in_f)  # (out, in)


def to_sparse_kernels(modules: list[torch.nn.Module]) -> tuple[int, str]:
    """Swap each nn.Linear's masked weight for a semi-structured sparse tensor; (converted, last error)."""
    from torch.sparse import to_sparse_semi_structured

    converted, error = 0, ""
    for module in modules:
        if not isinstance(module, torch.nn.Linear):  # GPT-2's Conv1D runs addmm, which has no sparse kernel
            continue
        try:
            sparse = to_sparse_semi_structured(module.weight.data.contiguous())  # (out, in), half the values
            module.weight = torch.nn.Parameter(sparse, requires_grad=False)
            converted += 1
        except (RuntimeError, NotImplementedError, ValueError) as e:  # shape / backend limits: stays dense
            error = str(e).splitlines()[0][:120]
    return converted, error


@register
@dataclass(frozen=True)
class Sparse24Config(TechniqueConfig):
    """2:4 semi-structured pruning: masks everywhere, real sparse kernels on CUDA compute capability ≥ 8.0."""

    name = "2:4"
    kind = "prune"
    engines = ("hf", "llamacpp")  # pruned float weights survive the GGUF export
    simulated = True  # on CPU and older GPUs; real kernels are named in the run's notes when used
    needs_float_weights = True
    summary = "2:4 semi-structured pruning: masks everywhere (accuracy), sparse kernels on Ampere+ GPUs (speed)"
    expect = Expectation(max_kl=2.0, raises_perplexity=True)  # tiny: KL 0.946, perplexity 89.48 vs 56.11

    scores: str = option("magnitude", "What decides which 2 of every 4 weights go: magnitude |W|, or wanda "
                         "|W|·‖X_j‖₂ with input norms from calibration text.", group="Pruning", choices=SCORES)
    calibration_tokens: int = option(2048, "Calibration tokens for scores=wanda.", group="Pruning",
                                     minimum=128, maximum=1_000_000)
    kernels: bool = option(True, "On CUDA compute capability ≥ 8.0 with fp16/bf16, convert the weights to "
                           "sparse semi-structured tensors for real speed (false: masks only).", group="Pruning")

    def notes(self) -> str:
        """What the numbers mean."""
        return (f"2 of every 4 consecutive input weights zeroed by {self.scores} score (50% of the pruned layers); "
                "speed changes only where real 2:4 kernels are used (see below)")

    def conflicts_before(self, later: TechniqueConfig, dtype: str) -> str | None:
        """Sparse kernel weights cannot be edited or packed by a later technique."""
        if self.kernels and dtype in KERNEL_DTYPES:
            return (f"on a GPU 2:4 turns {dtype} weights into sparse kernel tensors that {later.name} cannot "
                    "change; put 2:4 last, or use 2:4:kernels=false")
        return None


def _masks(config: Sparse24Config, ctx: ApplyContext, targets: dict[str, torch.nn.Module]) -> list[str]:
    """Apply the 2:4 masks in place; return the names of the layers skipped (in_features % 4 != 0)."""
    norms: dict[str, torch.Tensor] = {}
    if config.scores == "wanda":
        norms, used = input_norms(ctx, targets, config.calibration_tokens)
        ctx.notes.append(f"wanda scores from {used:,} calibration tokens")
    skipped = []
    with torch.no_grad():
        for i, (name, module) in enumerate(targets.items()):
            w = weight_matrix(module)  # (out, in)
            if w.shape[1] % 4:
                skipped.append(name)
                continue
            scores = wanda_scores(module, norms[name]) if name in norms else w.abs().float()  # (out, in)
            w.masked_fill_(~mask_2to4(scores), 0)
            ctx.on_progress(f"masked {name}", 0.5 + 0.4 * (i + 1) / len(targets))
    return skipped


@register_handler(Sparse24Config)
def apply_sparse24(config: Sparse24Config, ctx: ApplyContext) -> None:
    """Mask every eligible layer to 2:4, then use sparse kernels where the device supports them."""
    targets = dict(block_weights(ctx.model))
    skipped = _masks(config, ctx, targets)
    masked = [m for n, m in targets.items() if n not in skipped]
    zeros, total = zero_count(masked)
    ctx.notes.append(sparsity_note(zeros, total, 0.5, f"{len(masked)} layers masked 2:4"))
    if skipped:
        ctx.notes.append(f"{len(skipped)} layers left dense: in_features not a multiple of 4 ({', '.join(skipped[:3])}"
                         f"{', …' if len(skipped) > 3 else ''})")
    reason = kernel_reason(ctx.device, ctx.dtype) if config.kernels else "kernels=false: masks only, no speedup"
    if reason:
        ctx.notes.append(reason)
        return
    converted, error = to_sparse_kernels(masked)
    ctx.notes.append(f"real 2:4 sparse kernels (torch semi-structured) for {converted} of {len(masked)} layers"
                     + (f"; the rest stay dense masked ({error})" if converted < len(masked) else ""))
    logger.info("2:4: %d layers on sparse kernels", converted)
