"""`structured`: remove whole attention heads and MLP channels, so the model really shrinks and speeds up.

Importance is activation-based, over calibration text: input channel j of o_proj / down_proj scores
‖X_j‖₂ · ‖W[:, j]‖₂ (how much it adds to the layer's output). A head scores the sum over its head_dim
channels, a KV group the sum over its query heads; MLP channels score on their own. In every layer the
lowest-scoring KV groups (a key/value head with all its query heads, so num_key_value_groups stays
valid under GQA) and MLP channels are cut out by rebuilding smaller nn.Linear layers: q/k/v and
gate/up lose output rows, o_proj and down_proj lose input columns. Every layer loses the same number,
so `model.config` describes the new sizes and save_pretrained / from_pretrained round-trip.
Llama-family layouts (llama, qwen2, mistral; the attention forward reshapes with -1 heads), and GPT-2's
MLP channels (its Conv1D projections; see `_structured_gpt2`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from workbench.errors import ConfigError
from workbench.measure.memory import parameter_count
from workbench.options import option
from workbench.techniques._structured_gpt2 import GPT2_HEADS, gpt2_blocks, prune_gpt2_mlp
from workbench.techniques._targets import weight_matrix
from workbench.techniques.base import ApplyContext, Expectation, TechniqueConfig, register, register_handler
from workbench.techniques.wanda import input_norms

logger = logging.getLogger(__name__)
SUPPORTED = ("llama", "qwen2", "mistral")
_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")


@register
@dataclass(frozen=True)
class StructuredConfig(TechniqueConfig):
    """Structured pruning: cut the least important KV groups (with their heads) and MLP channels."""

    name = "structured"
    kind = "prune"
    engines = ("hf", "llamacpp")  # pruned float weights survive the GGUF export
    simulated = False
    needs_float_weights = True
    summary = "structured pruning of attention heads and MLP channels: a really smaller, faster model (Llama family)"
    expect = Expectation(max_kl=1.6, raises_perplexity=True)  # tiny: KL 0.666, perplexity 80.42 vs 56.11

    heads_ratio: float = option(0.25, "Share of attention heads removed from every layer (0..0.9), in whole KV "
                                "groups; at least one group stays.", group="Pruning", minimum=0.0, maximum=0.9)
    mlp_ratio: float = option(0.25, "Share of MLP channels (intermediate size) removed from every layer (0..0.9).",
                              group="Pruning", minimum=0.0, maximum=0.9)
    calibration_tokens: int = option(2048, "Calibration tokens for the activation-based importance scores.",
                                     group="Pruning", minimum=128, maximum=1_000_000)

    def model_problem(self, model: torch.nn.Module) -> str | None:
        """The Llama module layout (separate q/k/v/o and gate/up/down projections), or GPT-2's MLP channels."""
        if gpt2_blocks(model) is not None:
            return GPT2_HEADS if self.heads_ratio > 0 else None
        try:
            _decoder_layers(model)
        except ConfigError as e:
            return str(e)
        return None

    def notes(self) -> str:
        """What the numbers mean."""
        return ("real: heads (whole KV groups) and MLP channels cut out of smaller nn.Linear layers — fewer "
                "parameters, smaller KV cache, faster; importance is activation-based: input channel j of "
                "o_proj/down_proj scores ‖X_j‖₂·‖W[:, j]‖₂ over calibration text, summed per head and KV "
                "group, and the lowest go in every layer")


