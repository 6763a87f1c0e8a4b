"""`w8a8`: int8 weights per row and int8 activations per token on `torch._int_mm`.

The layer is checked against the formula it implements (in float64, from its own codes and scales), against
the float layer it replaces, at the edges (all-zero inputs and rows), and end to end: the compiled decode step
must give the tokens the eager one gives. Timings are never asserted here (bench/suite.py has them).
"""

from __future__ import annotations

import copy

import pytest
import torch

from workbench.measure.memory import parameter_count, weight_bytes
from workbench.techniques import REGISTRY, load_all, parse_spec
from workbench.techniques._targets import block_linears
from workbench.techniques.base import ApplyContext, handler_for
from workbench.techniques.w8a8 import QMAX, W8A8Linear, row_codes

load_all()
CPU = torch.device("cpu")


def _apply(spec: str, model: torch.nn.Module, dtype: str = "fp32") -> list[str]:
    cfg = parse_spec(spec)
    ctx = ApplyContext(model, None, CPU, dtype, lambda message, fraction: None)
    handler_for(cfg)(cfg, ctx)
    return ctx.notes


def _sqnr_db(ref: torch.Tensor, approx: torch.Tensor) -> float:
    return float(10 * torch.log10(ref.pow(2).sum() / (ref - approx).pow(2).sum()))


def test_the_layer_computes_its_formula_in_integers():
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


def test_codes_use_the_symmetric_range_and_reconstruct_the_weight():
    torch.manual_seed(1)
    w = torch.randn(16, 64)  # (out, in)
    codes, scale = row_codes(w)
    assert codes.dtype == torch.int8 and scale.shape == (16,)
    assert int(codes.abs().max()) == QMAX and int(codes.min()) >= -QMAX
    assert (codes.float() * scale[:, None] - w).abs().max() <= scale.max() / 2 + 1e-6  # round to nearest


def test_all_zero_inputs_and_rows_give_zeros_not_nan():
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
def test_the_output_keeps_the_input_dtype(dtype):
    torch.manual_seed(2)
    linear = torch.nn.Linear(64, 24).to(dtype)
    x = torch.randn(5, 64, dtype=dtype)
    with torch.inference_mode():
        y = W8A8Linear(linear)(x)
        ref = linear(x)
    assert y.dtype == dtype
    assert _sqnr_db(ref.float(), y.float()) > 25


def test_a_tied_head_gets_its_own_int8_copy_counted_once(tiny):
    model = copy.deepcopy(tiny.model)
    embed = model.get_input_embeddings().weight
    assert model.get_output_embeddings().weight is embed  # tiny ties them
    notes = _apply("w8a8", model)
    assert isinstance(model.get_output_embeddings(), W8A8Linear)
    assert model.get_input_embeddings().weight is embed  # the lookup keeps the float table
    assert parameter_count(model) == parameter_count(tiny.model)
    assert "its own copy of the tied embeddings" in notes[-1]
    # each fp32 block weight (4 bytes per weight) becomes 1-byte codes + a 4-byte scale per row; the head is added
    layers = [m for _, m in block_linears(tiny.model)] + [tiny.model.get_output_embeddings()]
    change = sum(m.weight.numel() + 4 * m.out_features for m in layers) - 4 * sum(m.weight.numel() for m in layers[:-1])
    assert weight_bytes(model) == weight_bytes(tiny.model) + change


def test_without_lm_head_the_output_projection_stays_float(tiny):
    model = copy.deepcopy(tiny.model)
    notes = _apply("w8a8:lm_head=false", model)
    assert type(model.get_output_embeddings()) is torch.nn.Linear
    assert all(isinstance(model.get_submodule(n), W8A8Linear) for n, _ in block_linears(tiny.model))
    assert "the output projection kept in float" in notes[-1]


def test_cpu_only_with_the_reason():
    cls = REGISTRY["w8a8"]
    assert cls.unavailable(CPU) is None
    reason = cls.unavailable(torch.device("cuda"))
    assert "more than 16 rows" in reason and "torchao-int8-weight" in reason


@pytest.mark.slow
def test_the_compiled_decode_step_gives_the_eager_tokens(fast):
    """One graph for the whole step (no 'compile skipped'), the eager tokens, and the decode check passes."""
    from workbench.measure.accuracy import decode_looks_wrong
    from workbench.runner import run

    settings = dict(max_new_tokens=6, eval_tokens=0, kv_cache="static", warmup=1, techniques=("w8a8",))
    eager = run(fast(**settings))
    compiled = run(fast(**settings, compile=True))
    assert eager.status == compiled.status == "ok"
    assert compiled.outputs == eager.outputs
    assert not decode_looks_wrong(compiled.warnings)
    assert not any(w.startswith(("compile skipped", "transformers did not compile")) for w in compiled.warnings)
