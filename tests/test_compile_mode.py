"""--compile-mode: transformers compiles the one-token decode step (CompileConfig + static cache), prefill stays
eager; the mode's fallbacks (CPU, techniques that break CUDA graphs or compile, a non-compileable quantizer);
the techniques' known slowness on CUDA at small batches."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import pytest
import torch

from workbench.config import COMPILE_MODES, RunConfig
from workbench.engines.hf_compile import CompilePlan, compile_config, plan_compile, was_compiled
from workbench.techniques import load_all, parse_spec
from workbench.techniques.base import TechniqueConfig
from workbench.techniques.rules import speed_warnings

CUDA_GRAPH_BREAKERS = sorted(n for n, c in load_all().items() if c.breaks_cuda_graphs)


# --- the plan (pure) --------------------------------------------------------------------------------------------

def test_the_default_mode_is_cuda_graphs_on_cuda_and_default_on_cpu():
    assert plan_compile(True, None, "cuda", ()) == CompilePlan("reduce-overhead")
    assert plan_compile(True, None, "cpu", ()) == CompilePlan("default")
    assert plan_compile(False, None, "cuda", ()) == CompilePlan(None)  # not compiled: no warning either


def test_reduce_overhead_on_cpu_runs_as_default_with_one_warning():
    plan = plan_compile(True, "reduce-overhead", "cpu", ())
    assert plan.mode == "default" and len(plan.warnings) == 1
    assert "CUDA graphs, which exist only on CUDA GPUs: on cpu it runs as default" in plan.warnings[0]
    # max-autotune keeps its kernel search without CUDA graphs on the CPU: nothing lost, nothing to say
    assert plan_compile(True, "max-autotune", "cpu", ()) == CompilePlan("max-autotune-no-cudagraphs")
    assert plan_compile(True, "default", "cuda", ()) == CompilePlan("default")


def test_bnb_int8_is_declared_to_break_cuda_graphs():
    assert "bnb-int8" in CUDA_GRAPH_BREAKERS


@pytest.mark.parametrize("name", CUDA_GRAPH_BREAKERS)
@pytest.mark.parametrize("mode, fallback", [(None, "default"), ("reduce-overhead", "default"),
                                            ("max-autotune", "max-autotune-no-cudagraphs")])
def test_a_technique_that_breaks_cuda_graphs_falls_back_with_the_reason(name, mode, fallback):
    technique = parse_spec(name)
    plan = plan_compile(True, mode, "cuda", (technique,))
    assert plan.mode == fallback and len(plan.warnings) == 1
    assert plan.warnings[0].startswith(f"CUDA graphs are off: {name} {technique.breaks_cuda_graphs}")
    assert plan_compile(True, "default", "cuda", (technique,)) == CompilePlan("default")  # no graphs asked for


@dataclasses.dataclass(frozen=True)
class _Untraceable(TechniqueConfig):
    """A technique whose layers torch.compile cannot run (declared as data, like any technique)."""

    name: ClassVar[str] = "untraceable"
    kind: ClassVar[str] = "quant"
    breaks_compile: ClassVar[str] = "runs its matmuls through an opaque extension"


def test_a_technique_that_breaks_compile_runs_uncompiled_with_the_reason():
    plan = plan_compile(True, "reduce-overhead", "cuda", (_Untraceable(),))
    assert plan.mode is None
    assert plan.warnings == ("compile skipped: untraceable runs its matmuls through an opaque extension, so "
                             "decoding runs uncompiled",)


def test_a_quantizer_transformers_will_not_compile_skips_compile_with_its_name():
    class Bnb4BitHfQuantizer:
        is_compileable = False

    plan = plan_compile(True, None, "cuda", (), Bnb4BitHfQuantizer())
    assert plan.mode is None and "through its Bnb4BitHfQuantizer (not compileable)" in plan.warnings[0]

    class TorchAoHfQuantizer:
        is_compileable = True

    assert plan_compile(True, None, "cuda", (), TorchAoHfQuantizer()) == CompilePlan("reduce-overhead")


def test_compile_config_compiles_on_cpu_only_with_the_all_devices_flag():
    cpu = compile_config(CompilePlan("default"), "cpu")
    assert (cpu.mode, cpu.dynamic, cpu.fullgraph, cpu._compile_all_devices) == ("default", False, False, True)
    cuda = compile_config(CompilePlan("reduce-overhead"), "cuda")
    assert cuda.mode == "reduce-overhead" and not cuda._compile_all_devices
    assert compile_config(CompilePlan(None), "cpu") is None


# --- the setting: refusal, flag, widget ---------------------------------------------------------------------------

def test_compile_mode_without_compile_is_refused_in_one_sentence():
    with pytest.raises(ValueError, match=r"^compile is off, so compile_mode max-autotune would do nothing: turn "
                                         r"compile on or leave compile_mode unset$"):
        RunConfig(compile_mode="max-autotune")
    with pytest.raises(ValueError, match="compile_mode must be one of default, reduce-overhead, max-autotune"):
        RunConfig(compile=True, kv_cache="static", compile_mode="fast")
    config = RunConfig(compile=True, kv_cache="static", compile_mode="max-autotune")
    assert RunConfig.from_json(config.to_json()) == config


def test_the_flag_and_the_widget_come_from_the_field(capsys, tmp_path):
    import argparse

    from widgets.forms import FieldForm
    from widgets.panels import SETTINGS_GROUPS
    from workbench.cli import main
    from workbench.flags import add_run_arguments, config_from_args

    parser = argparse.ArgumentParser()
    add_run_arguments(parser)
    args = parser.parse_args(["--compile", "--kv-cache", "static", "--compile-mode", "max-autotune"])
    assert config_from_args(args).compile_mode == "max-autotune"
    assert main(["run", "--compile-mode", "default", "--store", str(tmp_path / "r.sqlite")]) == 2
    assert "--compile is off, so --compile-mode default would do nothing" in capsys.readouterr().err

    form = FieldForm(RunConfig, SETTINGS_GROUPS["Execution"])
    assert form.values()["compile_mode"] is None  # 'auto': the device's default
    form.set_values({"compile_mode": "max-autotune"})
    assert form.values()["compile_mode"] == "max-autotune"
    assert tuple(form.inputs["compile_mode"].inner.options) == COMPILE_MODES


# --- techniques known to be slow on CUDA at small batches (pure) -------------------------------------------------

@pytest.mark.parametrize("name", sorted(load_all()))
def test_cpu_runs_never_get_a_cuda_speed_warning(name, monkeypatch):
    """On a CPU with every instruction set the CPU kernels use (AVX2, FMA, F16C, VNNI) no technique warns; the
    CPU-only warnings (w8a8 without VNNI, w4a8's portable build) have their own tests."""
    import workbench.native
    import workbench.techniques.w8a8

    flags = frozenset({"avx2", "fma", "f16c", "avx512_vnni"})
    monkeypatch.setattr(workbench.native, "cpu_flags", lambda: flags)
    monkeypatch.setattr(workbench.techniques.w8a8, "cpu_flags", lambda: flags)
    monkeypatch.delenv(workbench.native.PORTABLE_ENV, raising=False)
    technique = load_all()[name]()
    assert all(technique.speed_warning("cpu", batch, compiled) is None
               for batch in (1, 64) for compiled in (False, True))


@pytest.mark.parametrize("name, batch, compiled, fragment", [
    ("torchao-int8-dynamic", 1, True, "needs more than 16 rows"),
    ("torchao-int8-dynamic", 16, False, "use torchao-int8-weight with compile"),
    ("torchao-int8-dynamic", 17, False, "torchao-int8-dynamic without compile"),
    ("torchao-int8-dynamic", 17, True, None),
    ("torchao-int8-weight", 1, False, "converts each int8 weight matrix"),
    ("torchao-int8-weight", 1, True, None),
    ("torchao-int4-weight", 1, False, "torchao-int4-weight without compile decodes slower"),
    ("torchao-int4-weight", 1, True, None),
    ("bnb-int8", 1, True, "checks it for outlier columns (a GPU-to-CPU sync)"),
    ("bnb-int8", 32, False, None),
    ("bnb-nf4", 1, False, "for speed use torchao-int4-weight with compile"),
    ("bnb-nf4", 1, True, None),
    ("bnb-fp4", 64, False, None),
])
def test_cuda_speed_warnings_name_the_cause_and_what_to_use(name, batch, compiled, fragment):
    warnings = speed_warnings((parse_spec(name),), "cuda", batch, compiled)
    if fragment is None:
        assert warnings == ()
    else:
        assert len(warnings) == 1 and fragment in warnings[0]


def test_engine_warnings_reach_the_result(fast, monkeypatch):
    """The one place that emits them: a technique's speed warning (forced here on the CPU) is in the result."""
    from workbench.runner import run
    from workbench.techniques.sim import SimQuantConfig

    monkeypatch.setattr(SimQuantConfig, "speed_warning", lambda self, device, batch, compiled: f"slow at batch {batch}")
    result = run(fast(techniques=("sim:bits=8",), eval_tokens=0, max_new_tokens=2, batch_size=2))
    assert "slow at batch 2" in result.warnings
    monkeypatch.undo()
    assert not any("slow at batch" in w for w in run(fast(techniques=("sim:bits=8",), eval_tokens=0,
                                                          max_new_tokens=2)).warnings)


# --- compiling for real on the CPU (slow: a compile of tiny's decode step takes about a minute on 2 cores) -------

@pytest.fixture(scope="module")
def fresh_tiny():
    """A tiny of its own (transformers keeps the compiled step on the model; the session's tiny stays eager),
    recording the sequence length of every call that goes through transformers' compiled step."""
    from workbench.models.loader import load_model, load_tokenizer
    from workbench.models.sources import resolve

    model = load_model(resolve("tiny"), "fp32", torch.device("cpu")).model
    compiled_calls: list[int] = []
    get_compiled_call = model.get_compiled_call

    def recording(config):
        compiled = get_compiled_call(config)

        def call(**inputs):
            compiled_calls.append(inputs["input_ids"].shape[1])
            return compiled(**inputs)
        return call

    model.get_compiled_call = recording  # what generate calls for its decode steps
    return model, load_tokenizer(resolve("tiny")), compiled_calls


def _generate(fresh_tiny, prompt_len: int, plan: CompilePlan) -> list[list[int]]:
    from workbench.engines.hf_generate import Generator
    from workbench.measure.latency import TokenClock

    model, tokenizer, compiled_calls = fresh_tiny
    compiled_calls.clear()
    config = RunConfig(kv_cache="static", max_new_tokens=4)
    prompt = [list(range(10, 10 + prompt_len))]
    generator = Generator(model, tokenizer, torch.device("cpu"), config, prompt, lambda: False,
                          compile_config(plan, "cpu"))
    return generator.generate(TokenClock(torch.device("cpu"))).rows


@pytest.mark.slow
def test_decode_step_is_compiled_prefill_is_not_and_tokens_match_eager(fresh_tiny):
    from torch._dynamo.utils import counters

    model, _, compiled_calls = fresh_tiny
    eager = _generate(fresh_tiny, 9, CompilePlan(None))
    assert compiled_calls == [] and not was_compiled(model)
    graphs = counters["stats"]["unique_graphs"]
    assert _generate(fresh_tiny, 9, CompilePlan("default")) == eager
    assert compiled_calls == [1, 1, 1] and was_compiled(model)  # every decode step compiled, the prefill not
    assert counters["stats"]["unique_graphs"] == graphs + 1  # one graph: the one-token step
    _generate(fresh_tiny, 5, CompilePlan("default"))  # another prompt length: no new graph
    assert compiled_calls == [1, 1, 1] and counters["stats"]["unique_graphs"] == graphs + 1


@pytest.mark.slow
def test_max_autotune_gives_the_eager_tokens(fresh_tiny):
    eager = _generate(fresh_tiny, 6, CompilePlan(None))
    plan = plan_compile(True, "max-autotune", "cpu", ())
    assert _generate(fresh_tiny, 6, plan) == eager and fresh_tiny[2] == [1, 1, 1]
    assert fresh_tiny[0]._last_compile_config.mode == "max-autotune-no-cudagraphs"


@pytest.mark.slow
def test_reduce_overhead_on_cpu_runs_compiled_and_says_so(fast):
    """...and every compiled run of a process compiles: earlier runs' variants do not use up torch's recompile limit
    (without a fresh compile state the second run below, another batch size, would run eager under a limit of 1)."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    from workbench.runner import run

    settings = dict(max_new_tokens=4, eval_tokens=0, kv_cache="static", warmup=1)
    eager = run(fast(**settings))
    graphs = counters["stats"]["unique_graphs"]
    # torch's own patch (a monkeypatch of its config module would delete the setting when undone)
    with torch._dynamo.config.patch(recompile_limit=1):
        compiled = run(fast(**settings, compile=True, compile_mode="reduce-overhead"))
        assert counters["stats"]["unique_graphs"] == graphs + 1
        run(fast(**settings, compile=True, batch_size=2))
        assert counters["stats"]["unique_graphs"] == graphs + 2  # the second run compiled its own step
    assert compiled.outputs == eager.outputs
    assert sum("compile mode reduce-overhead means CUDA graphs" in w for w in compiled.warnings) == 1
    assert not any("did not compile the decode step" in w for w in compiled.warnings)  # transformers compiled it
    assert compiled.latency.cold_start_s > compiled.latency.e2e_ms.p50 / 1e3  # the first call compiled


@pytest.mark.gpu
def test_cuda_graphs_decode_step_on_the_gpu_gives_the_eager_tokens(fast):
    """reduce-overhead by default on CUDA: the step is captured (no cudagraph skip), the tokens are eager's; bnb-int8
    falls back to default with its reason and still runs compiled."""
    from torch._dynamo.utils import counters

    from workbench.runner import run

    settings = dict(device="cuda", dtype="bf16", max_new_tokens=8, eval_tokens=0, kv_cache="static", warmup=1)
    eager = run(fast(**settings))
    skips = counters["inductor"]["cudagraph_skips"]
    compiled = run(fast(**settings, compile=True))
    assert compiled.outputs == eager.outputs and counters["inductor"]["cudagraph_skips"] == skips
    assert not any(w.startswith(("CUDA graphs are off", "compile skipped", "transformers did not compile"))
                   for w in compiled.warnings)
    int8 = run(fast(**settings, compile=True, techniques=("bnb-int8",)))
    assert any(w.startswith("CUDA graphs are off: bnb-int8") for w in int8.warnings)
    assert not any("did not compile the decode step" in w for w in int8.warnings)
