"""`w4a8`: 4-bit weights times int8 activations on the workbench's own C kernel (`workbench/native/q4q8.c`).

The kernel is checked against the formula it implements, computed in float64 from the layer's own codes and the
activations quantized the same way, in both of its builds (AVX2 and portable C), for one row (decode), four-row
tiles with remainders (prefill, batches) and an odd number of blocks; the codes against the weights; the layer
inside models (head tied or not, a layer 32 does not divide, bf16); `torch.compile` keeping it in one graph; and
the refusals: no compiler, a compiler that fails, a CUDA device. Timings are never asserted here
(`python bench/engines.py` and `python bench/matmul_kernels.py` have them).
"""

from __future__ import annotations

import copy

import pytest
import torch

from workbench import native
from workbench.errors import ConfigError
from workbench.measure.memory import parameter_count, weight_bytes
from workbench.techniques import REGISTRY, load_all, parse_spec
from workbench.techniques._targets import block_linears
from workbench.techniques.w4a8 import BLOCK, W4A8Linear, block_codes, dequantize

load_all()
CPU = torch.device("cpu")


def _formula(layer: W4A8Linear, x: torch.Tensor) -> torch.Tensor:
    """What the kernel computes, in float64: int8 activations per block of 32 times the dequantized weight."""
    rows = x.reshape(-1, layer.in_features).double()  # (M, in)
    blocks = rows.reshape(rows.shape[0], -1, BLOCK)  # (M, in/32, 32)
    scale = blocks.abs().amax(dim=-1, keepdim=True) / 127  # (M, in/32, 1)
    q = torch.round(blocks / torch.where(scale > 0, scale, 1.0)) * scale  # (M, in/32, 32)
    y = q.reshape(rows.shape) @ dequantize(layer.packed, layer.scales, layer.mins).double().t()  # (M, out)
    return y if layer.bias is None else y + layer.bias.double()


@pytest.fixture(params=["vectorized", "portable"])
def build(request, monkeypatch):
    """Each test runs on both builds of the kernel: AVX2 (where this CPU has it) and portable C."""
    if request.param == "vectorized" and not native.cpu_vector_flags():
        pytest.skip("this CPU lacks AVX2 + FMA + F16C: only the portable build runs here")
    if request.param == "portable":
        monkeypatch.setenv(native.PORTABLE_ENV, "1")
    native.library.cache_clear()
    yield request.param
    native.library.cache_clear()


@pytest.mark.parametrize("rows", [1, 3, 4, 9])  # one token; below, at and past the four-row tile
@pytest.mark.parametrize("in_features", [32, 96, 768])  # 96: an odd number of blocks
def test_the_kernel_computes_its_formula(build, rows, in_features):
    torch.manual_seed(rows * in_features)
    linear = torch.nn.Linear(in_features, 37)
    layer = W4A8Linear(linear)
    x = torch.randn(rows, in_features)
    with torch.inference_mode():
        y = layer(x)
    assert native.vectorized() is (build == "vectorized")
    assert y.shape == (rows, 37) and y.dtype == torch.float32
    torch.testing.assert_close(y.double(), _formula(layer, x), rtol=1e-5, atol=1e-4)
    ref = linear(x).detach()
    assert float(10 * torch.log10(ref.pow(2).sum() / (ref - y).pow(2).sum())) > 18  # 4-bit weights: ~20-25 dB


def test_codes_span_each_block_and_reconstruct_it():
    torch.manual_seed(1)
    w = torch.randn(8, 64)  # (out, in)
    packed, scales, mins = block_codes(w)
    assert packed.shape == (8, 32) and packed.dtype == torch.uint8
    assert scales.shape == mins.shape == (8, 2) and scales.dtype == torch.float16
    codes = torch.cat([packed.reshape(8, 2, 16) & 0x0F, packed.reshape(8, 2, 16) >> 4], dim=-1)  # (out, in/32, 32)
    assert int(codes.amin(dim=-1).max()) == 0 and int(codes.amax(dim=-1).min()) == 15  # min -> 0, max -> 15
    error = (dequantize(packed, scales, mins) - w).abs().reshape(8, 2, 32)
    assert (error <= scales.float()[..., None] / 2 + 1e-2 * scales.float()[..., None]).all()  # round to nearest


def test_a_constant_block_is_exact_and_zero_input_gives_the_bias(build):
    linear = torch.nn.Linear(64, 4)
    with torch.no_grad():
        linear.weight[:, :32] = 0.25  # a constant block: scale 0, every code 0, the minimum carries it
    layer = W4A8Linear(linear)
    assert torch.equal(dequantize(layer.packed, layer.scales, layer.mins)[:, :32], torch.full((4, 32), 0.25))
    with torch.inference_mode():
        assert torch.allclose(layer(torch.zeros(2, 64)), linear.bias.detach().expand(2, 4))
        assert torch.isfinite(layer(torch.randn(2, 64))).all()


