"""The llamacpp engine: the same model as GGUF through llama.cpp, the same measures, and its refusals."""

from __future__ import annotations

import json
import sys

import pytest

from workbench.config import RunConfig
from workbench.errors import ConfigError
from workbench.events import StageEvent, TokenEvent
from workbench.measure.accuracy import decode_looks_wrong
from workbench.runner import run

QUICK = dict(model="tiny", engine="llamacpp", warmup=0, repeats=1, min_duration_s=0.0, max_new_tokens=8,
             eval_tokens=0)
EVAL = dict(eval_tokens=1000, eval_context=128)


def needs_llamacpp():
    return pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (bash dev.sh setup builds it)")


# ---- refusals that need no llama.cpp -------------------------------------------------------------------------

@pytest.mark.parametrize("overrides, words", [
    (dict(batch_size=2), "batch 1"),
    (dict(techniques=("dynamic-int8",)), "GGUF file cannot hold"),
    (dict(techniques=("sim",)), "gguf:type=Q8_0"),
])
def test_settings_the_engine_cannot_honour_are_refused_in_one_sentence(overrides, words):
    with pytest.raises(ConfigError, match=words) as info:
        run(RunConfig(**{**QUICK, **overrides}))
    assert "\n" not in str(info.value)


def test_gguf_on_the_pytorch_engine_is_refused():
    with pytest.raises(ConfigError, match="choose --engine llamacpp"):
        run(RunConfig(model="tiny", techniques=("gguf:type=Q4_0",), warmup=0, repeats=1, eval_tokens=0))


def test_an_unknown_gguf_type_lists_the_valid_ones():
    with pytest.raises(ConfigError) as info:
        RunConfig(**{**QUICK, "techniques": ("gguf:type=Q5_0",)})
    for name in ("Q8_0", "Q4_K_M", "Q2_K", "IQ4_NL"):
        assert name in str(info.value)


def test_an_architecture_the_writer_cannot_represent_is_refused():
    with pytest.raises(ConfigError, match="llamacpp engine cannot run this"):
        run(RunConfig(**{**QUICK, "model": "preset:gpt2-124m"}))


def test_missing_llama_cpp_python_says_how_to_install_it(monkeypatch):
    import workbench.engines.llamacpp_model as lm

    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # `import llama_cpp` raises ImportError
    monkeypatch.setattr(lm, "_initialized", False)
    with pytest.raises(ConfigError, match="needs llama-cpp-python.*bash dev.sh setup"):
        run(RunConfig(**QUICK))


def test_techniques_listing_follows_the_engine():
    from workbench.engines.base import engine_class

    llamacpp, hf = engine_class("llamacpp"), engine_class("hf")
    for name in ("gguf", "magnitude", "structured", "wanda", "2:4"):
        assert llamacpp.can_apply(name) is None, name
    for name in ("dynamic-int8", "sim", "bnb-int8", "torchao-int8-weight"):
        assert "GGUF file cannot hold" in llamacpp.can_apply(name)
    assert "--engine llamacpp" in hf.can_apply("gguf")
    assert hf.can_apply("magnitude") is None


def test_prompt_longer_than_the_context_is_refused():
    needs_llamacpp()  # checked after the engine's own checks (llama-cpp-python present)
    with pytest.raises(ConfigError, match="exceeds the model's context of 1024"):
        run(RunConfig(**{**QUICK, "prompt_tokens": 1020}))


# ---- runs through llama.cpp -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def hf_fp32():
    return run(RunConfig(model="tiny", warmup=0, repeats=1, min_duration_s=0.0, max_new_tokens=8, **EVAL))


@pytest.fixture(scope="module")
def f32():
    needs_llamacpp()
    events = []
    return run(RunConfig(**{**QUICK, **EVAL}, token_events=True), events.append), events


def test_f32_export_matches_pytorch_fp32(f32, hf_fp32):
    """The conversion is exact: perplexity within 0.5 % of PyTorch fp32 and KL < 0.001 on the same windows."""
    r, _ = f32
    assert r.status == "ok", r.warnings
    assert r.accuracy.eval_tokens == hf_fp32.accuracy.eval_tokens
    assert abs(r.accuracy.perplexity / hf_fp32.accuracy.perplexity - 1) < 0.005
    assert r.accuracy.kl_vs_baseline < 0.001
    assert r.accuracy.greedy_match_vs_baseline == 1.0
    assert r.outputs == hf_fp32.outputs  # same greedy text


