"""Pruning techniques (issue 3): magnitude, wanda, structured, 2:4 — exact sparsity, real shrinking, round trips."""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch

from workbench.errors import ConfigError
from workbench.measure.memory import parameter_count
from workbench.techniques import ApplyContext, load_all, parse_spec
from workbench.techniques.base import handler_for
from workbench.techniques._targets import block_weights, weight_matrix
from workbench.techniques.wanda import prune_rows

PRUNERS = ("magnitude", "wanda", "structured", "2:4")
CAL = "calibration_tokens=256"  # keeps the tests quick; the default is 2048
SPECS = ("magnitude:sparsity=0.5", "magnitude:sparsity=0.5,scope=global", f"wanda:sparsity=0.5,{CAL}",
         f"structured:heads_ratio=0.5,mlp_ratio=0.5,{CAL}", "2:4", f"2:4:scores=wanda,{CAL}")
CPU = torch.device("cpu")


def apply(spec: str, model: torch.nn.Module, tokenizer, dtype: str = "fp32") -> tuple[torch.nn.Module, list[str]]:
    """Apply one technique spec to `model` (in place) as the runner does; the model and the run notes."""
    cfg = parse_spec(spec)
    device = next(model.parameters()).device
    ctx = ApplyContext(model, tokenizer, device, dtype, lambda message, fraction: None)
    return handler_for(cfg)(cfg, ctx) or model, ctx.notes


def generate8(model: torch.nn.Module, tokenizer) -> torch.Tensor:
    """8 greedy tokens after a short prompt."""
    ids = torch.tensor([tokenizer.encode("The for statement is used to")], device=next(model.parameters()).device)
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, min_new_tokens=8,
                             do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return out[0, ids.shape[1]:]


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=ids).logits  # (1, T, V)


def perplexity(model: torch.nn.Module, tokenizer, tokens: int = 512, window: int = 128) -> float:
    """exp(mean next-token loss) over the first held-out tokens."""
    from workbench.textio import heldout_ids

    ids = torch.tensor(heldout_ids(tokenizer)[:tokens]).view(-1, window)  # (N, window)
    with torch.inference_mode():
        return math.exp(model(input_ids=ids, labels=ids).loss.item())


def random_model(arch: str, vocab: int, **changes) -> torch.nn.Module:
    """A tiny random model of another architecture (seeded), for layout coverage."""
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, MistralConfig, Qwen2Config

    base = dict(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=256)
    configs = {"llama": LlamaConfig, "qwen2": Qwen2Config, "mistral": MistralConfig}
    torch.manual_seed(0)
    if arch == "gpt2":
        config = GPT2Config(vocab_size=vocab, n_embd=64, n_layer=2, n_head=4, n_positions=256, **changes)
    else:
        config = configs[arch](**{**base, **changes})
    return AutoModelForCausalLM.from_config(config).eval()


def expected_structured_reduction(config, heads_ratio: float, mlp_ratio: float) -> int:
    """Parameters a structured pruning removes, from the config alone (whole KV groups, >= 1 kept)."""
    hd = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    n_kv = config.num_key_value_heads
    rep = config.num_attention_heads // n_kv
    groups = min(round(heads_ratio * n_kv), n_kv - 1)
    channels = min(round(mlp_ratio * config.intermediate_size), config.intermediate_size - 1)
    qkv_bias = getattr(config, "attention_bias", False) or config.model_type == "qwen2"
    attn = 2 * groups * rep * hd * config.hidden_size + 2 * groups * hd * config.hidden_size  # q rows, o cols, k, v
    attn += (groups * rep * hd + 2 * groups * hd) if qkv_bias else 0
    mlp = 3 * channels * config.hidden_size + (2 * channels if getattr(config, "mlp_bias", False) else 0)
    return config.num_hidden_layers * (attn + mlp)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: on a shared 2-core machine OpenMP waits dominate these small tensors."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def model(tiny):
    """A deep copy of the reference model (never mutate the session fixture)."""
    return copy.deepcopy(tiny.model)


# ----------------------------------------------------------------------------- registry and configs

