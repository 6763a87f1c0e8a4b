"""`w8a8` and `w4a16`: the quantized CPU layers built from plain aten operators, so a decode step compiles whole.

`w8a8`: int8 weights per row and int8 activations per token on `torch._int_mm`. `w4a16`: 4-bit grouped weights
with bf16 activations on PyTorch's CPU int4 kernel. Each layer is checked against the formula it implements
(from its own codes and scales), against the float layer it replaces, at the edges (all-zero inputs and rows,
constant groups, out_features that are not a multiple of 16, a group size that does not divide a layer), and end
to end: the compiled decode step gives the tokens the eager one gives. Timings are never asserted here
(bench/suite.py and bench/matmul_kernels.py have them).
"""

from __future__ import annotations

import copy

import pytest
import torch

from workbench.errors import ConfigError
from workbench.measure.memory import parameter_count, weight_bytes
from workbench.techniques import REGISTRY, load_all, parse_spec
from workbench.techniques._targets import block_linears
from workbench.techniques.w4a16 import W4A16Linear, group_codes
from workbench.techniques.w8a8 import QMAX, W8A8Linear, row_codes

load_all()
CPU = torch.device("cpu")


def _sqnr_db(ref: torch.Tensor, approx: torch.Tensor) -> float:
    return float(10 * torch.log10(ref.pow(2).sum() / (ref - approx).pow(2).sum()))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["w8a8", "w4a16", "w4a8"])  # w4a8: tests/test_w4a8.py has the rest
def test_the_compiled_decode_step_gives_the_eager_tokens(name, fast):
    """One graph for the whole step (no 'compile skipped'), the eager tokens, and the decode check passes."""
    from workbench.measure.accuracy import decode_looks_wrong
    from workbench.runner import run

    settings = dict(max_new_tokens=6, eval_tokens=0, kv_cache="static", warmup=1, techniques=(name,))
    eager = run(fast(**settings))
    compiled = run(fast(**settings, compile=True))
    assert eager.status == compiled.status == "ok"
    assert compiled.outputs == eager.outputs
    assert not decode_looks_wrong(compiled.warnings)
    assert not any(w.startswith(("compile skipped", "transformers did not compile")) for w in compiled.warnings)


# --- w8a8 -------------------------------------------------------------------------------------------------------

def test_w8a8_the_layer_computes_its_formula_in_integers():
    torch.manual_seed(0)
    linear = torch.nn.Linear(96, 40)
    layer = W8A8Linear(linear)
    x = torch.randn(2, 3, 96)  # (B, T, in)
    rows = x.reshape(-1, 96).double()  # (6, in)
    sx = rows.abs().amax(dim=1, keepdim=True) / QMAX  # (6, 1)
    xq = torch.round(rows / sx).clamp(-QMAX, QMAX)  # (6, in)
    expected = (xq @ layer.codes.double().t()) * sx * layer.scale.double() + linear.bias.double()  # (6, out)
    with torch.inference_mode():
        y = layer(x)
    assert y.shape == (2, 3, 40) and y.dtype == torch.float32
    torch.testing.assert_close(y.reshape(6, 40).double(), expected, rtol=1e-5, atol=1e-5)
    assert _sqnr_db(linear(x).detach(), y) > 30  # 8-bit weights and activations: ~35-40 dB on Gaussian layers


def test_w8a8_codes_use_the_symmetric_range_and_reconstruct_the_weight():
    torch.manual_seed(1)
    w = torch.randn(16, 64)  # (out, in)
    codes, scale = row_codes(w)
    assert codes.dtype == torch.int8 and scale.shape == (16,)
    assert int(codes.abs().max()) == QMAX and int(codes.min()) >= -QMAX
    assert (codes.float() * scale[:, None] - w).abs().max() <= scale.max() / 2 + 1e-6  # round to nearest


