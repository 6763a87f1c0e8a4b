"""Per-layer sensitivity: which layers a technique hurts, as data a heatmap can draw.

For each Linear layer, the model is run with only that layer replaced by its compressed version;
the error is the KL divergence from the unmodified model on held-out text, plus the weight SQNR.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from workbench.config import RunConfig
from workbench.errors import ConfigError
from workbench.events import OnEvent, StageEvent, never_stop, no_event
from workbench.measure.accuracy import compute_baseline, evaluate, make_windows
from workbench.models.loader import load_model
from workbench.models.sources import resolve
from workbench.serde import from_dict, to_dict
from workbench.techniques import ApplyContext, TechniqueConfig, handler_for
from workbench.techniques._targets import block_weights, weight_matrix
from workbench.techniques.sim import sqnr_db
from workbench.textio import heldout_ids

_BLOCK = re.compile(r"\.(\d+)\.")


@dataclass(frozen=True)
class LayerSensitivity:
    """The error one layer's compression causes on its own."""

    layer: str  # full module name, e.g. model.layers.3.mlp.down_proj
    block: int | None  # transformer block index (None outside the blocks)
    module: str  # name inside the block, e.g. mlp.down_proj
    params: int
    sqnr_db: float | None  # weight signal-to-noise of the compressed weight (None: not measurable)
    kl: float  # mean KL(unmodified || only this layer compressed) per held-out token


@dataclass(frozen=True)
class WeightHistogram:
    """One layer's weight distribution before and after, over the same bins."""

    layer: str
    edges: tuple[float, ...]
    before: tuple[int, ...]
    after: tuple[int, ...]
    distinct_after: int