@pytest.mark.parametrize("name", PRUNERS)
def test_registered_with_help(name):
    cls = load_all()[name]
    assert cls.name == name and cls.kind == "prune" and cls.needs_float_weights and not cls.packs_weights
    assert cls.unavailable(CPU) is None and cls.summary
    cfg = cls()
    assert cfg.notes() and parse_spec(cfg.spec()) == cfg and parse_spec(name) == cfg
    for f in dataclasses.fields(cls):
        assert f.metadata.get("help"), f"{name}.{f.name} has no help"


def test_parse_spec_with_colon_in_name():
    load_all()
    cfg = parse_spec("2:4:scores=wanda,calibration_tokens=512")
    assert (cfg.name, cfg.scores, cfg.calibration_tokens) == ("2:4", "wanda", 512)
    assert parse_spec(cfg.spec()) == cfg and cfg.spec().startswith("2:4:")
    mag = parse_spec(" magnitude:sparsity=0.3,scope=global ")
    assert (mag.name, mag.sparsity, mag.scope) == ("magnitude", 0.3, "global")
    with pytest.raises(ConfigError, match="unknown technique"):
        parse_spec("2:5")


@pytest.mark.parametrize("spec, allowed", [
    ("magnitude:sparsity=1.5", "0.0..0.99"), ("magnitude:sparsity=-0.1", "0.0..0.99"),
    ("magnitude:scope=row", "layer, global"), ("wanda:sparsity=0.995", "0.0..0.99"),
    ("wanda:calibration_tokens=8", "128.."), ("structured:heads_ratio=0.95", "0.0..0.9"),
    ("structured:mlp_ratio=1", "0.0..0.9"), ("2:4:scores=random", "magnitude, wanda"),
])
def test_out_of_range_names_the_range(spec, allowed):
    load_all()
    with pytest.raises(ConfigError, match=allowed.replace(".", r"\.")):
        parse_spec(spec)


def test_direct_construction_raises_value_error():
    cls = load_all()["magnitude"]
    with pytest.raises(ValueError, match="sparsity must be in 0.0..0.99"):
        cls(sparsity=2.0)


# ----------------------------------------------------------------------------- every technique on the reference model

@pytest.mark.parametrize("spec", SPECS)
def test_model_still_generates(spec, model, tiny):
    pruned, notes = apply(spec, model, tiny.tokenizer)
    assert generate8(pruned, tiny.tokenizer).numel() == 8
    assert notes and all(isinstance(n, str) and n for n in notes)


@pytest.mark.parametrize("sparsity", [0.37, 0.5])
def test_magnitude_layer_scope_is_exact(sparsity, model, tiny):
    _, notes = apply(f"magnitude:sparsity={sparsity}", model, tiny.tokenizer)
    targets = block_weights(model)
    assert {n.split(".")[-1] for n, _ in targets} >= {"q_proj", "down_proj"}
    assert model.get_output_embeddings() not in [m for _, m in targets]
    for name, m in targets:
        assert int((m.weight == 0).sum()) == round(sparsity * m.weight.numel()), name
    zeros = sum(int((m.weight == 0).sum()) for _, m in targets)
    assert f"{zeros:,} of" in notes[0]
    assert torch.equal(model.get_input_embeddings().weight, tiny.model.get_input_embeddings().weight)  # untouched
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())  # no hooks left behind


def test_magnitude_global_one_threshold(model, tiny):
    before = {n: m.weight.detach().abs().clone() for n, m in block_weights(model)}
    apply("magnitude:sparsity=0.6,scope=global", model, tiny.tokenizer)
    targets = block_weights(model)
    total = sum(m.weight.numel() for _, m in targets)
    assert sum(int((m.weight == 0).sum()) for _, m in targets) == round(0.6 * total)
    pruned_max = max(float(before[n][m.weight == 0].max()) for n, m in targets)
    kept_min = min(float(before[n][m.weight != 0].min()) for n, m in targets)
    assert pruned_max <= kept_min  # one threshold over all weights
    shares = {round(float((m.weight == 0).float().mean()), 3) for _, m in targets}
    assert len(shares) > 1  # layers end up uneven