def test_a_bf16_model_stays_bf16():
    linear = torch.nn.Linear(64, 24).to(torch.bfloat16)
    with torch.inference_mode():
        y = W4A8Linear(linear)(torch.randn(2, 3, 64, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16 and y.shape == (2, 3, 24)


def test_torch_compile_keeps_the_layer_in_one_graph():
    torch.manual_seed(3)
    layer = W4A8Linear(torch.nn.Linear(64, 48))
    x = torch.randn(1, 64)
    compiled = torch.compile(layer, fullgraph=True, dynamic=False)  # fullgraph: a graph break raises
    with torch.inference_mode():
        torch.testing.assert_close(compiled(x), layer(x))


def test_a_tied_head_gets_its_own_copy_counted_once(tiny, apply_technique):
    model = copy.deepcopy(tiny.model)
    embed = model.get_input_embeddings().weight
    notes = apply_technique("w4a8", model)
    assert isinstance(model.get_output_embeddings(), W4A8Linear)
    assert model.get_input_embeddings().weight is embed
    assert parameter_count(model) == parameter_count(tiny.model)
    assert "its own copy of the tied embeddings" in notes[-1] and "kernel: " in notes[-1]
    layers = [m for _, m in block_linears(tiny.model)] + [tiny.model.get_output_embeddings()]
    packed = sum(m.weight.numel() // 2 + m.weight.numel() // BLOCK * 4 for m in layers)  # 0.625 bytes per weight
    assert weight_bytes(model) == weight_bytes(tiny.model) - 4 * sum(m.weight.numel() for m in layers[:-1]) + packed


def test_a_layer_32_does_not_divide_or_beyond_fp16_stays_float(apply_technique):
    model = torch.nn.Sequential(torch.nn.Linear(48, 64), torch.nn.Linear(64, 64), torch.nn.Linear(64, 8))
    with torch.no_grad():
        model[1].weight[0, 0] = 1e5  # fp16 tops out at 65504: its block's minimum could not be stored
    notes = apply_technique("w4a8:lm_head=false", model)
    assert type(model[0]) is torch.nn.Linear and type(model[1]) is torch.nn.Linear
    assert isinstance(model[2], W4A8Linear) and notes[-1].startswith("1 Linear layers quantized")


def test_cpu_only_with_the_reason():
    cls = REGISTRY["w4a8"]
    assert cls.unavailable(CPU) is None
    assert "torchao-int4-weight" in cls.unavailable(torch.device("cuda"))


def test_without_a_compiler_it_is_unavailable_and_says_why(monkeypatch):
    monkeypatch.setenv("CC", "/nonexistent/cc")
    reason = REGISTRY["w4a8"].unavailable(CPU)
    assert reason == "$CC='/nonexistent/cc' is not an executable"
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.delenv("CC")
    monkeypatch.setattr(native.sysconfig, "get_config_var", lambda name: None)
    assert "no C compiler" in REGISTRY["w4a8"].unavailable(CPU)


def test_a_failing_build_stops_before_any_layer_changes(monkeypatch, tmp_path, apply_technique):
    monkeypatch.setenv("WORKBENCH_CACHE_DIR", str(tmp_path))  # no earlier build to reuse
    monkeypatch.setenv("CC", "false")  # exists, exits 1, writes nothing
    native.library.cache_clear()
    model = torch.nn.Sequential(torch.nn.Linear(64, 64))
    try:
        with pytest.raises(ConfigError, match=r"could not build the w4a8 kernel with false \(exit 1\)"):
            apply_technique("w4a8", model)
    finally:
        native.library.cache_clear()
    assert type(model[0]) is torch.nn.Linear
    assert not list((tmp_path / "native").glob("*"))  # no half-written library left behind


def test_the_portable_build_warns_that_it_is_slow(monkeypatch):
    cfg = parse_spec("w4a8")
    monkeypatch.setattr(native, "cpu_flags", lambda: frozenset({"sse2", "avx2", "fma", "f16c"}))
    assert native.cpu_vector_flags() == ["-mavx2", "-mfma", "-mf16c"]
    assert cfg.speed_warning("cpu", 1, compiled=True) is None
    monkeypatch.setattr(native, "cpu_flags", lambda: frozenset({"sse2", "avx2"}))  # no FMA or F16C
    assert "portable C" in cfg.speed_warning("cpu", 1, compiled=True)
    monkeypatch.setattr(native, "cpu_flags", lambda: frozenset({"sse2", "avx2", "fma", "f16c"}))
    monkeypatch.setenv(native.PORTABLE_ENV, "1")  # asked for: the same warning
    assert "portable C" in cfg.speed_warning("cpu", 1, compiled=True)
