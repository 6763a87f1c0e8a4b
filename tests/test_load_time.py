"""Models larger than the device: quantized while loading, placed while loading, the memory path the estimate
names, presets written block by block, and an fp32 baseline too large to compute."""

from __future__ import annotations

import os

import pytest
import torch

from workbench.config import RunConfig
from workbench.engines.hf_load import plan_load
from workbench.errors import ConfigError, InsufficientMemory
from workbench.events import StageEvent
from workbench.measure.estimate import check_fits, estimate_run
from workbench.measure.memory import weight_bytes
from workbench.models.loader import load_model
from workbench.models.presets import PRESETS, Preset
from workbench.models.sources import load_config, resolve, text_config
from workbench.runner import run
from workbench.techniques.apply import apply_techniques

CPU = torch.device("cpu")
GIB = 1 << 30


def plan(model: str = "tiny", load_kwargs: dict | None = None, **changes):
    cfg = RunConfig(model=model, device="cpu", **changes)
    return plan_load(cfg, load_config(resolve(model)), CPU, load_kwargs or {})


def stages(events: list) -> list[str]:
    return [e.stage for e in events if isinstance(e, StageEvent)]


# ---------------------------------------------------------------- which path, and the same numerics

@pytest.mark.parametrize("spec", ["bnb-nf4", "bnb-int8", "torchao-int8-weight"])
def test_quantized_while_loading_equals_quantized_after_loading(spec, tiny):
    cfg = RunConfig(model="tiny", device="cpu", techniques=(spec,))
    p = plan_load(cfg, load_config(resolve("tiny")), CPU, {})
    assert p.technique is cfg.techniques[0] and p.path.name == f"{spec} while loading"
    early = load_model(resolve("tiny"), "fp32", CPU, at_load=p.kwargs("fp32", None))
    # right after loading, as the engine does: it also finishes what from_pretrained leaves out (bnb-nf4: the fused
    # AVX512-BF16 CPU kernel, which computes in bf16, stays off under compute_dtype fp32, as the handler decides;
    # on a CPU with AVX512-BF16 a forward before it repacks the layers for that kernel)
    notes = p.record(early.model, "fp32").notes
    late = load_model(resolve("tiny"), "fp32", CPU)
    apply_techniques(late, cfg, lambda event: None)
    ids = tiny.tokenizer("def main():\n    return self.value", return_tensors="pt").input_ids  # (1, T)
    with torch.no_grad():
        a, b = early.model(ids).logits, late.model(ids).logits  # (1, T, V)
    assert torch.allclose(a, b, rtol=0, atol=1e-5), (a - b).abs().max()
    assert weight_bytes(early.model) == weight_bytes(late.model) < weight_bytes(tiny.model) / 2
    assert abs(p.path.weights - weight_bytes(early.model)) < 0.03 * weight_bytes(early.model)  # the estimate
    assert "quantized while loading (from_pretrained with" in notes and "42 of 42 Linear layers converted" in notes


@pytest.mark.parametrize("model, changes, load_kwargs, technique, path", [
    ("tiny", {"techniques": ("bnb-nf4",)}, None, "bnb-nf4", "bnb-nf4 while loading"),
    ("tiny", {"techniques": ("magnitude:sparsity=0.5", "bnb-nf4")}, None, None, "fp32 then bnb-nf4"),
    ("tiny", {"techniques": ("sim:bits=8",)}, None, None, "fp32"),
    ("tiny", {}, None, None, "fp32"),
    ("tiny", {"techniques": ("bnb-nf4",)}, {"distributed_config": "tp"}, None, "fp32 then bnb-nf4"),
    ("preset:gpt2-124m", {"techniques": ("bnb-nf4",)}, None, None, "fp32 then bnb-nf4"),  # Conv1D: after loading
    ("tiny", {"techniques": ("bnb-nf4",), "device_map": "model.layers.0-2=cpu"}, None, None,
     "fp32 then bnb-nf4, placed after loading"),  # a device map quantizes while loading on a GPU only
])
def test_which_technique_is_applied_while_loading(model, changes, load_kwargs, technique, path):
    p = plan(model, load_kwargs, **changes)
    assert (p.technique.name if p.technique else None, p.path.name) == (technique, path)
    if technique:
        assert p.skip == (r"lm_head(?:\.|$)",)  # the output projection stays float, as after loading
        assert p.kwargs("fp32", None)["quantization_config"].llm_int8_skip_modules == [r"lm_head(?:\.|$)"]


