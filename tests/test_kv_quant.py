"""Quantized KV cache: refusals, the cache's real bytes, and a KL that sees the quantization."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from workbench.config import RunConfig
from workbench.deferred import _installed
from workbench.engines import hf_kvquant
from workbench.engines.hf_kvquant import KVQuant, check_backend
from workbench.errors import ConfigError
from workbench.measure.accuracy import _kl_and_top1, compute_baseline, make_windows
from workbench.measure.memory import cache_bytes
from workbench.runner import run

# hqq is the kvquant extra (in the dev extra, so CI has it); without it the run is refused in one sentence, tested
# above, and these tests of the quantized cache itself have nothing to run
needs_hqq = pytest.mark.skipif(not _installed("hqq"), reason="hqq (the kvquant extra) is not installed")

@pytest.mark.parametrize("changes, message", [
    (dict(kv_bits=4), "set kv_cache to quantized"),
    (dict(kv_backend="hqq"), "set kv_cache to quantized"),
    (dict(kv_cache="quantized", kv_bits=3), "kv_bits must be one of 2, 4, 8"),
    (dict(kv_cache="quantized", kv_bits=8, kv_backend="quanto"), "quanto stores 2 or 4 bits"),
    (dict(kv_cache="quantized", compile=True), "choose one of compile and kv_cache quantized"),
    (dict(kv_cache="quantized", engine="llamacpp"), "needs engine hf"),
])
def test_bad_kv_settings_are_refused(changes, message):
    with pytest.raises(ValueError, match=message):
        RunConfig(model="tiny", **changes)


def test_a_missing_backend_names_the_pip_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(hf_kvquant.importlib.util, "find_spec", lambda name: None if name == "hqq" else real(name))
    with pytest.raises(ConfigError, match=r"pip install hqq==0\.2\.8\.post1"):
        check_backend("hqq", 4)
    with pytest.raises(ConfigError, match="stores 2 or 4 bits"):
        check_backend("quanto", 8)


def _prefill(model, bits: int | None, tokens: int = 200):
    """The cache after one forward over `tokens` tokens: quantized (hqq, `bits`) or unquantized."""
    ids = torch.arange(tokens).unsqueeze(0) % 4000  # (1, T)
    kv = KVQuant("auto", bits, "fp32")
    cache = kv._new(model.config) if bits else None
    name = hf_kvquant.cache_argument(model)
    with torch.inference_mode():
        out = model(input_ids=ids, use_cache=True, **({name: cache} if cache is not None else {}))
    return cache if cache is not None else getattr(out, "cache", None) or out.past_key_values


@needs_hqq
def test_cache_bytes_count_the_quantized_storage(tiny):
    full = cache_bytes(_prefill(tiny.model, None))
    sizes = {bits: cache_bytes(_prefill(tiny.model, bits)) for bits in (2, 4, 8)}
    assert sizes[2] < sizes[4] < sizes[8] < full
    # the prompt is quantized at once: the integers alone are bits/32 of fp32, plus a scale and zero per group of 64
    for bits, size in sizes.items():
        packed = full * bits // 32
        assert packed < size < packed + full * 2 // 64 + 1024


@needs_hqq
def test_teacher_forced_kl_sees_the_cache_bits(tiny):
    from workbench.textio import heldout_ids

    windows = make_windows(heldout_ids(tiny.tokenizer), context=64, n_tokens=126)
    base = compute_baseline(tiny.model, windows, torch.device("cpu"))
    kl = {}
    for bits in (2, 8):
        logp = torch.cat([lp for lp, _ in KVQuant("auto", bits, "fp32").window_logprobs(tiny.model, windows,
                                                                                       torch.device("cpu"))])
        kl[bits] = _kl_and_top1(logp, base, 0)[0]
    assert 0 < kl[8] < kl[2]


@needs_hqq
def test_quantized_run_reports_real_bytes_and_a_nonzero_kl(fast):
    r = run(fast(kv_cache="quantized", kv_bits=2, prompt_tokens=40, max_new_tokens=4, repeats=1))
    kv = r.kv_quant
    assert (kv.backend, kv.bits, kv.residual_length) == ("hqq", 2, 128)
    assert r.memory.kv_cache_bytes == kv.kv_cache_bytes < kv.unquantized_bytes
    assert r.accuracy.kl_vs_baseline > 0  # the accuracy pass went through the quantized cache
    assert "teacher-forced" in kv.kl_method
    assert r.speculative is None