def test_wanda_exact_per_row_and_uses_activations(model, tiny):
    reference = copy.deepcopy(model)
    apply(f"wanda:sparsity=0.5,{CAL}", model, tiny.tokenizer)
    differs = 0
    for (name, m), (_, ref) in zip(block_weights(model), block_weights(reference)):
        w = weight_matrix(m)  # (out, in)
        assert bool(((w == 0).sum(dim=1) == round(0.5 * w.shape[1])).all()), name
        with torch.no_grad():
            prune_rows(ref, weight_matrix(ref).abs().float(), round(0.5 * w.shape[1]))  # |W| alone, per row
        differs += int(((w == 0) != (weight_matrix(ref) == 0)).sum())
    assert differs > 0  # activation norms changed which weights went


def test_2to4_every_group_has_two_zeros(model, tiny):
    _, notes = apply("2:4", model, tiny.tokenizer)
    for name, m in block_weights(model):
        w = weight_matrix(m)  # (out, in)
        groups = (w == 0).reshape(w.shape[0], -1, 4).sum(dim=2)  # (out, in/4)
        assert bool((groups >= 2).all()), name
    assert any("compute capability ≥ 8.0; masks only" in n for n in notes)


def test_2to4_skips_layers_not_divisible_by_4(tiny):
    model = random_model("llama", tiny.model.config.vocab_size, intermediate_size=42)
    _, notes = apply("2:4", model, tiny.tokenizer)
    downs = [m for n, m in block_weights(model) if n.endswith("down_proj")]
    assert all(int((m.weight == 0).sum()) == 0 for m in downs)
    assert any("2 layers left dense: in_features not a multiple of 4" in n for n in notes)
    assert generate8(model, tiny.tokenizer).numel() == 8


def test_gpt2_conv1d_layers_are_pruned_too(tiny):
    model = random_model("gpt2", tiny.model.config.vocab_size)
    apply("magnitude:sparsity=0.5", model, tiny.tokenizer)
    targets = block_weights(model)
    assert len(targets) == 4 * model.config.n_layer  # c_attn, c_proj, c_fc, mlp.c_proj
    assert all(int((m.weight == 0).sum()) == round(0.5 * m.weight.numel()) for _, m in targets)
    model2 = random_model("gpt2", tiny.model.config.vocab_size)
    apply("2:4", model2, tiny.tokenizer)
    w = weight_matrix(block_weights(model2)[0][1])  # (out, in) view of a Conv1D (in, out) weight
    assert bool(((w == 0).reshape(w.shape[0], -1, 4).sum(dim=2) >= 2).all())


def test_perplexity_rises_with_sparsity(tiny):
    ppl = {}
    for s in (0.3, 0.7):
        m = copy.deepcopy(tiny.model)
        apply(f"magnitude:sparsity={s}", m, tiny.tokenizer)
        ppl[s] = perplexity(m, tiny.tokenizer)
    assert perplexity(tiny.model, tiny.tokenizer) < ppl[0.7] and ppl[0.3] < ppl[0.7]


# ----------------------------------------------------------------------------- structured

def test_structured_reduces_parameters_exactly(model, tiny):
    config = copy.deepcopy(model.config)
    before = parameter_count(model)
    pruned, notes = apply(f"structured:heads_ratio=0.5,mlp_ratio=0.5,{CAL}", model, tiny.tokenizer)
    assert before - parameter_count(pruned) == expected_structured_reduction(config, 0.5, 0.5)
    c = pruned.config
    assert c.num_attention_heads == config.num_attention_heads - round(0.5 * config.num_attention_heads)
    assert c.intermediate_size == config.intermediate_size - round(0.5 * config.intermediate_size)
    attn = pruned.model.layers[0].self_attn
    assert attn.q_proj.out_features == attn.o_proj.in_features == c.num_attention_heads * c.head_dim
    assert f"parameters {before:,} → {parameter_count(pruned):,}" in notes[0]