def test_the_8b_preset_in_nf4_fits_a_16_gib_gpu_by_the_estimate():
    text = text_config(load_config(resolve("preset:llama-3.1-8b")))
    nf4 = plan("preset:llama-3.1-8b", dtype="bf16", techniques=("bnb-nf4",)).path
    bf16 = plan("preset:llama-3.1-8b", dtype="bf16").path
    after = plan("preset:llama-3.1-8b", dtype="bf16", techniques=("magnitude:sparsity=0.5", "bnb-nf4")).path
    assert 5 * GIB < nf4.weights < nf4.load_peak < 6 * GIB  # 2.0 GB of bf16 embeddings + 3.6 GB of nf4 blocks
    assert bf16.weights == bf16.load_peak == 8_030_261_248 * 2
    assert after.weights == nf4.weights and after.load_peak > bf16.load_peak  # the float model held whole first

    def estimate(path):
        return estimate_run(text, params=0, dtype_bytes=2, kv_per_token=131072, batch=1, prompt_tokens=16,
                            new_tokens=128, eval_batch_tokens=0, path=path)

    assert estimate(nf4).describe("cuda:0") == f"bnb-nf4 while loading: {estimate(nf4).total / GIB:.1f} GiB peak on cuda:0"
    check_fits(estimate(nf4), 16 * GIB, "the GPU")  # fits
    with pytest.raises(InsufficientMemory, match=r"^this run needs about 15\.\d GiB on the GPU .* only "
                       r"16\.0 GiB is free; the weights alone do not fit: .* bnb-nf4 \(applied while loading\)"):
        check_fits(estimate(bf16), 16 * GIB, "the GPU")
    with pytest.raises(InsufficientMemory, match=r"^this run \(bf16 then bnb-nf4\) needs about 15\.\d GiB on the GPU "
                       r"\(loading peaks at 15\.\d GiB, weights 5\.\d GiB.*make the quantization the first technique"):
        check_fits(estimate(after), 16 * GIB, "the GPU")


def test_a_model_that_cannot_fit_even_quantized_is_refused_before_loading(monkeypatch):
    import workbench.engines.hf as hf

    monkeypatch.setattr(hf, "available_bytes", lambda device: 3 * GIB)
    events: list = []
    cfg = RunConfig(model="preset:llama-3.1-8b", dtype="bf16", device="cpu", techniques=("bnb-nf4",),
                    max_new_tokens=4, eval_tokens=0)
    with pytest.raises(InsufficientMemory, match=r"^this run \(bnb-nf4 while loading\) needs about 5\.\d GiB on this "
                       r"machine \(loading peaks at 5\.\d GiB, weights 5\.\d GiB, .*\) but only 3\.0 GiB is free; even quantized the weights do "
                       r"not fit: use --device-map auto"):
        run(cfg, on_event=events.append)
    assert "load" not in stages(events)


# ---------------------------------------------------------------- presets written block by block

@pytest.fixture
def small_preset(monkeypatch):
    """A 4-layer Llama preset (the reference tokenizer's vocabulary), shards of about one layer."""
    import workbench.models.preset_weights as preset_weights

    monkeypatch.setattr(preset_weights, "SHARD_BYTES", 300_000)
    monkeypatch.setitem(PRESETS, "test-llama", Preset("test-llama", "LlamaConfig", tuple(sorted(dict(
        vocab_size=4096, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False).items())), "test"))
    return resolve("preset:test-llama")


