"""The `hf` engine's compilation: Hugging Face's recipe, the one-token decode step compiled and prefill left eager.

With a static KV cache and `generation_config.compile_config` set, `generate` runs the prefill through the plain
forward and every later step through `model.get_compiled_call(compile_config)`: the decode step has fixed shapes
and compiles once, and a new prompt length never recompiles the prefill (transformers 5.17 to 5.24,
`GenerationMixin._valid_auto_compile_criteria`). A longer prompt + new tokens than any earlier call in the
process grows the static cache, which recompiles the step once. The mode is planned here from the run's
settings, the techniques' declared limits and the loaded model's quantizer; each change of plan is one warning.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from workbench.techniques.base import TechniqueConfig

# Each mode that captures CUDA graphs, and the same mode without them.
WITHOUT_CUDA_GRAPHS = {"reduce-overhead": "default", "max-autotune": "max-autotune-no-cudagraphs"}


@dataclass(frozen=True)
class CompilePlan:
    """The torch.compile mode the decode step gets (None: it runs uncompiled) and why it differs from the ask."""

    mode: str | None
    warnings: tuple[str, ...] = ()


def default_mode(device_type: str) -> str:
    """reduce-overhead (CUDA graphs: a batch-1 decode step is launch-bound) on CUDA; default elsewhere."""
    return "reduce-overhead" if device_type == "cuda" else "default"


def plan_compile(compile: bool, mode: str | None, device_type: str, techniques: Sequence[TechniqueConfig],
                 quantizer: Any = None) -> CompilePlan:
    """The mode to compile with, after the techniques' and the quantizer's limits (a warning for each fallback)."""
    if not compile:
        return CompilePlan(None)
    if quantizer is not None and not getattr(quantizer, "is_compileable", False):
        return CompilePlan(None, (f"compile skipped: transformers does not compile a model loaded through its "
                                  f"{type(quantizer).__name__} (not compileable), so decoding runs uncompiled",))
    for technique in techniques:
        if technique.breaks_compile:
            return CompilePlan(None, (f"compile skipped: {technique.name} {technique.breaks_compile}, so decoding "
                                      "runs uncompiled",))
    asked = mode or default_mode(device_type)
    if asked not in WITHOUT_CUDA_GRAPHS:
        return CompilePlan(asked)
    plain = WITHOUT_CUDA_GRAPHS[asked]
    if device_type != "cuda":
        # max-autotune keeps its kernel search without CUDA graphs; reduce-overhead has nothing left but default
        why = (f"compile mode reduce-overhead means CUDA graphs, which exist only on CUDA GPUs: on {device_type} it "
               "runs as default") if asked == "reduce-overhead" else None
        return CompilePlan(plain, (why,) if why else ())
    for technique in techniques:
        if technique.breaks_cuda_graphs:
            return CompilePlan(plain, (f"CUDA graphs are off: {technique.name} {technique.breaks_cuda_graphs}, so "
                                       f"compile mode {asked} runs as {plain}",))
    return CompilePlan(asked)


def compile_config(plan: CompilePlan, device_type: str) -> Any:
    """transformers' CompileConfig for the plan (None when the plan compiles nothing)."""
    if plan.mode is None:
        return None
    from transformers import CompileConfig

    # fullgraph=False: a graph break in a technique's layer splits the step into graphs instead of failing the run.
    config = CompileConfig(mode=plan.mode, dynamic=False, fullgraph=False)
    if device_type != "cuda":
        # transformers compiles in generate only on an allowlist of accelerators (cuda, xpu, neuron, tpu); this
        # flag (the one its own tests set) is the only way to compile the decode step on the CPU.
        config._compile_all_devices = True
    return config


def fresh_compile_state() -> None:
    """Forget what earlier runs of this process compiled, before a run compiles its decode step.

    torch.compile keeps compiled code per code object, and every model of a class shares its forward's: each earlier
    compiled run (another batch size, cache length or model instance) is one more variant, and after
    `torch._dynamo.config.recompile_limit` (8) of them torch runs the step uncompiled and only logs it. Measured
    here: in one process, the 9th compiled run of `tiny` (batch 9) had a 0.08 s cold start and eager speed, and the
    result still said compiled. Starting from a clean state, a run compiles the step once (twice when it grows the
    static cache), far from the limit. It also frees earlier runs' CUDA graph memory pools; file caches (Inductor's
    FX graph cache) stay, so an earlier shape compiles faster the second time.
    """
    import torch._dynamo

    torch._dynamo.reset()


def was_compiled(model: Any) -> bool:
    """Whether transformers built the compiled decode step (`get_compiled_call` keeps it on the model)."""
    return getattr(model, "_compiled_call", None) is not None
