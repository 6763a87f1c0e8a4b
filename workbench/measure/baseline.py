"""The unmodified model's predictions, computed once per model and kept on disk for later runs."""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import os
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from workbench.errors import InsufficientMemory, is_oom
from workbench.measure.accuracy import EVAL_BATCH, Baseline, EvalWindows, compute_baseline
from workbench.measure.memory import available_bytes
from workbench.models.loader import load_model
from workbench.models.sources import ModelSource, fingerprint
from workbench.paths import cache_dir

logger = logging.getLogger(__name__)

BASELINE_DTYPE = "fp32"
_GIB = 1 << 30
_memory: dict[str, object] = {}  # this process's copies, keyed like the files


@dataclass(frozen=True)
class BaselineKeys:
    """File names of one model's cached eval predictions and greedy continuation."""

    eval_key: str | None
    greedy_key: str

    @classmethod
    def make(cls, fingerprint: str, windows: EvalWindows | None, prompt_ids: list[int], new_tokens: int) -> BaselineKeys:
        """Keys that change whenever the model, the windows, the prompt or the length change."""
        eval_key = None
        if windows is not None:
            digest = hashlib.sha256(windows.ids.numpy().tobytes() + str(windows.stride).encode()).hexdigest()[:16]
            eval_key = f"{fingerprint}-eval-{digest}"
        greedy = hashlib.sha256(json.dumps([prompt_ids, new_tokens]).encode()).hexdigest()[:16]
        return cls(eval_key, f"{fingerprint}-greedy-{greedy}")


def _dir() -> Path:
    path = cache_dir() / "baselines"
    path.mkdir(parents=True, exist_ok=True)
    return path


def load_cached(keys: BaselineKeys) -> tuple[Baseline | None, list[int] | None]:
    """What is already cached (memory first, then disk); None for what is missing."""
    from safetensors.torch import load_file

    base = _memory.get(keys.eval_key) if keys.eval_key else None
    if keys.eval_key and base is None and (_dir() / f"{keys.eval_key}.safetensors").exists():
        try:
            t = load_file(str(_dir() / f"{keys.eval_key}.safetensors"))
            base = Baseline(t["topk_logp"], t["topk_ids"], int(t["vocab"]))
            _memory[keys.eval_key] = base
        except Exception as e:  # noqa: BLE001 - a damaged cache file is recomputed, not fatal
            logger.warning("ignoring unreadable baseline cache %s: %s", keys.eval_key, e)
    greedy = _memory.get(keys.greedy_key)
    path = _dir() / f"{keys.greedy_key}.json"
    if greedy is None and path.exists():
        try:
            greedy = json.loads(path.read_text())
            _memory[keys.greedy_key] = greedy
        except ValueError:
            greedy = None
    return base, greedy  # type: ignore[return-value]


def save(keys: BaselineKeys, base: Baseline | None, greedy: list[int] | None) -> None:
    """Write to the cache atomically (a temporary file renamed into place)."""
    from safetensors.torch import save_file

    if base is not None and keys.eval_key:
        _memory[keys.eval_key] = base
        tmp = _dir() / f"{keys.eval_key}.{os.getpid()}.tmp"  # one per process: pages' kernels write at once
        save_file({"topk_logp": base.topk_logp.contiguous(), "topk_ids": base.topk_ids.contiguous(),
                   "vocab": torch.tensor(base.vocab)}, str(tmp))
        tmp.replace(_dir() / f"{keys.eval_key}.safetensors")
    if greedy is not None:
        _memory[keys.greedy_key] = greedy
        tmp = _dir() / f"{keys.greedy_key}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(greedy))
        tmp.replace(_dir() / f"{keys.greedy_key}.json")


@torch.inference_mode()
def greedy_tokens(model: torch.nn.Module, prompt_ids: list[int], new_tokens: int, pad_id: int | None) -> list[int]:
    """The model's greedy continuation of one prompt, exactly `new_tokens` long."""
    device = next(model.parameters()).device
    ids = torch.tensor([prompt_ids], device=device)  # (1, T)
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                         min_new_tokens=new_tokens, do_sample=False, pad_token_id=pad_id)
    return out[0, ids.shape[1]:].tolist()