def test_preset_shards_are_seeded_and_written_block_by_block(small_preset):
    from transformers import AutoModelForCausalLM

    from workbench.models.preset_weights import preset_shards

    def weights(seed: int) -> tuple[int, dict[str, torch.Tensor]]:
        with preset_shards(small_preset, "fp32", seed, CPU) as folder:
            shards = len([f for f in os.listdir(folder) if f.endswith(".safetensors")])
            return shards, AutoModelForCausalLM.from_pretrained(folder).state_dict()

    shards, first = weights(0)
    _, again = weights(0)
    _, other = weights(1)
    built = load_model(small_preset, "fp32", CPU, seed=0).model.state_dict()  # the whole model at once
    assert shards > 2 and set(first) == set(built)
    assert all(torch.equal(first[k], again[k]) and torch.equal(first[k], built[k]) for k in first)
    assert not torch.equal(first["model.layers.3.mlp.up_proj.weight"], other["model.layers.3.mlp.up_proj.weight"])
    w = first["model.layers.3.mlp.up_proj.weight"]
    assert abs(float(w.std()) - 0.02) < 0.002 and torch.equal(first["model.norm.weight"], torch.ones(64))


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_a_preset_draws_each_weight_once_with_the_buffers_and_ties_from_config_makes(name, monkeypatch):
    """Built on the meta device, then drawn once by the model's own init: torch's default init never runs on a
    real tensor and a tied output head is not drawn (together 55 % of a build). The result is the model
    `from_config` makes (one layer, a small vocabulary of a size no other weight has, a small MLP; the preset's
    attention shape, rope and ties)."""
    from transformers import AutoModelForCausalLM
    from transformers import initialization as hf_init

    from workbench.models.preset_weights import build_preset

    preset = PRESETS[name]
    small = {"num_hidden_layers": 1, "n_layer": 1, "vocab_size": 1000, "intermediate_size": 256}
    kwargs = dict(preset.kwargs, **{k: v for k, v in small.items() if k in dict(preset.kwargs)})
    monkeypatch.setitem(PRESETS, "test-one-layer", Preset("test-one-layer", preset.config_class,
                                                          tuple(sorted(kwargs.items())), "test"))
    source = resolve("preset:test-one-layer")
    torch.manual_seed(0)
    reference = AutoModelForCausalLM.from_config(load_config(source))
    default_inits = []  # the devices torch's own init ran on (layers' reset_parameters, GPT-2's Conv1D)
    for function in ("kaiming_uniform_", "uniform_", "normal_"):
        def recorded(tensor, *args, _real=getattr(torch.nn.init, function), **kwargs):
            default_inits.append(tensor.device.type)
            return _real(tensor, *args, **kwargs)

        monkeypatch.setattr(torch.nn.init, function, recorded)
    drawn = []  # the shapes transformers' init drew normal values into

    def normal_(tensor, *args, _real=hf_init.TORCH_INIT_FUNCTIONS["normal_"], **kwargs):
        drawn.append(tuple(tensor.shape))
        return _real(tensor, *args, **kwargs)

    monkeypatch.setitem(hf_init.TORCH_INIT_FUNCTIONS, "normal_", normal_)
    model = build_preset(source, "fp32", 0, "cpu")
    assert default_inits and set(default_inits) == {"meta"}
    assert dict(model.named_buffers()).keys() == dict(reference.named_buffers()).keys()
    assert all(torch.equal(b, reference.get_buffer(k)) for k, b in model.named_buffers())
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert tied == (reference.get_output_embeddings().weight is reference.get_input_embeddings().weight)
    assert drawn.count(tuple(model.get_input_embeddings().weight.shape)) == (1 if tied else 2)  # a tied head: once
    for k, p in model.named_parameters():
        p, r = p.detach(), reference.get_parameter(k).detach()  # float() of a tensor that needs grad warns
        if float(r.std()) == 0:  # norms and biases: ones and zeros
            assert torch.equal(p, r), k
        else:
            assert abs(float(p.std()) / float(r.std()) - 1) < 0.1, k
    again = build_preset(source, "fp32", 0, "cpu").state_dict()
    assert all(torch.equal(t, again[k]) for k, t in model.state_dict().items())


def test_a_preset_is_quantized_while_loading(small_preset):
    r = run(RunConfig(model="preset:test-llama", device="cpu", techniques=("bnb-nf4",), warmup=0, repeats=1,
                      min_duration_s=0.0, max_new_tokens=4, eval_tokens=0))
    assert "quantized while loading" in r.techniques[0].notes and "28 of 28 Linear layers" in r.techniques[0].notes
    assert r.model.random_weights and len(r.outputs[0]) > 0


# ---------------------------------------------------------------- device maps placed while loading, offload folder

def test_device_map_places_while_loading_into_a_run_folder(fast, tmp_path, monkeypatch):
    import workbench.engines.hf as hf

    monkeypatch.setattr(hf, "place", lambda *a, **k: pytest.fail("placed after loading"))
    from workbench.parallel import placement

    made: list[str] = []

    def recording(root: str | None) -> str:
        made.append(placement.offload_dir(root))
        return made[-1]

    monkeypatch.setattr(hf, "offload_dir", recording)
    r = run(fast(max_new_tokens=4, eval_tokens=0, device_map="model.layers.0-2=cpu;model.layers.3-5=disk",
                 offload_folder=str(tmp_path)))
    assert len(made) == 1 and os.path.dirname(made[0]) == str(tmp_path)
    assert os.listdir(tmp_path) == []  # the run's folder is removed with the model
    assert r.parallel.placement["model.layers.4"] == "disk" and r.parallel.bytes_by_device["disk"] > 0


def test_a_preset_offloaded_to_disk_reads_its_shards_until_the_run_ends(small_preset, tmp_path):
    """transformers reads disk-offloaded safetensors weights from the checkpoint itself: a preset's shards are
    written into the run's offload folder and live as long as the model."""
    events: list = []

    def seen(event) -> None:
        if isinstance(event, StageEvent) and event.stage == "warmup" and event.state == "start":
            events.append([f for _, _, files in os.walk(tmp_path) for f in files])

    r = run(RunConfig(model="preset:test-llama", device="cpu", warmup=1, repeats=1, min_duration_s=0.0,
                      max_new_tokens=4, eval_tokens=0, device_map="model.layers.0-1=cpu;model.layers.2-3=disk",
                      offload_folder=str(tmp_path)), on_event=seen)
    assert any(f.endswith(".safetensors") for f in events[0]) and len(r.outputs[0]) > 0
    assert r.parallel.placement["model.layers.3"] == "disk" and os.listdir(tmp_path) == []


