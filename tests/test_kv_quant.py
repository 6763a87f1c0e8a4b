"""Quantized KV cache: refusals, the cache's real bytes, and a KL that sees the quantization."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from workbench import deferred
from workbench.config import RunConfig
from workbench.engines import hf_kvquant
from workbench.engines.hf_kvquant import KVQuant, check_backend
from workbench.errors import ConfigError
from workbench.measure.accuracy import _kl_and_top1, compute_baseline, make_windows
from workbench.measure.memory import cache_bytes
from workbench.runner import run


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


class _Loader:
    """Stands in for `cache_utils`' loader: imports transformers' hqq check as the module does, and asks it."""

    def __init__(self) -> None:
        self.seen: list[bool] = []

    def create_module(self, spec):
        return None

    def exec_module(self, module) -> None:
        import transformers.utils

        check = getattr(transformers.utils, "is_hqq_available", None)
        if check is not None:
            module.is_hqq_available = check
            self.seen.append(check())


def test_the_deferral_hides_hqq_only_while_cache_utils_loads(monkeypatch):
    import copy
    import types

    import transformers.utils

    real, module, loader = transformers.utils.is_hqq_available, types.SimpleNamespace(), _Loader()
    deferred._WithoutHQQ(loader).exec_module(module)
    assert loader.seen == [False]  # at the module's top: hqq looks absent
    assert transformers.utils.is_hqq_available is real and module.is_hqq_available is real  # asked again later
    stand_in = module.HQQQuantizer
    assert copy.copy(stand_in).module is module  # special names are not hqq's: no import, no recursion
    monkeypatch.delattr(transformers.utils, "is_hqq_available")  # another transformers: loaded as it is
    other = _Loader()
    deferred._WithoutHQQ(other).exec_module(types.SimpleNamespace())
    assert other.seen == []


def test_a_finder_that_refuses_hqq_reads_as_hqq_absent(monkeypatch):
    """A GPU image without the kvquant extra (tests/test_bench_gpu.py blocks it with a finder that raises)."""

    def refuse(name, package=None):
        raise ModuleNotFoundError(f"No module named {name!r}", name=name)

    monkeypatch.setattr(deferred.importlib.util, "find_spec", refuse)
    assert deferred._installed("hqq") is False


_DEFERRED_HQQ = """
import sys
import torch
import workbench.runner  # imports transformers.cache_utils, as every run does
import transformers.cache_utils
from transformers.cache_utils import QuantizedCache
assert "hqq" not in sys.modules, "hqq was imported at start-up"
from workbench.models.loader import load_model
from workbench.models.sources import resolve
tiny = load_model(resolve("tiny"), "fp32", torch.device("cpu"))
cache = QuantizedCache(backend="hqq", config=tiny.model.config, nbits=4)  # transformers' own API, as a notebook would
with torch.no_grad():
    tiny.model(input_ids=torch.arange(16)[None], past_key_values=cache, use_cache=True)
assert cache.layers[0]._quantized_keys is not None  # hqq quantized the prompt
from hqq.core.quantize import Quantizer
assert transformers.cache_utils.HQQQuantizer is Quantizer  # the stand-in gave way to hqq's class
print("ok")
"""


@pytest.mark.skipif(not deferred._installed("hqq"), reason="hqq (the kvquant extra) is not installed")
def test_hqq_is_imported_only_when_a_run_quantizes_its_kv_cache():
    """transformers imports hqq at start-up when it is installed (1.5-2.3 s per process); the workbench defers it
    to the first hqq cache layer that quantizes, whoever makes the cache."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", _DEFERRED_HQQ], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def _prefill(model, bits: int | None, tokens: int = 200):
    """The cache after one forward over `tokens` tokens: quantized (hqq, `bits`) or unquantized."""
    ids = torch.arange(tokens).unsqueeze(0) % 4000  # (1, T)
    kv = KVQuant("auto", bits, "fp32")
    cache = kv._new(model.config) if bits else None
    name = hf_kvquant.cache_argument(model)
    with torch.inference_mode():
        out = model(input_ids=ids, use_cache=True, **({name: cache} if cache is not None else {}))
    return cache if cache is not None else getattr(out, "cache", None) or out.past_key_values


def test_cache_bytes_count_the_quantized_storage(tiny):
    full = cache_bytes(_prefill(tiny.model, None))
    sizes = {bits: cache_bytes(_prefill(tiny.model, bits)) for bits in (2, 4, 8)}
    assert sizes[2] < sizes[4] < sizes[8] < full
    # the prompt is quantized at once: the integers alone are bits/32 of fp32, plus a scale and zero per group of 64
    for bits, size in sizes.items():
        packed = full * bits // 32
        assert packed < size < packed + full * 2 // 64 + 1024


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


def test_quantized_run_reports_real_bytes_and_a_nonzero_kl(fast):
    r = run(fast(kv_cache="quantized", kv_bits=2, prompt_tokens=40, max_new_tokens=4, repeats=1))
    kv = r.kv_quant
    assert (kv.backend, kv.bits, kv.residual_length) == ("hqq", 2, 128)
    assert r.memory.kv_cache_bytes == kv.kv_cache_bytes < kv.unquantized_bytes
    assert r.accuracy.kl_vs_baseline > 0  # the accuracy pass went through the quantized cache
    assert "teacher-forced" in kv.kl_method
    assert r.speculative is None
