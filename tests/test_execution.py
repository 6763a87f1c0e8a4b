"""Execution settings: batching, KV cache, attention kernel, threads, model split / offload, compile."""

from __future__ import annotations

import pytest
import torch

from workbench.config import RunConfig
from workbench.errors import ConfigError
from workbench.runner import run


def test_batch_rows_get_distinct_prompts_and_one_continuation_each(fast):
    single = run(fast(max_new_tokens=8, eval_tokens=0))
    batch = run(fast(max_new_tokens=8, eval_tokens=0, batch_size=3))
    assert len(batch.outputs) == 3 and len(set(batch.outputs)) == 3
    assert batch.outputs[0] == single.outputs[0] == single.output_text  # row 0 is the prompt itself
    lat = batch.latency
    assert lat.decode_tokens_per_s_per_sequence == pytest.approx(lat.decode_tokens_per_s / 3)
    assert batch.parallel.ranks[0].rows == 3


def test_static_cache_and_eager_attention_give_the_same_tokens(fast):
    base = run(fast(max_new_tokens=10, eval_tokens=0))
    static = run(fast(max_new_tokens=10, eval_tokens=0, kv_cache="static"))
    eager = run(fast(max_new_tokens=10, eval_tokens=0, attn_implementation="eager"))
    assert static.outputs == base.outputs == eager.outputs
    assert static.memory.kv_cache_bytes >= base.memory.kv_cache_bytes  # preallocated for every position


def test_single_process_reports_its_rank(fast):
    p = run(fast(eval_tokens=0)).parallel
    assert (p.kind, p.world_size, len(p.ranks)) == ("single", 1, 1)
    assert p.ranks[0].busy is not None and 0 < p.ranks[0].busy < 2
    assert p.placement == {}


def test_device_map_offload_equals_in_ram(fast):
    ram = run(fast(max_new_tokens=8, eval_tokens=300))
    split = run(fast(max_new_tokens=8, eval_tokens=300, device_map="model.layers.0-2=cpu;model.layers.3-5=disk"))
    assert split.outputs == ram.outputs
    assert split.accuracy.perplexity == pytest.approx(ram.accuracy.perplexity, rel=1e-6)
    p = split.parallel
    assert p.kind == "split" and p.placement["model.layers.4"] == "disk" and p.placement["model.layers.0"] == "cpu"
    assert p.bytes_by_device["disk"] > 0 and p.bytes_by_device["cpu"] > 0


def test_automatic_device_map_with_a_memory_cap_offloads(fast):
    r = run(fast(max_new_tokens=4, eval_tokens=0, device_map="auto", max_memory="cpu=8MiB"))
    assert "disk" in set(r.parallel.placement.values())
    assert len(r.outputs[0]) > 0


@pytest.mark.parametrize("changes, fragment", [
    ({"device_map": "model.layers.0-2=gpu"}, "device must be cpu, disk, cuda or cuda:N"),
    ({"device_map": "nonsense"}, "entries look like"),
    ({"device_map": "model.layers.3-1=cpu"}, "runs backwards"),
    ({"max_memory": "cpu=2GiB"}, "max_memory caps an automatic device_map"),
    ({"device_map": "auto", "max_memory": "cpu=lots"}, "max_memory entries look like"),
    ({"compile": True}, "compile needs kv_cache=static"),
    ({"compile": True, "kv_cache": "static", "warmup": 0}, "compile needs warmup >= 1"),
    ({"tensor_parallel": 2, "data_parallel": 2, "batch_size": 2}, "not both"),
    ({"data_parallel": 2}, "batch_size must be at least 2"),
    ({"device_map": "auto", "tensor_parallel": 2}, "does not combine"),
])
def test_bad_parallel_settings(changes, fragment):
    with pytest.raises(ValueError, match=fragment):
        RunConfig(**changes)


def test_device_map_naming_layers_the_model_lacks(fast):
    with pytest.raises(ConfigError, match=r"model.layers.9, which this model does not have \(it has model.layers.0"):
        run(fast(device_map="model.layers.9=disk"))


def test_device_map_on_a_gpu_this_machine_lacks(fast):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(ConfigError, match="no CUDA GPU"):
        run(fast(device_map="model.layers.0=cuda:0"))


def test_interop_threads_are_set_once_per_process(fast):
    current = torch.get_num_interop_threads()
    assert not any("inter-op" in w for w in run(fast(eval_tokens=0, interop_threads=current)).warnings)
    r = run(fast(eval_tokens=0, interop_threads=current + 1))
    assert any("inter-op threads stay at" in w for w in r.warnings) or torch.get_num_interop_threads() == current + 1


@pytest.mark.slow
def test_compile_reports_cold_start_apart_from_warm_latency(fast):
    eager = run(fast(max_new_tokens=8, eval_tokens=0, kv_cache="static", warmup=1))
    compiled = run(fast(max_new_tokens=8, eval_tokens=0, kv_cache="static", warmup=1, compile=True))
    assert compiled.outputs == eager.outputs
    lat = compiled.latency
    assert lat.cold_start_s is not None and lat.cold_start_s > lat.e2e_ms.p50 / 1e3  # the first call compiled
    import os

    assert os.listdir(os.environ["TORCHINDUCTOR_CACHE_DIR"])  # the project's cache folder, not /tmp