def test_techniques_that_change_the_float_model_are_placed_after_loading(fast, monkeypatch):
    import workbench.engines.hf as hf

    calls: list = []
    real = hf.place
    monkeypatch.setattr(hf, "place", lambda *a, **k: calls.append(1) or real(*a, **k))
    r = run(fast(max_new_tokens=4, eval_tokens=0, techniques=("magnitude:sparsity=0.5",),
                 device_map="model.layers.0-2=cpu;model.layers.3-5=disk"))
    assert calls == [1] and r.parallel.placement["model.layers.4"] == "disk"
    with pytest.raises(ConfigError, match=r"^bnb-nf4 packs its weights, which accelerate cannot offload after loading"):
        run(fast(techniques=("bnb-nf4",), device_map="model.layers.0-2=cpu;model.layers.3-5=disk"))


def test_an_unwritable_offload_folder_is_refused_before_loading(fast, tmp_path):
    from workbench.flags import flags_in

    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    events: list = []
    with pytest.raises(ConfigError, match=r"^offload_folder '.*a-file/offload' is not writable \(Not a directory\)") as e:
        run(fast(device_map="auto", max_memory="cpu=8MiB", offload_folder=str(blocker / "offload")),
            on_event=events.append)
    assert "load" not in stages(events) and "baseline" not in stages(events)
    assert flags_in(str(e.value), RunConfig).startswith("--offload-folder ")
    with pytest.raises(ValueError, match="offload_folder holds the layers a device_map offloads to disk"):
        RunConfig(offload_folder=str(tmp_path))


# ---------------------------------------------------------------- the fp32 baseline of a model too large

def test_a_baseline_too_large_for_the_host_is_a_warning(fast, monkeypatch):
    import workbench.measure.baseline as baseline

    monkeypatch.setattr(baseline, "available_bytes", lambda device: 1 << 20)
    r = run(fast(prompt="A prompt no other test computes a baseline for", eval_tokens=300))
    [warning] = [w for w in r.warnings if "baseline" in w]
    assert warning.startswith("the fp32 baseline was not computed: the unmodified model in fp32 needs about ")
    assert "but only 0.0 GiB is free" in warning
    assert r.accuracy.kl_vs_baseline is None and r.accuracy.greedy_match_vs_baseline is None
    assert r.accuracy.perplexity is not None  # the run's own model is still scored


def test_a_baseline_that_runs_out_of_memory_is_a_warning(fast, monkeypatch):
    import workbench.measure.baseline as baseline

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(baseline, "compute_baseline", oom)
    monkeypatch.setattr(baseline, "greedy_tokens", oom)
    r = run(fast(prompt="Another prompt whose baseline no test has cached", eval_tokens=300))
    assert any(w.startswith("the fp32 baseline was not computed: the unmodified model ran out of memory (CUDA out of "
                            "memory") for w in r.warnings)
    assert r.accuracy.kl_vs_baseline is None and r.accuracy.perplexity is not None


# ---------------------------------------------------------------- on a GPU (the 16 GB course setup)

@pytest.mark.gpu
def test_the_8b_preset_in_nf4_runs_under_7_gib_of_gpu_memory():
    r = run(RunConfig(model="preset:llama-3.1-8b", dtype="bf16", device="cuda", techniques=("bnb-nf4",), warmup=0,
                      repeats=1, min_duration_s=0.0, max_new_tokens=8, eval_tokens=0))
    assert "quantized while loading" in r.techniques[0].notes
    assert r.model.weight_bytes < 7 * GIB and r.memory.peak_gpu_allocated_bytes < 7 * GIB
    assert (r.memory.load_peak_gpu_allocated_bytes or 0) < 7 * GIB


@pytest.mark.gpu
def test_the_8b_preset_in_nf4_runs_with_offload_under_a_4_gib_cap():
    r = run(RunConfig(model="preset:llama-3.1-8b", dtype="bf16", device="cuda", techniques=("bnb-nf4",), warmup=0,
                      repeats=1, min_duration_s=0.0, max_new_tokens=4, eval_tokens=0, device_map="auto",
                      max_memory="cuda:0=4GiB"))
    assert "cpu" in set(r.parallel.placement.values()) and len(r.outputs[0]) > 0
    assert r.parallel.bytes_by_device["cuda:0"] < 4 * GIB
