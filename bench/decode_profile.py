"""Where one decode step's time goes: matrix multiplies, the other tensor ops, and Python around them.

For each configuration (dtype + technique specs, as `workbench run` takes them) this loads the model the way
the workbench does, decodes with a plain loop over the model's forward (one token per step, KV cache, no
`generate`), and splits the step time using PyTorch's profiler:

- matmuls: self time of the Linear kernels (fp32 addmm/mm, fbgemm's quantized linear_dynamic, bnb, torchao);
- other ops: self time of every other tensor op (norms, rotary, attention, cache updates, casts);
- Python: what is left of the step (the model's module code and PyTorch's dispatch between the ops).

    python bench/decode_profile.py [--model preset:llama-124m] [--config fp32 --config 'fp32|w4a8|compile'] [--json P]

A config is `DTYPE` or `DTYPE|SPEC|SPEC...`; a final `|compile` runs the compiled decode step the workbench runs
(`--compile`: a static KV cache and transformers' compiled call), where "other ops" is mostly the compiled graph's
own fused kernels and "guard checks" the time torch.compile spends deciding that its graph still applies (the
`TorchDynamo Cache Lookup` event). The profiler adds a little time to every op, so the shares are approximate; the
step time (and tokens/s) is measured without it.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from workbench import logs  # noqa: E402

logs.quiet_libraries()

from workbench.config import RunConfig  # noqa: E402
from workbench.engines.hf_compile import CompilePlan, compile_config  # noqa: E402
from workbench.events import no_event  # noqa: E402
from workbench.models.loader import load_model  # noqa: E402
from workbench.models.sources import resolve  # noqa: E402
from workbench.techniques import apply_techniques  # noqa: E402

DEFAULT_CONFIGS = ["fp32", "fp32|dynamic-int8:lm_head=true",
                   "fp32|structured:heads_ratio=0.5,mlp_ratio=0.5|dynamic-int8:lm_head=true"]
MATMUL_OPS = ("linear", "addmm", "mm", "matmul", "bmm", "int8pack", "int4pack", "gemv", "gemm", "bnb", "q4q8")
WARMUP_STEPS = 4
GUARDS = "TorchDynamo Cache Lookup"  # the profiler's name for torch.compile's guard checks before each call


def is_matmul(name: str) -> bool:
    """True for the kernels that multiply by a weight matrix (not attention's scaled_dot_product)."""
    low = name.lower()
    return "scaled_dot_product" not in low and any(k in low for k in MATMUL_OPS)


def _steps(model: torch.nn.Module, prompt: torch.Tensor, steps: int, compiled: int, around: Any = None) -> float:
    """Prefill, then `steps` greedy one-token forwards (inside the context `around`, if given); their seconds.

    `compiled` > 0: a static cache of that many positions (the same in every call, so the graph compiles once) and
    the model's compiled call, as `workbench run --compile` decodes; 0: eager, with a dynamic cache."""
    from transformers import DynamicCache, StaticCache

    # transformers 5.25 renamed the forward's `past_key_values` to `cache` (the old name warns until 5.40)
    cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    length = prompt.shape[1]
    with torch.inference_mode():
        if compiled:
            cache = StaticCache(config=model.config, max_cache_len=compiled)
            step = model.get_compiled_call(compile_config(CompilePlan("default"), "cpu"))
        else:
            cache, step = DynamicCache(config=model.config), model
        logits = model(input_ids=prompt, cache_position=torch.arange(length), **{cache_kw: cache}).logits
        tok = logits[:, -1:].argmax(-1)  # (1, 1)
        with around or contextlib.nullcontext():
            t0 = time.perf_counter()
            for i in range(steps):
                logits = step(input_ids=tok, cache_position=torch.tensor([length + i]), **{cache_kw: cache}).logits
                tok = logits[:, -1:].argmax(-1)
            return time.perf_counter() - t0


def _op_times(model: torch.nn.Module, prompt: torch.Tensor, steps: int, compiled: int) -> tuple[float, float, float]:
    """(matmul, other, guard checks) self CPU seconds per decode step, from the profiler."""
    from torch.profiler import ProfilerActivity, profile

    prof = profile(activities=[ProfilerActivity.CPU])
    _steps(model, prompt, steps, compiled, around=prof)
    matmul = other = guards = 0.0
    for e in prof.key_averages():
        if e.key == GUARDS:
            guards += e.self_cpu_time_total
        elif is_matmul(e.key):
            matmul += e.self_cpu_time_total
        else:
            other += e.self_cpu_time_total
    return matmul / 1e6 / steps, other / 1e6 / steps, guards / 1e6 / steps


def profile_config(model_spec: str, config: str, steps: int, rounds: int) -> dict[str, Any]:
    """Load, apply, and split one configuration's decode step."""
    dtype, *specs = config.split("|")
    prompt = torch.tensor([[11, 12, 13, 14, 15, 16]])
    capacity = prompt.shape[1] + max(steps, WARMUP_STEPS)  # the static cache's length: room for every call
    compiled = capacity if specs and specs[-1] == "compile" else 0
    specs = specs[:-1] if compiled else specs
    loaded = load_model(resolve(model_spec), dtype, torch.device("cpu"))
    apply_techniques(loaded, RunConfig(model=model_spec, dtype=dtype, device="cpu", techniques=tuple(specs)),
                     no_event)
    model = loaded.model.eval()
    _steps(model, prompt, WARMUP_STEPS, compiled)  # warm up (and compile)
    step = statistics.median(_steps(model, prompt, steps, compiled) / steps for _ in range(rounds))
    matmul, other, guards = _op_times(model, prompt, steps, compiled)
    python = max(0.0, step - matmul - other - guards)
    row = {"config": config, "tokens_per_s": 1 / step, "step_ms": 1e3 * step, "matmul_ms": 1e3 * matmul,
           "other_ops_ms": 1e3 * other, "guards_ms": 1e3 * guards, "python_ms": 1e3 * python}
    del loaded, model
    return row


def markdown(model: str, rows: list[dict[str, Any]]) -> str:
    """The table the README quotes."""
    out = [f"Decode step on `{model}` (batch 1, plain loop over the forward, {torch.get_num_threads()} threads):", "",
           "| configuration | tok/s | step ms | matmuls ms | other ops ms | guard checks ms | Python + dispatch ms |",
           "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    out += [f"| {r['config'].replace('|', ' + ')} | {r['tokens_per_s']:.1f} | {r['step_ms']:.2f} | "
            f"{r['matmul_ms']:.2f} | {r['other_ops_ms']:.2f} | {r['guards_ms']:.2f} | {r['python_ms']:.2f} |"
            for r in rows]
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="preset:llama-124m")
    p.add_argument("--config", action="append", help="DTYPE or DTYPE|SPEC|SPEC... (repeatable)")
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    rows = []
    for config in args.config or DEFAULT_CONFIGS:
        rows.append(profile_config(args.model, config, args.steps, args.rounds))
        print(f"  {config}: {rows[-1]['tokens_per_s']:.1f} tok/s", file=sys.stderr, flush=True)
    print(markdown(args.model, rows))
    if args.json:
        args.json.write_text(json.dumps({"model": args.model, "threads": torch.get_num_threads(), "rows": rows},
                                        indent=2))


if __name__ == "__main__":
    main()