def test_w8a8_all_zero_inputs_and_rows_give_zeros_not_nan():
    linear = torch.nn.Linear(32, 8, bias=False)
    with torch.no_grad():
        linear.weight[3] = 0  # a pruned row
    layer = W8A8Linear(linear)
    with torch.inference_mode():
        zeros = layer(torch.zeros(2, 32))
        y = layer(torch.randn(2, 32))
    assert torch.equal(zeros, torch.zeros(2, 8))
    assert torch.isfinite(y).all() and torch.equal(y[:, 3], torch.zeros(2))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_w8a8_the_output_keeps_the_input_dtype(dtype):
    torch.manual_seed(2)
    linear = torch.nn.Linear(64, 24).to(dtype)
    x = torch.randn(5, 64, dtype=dtype)
    with torch.inference_mode():
        y = W8A8Linear(linear)(x)
        ref = linear(x)
    assert y.dtype == dtype
    assert _sqnr_db(ref.float(), y.float()) > 25


def test_w8a8_a_tied_head_gets_its_own_int8_copy_counted_once(tiny, apply_technique):
    model = copy.deepcopy(tiny.model)
    embed = model.get_input_embeddings().weight
    assert model.get_output_embeddings().weight is embed  # tiny ties them
    notes = apply_technique("w8a8", model)
    assert isinstance(model.get_output_embeddings(), W8A8Linear)
    assert model.get_input_embeddings().weight is embed  # the lookup keeps the float table
    assert parameter_count(model) == parameter_count(tiny.model)
    assert "its own copy of the tied embeddings" in notes[-1]
    # each fp32 block weight (4 bytes per weight) becomes 1-byte codes + a 4-byte scale per row; the head is added
    layers = [m for _, m in block_linears(tiny.model)] + [tiny.model.get_output_embeddings()]
    change = sum(m.weight.numel() + 4 * m.out_features for m in layers) - 4 * sum(m.weight.numel() for m in layers[:-1])
    assert weight_bytes(model) == weight_bytes(tiny.model) + change


def test_w8a8_without_lm_head_the_output_projection_stays_float(tiny, apply_technique):
    model = copy.deepcopy(tiny.model)
    notes = apply_technique("w8a8:lm_head=false", model)
    assert type(model.get_output_embeddings()) is torch.nn.Linear
    assert all(isinstance(model.get_submodule(n), W8A8Linear) for n, _ in block_linears(tiny.model))
    assert "the output projection kept in float" in notes[-1]


def test_w8a8_warns_on_an_x86_cpu_without_vnni(monkeypatch):
    """Measured: torch._int_mm at 0.63x fp32 on an AVX2-only CPU (bench/results/matmul-kernels-avx2.md)."""
    import workbench.techniques.w8a8 as w8a8

    cfg = parse_spec("w8a8")
    monkeypatch.setattr(w8a8, "cpu_flags", lambda: frozenset({"avx2", "fma"}))
    assert "no VNNI" in cfg.speed_warning("cpu", 1, True) and "w4a8" in cfg.speed_warning("cpu", 1, True)
    for flags in ({"avx2", "avx512_vnni"}, {"avx2", "avx_vnni"}, set()):  # VNNI, or no x86 flags to read
        monkeypatch.setattr(w8a8, "cpu_flags", lambda f=frozenset(flags): f)
        assert cfg.speed_warning("cpu", 1, True) is None


def test_w8a8_cpu_only_with_the_reason():
    cls = REGISTRY["w8a8"]
    assert cls.unavailable(CPU) is None
    reason = cls.unavailable(torch.device("cuda"))
    assert "more than 16 rows" in reason and "torchao-int8-weight" in reason


# --- w4a16 ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("out_features", [48, 40])  # 40: padded to 48 rows for the packing, sliced back
def test_w4a16_the_layer_computes_its_formula(out_features):
    torch.manual_seed(0)
    linear = torch.nn.Linear(128, out_features)
    layer = W4A16Linear(linear, 32)
    codes, scale, zero = group_codes(linear.weight, 32)
    scale, zero = scale.bfloat16().float(), zero.bfloat16().float()  # the kernel reads them in bf16
    weight = ((codes.reshape(out_features, 4, 32).float() - 8) * scale[..., None] + zero[..., None]).reshape(
        out_features, 128)  # (out, in)
    x = torch.randn(2, 3, 128)  # (B, T, in)
    expected = x.bfloat16().float() @ weight.t() + linear.bias.detach()  # (B, T, out)
    with torch.inference_mode():
        y = layer(x)
    assert y.shape == (2, 3, out_features) and y.dtype == torch.float32
    torch.testing.assert_close(y, expected, rtol=2e-2, atol=2e-2)  # bf16 accumulation inside the kernel
    assert _sqnr_db(linear(x).detach(), y) > 18  # 4-bit groups of 32: ~23-25 dB on Gaussian layers