@dataclass(frozen=True)
class SensitivityReport:
    """Per-layer errors of one technique on one model."""

    model: str
    technique: str
    eval_tokens: int
    layers: tuple[LayerSensitivity, ...]
    histogram: WeightHistogram | None
    definition: str

    def matrix(self, metric: str = "kl") -> tuple[list[int], list[str], list[list[float | None]]]:
        """(blocks, module names, values[block][module]) for a heatmap of `kl` or `sqnr_db`."""
        rows = [r for r in self.layers if r.block is not None]
        blocks = sorted({r.block for r in rows})
        modules = list(dict.fromkeys(r.module for r in rows))
        grid: list[list[float | None]] = [[None] * len(modules) for _ in blocks]
        for r in rows:
            grid[blocks.index(r.block)][modules.index(r.module)] = getattr(r, metric)
        return blocks, modules, grid

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (JSON edge)."""
        return to_dict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SensitivityReport:
        """Inverse of `to_dict`."""
        return from_dict(cls, data)


def effective_weight(module: torch.nn.Module, in_features: int, like: torch.Tensor) -> torch.Tensor | None:
    """The (out, in) float weight a packed Linear-like module applies, probed with an identity input."""
    try:
        with torch.inference_mode():
            eye = torch.eye(in_features, dtype=like.dtype, device=like.device)  # (in, in)
            y = module(eye) - module(torch.zeros_like(eye))  # (in, out): rows of W^T
        return y.float().T.contiguous()
    except Exception:  # noqa: BLE001 - some packed kernels refuse odd shapes; SQNR is then unknown
        return None


def _differs(old: torch.nn.Module, new: torch.nn.Module) -> bool:
    """True when the technique changed this layer (its type, its weight, or added hooks)."""
    if type(new) is not type(old) or new._forward_pre_hooks or new._forward_hooks:
        return True
    return not torch.equal(old.weight, new.weight)


def _swap(model: torch.nn.Module, name: str, new: torch.nn.Module) -> torch.nn.Module:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, child)
    setattr(parent, child, new)
    return old


def _histogram(name: str, before: torch.Tensor, after: torch.Tensor, bins: int = 60) -> WeightHistogram:
    lo, hi = float(before.min()), float(before.max())
    edges = torch.linspace(lo, hi, bins + 1)
    h_before = torch.histc(before.float(), bins=bins, min=lo, max=hi)
    h_after = torch.histc(after.float().clamp(lo, hi), bins=bins, min=lo, max=hi)
    return WeightHistogram(name, tuple(edges.tolist()), tuple(int(x) for x in h_before.tolist()),
                           tuple(int(x) for x in h_after.tolist()), int(after.unique().numel()))


def _compressed_copy(loaded: Any, cfg: TechniqueConfig, dtype: str, on_event: OnEvent) -> torch.nn.Module:
    """A deep copy of the model with the technique applied to every layer."""
    model = copy.deepcopy(loaded.model)
    ctx = ApplyContext(model, loaded.tokenizer, loaded.device, dtype,
                       lambda m, f: on_event(StageEvent("apply", "progress", m, f)))
    return handler_for(cfg)(cfg, ctx) or model


def _layer_pairs(model: torch.nn.Module, compressed: torch.nn.Module,
                 technique: str) -> dict[str, tuple[torch.nn.Module, torch.nn.Module]]:
    """name -> (original, compressed) for every layer the technique changed; refuse shape changes."""
    pairs = {}
    for name, layer in block_weights(model, include_lm_head=True):
        try:
            new = compressed.get_submodule(name)
        except AttributeError:
            new = None
        if new is None or (type(new) is type(layer) and new.weight.shape != layer.weight.shape):
            raise ConfigError("per-layer sensitivity needs a technique that keeps every layer's shape; "
                              f"{technique} changes {name}")
        if _differs(layer, new):
            pairs[name] = (layer, new)
    return pairs


def _layer_row(model: torch.nn.Module, name: str, pair: tuple[torch.nn.Module, torch.nn.Module], windows: Any,
               device: torch.device, base: Any) -> tuple[LayerSensitivity, torch.Tensor | None]:
    """Swap one compressed layer in, measure the KL it alone causes, swap it back."""
    layer, new = pair
    w = weight_matrix(layer)  # (out, in)
    w_hat = weight_matrix(new).float() if type(new) is type(layer) else effective_weight(new, w.shape[1], w)
    _swap(model, name, new)
    try:
        acc = evaluate(model, windows, device, base)
    finally:
        _swap(model, name, layer)
    match = _BLOCK.search(name)
    row = LayerSensitivity(layer=name, block=int(match.group(1)) if match else None,
                           module=name[match.end():] if match else name, params=w.numel(),
                           sqnr_db=sqnr_db(w, w_hat) if w_hat is not None else None, kl=acc.kl_vs_baseline)
    return row, w_hat


def analyze(model: str = "tiny", technique: str = "sim:bits=4", *, dtype: str = "fp32", device: str = "auto",
            eval_tokens: int = 512, eval_context: int = 128, histogram_layer: str | None = None,
            on_event: OnEvent = no_event, should_stop: Callable[[], bool] = never_stop) -> SensitivityReport | None:
    """Per-layer SQNR and KL of `technique` on `model`; None if stopped."""
    from workbench.execution import resolve_device

    cfg = RunConfig(model=model, dtype=dtype, device=device, techniques=(technique,)).techniques[0]
    spec, name = cfg.spec(), cfg.name
    dev = resolve_device(device)
    on_event(StageEvent("load", "start", f"loading {model}"))
    loaded = load_model(resolve(model), dtype, dev)
    if histogram_layer is not None and histogram_layer not in dict(block_weights(loaded.model, True)):
        raise ConfigError(f"no Linear layer named {histogram_layer!r}; for example "
                          f"{block_weights(loaded.model)[0][0]!r}")
    on_event(StageEvent("apply", "start", spec))
    pairs = _layer_pairs(loaded.model, _compressed_copy(loaded, cfg, dtype, on_event), name)
    windows = make_windows(heldout_ids(loaded.tokenizer),
                           min(eval_context, loaded.model.config.max_position_embeddings), eval_tokens)
    base = compute_baseline(loaded.model, windows, dev)
    rows, weights = [], {}
    on_event(StageEvent("evaluate", "start", f"{len(pairs)} layers x {windows.scored_tokens} tokens"))
    for i, (layer_name, pair) in enumerate(pairs.items()):
        if should_stop():
            return None
        row, weights[layer_name] = _layer_row(loaded.model, layer_name, pair, windows, dev, base)
        rows.append(row)
        on_event(StageEvent("evaluate", "progress", layer_name, (i + 1) / len(pairs)))
    hist_name = histogram_layer or (max(rows, key=lambda r: r.kl).layer if rows else None)
    hist = None
    if hist_name in pairs and weights.get(hist_name) is not None:
        hist = _histogram(hist_name, weight_matrix(pairs[hist_name][0]), weights[hist_name])
    return SensitivityReport(
        model=model, technique=spec, eval_tokens=windows.scored_tokens, layers=tuple(rows), histogram=hist,
        definition=("kl: mean KL(unmodified || model with only this layer compressed) per held-out token, "
                    f"{windows.scored_tokens} tokens in windows of {windows.context}; sqnr_db: 10 log10(|W|^2 / "
                    "|W - W'|^2) of the weight the compressed layer applies (packed layers probed with an "
                    "identity input)"))
