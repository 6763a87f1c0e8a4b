"""A preset's seeded random weights written as a model folder, for loaders that need one (tensor parallelism)."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from typing import Any

import torch

from workbench.models.sources import TORCH_DTYPES, load_config


@contextlib.contextmanager
def preset_folder(source: Any, dtype: str, seed: int, attn_implementation: str) -> Iterator[str]:
    """A preset's seeded random weights saved as a model folder (removed afterwards).

    `from_config` cannot apply a tensor-parallel plan; `from_pretrained` of this folder can. The weights
    are built on the CPU exactly as a single CPU process builds them, so every rank holds the same ones.
    """
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM

    folder = tempfile.mkdtemp(prefix="workbench-preset-")
    try:
        torch.manual_seed(seed)
        with torch.device("cpu"):
            model = AutoModelForCausalLM.from_config(load_config(source), dtype=TORCH_DTYPES[dtype],
                                                     attn_implementation=attn_implementation)
        # save_pretrained writes only on rank 0 of an initialised process group; every rank needs its own copy
        model.config.to_json_file(os.path.join(folder, "config.json"))
        save_model(model, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
        del model
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)
