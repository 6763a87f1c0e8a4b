"""`static-int8`: calibrated (fixed) activation ranges on PyTorch's int8 CPU kernel, against a float reference."""

from __future__ import annotations

import copy

import pytest
import torch

from workbench.errors import ConfigError
from workbench.techniques import ApplyContext, check_combination, check_techniques, handler_for, parse_spec
from workbench.techniques.static_int8 import StaticInt8Linear, _observer_factory

CPU = torch.device("cpu")


def observed(linear: torch.nn.Linear, calibration: torch.Tensor, kind: str = "minmax"):
    """Input and output observers of `linear` after seeing `calibration` (N, in)."""
    make = _observer_factory(kind)
    act_in, act_out = make(127), make(255)
    act_in(calibration)
    act_out(linear(calibration).detach())
    return act_in, act_out


def reference(linear: torch.nn.Linear, layer: StaticInt8Linear, x: torch.Tensor) -> torch.Tensor:
    """The same computation in float: the input on its fixed 7-bit grid, the int8 weight, the output on its grid."""
    s, z = layer.in_scale, layer.in_zero
    x_hat = (torch.clamp(torch.round(x / s) + z, 0, 127) - z) * s  # (N, in)
    w_hat = layer.qlinear.weight().dequantize()  # (out, in)
    y = x_hat @ w_hat.T + linear.bias.detach()  # (N, out)
    so, zo = layer.qlinear.scale, layer.qlinear.zero_point
    return (torch.clamp(torch.round(y / so) + zo, 0, 255) - zo) * so


@torch.inference_mode()
def test_the_int8_kernel_computes_what_the_fixed_grids_say():
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 32)
    layer = StaticInt8Linear(linear, *observed(linear, torch.randn(256, 64)))
    x = torch.randn(3, 5, 64)  # (B, T, in): the kernel takes any leading shape
    out = layer(x)
    assert out.shape == (3, 5, 32) and out.dtype == torch.float32
    step = layer.qlinear.scale
    assert (out - reference(linear, layer, x)).abs().max() <= step * 1.01  # int32 sums vs float sums: one code at most
    assert (out - linear(x)).abs().max() < 0.05 * linear(x).abs().max()


@torch.inference_mode()
def test_ranges_are_fixed_at_calibration_not_measured_per_call():
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 32)
    layer = StaticInt8Linear(linear, *observed(linear, torch.randn(256, 64)))
    scale = layer.in_scale
    x = torch.randn(4, 64)
    layer(100 * x)  # a call with a far wider input changes nothing
    assert layer.in_scale == scale
    y = layer(100 * x)
    out_lo = (0 - layer.qlinear.zero_point) * layer.qlinear.scale
    out_hi = (255 - layer.qlinear.zero_point) * layer.qlinear.scale
    assert y.min() >= out_lo - 1e-6 and y.max() <= out_hi + 1e-6  # saturates at the calibrated output range
    assert linear(100 * x).abs().max() > 2 * max(abs(out_lo), abs(out_hi))  # ... which the float result exceeds


@torch.inference_mode()
def test_histogram_ranges_clip_outliers_that_minmax_keeps():
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 32)
    calibration = torch.randn(4096, 64)
    calibration[0, 0] = 30.0  # one outlier among 262 144 values: clipping it costs less than coarse steps for all
    minmax = StaticInt8Linear(linear, *observed(linear, calibration, "minmax"))
    histogram = StaticInt8Linear(linear, *observed(linear, calibration, "histogram"))
    assert histogram.in_scale < minmax.in_scale / 2
    typical = torch.randn(64, 64)
    err = {name: (m(typical) - linear(typical)).pow(2).mean() for name, m in (("minmax", minmax),
                                                                                ("histogram", histogram))}
    assert err["histogram"] < err["minmax"]


def test_applied_to_the_reference_model(tiny):
    from workbench.measure.memory import parameter_count

    cfg = parse_spec("static-int8:calibration_tokens=256")
    model = copy.deepcopy(tiny.model)
    ctx = ApplyContext(model, tiny.tokenizer, CPU, "fp32", lambda m, f: None)
    handler_for(cfg)(cfg, ctx)
    swapped = [m for m in model.modules() if isinstance(m, StaticInt8Linear)]
    assert len(swapped) == 7 * len(model.model.layers) and "statically" in ctx.notes[-1]
    assert isinstance(model.lm_head, torch.nn.Linear)  # the output projection stays fp32
    assert parameter_count(model) == parameter_count(tiny.model)
    assert len({m.in_scale for m in swapped}) > 1  # one calibrated range per layer


def test_a_run_reports_its_accuracy_and_greedy_match(fast):
    from workbench.runner import run

    result = run(fast(techniques=("static-int8:calibration_tokens=256",), device="cpu"))
    acc = result.accuracy
    assert 0.005 < acc.kl_vs_baseline < 0.2 and acc.greedy_match_vs_baseline is not None
    assert "static int8" in result.techniques[0].notes
    assert result.latency.decode_tokens_per_s > 0


@pytest.mark.parametrize("spec, dtype, message", [
    ("static-int8", "bf16", "static-int8: PyTorch static int8 works on fp32 models only; use --dtype fp32"),
    ("static-int8:observer=percentile", "fp32", "observer must be one of minmax, histogram"),
    ("static-int8:calibration_tokens=8", "fp32", "calibration_tokens must be in 128.."),
    ("sim:activations=static,act_granularity=token", "fp32", "a range per token does not exist"),
])
def test_bad_input_is_refused_in_one_sentence(spec, dtype, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("(", r"\(")):
        check_techniques([spec], dtype)


def test_refused_off_the_cpu():
    cfg = parse_spec("static-int8")
    with pytest.raises(ConfigError, match="static-int8 cannot run on cuda: .* run on the CPU only"):
        check_combination([cfg], torch.device("cuda"))
