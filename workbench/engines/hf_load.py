"""How the hf engine loads a model, decided before a weight is read.

A quantization that is the run's first technique, and that `from_pretrained` can apply (its
`load_time_config`), quantizes each layer as it is read: the float model never exists whole. A device map
is computed on the meta device (sized as the model will load) and handed to `from_pretrained`, which places
each layer as it reads it (accelerate's lazy placement, disk offload into a per-run folder). Techniques that
change the whole float model after loading (pruning, simulated quantization) keep the older order: load,
apply, then place. The plan names the path its memory takes, for the estimate.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from typing import Any

import torch

from workbench.config import RunConfig
from workbench.errors import ConfigError
from workbench.measure.estimate import LoadPath
from workbench.models.sources import TORCH_DTYPES
from workbench.parallel.placement import (check_offload_folder, device_map_for, module_bytes, offloaded,
                                          parse_device_map, parse_max_memory)
from workbench.report import human_bytes
from workbench.result import TechniqueRecord
from workbench.techniques._targets import block_linears, block_weights
from workbench.techniques.apply import record
from workbench.techniques.base import TechniqueConfig

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadPlan:
    """What `from_pretrained` does while reading the weights, and the memory path that takes."""

    path: LoadPath
    technique: TechniqueConfig | None = None  # the quantization applied while loading
    skip: tuple[str, ...] = ()  # modules it leaves in the run's dtype (output projection, offloaded layers)
    device_map: dict[str, str] | None = None  # module -> device, placed while loading
    split_bytes: dict[str, int] = field(default_factory=dict)  # bytes per device under that map

    def kwargs(self, dtype: str, offload_dir: str | None) -> dict[str, Any]:
        """The `from_pretrained` arguments that carry it out (empty: load as is)."""
        out: dict[str, Any] = {}
        if self.technique is not None:
            out["quantization_config"] = self.technique.load_time_config(
                dtype, self.skip, offload=bool(self.device_map and offloaded(self.device_map)))
        if self.device_map:
            out["device_map"] = {k: int(v.split(":")[1]) if v.startswith("cuda:") else v
                                 for k, v in self.device_map.items()}
            out["offload_folder"] = offload_dir
        return out

    def describe(self, peak: str | None) -> str:
        """One line for the load stage: the path and where its bytes go."""
        if self.device_map:
            where = ", ".join(f"{human_bytes(b)} on {d}" for d, b in sorted(self.split_bytes.items()))
            return f"{self.path.name}, placed while loading: {where}"
        return peak or self.path.name

    def record(self, model: torch.nn.Module, dtype: str) -> TechniqueRecord:
        """What the result says about the technique `from_pretrained` applied."""
        technique = self.technique
        layers = block_linears(model)
        done = sum(_quantized(m) for _, m in layers)
        notes = [f"quantized while loading (from_pretrained with "
                 f"{type(technique.load_time_config(dtype)).__name__}): {done} of {len(layers)} Linear layers "
                 f"converted (output projection and embeddings kept in {dtype})"]
        away = offloaded(self.device_map) if self.device_map else []
        if away:
            notes.append(f"{len(away)} modules offloaded to the CPU or disk stay in {dtype}: transformers does not "
                         "quantize offloaded layers")
        return record(technique, notes + technique.after_load_time(model, dtype))


def _quantized(module: torch.nn.Module) -> bool:
    """A Linear replaced by a quantized class, or holding a quantized tensor subclass as its weight."""
    return type(module) is not torch.nn.Linear or type(module.weight) not in (torch.Tensor, torch.nn.Parameter)


def _meta(model_config: Any, cfg: RunConfig) -> torch.nn.Module | None:
    """The model on the meta device in the run's dtype (shapes and element sizes, no memory), or None."""
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(copy.deepcopy(model_config), dtype=TORCH_DTYPES[cfg.dtype],
                                                    trust_remote_code=cfg.trust_remote_code)
    except Exception as e:  # noqa: BLE001 - then loading decides everything, as before this plan existed
        logger.info("cannot build the model on the meta device (%s): loading as is", str(e).splitlines()[0] if str(e) else e)
        return None


def _matrices(meta: torch.nn.Module) -> list[tuple[str, int, int]]:
    """(name, out, in) of every block weight matrix (GPT-2's Conv1D stores (in, out))."""
    return [(name, *(m.weight.shape if isinstance(m, torch.nn.Linear) else m.weight.shape[::-1]))
            for name, m in block_weights(meta)]


