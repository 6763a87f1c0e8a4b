"""Memory accounting: real storage bytes, KV-cache bytes, and host peaks."""

from __future__ import annotations

import mmap

import torch

from workbench.measure.memory import HostPeak, cache_bytes, parameter_count, reset_host_peak, weight_bytes


def test_weight_bytes_counts_storage_and_tied_weights_once():
    model = torch.nn.Sequential(torch.nn.Embedding(100, 16), torch.nn.Linear(16, 100, bias=False))
    model[1].weight = model[0].weight  # tie
    assert weight_bytes(model) == 100 * 16 * 4
    assert parameter_count(model) == 100 * 16
    model.half()
    assert weight_bytes(model) == 100 * 16 * 2


def test_weight_bytes_counts_buffers():
    model = torch.nn.BatchNorm1d(10)  # weight, bias, running_mean, running_var (fp32), num_batches_tracked (int64)
    assert weight_bytes(model) == 4 * 10 * 4 + 8


def test_weight_bytes_of_dynamic_int8_packed_linear():
    from torch.ao.quantization import quantize_dynamic

    model = torch.nn.Sequential(torch.nn.Linear(256, 128))
    q = quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
    b = weight_bytes(q)
    # int8 weights (256*128 bytes) + fp32 bias; far below the fp32 original
    assert 256 * 128 <= b < 256 * 128 * 2
    assert weight_bytes(model) == (256 * 128 + 128) * 4


def test_kv_cache_bytes_match_the_analytic_size(tiny):
    cfg = tiny.model.config
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    out = tiny.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, min_new_tokens=4,
                              do_sample=False, return_dict_in_generate=True, pad_token_id=0)
    cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    # K and V for every layer and head; the cache holds prompt + new tokens - 1 positions
    per_position = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * 4
    assert cache_bytes(cache) == per_position * (5 + 4 - 1)


def test_host_peak_sees_a_transient_allocation():
    if not reset_host_peak():
        import pytest

        pytest.skip("this kernel does not allow resetting VmHWM")
    with HostPeak() as before:
        pass
    # A fresh anonymous mapping, every page written: RSS must grow by 64 MiB. (A torch tensor of that size may be
    # served from heap memory malloc kept resident after earlier tests, which rightly is no new peak.)
    size = 64 * 1024 * 1024
    with HostPeak() as during:
        block = mmap.mmap(-1, size)
        for offset in range(0, size, mmap.PAGESIZE):
            block[offset] = 1
        block.close()
    assert "VmHWM" in during.method
    assert during.peak - before.peak >= 60 * 1024 * 1024
    with HostPeak() as after:  # the mark was reset: the freed 64 MiB does not count again
        pass
    assert after.peak < during.peak - 32 * 1024 * 1024


def test_run_estimate_counts_the_batch_kv_cache_activations_and_logits():
    """batch 4096 on a GPT-2-sized vocabulary: the last position's logits alone are 3 x 4096 x 50257 x 4 bytes."""
    from types import SimpleNamespace

    from workbench.measure.estimate import estimate_run

    text = SimpleNamespace(hidden_size=768, intermediate_size=2048, num_attention_heads=12, vocab_size=50257)
    est = estimate_run(text, params=123_551_232, dtype_bytes=4, kv_per_token=73_728, batch=4096, prompt_tokens=7,
                       new_tokens=32, eval_batch_tokens=2048, eager=True)
    assert est.weights == 123_551_232 * 4
    assert est.kv_cache == 73_728 * 4096 * 39
    assert est.logits == 3 * 4096 * 50257 * 4
    assert est.activations == 4096 * 39 * 3072 * 4 * 3 + 4096 * 12 * 7 * 7 * 4
    sdpa = estimate_run(text, params=123_551_232, dtype_bytes=4, kv_per_token=73_728, batch=4096, prompt_tokens=7,
                        new_tokens=32, eval_batch_tokens=2048)
    assert sdpa.activations == 4096 * 39 * 3072 * 4 * 3  # fused attention keeps no (B, H, T, T) scores
    assert est.total == est.weights + est.kv_cache + est.activations + est.logits  # generation outweighs evaluation
    small = estimate_run(text, params=1000, dtype_bytes=2, kv_per_token=10, batch=1, prompt_tokens=4, new_tokens=4,
                         eval_batch_tokens=2048)
    assert small.total == 2000 + small.evaluation  # evaluation (after generation) is the peak of a tiny batch


def test_check_fits_refuses_with_every_number():
    from types import SimpleNamespace

    import pytest

    from workbench.errors import InsufficientMemory
    from workbench.measure.estimate import check_fits, estimate_run

    text = SimpleNamespace(hidden_size=768, intermediate_size=2048, num_attention_heads=12, vocab_size=50257)
    est = estimate_run(text, params=123_551_232, dtype_bytes=4, kv_per_token=73_728, batch=4096, prompt_tokens=7,
                       new_tokens=32, eval_batch_tokens=0)
    check_fits(est, int(est.total / 0.9) + 1, "this machine")  # fits: no error
    with pytest.raises(InsufficientMemory, match=r"needs about 19\.2 GiB on this machine \(weights 0\.5 GiB, KV cache "
                       r"11\.0 GiB for batch 4096 x 39 tokens, activations 5\.5 GiB, logits 2\.3 GiB for batch 4096 x "
                       r"vocabulary 50257 in fp32, .*\) but only 16\.0 GiB is free; lower --batch-size"):
        check_fits(est, 16 << 30, "this machine")