def test_w4a16_codes_span_the_group_and_reconstruct_it():
    torch.manual_seed(1)
    w = torch.randn(16, 64)  # (out, in)
    codes, scale, zero = group_codes(w, 32)
    assert codes.dtype == torch.int32 and int(codes.min()) == 0 and int(codes.max()) == 15
    rebuilt = ((codes.reshape(16, 2, 32).float() - 8) * scale[..., None] + zero[..., None]).reshape(16, 64)
    assert (rebuilt - w).abs().max() <= scale.max() / 2 + 1e-6  # round to nearest


def test_w4a16_a_constant_group_is_exact_and_zero_input_gives_the_bias():
    linear = torch.nn.Linear(64, 16)
    with torch.no_grad():
        linear.weight[:, :32] = 0.25  # one constant group per row
        linear.weight[3] = 0.0  # a pruned row
    layer = W4A16Linear(linear, 32)
    codes, scale, zero = group_codes(linear.weight, 32)
    rebuilt = (codes[:, :32].float() - 8) * scale[:, :1] + zero[:, :1]  # (out, 32)
    assert torch.equal(rebuilt, linear.weight.detach()[:, :32])  # 0.25, and 0 in the pruned row
    with torch.inference_mode():
        y = layer(torch.zeros(2, 64))
        z = layer(torch.randn(2, 64))
    torch.testing.assert_close(y, linear.bias.detach().expand(2, 16), rtol=0, atol=0)
    assert torch.isfinite(z).all()


def test_w4a16_bf16_models_stay_bf16():
    torch.manual_seed(2)
    linear = torch.nn.Linear(64, 32).bfloat16()
    x = torch.randn(5, 64, dtype=torch.bfloat16)
    with torch.inference_mode():
        y = W4A16Linear(linear, 64)(x)
        ref = linear(x)
    assert y.dtype == torch.bfloat16 and _sqnr_db(ref.float(), y.float()) > 18


def test_w4a16_a_layer_the_group_size_does_not_divide_stays_float(tiny, apply_technique):
    model = copy.deepcopy(tiny.model)
    notes = apply_technique("w4a16:group_size=256", model)  # tiny: hidden 256, MLP 768: every in_features divides
    assert all(isinstance(model.get_submodule(n), W4A16Linear) for n, _ in block_linears(tiny.model))
    odd = torch.nn.Sequential(torch.nn.Linear(96, 32), torch.nn.Linear(32, 64))
    apply_technique("w4a16:group_size=64,lm_head=false", odd)
    assert type(odd[0]) is torch.nn.Linear and type(odd[1]) is torch.nn.Linear  # 96 and 32: not multiples of 64
    apply_technique("w4a16:group_size=32,lm_head=false", odd)
    assert isinstance(odd[0], W4A16Linear) and isinstance(odd[1], W4A16Linear)
    assert "groups of 256" in notes[-1]


def test_w4a16_a_tied_head_gets_its_own_copy_counted_once(tiny, apply_technique):
    model = copy.deepcopy(tiny.model)
    embed = model.get_input_embeddings().weight
    notes = apply_technique("w4a16", model)
    head = model.get_output_embeddings()
    assert isinstance(head, W4A16Linear) and model.get_input_embeddings().weight is embed
    assert parameter_count(model) == parameter_count(tiny.model)
    assert "its own copy of the tied embeddings" in notes[-1]
    layers = [m for _, m in block_linears(tiny.model)] + [tiny.model.get_output_embeddings()]
    cfg = parse_spec("w4a16")
    change = (sum(cfg.packed_bytes(m.out_features, m.in_features) for m in layers)
              - 4 * sum(m.weight.numel() for m in layers[:-1]))  # fp32 block weights go, the head copy is added
    assert weight_bytes(model) == weight_bytes(tiny.model) + change


def test_w4a16_cpu_only_with_the_reason_and_a_group_size_from_the_list():
    cls = REGISTRY["w4a16"]
    assert cls.unavailable(CPU) is None
    assert "torchao-int4-weight" in cls.unavailable(torch.device("cuda"))
    with pytest.raises(ConfigError, match="group_size must be one of 32, 64, 128, 256"):
        parse_spec("w4a16:group_size=48")