def test_structured_ratio_zero_is_identity(model, tiny):
    ids = torch.tensor([tiny.tokenizer.encode("The for statement is used to")])
    expected = logits(tiny.model, ids)
    pruned, _ = apply("structured:heads_ratio=0,mlp_ratio=0", model, tiny.tokenizer)
    assert parameter_count(pruned) == parameter_count(tiny.model)
    assert torch.equal(logits(pruned, ids), expected)


@pytest.mark.parametrize("arch, changes", [("llama", {}), ("llama", {"attention_bias": True, "mlp_bias": True}),
                                          ("qwen2", {}), ("mistral", {})])
def test_structured_gqa_whole_kv_groups(arch, changes, tiny, tmp_path):
    from transformers import AutoModelForCausalLM

    model = random_model(arch, tiny.model.config.vocab_size, **changes)  # 4 heads, 2 KV heads: groups of 2
    config = copy.deepcopy(model.config)
    before = parameter_count(model)
    pruned, notes = apply(f"structured:heads_ratio=0.3,mlp_ratio=0.25,{CAL}", model, tiny.tokenizer)
    assert before - parameter_count(pruned) == expected_structured_reduction(config, 0.3, 0.25)
    assert (pruned.config.num_attention_heads, pruned.config.num_key_value_heads) == (2, 1)
    assert all(layer.self_attn.num_key_value_groups == 2 for layer in pruned.model.layers)
    assert "removed 2 of 4 attention heads per layer (asked 0.3 × 4 = 1.2)" in notes[0]
    assert "KV groups of 2" in notes[0]
    assert generate8(pruned, tiny.tokenizer).numel() == 8
    pruned.save_pretrained(tmp_path)
    ids = torch.tensor([[5, 17, 300, 42, 9]])
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert torch.allclose(logits(reloaded, ids), logits(pruned, ids), atol=1e-5)


def test_structured_keeps_one_group_and_one_channel(tiny):
    model = random_model("llama", tiny.model.config.vocab_size, num_key_value_heads=1, intermediate_size=2)
    pruned, _ = apply(f"structured:heads_ratio=0.9,mlp_ratio=0.9,{CAL}", model, tiny.tokenizer)
    assert pruned.config.num_attention_heads == 4 and pruned.config.intermediate_size == 1
    assert generate8(pruned, tiny.tokenizer).numel() == 8


def test_structured_save_reload_round_trip(model, tiny, tmp_path):
    from transformers import AutoModelForCausalLM

    pruned, notes = apply(f"structured:heads_ratio=0.5,mlp_ratio=0.5,{CAL}", model, tiny.tokenizer)
    assert not any("save_pretrained would refuse" in n for n in notes)
    pruned.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.tensor([tiny.tokenizer.encode("The for statement is used to")])
    assert parameter_count(reloaded) == parameter_count(pruned)
    assert torch.allclose(logits(reloaded, ids), logits(pruned, ids), atol=1e-5)


def test_structured_uneven_heads_warns_about_saving(model, tiny):
    _, notes = apply(f"structured:heads_ratio=0.25,mlp_ratio=0,{CAL}", model, tiny.tokenizer)
    if model.config.hidden_size % model.config.num_attention_heads:
        assert any("save_pretrained would refuse" in n for n in notes)


def test_structured_refuses_gpt2_heads_in_one_sentence(tiny):
    model = random_model("gpt2", tiny.model.config.vocab_size)
    with pytest.raises(ConfigError) as err:
        apply("structured:heads_ratio=0.5", model, tiny.tokenizer)
    text = str(err.value)
    assert "MLP channels only" in text and "heads_ratio=0" in text and "\n" not in text and text.count(". ") == 0
    phi = random_model("llama", tiny.model.config.vocab_size)
    phi.config.model_type = "phi3"  # any layout structured does not know
    with pytest.raises(ConfigError, match="supports the Llama family .* not 'phi3'"):
        apply("structured:heads_ratio=0.5", phi, tiny.tokenizer)