def compute(keys: BaselineKeys, load_unmodified: Callable[[], torch.nn.Module], windows: EvalWindows | None,
            prompt_ids: list[int], new_tokens: int, pad_id: int | None, should_stop: Callable[[], bool],
            narrate: Callable[[str, str], None] = lambda state, message: None,
            ) -> tuple[Baseline | None, list[int] | None]:
    """Load the unmodified model, compute whatever is not cached, save it, and free the model.

    `narrate("start", message)` and `narrate("end", "")` bracket the computation (not called on a cache hit).
    """
    base, greedy = load_cached(keys)
    if (base is not None or windows is None) and greedy is not None:
        return base, greedy
    narrate("start", "computing the unmodified model's predictions once (cached afterwards)")
    model = load_unmodified()
    try:
        device = next(model.parameters()).device
        if base is None and windows is not None:
            base = compute_baseline(model, windows, device, should_stop)
        if greedy is None and not should_stop():
            greedy = greedy_tokens(model, prompt_ids, new_tokens, pad_id)
    finally:
        del model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    if not should_stop():
        save(keys, base, greedy)
    narrate("end", "")
    return base, greedy


class BaselineTooLarge(InsufficientMemory):
    """The fp32 model does not fit where the baseline would be computed (the run goes on without it)."""


def check_baseline_fits(source: ModelSource, config: Any, device: torch.device, windows: EvalWindows | None,
                        prompt_tokens: int, available: int | None = None) -> None:
    """Refuse (BaselineTooLarge, one sentence with the numbers) an fp32 baseline the device cannot hold."""
    from workbench.measure.estimate import estimate_run
    from workbench.models.loader import count_params, kv_bytes_per_token
    from workbench.models.sources import load_config, text_config

    model_config = load_config(source, config.trust_remote_code)
    est = estimate_run(text_config(model_config), params=count_params(model_config, config.trust_remote_code),
                       dtype_bytes=4, kv_per_token=kv_bytes_per_token(model_config, BASELINE_DTYPE), batch=1,
                       prompt_tokens=prompt_tokens, new_tokens=config.max_new_tokens,
                       eval_batch_tokens=EVAL_BATCH * (windows.context if windows else 0))
    available = available_bytes(device) if available is None else available
    if est.total > 0.9 * available:
        where = "the GPU" if device.type == "cuda" else "this machine"
        raise BaselineTooLarge(
            f"the fp32 baseline was not computed: the unmodified model in fp32 needs about {est.total / _GIB:.1f} GiB "
            f"on {where} (weights {est.weights / _GIB:.1f} GiB) but only {available / _GIB:.1f} GiB is free, so "
            "KL, top-1 and greedy agreement vs the fp32 model are not measured (perplexity is)")


def for_run(source: ModelSource, config: Any, device: torch.device, windows: EvalWindows | None,
            prompt_ids: list[int], pad_id: int | None, should_stop: Callable[[], bool],
            narrate: Callable[[str, str], None]) -> tuple[Baseline | None, list[int] | None]:
    """The baseline of a run's model (PyTorch, fp32, whatever engine the run uses): cached, or computed once.

    BaselineTooLarge when it is not cached and the fp32 model cannot be held (checked before loading it, and
    an out-of-memory failure while computing it becomes the same refusal, with the memory freed).
    """
    keys = BaselineKeys.make(fingerprint(source), windows, prompt_ids, config.max_new_tokens)
    base, greedy = load_cached(keys)
    if not ((base is not None or windows is None) and greedy is not None):
        check_baseline_fits(source, config, device, windows, len(prompt_ids))
    try:
        return compute(keys, lambda: load_model(source, BASELINE_DTYPE, device,
                                                trust_remote_code=config.trust_remote_code, seed=config.seed,
                                                allow_pickle=config.allow_pickle).model,
                       windows, prompt_ids, config.max_new_tokens, pad_id, should_stop, narrate)
    except Exception as e:
        if not is_oom(e):
            raise
        traceback.clear_frames(e.__traceback__)  # the failed frames' tensors go with them
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        raise BaselineTooLarge(f"the fp32 baseline was not computed: the unmodified model ran out of memory "
                               f"({str(e).splitlines()[0][:120]}), so KL, top-1 and greedy agreement vs the fp32 "
                               "model are not measured (perplexity is)") from None
