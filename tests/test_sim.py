"""`sim` quantization: the formula by hand, granularities, activations, and accuracy at 8 vs 2-3 bits."""

from __future__ import annotations

import copy

import pytest
import torch

from workbench.techniques import parse_spec
from workbench.techniques.sim import fake_quant, qparams, qrange, quantize_weight, sqnr_db


def test_symmetric_formula_by_hand():
    x = torch.tensor([-1.2, -0.5, 0.1, 0.6, 1.2])
    scale, zero = qparams(x.min(), x.max(), bits=3, symmetric=True)
    assert qrange(3, True) == (-4, 3)
    assert scale.item() == pytest.approx(0.4) and zero.item() == 0  # max|x| / 3
    # x / scale = -3, -1.25, 0.25, 1.5, 3 -> round half to even: -3, -1, 0, 2, 3
    assert torch.allclose(fake_quant(x, scale, zero, 3, True), torch.tensor([-1.2, -0.4, 0.0, 0.8, 1.2]))


def test_asymmetric_formula_by_hand_keeps_zero_exact():
    x = torch.tensor([-0.3, 0.0, 0.6])
    scale, zero = qparams(x.min(), x.max(), bits=2, symmetric=False)
    assert qrange(2, False) == (0, 3)
    assert scale.item() == pytest.approx(0.3) and zero.item() == 1  # (0.6 + 0.3) / 3; round(0 - (-0.3 / 0.3))
    assert torch.allclose(fake_quant(x, scale, zero, 2, False), torch.tensor([-0.3, 0.0, 0.6]))
    pos = torch.tensor([0.2, 0.5, 0.9])  # the range is widened to include 0
    s, z = qparams(pos.min(), pos.max(), 2, False)
    assert z.item() == 0 and s.item() == pytest.approx(0.3)


def test_clamping_saturates_out_of_range_values():
    scale, zero = torch.tensor(0.1), torch.tensor(0.0)
    out = fake_quant(torch.tensor([10.0, -10.0]), scale, zero, bits=4, symmetric=True)
    assert torch.allclose(out, torch.tensor([0.7, -0.8]))  # codes 7 and -8


def test_granularities():
    torch.manual_seed(0)
    w = torch.randn(8, 64)
    w[:, :32] *= 0.01  # one small-magnitude group per row
    errs = {g: sqnr_db(w, quantize_weight(w, 4, True, g, 32)) for g in ("per-tensor", "per-channel", "per-group")}
    assert errs["per-tensor"] < errs["per-channel"] < errs["per-group"]
    per_channel = quantize_weight(w, 4, True, "per-channel", 32)
    assert all(row.unique().numel() <= 16 for row in per_channel)
    odd = torch.randn(3, 50)  # 50 = 32 + a shorter last group
    q = quantize_weight(odd, 8, False, "per-group", 32)
    assert q.shape == odd.shape and sqnr_db(odd, q) > 35


def apply(model, spec):
    from workbench.techniques import ApplyContext, handler_for

    cfg = parse_spec(spec)
    m = copy.deepcopy(model.model)
    ctx = ApplyContext(m, model.tokenizer, torch.device("cpu"), "fp32", lambda msg, f: None)
    handler_for(cfg)(cfg, ctx)
    return m, ctx


def test_applied_weights_sit_on_the_grid(tiny):
    m, ctx = apply(tiny, "sim:bits=3")
    w = m.model.layers[0].mlp.up_proj.weight
    assert all(row.unique().numel() <= 8 for row in w)
    assert "SQNR" in ctx.notes[0]
    assert torch.equal(m.lm_head.weight, tiny.model.lm_head.weight)  # output projection untouched by default
    assert m.model.layers[0].mlp.up_proj.weight is not tiny.model.model.layers[0].mlp.up_proj.weight