def _decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The decoder layers; ConfigError for any architecture whose module layout is not the Llama one."""
    model_type = getattr(getattr(model, "config", None), "model_type", "") or type(model).__name__
    layers = getattr(getattr(model, "model", None), "layers", None)
    ok = model_type in SUPPORTED and layers is not None and all(
        all(hasattr(layer.self_attn, n) for n in _ATTN) and all(hasattr(layer.mlp, n) for n in _MLP)
        for layer in layers)
    if not ok:
        raise ConfigError(f"structured pruning supports the Llama family ({', '.join(SUPPORTED)}) and GPT-2's MLP "
                          f"channels, not {model_type!r}; use magnitude, wanda or 2:4 for this model")
    return list(layers)


def _linear(src: torch.nn.Linear, rows: torch.Tensor | None = None,
            cols: torch.Tensor | None = None) -> torch.nn.Linear:
    """A new, smaller nn.Linear holding the chosen output rows and/or input columns of `src`."""
    w = src.weight.data  # (out, in)
    w = w.index_select(0, rows) if rows is not None else w.clone()  # (out', in)
    w = w.index_select(1, cols) if cols is not None else w  # (out', in')
    new = torch.nn.Linear(w.shape[1], w.shape[0], bias=src.bias is not None, device="meta", dtype=w.dtype)
    new.weight = torch.nn.Parameter(w.contiguous(), requires_grad=src.weight.requires_grad)
    if src.bias is not None:
        b = src.bias.data.index_select(0, rows) if rows is not None else src.bias.data.clone()  # (out',)
        new.bias = torch.nn.Parameter(b, requires_grad=src.bias.requires_grad)
    return new


def _keep(scores: torch.Tensor, drop: int) -> torch.Tensor:
    """Indices (ascending) of all but the `drop` lowest scores."""
    return torch.topk(scores, scores.numel() - drop).indices.sort().values


def _channel_scores(linear: torch.nn.Linear, norm: torch.Tensor | None) -> torch.Tensor:
    """‖X_j‖₂ · ‖W[:, j]‖₂ for every input channel j of an output projection."""
    col = weight_matrix(linear).float().norm(dim=0)  # (in,); a GPT-2 Conv1D is viewed as (out, in)
    return col * (norm.to(col.device) if norm is not None else 1.0)  # (in,)


def _prune_attention(attn: torch.nn.Module, norm: torch.Tensor | None, ratio: float) -> tuple[int, int, int]:
    """Cut the lowest-scoring KV groups out of one attention block; (heads, kv heads, head_dim) left."""
    hd = attn.head_dim
    n_heads, n_kv = attn.q_proj.out_features // hd, attn.k_proj.out_features // hd
    n_rep = n_heads // n_kv  # query heads per KV head: head h uses KV head h // n_rep
    groups = _channel_scores(attn.o_proj, norm).view(n_kv, n_rep, hd).sum(dim=(1, 2))  # (n_kv,)
    kept = _keep(groups, min(round(ratio * n_kv), n_kv - 1))  # (kv',)
    kv_rows = (kept[:, None] * hd + torch.arange(hd, device=kept.device)).flatten()  # (kv' * hd,)
    heads = (kept[:, None] * n_rep + torch.arange(n_rep, device=kept.device)).flatten()  # (kv' * n_rep,)
    q_rows = (heads[:, None] * hd + torch.arange(hd, device=kept.device)).flatten()  # (heads' * hd,)
    attn.q_proj = _linear(attn.q_proj, rows=q_rows)
    attn.k_proj = _linear(attn.k_proj, rows=kv_rows)
    attn.v_proj = _linear(attn.v_proj, rows=kv_rows)
    attn.o_proj = _linear(attn.o_proj, cols=q_rows)
    for attr, value in (("num_heads", heads.numel()), ("num_key_value_heads", kept.numel())):
        if hasattr(attn, attr):  # older transformers keep head counts on the module
            setattr(attn, attr, value)
    return heads.numel(), kept.numel(), hd


def _prune_mlp(mlp: torch.nn.Module, norm: torch.Tensor | None, ratio: float) -> int:
    """Cut the lowest-scoring intermediate channels out of one MLP; channels left."""
    inter = mlp.down_proj.in_features
    kept = _keep(_channel_scores(mlp.down_proj, norm), min(round(ratio * inter), inter - 1))  # (inter',)
    mlp.gate_proj = _linear(mlp.gate_proj, rows=kept)
    mlp.up_proj = _linear(mlp.up_proj, rows=kept)
    mlp.down_proj = _linear(mlp.down_proj, cols=kept)
    if hasattr(mlp, "intermediate_size"):
        mlp.intermediate_size = kept.numel()
    return kept.numel()


def _save_problem(config: object) -> str | None:
    """Why save_pretrained would refuse this config (transformers validates it on save), or None."""
    validate = getattr(config, "validate", None)
    try:
        if validate is not None:
            validate()
    except Exception as e:  # noqa: BLE001 - any validation failure is reported, not raised
        return str(e).strip().splitlines()[-1].strip()
    return None


@register_handler(StructuredConfig)
def apply_structured(config: StructuredConfig, ctx: ApplyContext) -> None:
    """Score heads and channels on calibration text, rebuild every layer smaller, update model.config."""
    blocks = gpt2_blocks(ctx.model)
    if blocks is not None:
        _apply_gpt2(config, ctx, blocks)
        return
    layers = _decoder_layers(ctx.model)
    cfg = ctx.model.config
    first = layers[0].self_attn
    before_heads, before_inter = first.q_proj.out_features // first.head_dim, layers[0].mlp.down_proj.in_features
    before = parameter_count(ctx.model)
    outputs = {f"{i}.{part}": mod for i, layer in enumerate(layers)
               for part, mod in (("o", layer.self_attn.o_proj), ("down", layer.mlp.down_proj))}
    wanted = config.heads_ratio > 0 or config.mlp_ratio > 0  # nothing to rank when nothing goes
    norms, used = input_norms(ctx, outputs, config.calibration_tokens) if wanted else ({}, 0)
    shapes = set()
    with torch.no_grad():
        for i, layer in enumerate(layers):
            heads, kv, hd = _prune_attention(layer.self_attn, norms.get(f"{i}.o"), config.heads_ratio)
            inter = _prune_mlp(layer.mlp, norms.get(f"{i}.down"), config.mlp_ratio)
            shapes.add((heads, kv, hd, inter))
            ctx.on_progress(f"rebuilt layer {i + 1}/{len(layers)}", 0.5 + 0.5 * (i + 1) / len(layers))
    if len(shapes) == 1:  # uniform, as every layer loses the same counts: the config can describe it
        heads, kv, hd, inter = shapes.pop()
        cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.intermediate_size = heads, kv, hd, inter
    _notes(ctx, config, (before_heads, heads), (before_inter, inter), kv, (before, parameter_count(ctx.model)), used)
    logger.info("structured: %d heads and %d MLP channels left per layer", heads, inter)


def _notes(ctx: ApplyContext, config: StructuredConfig, heads: tuple[int, int], inter: tuple[int, int], kv: int,
           params: tuple[int, int], used: int) -> None:
    """Run notes: what was removed exactly, and whether the result can be saved."""
    (h0, h1), (i0, i1), (p0, p1) = heads, inter, params
    group = h1 // kv  # query heads per KV head (unchanged by pruning)
    asked = config.heads_ratio * h0
    head_note = (f"removed {h0 - h1} of {h0} attention heads per layer "
                 f"(asked {config.heads_ratio:g} × {h0} = {asked:g})")
    if h0 - h1 != asked:
        head_note += f"; heads go in KV groups of {group} query heads and at least one group stays"
    ctx.notes.append(f"{head_note}; {kv} KV heads left; removed {i0 - i1} of {i0} MLP channels per layer "
                     f"(asked {config.mlp_ratio:g}); parameters {p0:,} → {p1:,} (−{p0 - p1:,}, "
                     f"{(p0 - p1) / max(1, p0):.1%})" + (f"; scores from {used:,} calibration tokens" if used else ""))
    problem = _save_problem(ctx.model.config)
    if problem:
        ctx.notes.append(f"save_pretrained would refuse this model: {problem}")


def _apply_gpt2(config: StructuredConfig, ctx: ApplyContext, blocks: list[torch.nn.Module]) -> None:
    """GPT-2: cut the lowest-scoring MLP channels of every block; `n_inner` describes the new width."""
    if config.heads_ratio > 0:
        raise ConfigError(GPT2_HEADS)
    before, inter0 = parameter_count(ctx.model), blocks[0].mlp.c_proj.weight.shape[0]
    outputs = {f"{i}.down": block.mlp.c_proj for i, block in enumerate(blocks)}
    norms, used = input_norms(ctx, outputs, config.calibration_tokens) if config.mlp_ratio > 0 else ({}, 0)
    inter = inter0
    with torch.no_grad():
        for i, block in enumerate(blocks):
            scores = _channel_scores(block.mlp.c_proj, norms.get(f"{i}.down"))  # (inter,)
            inter = prune_gpt2_mlp(block.mlp, _keep(scores, min(round(config.mlp_ratio * inter0), inter0 - 1)))
            ctx.on_progress(f"rebuilt block {i + 1}/{len(blocks)}", 0.5 + 0.5 * (i + 1) / len(blocks))
    ctx.model.config.n_inner = inter
    after = parameter_count(ctx.model)
    ctx.notes.append(f"GPT-2: removed {inter0 - inter} of {inter0} MLP channels per block (asked "
                     f"{config.mlp_ratio:g}); attention heads kept; parameters {before:,} → {after:,} "
                     f"(−{before - after:,}, {(before - after) / max(1, before):.1%})"
                     + (f"; scores from {used:,} calibration tokens" if used else ""))
    logger.info("structured (GPT-2): %d MLP channels left per block", inter)
