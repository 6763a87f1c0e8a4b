"""Tensor-, data- and pipeline-parallel ranks on torch.distributed: checks, process group, coordinator."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import logging
import os
import re
from typing import Any

import torch

from workbench.config import RunConfig
from workbench.errors import ConfigError
from workbench.execution import cpu_cores, resolve_device
from workbench.models.checks import meta_model
from workbench.models.sources import load_config, resolve, text_config
from workbench.parallel.coordinator import Coordinator

logger = logging.getLogger(__name__)

COLLECTIVE_TIMEOUT = dt.timedelta(minutes=30)  # a rank that waits longer than this for the others fails


@dataclasses.dataclass(frozen=True)
class Layout:
    """What a distributed run asks for: tensor or data parallel, over how many ranks, on which device type."""

    kind: str  # "tensor" | "data" | "pipeline"
    world_size: int
    device_type: str  # "cpu" | "cuda"


def rank_threads(config: RunConfig, local_world: int) -> int:
    """Intra-op threads per rank: as configured, else this machine's cores shared between its ranks."""
    return config.threads or max(1, cpu_cores() // local_world)


def share(rows: list[Any], rank: int, world: int) -> list[Any]:
    """Rank `rank`'s contiguous share of `rows`; the first len(rows) % world ranks take one more."""
    base, extra = divmod(len(rows), world)
    start = rank * base + min(rank, extra)
    return rows[start:start + base + (1 if rank < extra else 0)]


def not_a_pipeline_decoder(model: torch.nn.Module) -> str | None:
    """Why pipeline stages cannot be cut from `model` (None: a Llama-style decoder they can be cut from)."""
    base = getattr(model, "model", None)
    parts = ("layers", "embed_tokens", "norm", "rotary_emb")
    if base is None or not all(hasattr(base, p) for p in parts) or not hasattr(model, "lm_head"):
        return (f"pipeline_parallel splits a Llama-style decoder (model.layers, embed_tokens, norm, rotary_emb, "
                f"lm_head); {type(model).__name__} is not one: use data_parallel")
    return None


def check_stages(config: RunConfig, stages: int) -> None:
    """Every stage needs at least one decoder layer, and the model must be a decoder the stages can be cut from
    (checked on the model built on the meta device, before any rank starts); ConfigError in one sentence."""
    model_config = load_config(resolve(config.model), config.trust_remote_code)
    layers = getattr(text_config(model_config), "num_hidden_layers", None)
    if layers is not None and stages > layers:
        raise ConfigError(f"pipeline_parallel {stages} needs at least one decoder layer per stage, but "
                          f"{config.model} has {layers} layers: use at most {layers} stages")
    meta = meta_model(model_config, config.trust_remote_code)  # None: cannot tell yet, the stage checks it
    why = not_a_pipeline_decoder(meta) if meta is not None else None
    if why:
        raise ConfigError(why)


def ranks_device(spec: str, setting: str, world: int, local: int) -> torch.device:
    """The device `local` ranks on this machine run on (one GPU or one CPU core each); ConfigError with one
    sentence when `spec` names one GPU for all of them or the machine cannot hold them."""
    if re.fullmatch(r"cuda:\d+", spec):
        raise ConfigError(f"with {setting} each rank takes its own GPU (rank r uses cuda:r); give --device "
                          f"cuda or auto instead of {spec}")
    device = resolve_device(spec)
    if device.type == "cuda" and local > torch.cuda.device_count():
        raise ConfigError(f"{setting} {world} needs {local} GPUs on this machine, but it has "
                          f"{torch.cuda.device_count()}")
    if device.type == "cpu" and local > cpu_cores():
        raise ConfigError(f"{setting} {world} needs {local} CPU cores (one per rank), but this machine has "
                          f"{cpu_cores()}")
    return device


def layout(config: RunConfig, local_world: int | None = None) -> Layout:
    """Check a tensor/data-parallel request before any process starts; ConfigError with one sentence if it cannot run.

    `local_world`: ranks on this machine (all of them unless torchrun spreads them over nodes).
    """
    kind = "tensor" if config.tensor_parallel > 1 else "pipeline" if config.pipeline_parallel > 1 else "data"
    world = max(config.tensor_parallel, config.data_parallel, config.pipeline_parallel)
    local = local_world or world
    if kind == "pipeline":  # a model too shallow for the stages is refused whatever the machine
        check_stages(config, world)
    device = ranks_device(config.device, f"{kind}_parallel", world, local)
    if kind == "tensor":
        _check_tensor_plan(config, world)
    return Layout(kind, world, device.type)


def _check_tensor_plan(config: RunConfig, world: int) -> None:
    """The architecture must have a tensor-parallel plan, and the ranks must split its heads evenly."""
    model_config = load_config(resolve(config.model), config.trust_remote_code)
    text = text_config(model_config)
    if not getattr(text, "base_model_tp_plan", None):
        raise ConfigError(f"{config.model} ({type(text).__name__}) has no tensor-parallel plan in transformers, so "
                          "its layers cannot be split across ranks; use data_parallel or a device_map instead")
    heads = getattr(text, "num_attention_heads", None)
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    if heads and (heads % world or kv_heads % world):
        fits = [n for n in range(2, heads + 1) if heads % n == 0 and kv_heads % n == 0]
        raise ConfigError(f"tensor_parallel {world} must divide {config.model}'s {heads} attention heads and "
                          f"{kv_heads} key/value heads; possible values: {', '.join(map(str, fits)) or 'none'}")
    if config.techniques:
        raise ConfigError("techniques are not applied to tensor-parallel models (their weights are sharded "
                          "DTensors); use them with data_parallel or a single process")


def tensor_parallel_kwargs(world: int) -> dict[str, Any]:
    """`from_pretrained` arguments that shard every layer over `world` ranks with the model's own plan."""
    import transformers.distributed as hf_dist

    config_class = getattr(hf_dist, "DistributedConfig", None)
    fields = {f.name for f in dataclasses.fields(config_class)} if config_class else set()
    if "tp_plan" in fields:  # transformers >= 5.0 (the tp_plan= keyword was removed in 5.18)
        return {"distributed_config": config_class(tp_plan="auto", tp_size=world)}
    return {"tp_plan": "auto", "tp_size": world}  # older releases


def init_process_group(device: torch.device) -> None:
    """Join the ranks (RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT from torchrun's environment): gloo on CPU, nccl on GPU."""
    import torch.distributed as dist

    if device.type == "cuda":
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", timeout=COLLECTIVE_TIMEOUT, device_id=device)
    else:
        dist.init_process_group("gloo", timeout=COLLECTIVE_TIMEOUT)


class DistributedCoordinator(Coordinator):
    """One rank of a torch.distributed run: decisions are all-reduced, so every rank takes the same branch."""

    def __init__(self, kind: str) -> None:
        import torch.distributed as dist

        self.kind, self.rank, self.world_size = kind, dist.get_rank(), dist.get_world_size()
        self.backend = dist.get_backend()
        # decisions and small objects travel over gloo (CPU), so polling them never waits for the GPU
        self.group = dist.new_group(backend="gloo") if self.backend != "gloo" else None

    def any(self, flag: bool) -> bool:
        """True on every rank when it is True on any rank."""
        import torch.distributed as dist

        value = torch.tensor([1 if flag else 0], dtype=torch.int32)
        dist.all_reduce(value, op=dist.ReduceOp.MAX, group=self.group)
        return bool(value.item())

    def barrier(self) -> None:
        """Wait for every rank."""
        import torch.distributed as dist

        dist.barrier(group=self.group)

    def my_rows(self, rows: list[list[int]]) -> list[list[int]]:
        """Data parallel: this replica's contiguous share of the prompts; tensor parallel: all of them."""
        return share(rows, self.rank, self.world_size) if self.kind == "data" else rows

    def load_kwargs(self) -> dict[str, Any]:
        """Tensor parallel: the model's tensor-parallel plan over all ranks."""
        return tensor_parallel_kwargs(self.world_size) if self.kind == "tensor" else {}

    def gather(self, obj: Any) -> list[Any] | None:
        """Every rank's `obj`, in rank order, on rank 0 (None elsewhere)."""
        import torch.distributed as dist

        out = [None] * self.world_size if self.rank == 0 else None
        dist.gather_object(obj, out, dst=0, group=self.group)
        return out


class RowShare(Coordinator):
    """A single process standing in for rank `rank` (to fill that rank's baseline cache before the ranks start)."""

    def __init__(self, kind: str, rank: int, world_size: int) -> None:
        self.kind, self.rank, self.world_size = kind, rank, world_size

    def my_rows(self, rows: list[list[int]]) -> list[list[int]]:
        """The rows rank `rank` will take."""
        return share(rows, self.rank, self.world_size) if self.kind == "data" else rows


def hide_gpus_for_cpu_run(device_spec: str) -> None:
    """A CPU run on a GPU machine: hide the GPUs, or transformers would build its tensor-parallel mesh on them."""
    if device_spec == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""


def rank_device(layout_: Layout, local_rank: int) -> torch.device:
    """Rank r's device: cuda:LOCAL_RANK on GPU machines, else the CPU."""
    return torch.device("cuda", local_rank) if layout_.device_type == "cuda" else torch.device("cpu")


def destroy() -> None:
    """Leave the process group (if joined)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


def world_from_env() -> tuple[int, int, int, int]:
    """(rank, world size, local rank, local world size) as torchrun sets them; ConfigError outside torchrun."""
    try:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    except (KeyError, ValueError):
        raise ConfigError("RANK and WORLD_SIZE are not set: start ranks with torchrun (or `workbench run "
                          "--tensor-parallel N`), not directly") from None
    local = int(os.environ.get("LOCAL_RANK", rank))
    return rank, world, local, int(os.environ.get("LOCAL_WORLD_SIZE", world))