def test_static_activations_calibrate_and_hook(tiny):
    m, _ = apply(tiny, "sim:bits=8,activations=static,activation_bits=4,calibration_tokens=256")
    hooks = m.model.layers[0].self_attn.q_proj._forward_pre_hooks
    assert len(hooks) == 1 and next(iter(hooks.values())).fixed is not None
    ids = torch.tensor([[5, 6, 7, 8]])
    assert m.generate(input_ids=ids, max_new_tokens=4, do_sample=False, pad_token_id=0).shape == (1, 8)


def run_acc(fast, *techniques):
    from workbench.runner import run

    return run(fast(techniques=techniques, eval_tokens=2000, eval_context=128, max_new_tokens=4)).accuracy


def test_8_bits_stay_close_and_2_3_bits_degrade(fast):
    base = run_acc(fast)
    eight = run_acc(fast, "sim:bits=8")
    three = run_acc(fast, "sim:bits=3")
    two = run_acc(fast, "sim:bits=2,granularity=per-group,group_size=32")
    assert eight.kl_vs_baseline < 1e-3
    assert abs(eight.perplexity / base.perplexity - 1) < 0.01
    assert three.perplexity > 1.1 * base.perplexity and three.kl_vs_baseline > 20 * eight.kl_vs_baseline
    assert two.perplexity > three.perplexity


def test_dynamic_activations_at_8_bits_stay_close(fast):
    acc = run_acc(fast, "sim:bits=8,activations=dynamic,act_granularity=token")
    assert acc.kl_vs_baseline < 5e-3


def test_static_per_token_activations_are_refused_in_one_sentence():
    from workbench.errors import ConfigError

    with pytest.raises(ConfigError, match="a range per token does not exist"):
        parse_spec("sim:activations=static,act_granularity=token")
    assert parse_spec("sim:activations=dynamic,act_granularity=token").act_granularity == "token"
    assert parse_spec("sim:activations=static").act_granularity == "tensor"  # the default serves static and dynamic


def hooked_inputs(tiny, spec, x):
    """What the first q_proj sees after `spec`'s activation hook, for an input `x` (B, T, in)."""
    m, _ = apply(tiny, spec)
    layer = m.model.layers[0].self_attn.q_proj
    (hook,) = layer._forward_pre_hooks.values()
    return hook(layer, (x,))[0], hook


def test_dynamic_per_tensor_and_per_token_ranges_follow_the_input(tiny):
    torch.manual_seed(0)
    x = torch.randn(1, 3, 256)
    x[0, 2] *= 20  # one token with a far wider range than the others
    tensor, _ = hooked_inputs(tiny, "sim:activations=dynamic,activation_bits=4", x)
    token, _ = hooked_inputs(tiny, "sim:activations=dynamic,act_granularity=token,activation_bits=4", x)
    scale, zero = qparams(x.amin(), x.amax(), 4, True)  # one range over the whole call
    assert torch.allclose(tensor, fake_quant(x, scale, zero, 4, True))
    for t in range(3):  # each token on its own grid
        row = x[0, t]
        assert torch.allclose(token[0, t], fake_quant(row, *qparams(row.min(), row.max(), 4, True), 4, True))
    # the narrow tokens lose far more under the wide token's range: the granularity effect, same bits, both dynamic
    assert sqnr_db(x[0, :2], tensor[0, :2]) + 10 < sqnr_db(x[0, :2], token[0, :2])
    doubled, _ = hooked_inputs(tiny, "sim:activations=dynamic,activation_bits=4", 2 * x)
    assert torch.allclose(doubled, 2 * tensor, atol=1e-5)  # dynamic: the range scales with the input


def test_static_per_tensor_range_is_fixed_by_calibration(tiny):
    x = torch.randn(1, 3, 256)
    out, hook = hooked_inputs(tiny, "sim:activations=static,activation_bits=4,calibration_tokens=256", x)
    scale, zero = hook.fixed
    assert scale.numel() == 1 and torch.allclose(out, fake_quant(x, scale, zero, 4, True))
    big, _ = hooked_inputs(tiny, "sim:activations=static,activation_bits=4,calibration_tokens=256", 1e3 * x)
    assert big.abs().max() <= 8 * scale + 1e-6  # the calibrated range clamps what it never saw, whatever the input
