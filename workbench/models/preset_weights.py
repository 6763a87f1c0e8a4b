"""A preset's seeded random weights: built on a device, or written as a model folder for loaders that need one.

`build_preset` builds a preset whole on its device. `from_pretrained` is what applies a tensor-parallel plan,
quantizes weights as they are read and places layers over devices, and it needs a folder. Two writers:
`preset_folder` builds the whole model on the CPU (every tensor-parallel rank gets the weights one CPU
process builds), `preset_shards` builds it one block at a time (host memory: one block), for models larger
than the machine. All three draw every weight once, in the same order from the same seed, so a preset holds
the same weights on every path that builds it on the same device.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from typing import Any

import torch

from workbench.models.sources import TORCH_DTYPES, load_config

SHARD_BYTES = 2 << 30  # blocks are grouped into safetensors files of about this size


def _seeded_blocks(model: torch.nn.Module, device: torch.device | str,
                   seed: int) -> Iterator[tuple[str, torch.nn.Module]]:
    """Materialise a model built on the meta device block by block on `device`, each block initialised by the
    model's own `_init_weights` (the distributions `from_config` draws from, in its order: children before their
    parent), seeded by `seed`. Yields each (prefix, block) once it holds its weights. A weight tied to another
    (a tied output head) is not drawn: it is dropped for the weight it shares."""
    from transformers import initialization as hf_init

    tied = set(getattr(model, "all_tied_weights_keys", None) or {})
    torch.manual_seed(seed)
    for prefix, block in _blocks(model):
        block.to_empty(device=device)
        for name, weight in block.named_parameters():
            if prefix + name in tied:
                weight._is_hf_initialized = True  # transformers' init functions skip it
        with torch.no_grad(), hf_init.guard_torch_init_functions():
            for module in _post_order(block):
                model._initialize_weights(module)
        yield prefix, block


def build_preset(source: Any, dtype: str, seed: int, device: torch.device | str,
                 attn_implementation: str = "sdpa") -> torch.nn.Module:
    """A preset with seeded random weights, built on `device`.

    The model is built on the meta device and each weight is drawn once, by the model's own `_init_weights`; a
    tied output head is not drawn. `from_config` on a real device first runs torch's default init of every layer
    (kaiming-uniform), then draws every weight again, the tied head included (`bench/preset_build.py`:
    `preset:llama-3.2-1b` in fp32 on 2 CPU cores took 20.4 s, now 9.1 s). Buffers (the rotary inverse
    frequencies) are computed again by `_init_weights`.
    """
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(load_config(source), dtype=TORCH_DTYPES[dtype],
                                                 attn_implementation=attn_implementation)
    for _ in _seeded_blocks(model, device, seed):
        pass
    model.tie_weights()
    left = [name for name, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if left:
        raise RuntimeError(f"building {source.spec!r} left {len(left)} tensors unmaterialised, e.g. {left[0]}")
    return model


@contextlib.contextmanager
def preset_folder(source: Any, dtype: str, seed: int, attn_implementation: str) -> Iterator[str]:
    """A preset's seeded random weights saved as a model folder (removed afterwards).

    `from_config` cannot apply a tensor-parallel plan; `from_pretrained` of this folder can. The weights
    are built on the CPU exactly as a single CPU process builds them, so every rank holds the same ones.
    """
    from safetensors.torch import save_model

    folder = tempfile.mkdtemp(prefix="workbench-preset-")
    try:
        model = build_preset(source, dtype, seed, "cpu", attn_implementation)
        # save_pretrained writes only on rank 0 of an initialised process group; every rank needs its own copy
        model.config.to_json_file(os.path.join(folder, "config.json"))
        save_model(model, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
        del model
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _blocks(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """The model cut into (prefix, module) blocks written one at a time: whole modules of a class the model
    never splits (a decoder layer), whole leaves, and the children of everything larger than a shard."""
    no_split = set(getattr(model, "_no_split_modules", None) or ())
    out: list[tuple[str, torch.nn.Module]] = []

    def visit(prefix: str, module: torch.nn.Module) -> None:
        size = sum(t.numel() * t.element_size() for t in module.parameters())
        children = list(module.named_children())
        if type(module).__name__ in no_split or not children or size <= SHARD_BYTES:
            out.append((prefix, module))
            return
        if any(True for _ in module.parameters(recurse=False)):
            raise ValueError(f"{type(module).__name__} holds its own weights next to its children")
        for name, child in children:
            visit(f"{prefix}{name}.", child)

    visit("", model)
    return out


def _post_order(module: torch.nn.Module) -> Iterator[torch.nn.Module]:
    for child in module.children():
        yield from _post_order(child)
    yield module


def _write_shard(folder: str, index: dict[str, str], tensors: dict[str, torch.Tensor], number: int) -> None:
    from safetensors.torch import save_file

    name = f"model-{number:05d}.safetensors"
    save_file(tensors, os.path.join(folder, name), metadata={"format": "pt"})
    index.update(dict.fromkeys(tensors, name))


@contextlib.contextmanager
def preset_shards(source: Any, dtype: str, seed: int, device: torch.device,
                  keep_in: str | None = None) -> Iterator[str]:
    """A preset's seeded random weights written block by block as a sharded model folder, removed afterwards
    unless it is made inside `keep_in` (a run's offload folder: disk-offloaded layers are read from these files
    for as long as the model lives, and go with that folder).

    The model is built on the meta device; each block is materialised on `device` and drawn as `build_preset`
    draws it (the same values as a `build_preset` on that device), copied to the host and written, then
    dropped. Host and device hold one block at a time (a Llama-3.1-8B layer: 0.4 GB in bf16).
    """
    from transformers import AutoModelForCausalLM

    folder = tempfile.mkdtemp(prefix="workbench-preset-", dir=keep_in)
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(load_config(source), dtype=TORCH_DTYPES[dtype])
        tied = set(getattr(model, "all_tied_weights_keys", None) or {})  # written once, under the source's name
        index: dict[str, str] = {}
        pending: dict[str, torch.Tensor] = {}
        for prefix, block in _seeded_blocks(model, device, seed):
            pending.update({prefix + k: v.detach().to("cpu").contiguous() for k, v in block.state_dict().items()
                            if prefix + k not in tied})
            block.to("meta")
            if sum(t.numel() * t.element_size() for t in pending.values()) >= SHARD_BYTES:
                _write_shard(folder, index, pending, len(set(index.values())) + 1)
                pending = {}
        if pending:
            _write_shard(folder, index, pending, len(set(index.values())) + 1)
        model.config.to_json_file(os.path.join(folder, "config.json"))
        with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {}, "weight_map": index}, f)
        del model
        yield folder
    finally:
        if keep_in is None:
            shutil.rmtree(folder, ignore_errors=True)