def load_path(meta: torch.nn.Module, dtype: str, techniques: tuple[TechniqueConfig, ...],
              at_load: TechniqueConfig | None) -> LoadPath:
    """Bytes of the weights once loaded and changed, and at the load's peak, from the meta model's shapes."""
    size = TORCH_DTYPES[dtype].itemsize
    params = {id(p): p for p in meta.parameters()}.values()
    full = sum(p.numel() for p in params) * size
    packer = at_load or next((t for t in techniques if t.packs_weights), None)
    matrices = _matrices(meta)
    packed = [packer.packed_bytes(o, i) for _, o, i in matrices] if packer and matrices else []
    if not packed or None in packed:
        return LoadPath(dtype, full, full)
    weights = full - sum(o * i for _, o, i in matrices) * size + sum(packed)
    if at_load is not None:  # one float matrix at a time on its way to being quantized
        return LoadPath(f"{at_load.name} while loading", weights, weights + max(o * i for _, o, i in matrices) * size,
                        "while loading")
    return LoadPath(f"{dtype} then {packer.name}", weights, full + max(packed), "after loading")


def _loads_quantized(first: TechniqueConfig | None, meta: torch.nn.Module | None, cfg: RunConfig,
                     device: torch.device, load_kwargs: dict[str, Any]) -> bool:
    """Whether `from_pretrained` can apply the run's first technique while reading the weights."""
    if first is None or meta is None or load_kwargs:  # tensor parallelism loads through its own plan
        return False
    if any(not isinstance(m, torch.nn.Linear) for _, m in block_weights(meta)):  # GPT-2's Conv1D: converted after
        return False
    if cfg.device_map and device.type != "cuda":  # transformers keeps CPU-placed layers unquantized
        return False
    return first.load_time_config(cfg.dtype) is not None


def _resize_for(meta: torch.nn.Module, technique: TechniqueConfig) -> None:
    """Give each block Linear of the meta model a weight of the bytes `technique` stores (for device-map sizes)."""
    for _, module in block_linears(meta):
        out_f, in_f = module.weight.shape
        module.weight = torch.nn.Parameter(torch.empty(technique.packed_bytes(out_f, in_f), dtype=torch.uint8,
                                                       device="meta"), requires_grad=False)


def plan_load(cfg: RunConfig, model_config: Any, device: torch.device, load_kwargs: dict[str, Any]) -> LoadPlan:
    """Decide how the weights load (ConfigError for a device map or offload folder that cannot work)."""
    if cfg.device_map:
        check_offload_folder(cfg.offload_folder)
    meta = _meta(model_config, cfg)
    first = cfg.techniques[0] if cfg.techniques else None
    at_load = first if _loads_quantized(first, meta, cfg, device, load_kwargs) else None
    if meta is None:  # nothing known before loading: the estimate counts the parameters its own way
        return LoadPlan(LoadPath("", 0, 0))
    path = load_path(meta, cfg.dtype, cfg.techniques, at_load)
    remaining = cfg.techniques[1:] if at_load else cfg.techniques
    skip = tuple(name for name, m in meta.named_modules()
                 if isinstance(m, torch.nn.Linear) and name not in {n for n, _ in block_linears(meta)})
    if not cfg.device_map:
        return LoadPlan(path, at_load, _patterns(skip))
    if at_load is not None:
        _resize_for(meta, at_load)
    memory = parse_max_memory(cfg.max_memory) if cfg.max_memory else None
    device_map = device_map_for(meta, parse_device_map(cfg.device_map), device, memory)  # ConfigError: bad rules
    if remaining:  # techniques change the whole float model: placed after them (`place`)
        packer = next((t for t in remaining if t.packs_weights), None)
        if packer is not None and offloaded(device_map):
            raise ConfigError(f"{packer.name} packs its weights, which accelerate cannot offload after loading; drop "
                              "the device_map entries that offload (disk, or cpu next to a GPU), or the technique (on "
                              "a GPU, as the first technique, it is applied while loading and offloaded layers stay "
                              "unquantized)")
        return LoadPlan(LoadPath(f"{path.name}, placed after loading", path.weights, path.load_peak, path.quantized))
    logger.info("device map decided before loading: %s", device_map)
    return LoadPlan(path, at_load, _patterns(skip + tuple(offloaded(device_map))), device_map,
                    module_bytes(meta, device_map))


def _patterns(names: tuple[str, ...]) -> tuple[str, ...]:
    """Module names as the anchored patterns transformers matches `modules_to_not_convert` with
    ('model.layers.1' must not also match 'model.layers.10')."""
    return tuple(name.replace(".", r"\.") + r"(?:\.|$)" for name in names)