def test_structured_cuts_gpt2_mlp_channels_exactly_and_round_trips(tiny, tmp_path):
    """GPT-2's Conv1D projections (weights (in, out)): c_fc loses output columns, c_proj input rows (issue 12)."""
    from transformers import AutoModelForCausalLM

    model = random_model("gpt2", tiny.model.config.vocab_size)  # n_embd 64, 2 blocks, n_inner 4 * 64
    before = parameter_count(model)
    pruned, notes = apply(f"structured:heads_ratio=0,mlp_ratio=0.25,{CAL}", model, tiny.tokenizer)
    removed = round(0.25 * 256)
    assert before - parameter_count(pruned) == 2 * removed * (2 * 64 + 1)  # c_fc weight + bias, c_proj weight
    assert pruned.config.n_inner == 256 - removed
    assert all(b.mlp.c_fc.weight.shape == (64, 192) and b.mlp.c_proj.weight.shape == (192, 64)
               for b in pruned.transformer.h)
    assert f"removed {removed} of 256 MLP channels per block" in notes[0]
    assert generate8(pruned, tiny.tokenizer).numel() == 8
    pruned.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.tensor([[5, 17, 300, 42, 9]])
    assert torch.allclose(logits(reloaded, ids), logits(pruned, ids), atol=1e-5)


def test_structured_gpt2_drops_the_least_important_channels(tiny):
    """A channel whose c_proj row is zero adds nothing to the output: it is the first to go."""
    model = random_model("gpt2", tiny.model.config.vocab_size)
    with torch.no_grad():
        for block in model.transformer.h:
            block.mlp.c_proj.weight[7].zero_()  # channel 7 of every block: (inter, E) row
    ids = torch.tensor([tiny.tokenizer.encode("The for statement is used to")])
    expected = logits(model, ids)
    pruned, _ = apply(f"structured:heads_ratio=0,mlp_ratio=0.004,{CAL}", model, tiny.tokenizer)  # 1 of 256
    assert pruned.config.n_inner == 255
    assert torch.allclose(logits(pruned, ids), expected, atol=1e-5)


def test_2to4_kernels_must_come_last_in_half_precision():
    from workbench.techniques import normalize_specs

    with pytest.raises(ConfigError, match="put 2:4 last, or use 2:4:kernels=false"):
        normalize_specs(["2:4", "magnitude"], "fp16")
    assert normalize_specs(["2:4:kernels=false", "magnitude"], "fp16")
    assert normalize_specs(["2:4", "magnitude"], "fp32")


# ----------------------------------------------------------------------------- end to end

def test_runner_records_technique(fast):
    from workbench.runner import run

    result = run(fast(techniques=("magnitude:sparsity=0.5",)))
    (rec,) = result.techniques
    assert (rec.name, rec.kind, rec.simulated) == ("magnitude", "prune", True)
    assert rec.params == {"sparsity": 0.5, "scope": "layer"}
    assert "(target 50.00%)" in rec.notes and "dense kernels do not get faster" in rec.notes
    assert result.accuracy is not None and result.accuracy.kl_vs_baseline > 0


def test_runner_structured_shrinks_reported_params(fast, tiny):
    from workbench.runner import run

    result = run(fast(techniques=(f"structured:heads_ratio=0.5,mlp_ratio=0.5,{CAL}",), eval_tokens=0))
    expected = parameter_count(tiny.model) - expected_structured_reduction(tiny.model.config, 0.5, 0.5)
    assert result.model.params == expected and result.techniques[0].simulated is False


# ----------------------------------------------------------------------------- GPU: real 2:4 kernels

@pytest.mark.gpu
def test_2to4_real_kernels_on_ampere(tiny):
    if torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("2:4 sparse kernels need CUDA compute capability ≥ 8.0")
    from torch.sparse import SparseSemiStructuredTensor

    model = copy.deepcopy(tiny.model).to("cuda", torch.float16)
    pruned, notes = apply("2:4", model, tiny.tokenizer, dtype="fp16")
    sparse = [m for _, m in block_weights(pruned) if isinstance(m.weight, SparseSemiStructuredTensor)]
    assert sparse and any("real 2:4 sparse kernels" in n for n in notes)
    assert generate8(pruned, tiny.tokenizer).numel() == 8