def test_same_measures_as_the_pytorch_engine(f32):
    r, events = f32
    data = json.loads(r.to_json())
    assert data["config"]["engine"] == "llamacpp"
    assert r.latency.new_tokens == 8 and len(r.latency.samples[0].token_ms) == 8
    assert r.latency.decode_tokens_per_s > 0 and r.latency.ttft_ms.p50 > 0
    assert r.model.weight_bytes > 0 and r.model.architecture.startswith("GGUF F32")
    assert r.memory.kv_cache_bytes > 0 and r.memory.peak_host_bytes > 0
    assert r.roofline.bytes_per_token > 0
    assert not decode_looks_wrong(r.warnings)  # the decode check passed
    assert sum(isinstance(e, TokenEvent) for e in events) == 8


def test_q8_0_is_close_and_smaller(f32):
    needs_llamacpp()
    q8 = run(RunConfig(**{**QUICK, **EVAL, "techniques": ("gguf:type=Q8_0",)}))
    assert q8.accuracy.kl_vs_baseline < 0.01
    from workbench.techniques.base import REGISTRY  # the expectation gguf declares, met through its engine

    assert REGISTRY["gguf"].expect.check(q8.accuracy.kl_vs_baseline, q8.accuracy.perplexity,
                                         f32[0].accuracy.perplexity) is None
    assert q8.model.weight_bytes < 0.35 * f32[0].model.weight_bytes
    assert q8.techniques[-1].name == "gguf" and q8.techniques[-1].params == {"type": "Q8_0"}


def test_pruning_before_the_export_is_applied_and_recorded(f32):
    needs_llamacpp()
    pruned = run(RunConfig(**{**QUICK, **EVAL, "techniques": ("magnitude:sparsity=0.5",)}))
    assert [t.name for t in pruned.techniques] == ["magnitude"]
    assert pruned.accuracy.kl_vs_baseline > 10 * max(f32[0].accuracy.kl_vs_baseline, 1e-4)


def test_the_export_is_cached_and_a_corrupt_file_is_rebuilt(f32, caplog):
    needs_llamacpp()
    from workbench.paths import cache_dir

    events = []
    run(RunConfig(**QUICK), events.append)
    assert not any(isinstance(e, StageEvent) and e.stage == "load" and e.state == "progress" for e in events)
    files = sorted((cache_dir() / "gguf").glob("*.gguf"))
    assert files
    for f in files:  # corrupt every cached file (a torn copy, a bad disk)
        data = bytearray(f.read_bytes())
        data[len(data) // 2: len(data) // 2 + 64] = bytes(64)
        f.write_bytes(bytes(data))
    again = run(RunConfig(**{**QUICK, **EVAL}))
    assert again.status == "ok" and again.accuracy.kl_vs_baseline < 0.001
    assert any("corrupt" in rec.message.lower() or "rebuil" in rec.message.lower() for rec in caplog.records)


def test_stop_mid_decode_ends_within_one_token_and_keeps_a_partial_result():
    needs_llamacpp()
    seen = {"n": 0}

    def on_event(e):
        if isinstance(e, TokenEvent) and e.phase == "measure":
            seen["n"] += 1

    r = run(RunConfig(**{**QUICK, "max_new_tokens": 64, "repeats": 3}), on_event, lambda: seen["n"] >= 3)
    assert r.status == "stopped"
    assert seen["n"] <= 4
    assert r.latency is not None and r.latency.repeats == 1


def test_stop_mid_export_leaves_nothing_half_written():
    needs_llamacpp()
    from workbench.paths import cache_dir

    def files():  # a key's lock file (flock) may stay: it holds no data
        return {f for f in (cache_dir() / "gguf").glob("*") if f.suffix != ".lock"} if (cache_dir() / "gguf").exists() else set()

    before = files()
    stop = {"now": False}

    def on_event(e):
        if isinstance(e, StageEvent) and e.stage in ("load", "apply") and e.state == "progress":
            stop["now"] = True

    r = run(RunConfig(**{**QUICK, "techniques": ("magnitude:sparsity=0.3",)}), on_event,
            lambda: stop["now"])
    assert r.status == "stopped"
    assert files() == before, files() - before


def test_a_prompt_longer_than_one_micro_batch_decodes_and_passes_the_decode_check(monkeypatch):
    """600 prompt tokens: more than llama.cpp's 512-token micro-batch, in one decode whose logits are all read;
    the decode check (one llama.cpp decode over the whole text) agrees with every token decoded one at a time."""
    needs_llamacpp()
    import workbench.runner as runner

    shares = []
    monkeypatch.setattr(runner, "decode_warning", lambda share: shares.append(share) or None)
    r = run(RunConfig(**{**QUICK, "prompt_tokens": 600, "max_new_tokens": 6}))
    assert r.status == "ok" and r.latency.prompt_tokens == 600 and r.latency.new_tokens == 6
    assert shares == [1.0]
