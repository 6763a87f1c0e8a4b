"""Real (non-simulated) quantization: bitsandbytes, torchao and PyTorch dynamic int8 on the reference model.

Numerics are checked against a deep copy of the session's reference model (never the fixture itself):
KL(unmodified || quantized) per position on ~300 held-out tokens, greedy generation, stored bytes and
the logical parameter count. Timings are never asserted here (see bench/).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
import subprocess
import sys

import pytest
import torch

from workbench.errors import ConfigError
from workbench.measure.accuracy import compute_baseline, evaluate, make_windows
from workbench.measure.memory import parameter_count, weight_bytes
from workbench.techniques import REGISTRY, check_combination, load_all, normalize_specs, parse_spec
from workbench.techniques._targets import block_linears
from workbench.techniques.base import ApplyContext, handler_for

load_all()
CPU = torch.device("cpu")
REAL = ("bnb-int8", "bnb-nf4", "bnb-fp4", "torchao-int8-weight", "torchao-int8-dynamic", "torchao-int4-weight",
        "dynamic-int8", "w8a8", "w4a16", "w4a8")
ON_CPU = tuple(n for n in REAL if n != "torchao-int4-weight")

# Bytes per block-Linear weight after quantization: (low, high). int8 stores 1 byte per weight plus a
# float32 scale per output row (and, for dynamic-int8 per-channel, the float64 scale + int64 zero point
# that torch.ao's unpacked copy exposes: 16 bytes per row); 4-bit stores 0.5 byte per weight plus one
# absmax per 64 weights (1 byte double-quantized, 4 bytes plain) and a few small code books; w4a16 0.5 byte
# plus a bf16 scale and zero point per group of 32 (0.625); w4a8 likewise, with fp16 numbers.
BYTES_PER_WEIGHT = {"bnb-int8": (1.0, 1.05), "torchao-int8-weight": (1.0, 1.05), "torchao-int8-dynamic": (1.0, 1.05),
                    "dynamic-int8": (1.0, 1.1), "w8a8": (1.0, 1.05), "w4a16": (0.62, 0.63), "w4a8": (0.62, 0.63),
                    "bnb-nf4": (0.5, 0.56), "bnb-fp4": (0.5, 0.56)}

# KL(unmodified || quantized) in nats per position over ~300 held-out tokens (windows of 64), and the share
# of positions whose top-1 token is unchanged. Measured on the trained reference model (6 layers, hidden
# 256, MLP 768, held-out perplexity 43): torchao int8 weight-only 0.0003, bnb-int8 0.0013, torchao int8
# dynamic 0.0023, dynamic-int8 0.038 (fbgemm quantizes activations per tensor to 7 bits), NF4 0.054,
# FP4 0.093, w8a8 (int8 per token, head quantized too) 0.0027, w4a16 (groups of 32, head too) 0.044; top-1
# agreement 0.96-0.99 for int8, 0.87 for dynamic-int8, 0.78-0.86 for 4-bit.
# For scale, on the same tokens: 8-bit round-to-nearest weights 0.0003, 4-bit (groups of 64) 0.07,
# 3-bit 0.34, one MLP down-projection zeroed 0.31, 2-bit 3.1, one q_proj with permuted rows 5.9.
# So the bounds leave 2-8x headroom for a retrained model, keep int8 below 4-bit-sized damage, and keep
# 4-bit below what 3-bit rounding or a single dead layer costs.
KL_BOUND = {"torchao-int8-weight": 0.01, "bnb-int8": 0.01, "torchao-int8-dynamic": 0.01, "dynamic-int8": 0.1,
            "w8a8": 0.01, "w4a16": 0.2, "w4a8": 0.2, "bnb-nf4": 0.2, "bnb-fp4": 0.2, "torchao-int4-weight": 0.2}
TOP1_MIN = {"torchao-int8-weight": 0.9, "bnb-int8": 0.9, "torchao-int8-dynamic": 0.9, "dynamic-int8": 0.75,
            "w8a8": 0.9, "w4a16": 0.65, "w4a8": 0.65, "bnb-nf4": 0.65, "bnb-fp4": 0.65, "torchao-int4-weight": 0.65}


def apply(name_or_spec: str, model: torch.nn.Module, tokenizer=None, device: torch.device = CPU,
          dtype: str = "fp32") -> tuple[torch.nn.Module, list[str]]:
    """Apply one technique through its registered handler; return the model and the run notes."""
    cfg = parse_spec(name_or_spec)
    ctx = ApplyContext(model, tokenizer, device, dtype, lambda message, fraction: None)
    new = handler_for(cfg)(cfg, ctx)
    return (new if new is not None else model), ctx.notes


# ---------------------------------------------------------------- registry, specs, validation

@pytest.mark.parametrize("name", REAL)
def test_registered_under_its_cli_name(name):
    cls = REGISTRY[name]
    assert cls.name == name and cls.kind == "quant"
    assert cls.simulated is False and cls.packs_weights is True and cls.needs_float_weights is False
    assert cls.summary and "\n" not in cls.summary
    assert cls().notes()  # every real technique tells the user what to expect
    for f in dataclasses.fields(cls):
        assert f.metadata.get("help"), f"{name}.{f.name} has no help text"


@pytest.mark.parametrize("spec", ["bnb-int8", "bnb-int8:threshold=4.5", "bnb-nf4:compute_dtype=bf16",
                                  "bnb-fp4:compute_dtype=fp16,double_quant=false", "torchao-int8-weight",
                                  "torchao-int8-dynamic", "torchao-int4-weight:group_size=64",
                                  "dynamic-int8:granularity=per-tensor"])
def test_spec_round_trip(spec):
    cfg = parse_spec(spec)
    canonical = cfg.spec()
    assert parse_spec(canonical) == cfg and parse_spec(canonical).spec() == canonical
    assert canonical.startswith(spec.partition(":")[0])


def test_spec_spells_out_defaults():
    assert parse_spec("bnb-nf4:compute_dtype=bf16").spec() == "bnb-nf4:compute_dtype=bf16,double_quant=true"
    assert parse_spec("bnb-int8").spec() == "bnb-int8:threshold=6"
    assert parse_spec("torchao-int4-weight").spec() == "torchao-int4-weight:group_size=128"


@pytest.mark.parametrize("spec, words", [
    ("bnb-int8:threshold=-1", "threshold must be in 0.0..1000.0"),
    ("bnb-int8:threshold=lots", "not a valid float"),
    ("bnb-nf4:compute_dtype=fp8", "compute_dtype must be one of fp32, fp16, bf16"),
    ("bnb-fp4:double_quant=maybe", "not a valid bool"),
    ("torchao-int4-weight:group_size=100", "group_size must be one of 32, 64, 128, 256"),
    ("dynamic-int8:granularity=per-group", "granularity must be one of per-tensor, per-channel"),
    ("torchao-int8-weight:group_size=64", "unknown parameter 'group_size'"),
])
def test_bad_parameters_name_the_allowed_values(spec, words):
    with pytest.raises(ConfigError, match=words.replace(".", r"\.")):
        parse_spec(spec)


def test_direct_construction_validates_too():
    with pytest.raises(ValueError, match="0.0..1000.0"):
        REGISTRY["bnb-int8"](threshold=-0.5)
    with pytest.raises(ValueError, match="32, 64, 128, 256"):
        REGISTRY["torchao-int4-weight"](group_size=16)


@pytest.mark.parametrize("spec, dtype, words", [
    ("dynamic-int8", "fp16", "fp32 models only"),
    ("dynamic-int8", "bf16", "fp32 models only"),
    ("torchao-int4-weight", "fp32", "needs bf16 weights on a CUDA GPU; use --dtype bf16"),
    ("torchao-int4-weight", "fp16", "needs bf16 weights on a CUDA GPU; use --dtype bf16"),
])
def test_impossible_dtypes_are_refused_before_loading(spec, dtype, words):
    with pytest.raises(ConfigError, match=words):
        normalize_specs([spec], dtype)
    from workbench.config import RunConfig
    from workbench.execution import resolve_device

    blocked = REGISTRY[spec].unavailable(resolve_device("auto"))  # then the device is the reason given first
    with pytest.raises(ValueError, match=f"{spec} cannot run on" if blocked else words):
        RunConfig(model="tiny", dtype=dtype, techniques=(spec,))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("name", sorted(REGISTRY))
@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
def test_a_refusal_gives_the_blocking_reason_first_and_its_advice_works(name, dtype, device):
    """Device before dtype: following a refusal's advice never leads to a second refusal (issue 12)."""
    import re

    from workbench.config import RunConfig

    dev = torch.device(device)
    reason = REGISTRY[name].unavailable(dev)
    try:
        RunConfig(model="tiny", dtype=dtype, device=device, techniques=(name,))
        message = None
    except ValueError as e:
        message = str(e)
    if reason:
        assert message in (None, f"{name} cannot run on {device}: {reason}"), message
        if message is None:  # a valid config: refused when the run starts, before loading
            with pytest.raises(ConfigError, match=f"{name} cannot run on {device}"):
                check_combination([parse_spec(name)], dev)
        return
    if message is not None:
        advised = re.search(r"use --dtype (\w+)", message)
        assert advised, message
        config = RunConfig(model="tiny", dtype=advised[1], device=device, techniques=(name,))
        check_combination(config.techniques, dev)


def test_device_reasons_come_before_install_advice(monkeypatch):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None)  # as if nothing were installed
    assert REGISTRY["torchao-int4-weight"].unavailable(CPU) == "torchao int4 weight-only kernels need a CUDA GPU"
    for name in ("bnb-int8", "bnb-nf4", "torchao-int8-weight"):
        assert "cpu or cuda only" in REGISTRY[name].unavailable(torch.device("meta")), name
        assert "not installed" in REGISTRY[name].unavailable(CPU), name


@pytest.mark.parametrize("name", [n for n in REAL if n not in ("dynamic-int8", "torchao-int4-weight")])
@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
def test_dtypes_that_work_are_accepted(name, dtype):
    assert normalize_specs([name], dtype) == (parse_spec(name).spec(),)


def test_int4_is_unavailable_on_cpu_with_one_sentence():
    reason = REGISTRY["torchao-int4-weight"].unavailable(CPU)
    assert reason == "torchao int4 weight-only kernels need a CUDA GPU"
    with pytest.raises(ConfigError, match="torchao-int4-weight cannot run on cpu: torchao int4 weight-only"):
        check_combination([parse_spec("torchao-int4-weight")], CPU)


def test_availability_by_device():
    for name in ON_CPU:
        assert REGISTRY[name].unavailable(CPU) is None, name
    assert "CPU only" in REGISTRY["dynamic-int8"].unavailable(torch.device("cuda"))
    assert "cpu or cuda only" in REGISTRY["bnb-nf4"].unavailable(torch.device("meta"))


# ---------------------------------------------------------------- applied to the reference model

@pytest.fixture(scope="module")
def windows(tiny):
    from workbench.textio import heldout_ids

    return make_windows(heldout_ids(tiny.tokenizer), 64, 300)


@pytest.fixture(scope="module")
def baseline(tiny, windows):
    return compute_baseline(tiny.model, windows, CPU)


@pytest.fixture(scope="module")
def quantized(tiny):
    """name -> (quantized deep copy of the reference model, notes); built once per technique."""
    cache: dict[str, tuple[torch.nn.Module, list[str]]] = {}

    def get(name: str) -> tuple[torch.nn.Module, list[str]]:
        if name not in cache:
            cache[name] = apply(name, copy.deepcopy(tiny.model), tiny.tokenizer)
        return cache[name]
    return get


@pytest.mark.parametrize("name", ON_CPU)
def test_applied_model_generates(name, quantized, tiny):
    model, notes = quantized(name)
    assert notes and "Linear layers" in notes[0]
    prompt = tiny.tokenizer("The for statement is used to", return_tensors="pt").input_ids  # (1, T)
    with torch.inference_mode():
        out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8,
                             min_new_tokens=8, do_sample=False, pad_token_id=tiny.tokenizer.pad_token_id)
    assert out.shape == (1, prompt.shape[1] + 8)
    assert int(out.max()) < tiny.model.config.vocab_size


@pytest.mark.parametrize("name", ON_CPU)
def test_logits_stay_close_to_the_unmodified_model(name, quantized, windows, baseline):
    model, _ = quantized(name)
    acc = evaluate(model, windows, CPU, baseline)
    assert acc.eval_tokens >= 250
    assert 0 <= acc.kl_vs_baseline < KL_BOUND[name], f"{name}: KL {acc.kl_vs_baseline:.5f}"
    assert acc.top1_agreement_vs_baseline >= TOP1_MIN[name], f"{name}: top-1 {acc.top1_agreement_vs_baseline:.3f}"


@pytest.mark.parametrize("name", ON_CPU)
def test_weight_bytes_drop_and_parameter_count_stays(name, quantized, tiny):
    model, _ = quantized(name)
    linear_params = sum(m.weight.numel() for _, m in block_linears(tiny.model))
    linear_bytes = sum(m.weight.numel() * m.weight.element_size() for _, m in block_linears(tiny.model))
    rest = weight_bytes(tiny.model) - linear_bytes  # embeddings, norms, the output projection: unchanged
    if not isinstance(model.get_output_embeddings(), torch.nn.Linear):  # quantized too: an int8 copy of a tied head
        head = tiny.model.get_output_embeddings().weight
        linear_params += head.numel()
        rest -= 0 if head is tiny.model.get_input_embeddings().weight else head.numel() * head.element_size()
    low, high = BYTES_PER_WEIGHT[name]
    after = weight_bytes(model)
    assert rest + low * linear_params <= after <= rest + high * linear_params, \
        f"{name}: {(after - rest) / linear_params:.3f} bytes per quantized weight"
    assert parameter_count(model) == parameter_count(tiny.model)


def test_the_session_model_is_untouched(tiny, quantized):
    quantized("bnb-int8")
    assert all(type(m) is torch.nn.Linear for _, m in block_linears(tiny.model))


# ---------------------------------------------------------------- bitsandbytes specifics

class _Mlp(torch.nn.Module):
    """Two Linears with an out_features (688) that bnb's AVX512-BF16 CPU packing cannot take."""

    def __init__(self, hidden: int = 256, inner: int = 688) -> None:
        super().__init__()
        self.up = torch.nn.Linear(hidden, inner)
        self.down = torch.nn.Linear(inner, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.relu(self.up(x)))


def _sqnr_db(ref: torch.Tensor, approx: torch.Tensor) -> float:
    return float(10 * torch.log10(ref.pow(2).sum() / (ref - approx).pow(2).sum()))


@pytest.mark.parametrize("spec", ["bnb-nf4:compute_dtype=bf16", "bnb-nf4", "bnb-fp4:compute_dtype=bf16",
                                  "bnb-fp4:compute_dtype=fp16"])
@pytest.mark.parametrize("inner", [688, 768])
def test_4bit_layers_of_any_width_run_on_cpu(spec, inner):
    torch.manual_seed(0)
    mlp = _Mlp(inner=inner).eval()
    x = torch.randn(3, 5, 256)  # (B, T, H)
    q, _ = apply(spec, copy.deepcopy(mlp))
    with torch.inference_mode():
        ref = mlp(x)
        y = q(x)  # (B, T, H): the first call is where bnb repacks for its CPU kernel
        again = q(x)
    assert y.shape == ref.shape and y.dtype == ref.dtype
    assert _sqnr_db(ref, y) > 12  # 4-bit round-to-nearest gives ~15-20 dB on Gaussian-initialised layers
    assert torch.equal(y, again)


def test_bf16_compute_uses_the_fused_cpu_kernel_only_where_it_fits():
    from bitsandbytes.functional import has_avx512bf16

    if not has_avx512bf16():
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes never packs for its fused kernel")
    q, _ = apply("bnb-nf4:compute_dtype=bf16", _Mlp(inner=768).eval())
    q688, _ = apply("bnb-nf4:compute_dtype=bf16", _Mlp(inner=688).eval())
    with torch.inference_mode():
        q(torch.randn(2, 256))
        q688(torch.randn(2, 256))
    packed = lambda layer: bool(getattr(layer.weight.quant_state, "packing_format_for_cpu", False))  # noqa: E731
    assert packed(q.up) and packed(q.down)  # 768 % 32 == 0 and 768 % 64 == 0
    assert not packed(q688.up) and not packed(q688.down)  # 688 % 32 != 0; 688 % 64 != 0


def test_int8_does_not_log_per_matmul(caplog):
    """bitsandbytes warns on every int8 matmul of a non-fp16 input; the workbench keeps that quiet."""
    loggers = [logging.getLogger(n) for n in ("bitsandbytes", "bitsandbytes.autograd._functions")]
    saved = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.NOTSET)  # as in a bare Python session, before the technique is applied
        q, _ = apply("bnb-int8", _Mlp(inner=768).eval())
        with caplog.at_level(logging.DEBUG), torch.inference_mode():
            for _ in range(3):
                q(torch.randn(2, 4, 256))  # fp32 input: bitsandbytes would log "inputs will be cast" each time
    finally:
        for lg, level in zip(loggers, saved):
            lg.setLevel(level)
    assert not [r for r in caplog.records if r.name.startswith("bitsandbytes")]


# ---------------------------------------------------------------- end to end

def test_full_run_records_the_technique(fast, tiny):
    from workbench.runner import run

    result = run(fast(techniques=("bnb-nf4",)))
    assert result.status == "ok"
    (rec,) = result.techniques
    assert (rec.name, rec.kind, rec.simulated) == ("bnb-nf4", "quant", False)
    assert rec.params == {"compute_dtype": "fp32", "double_quant": True}
    assert "NF4" in rec.notes and "quantized while loading" in rec.notes and "42 of 42 Linear layers converted" in rec.notes
    assert result.model.params == parameter_count(tiny.model)
    assert result.model.weight_bytes < 0.6 * weight_bytes(tiny.model)
    assert result.accuracy.kl_vs_baseline < KL_BOUND["bnb-nf4"]
    assert len(result.output_text) > 0


def test_cli_int8_run_keeps_stderr_quiet(tmp_path):
    """A fresh process, as a user runs it: no per-matmul lines, no import-time probes, no warnings."""
    args = ["run", "--model", "tiny", "--quant", "bnb-int8", "--no-store", "--warmup", "0", "--repeats", "2",
            "--min-duration-s", "0", "--max-new-tokens", "6", "--eval-tokens", "100", "--eval-context", "64"]
    env = {**os.environ, "WORKBENCH_CACHE_DIR": str(tmp_path / "cache")}
    p = subprocess.run([sys.executable, "-m", "workbench", *args], capture_output=True, text=True, timeout=300,
                       env=env, cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    err = p.stderr
    for noise in ("MatMul8bitLt", "bitsandbytes", "torchao", "Warning", "warn", "Traceback", "profiler_start"):
        assert noise not in err, err
    assert len(err.splitlines()) <= 12, err  # the stage narration only
    assert "bnb-int8" in p.stdout


# ---------------------------------------------------------------- CUDA only

@pytest.mark.gpu
@pytest.mark.parametrize("name", ["torchao-int4-weight", "bnb-nf4", "bnb-int8", "torchao-int8-dynamic"])
def test_real_paths_on_cuda(name):
    from workbench.models.loader import load_model
    from workbench.models.sources import resolve
    from workbench.textio import heldout_ids

    cuda = torch.device("cuda")
    assert REGISTRY[name].unavailable(cuda) is None
    loaded = load_model(resolve("tiny"), "bf16", cuda)
    win = make_windows(heldout_ids(loaded.tokenizer), 64, 300)
    base = compute_baseline(loaded.model, win, cuda)
    params = parameter_count(loaded.model)
    model, _ = apply(name, loaded.model, loaded.tokenizer, cuda, "bf16")
    acc = evaluate(model, win, cuda, base)
    assert acc.kl_vs_baseline < KL_BOUND[name]
    assert acc.top1_agreement_vs_baseline >= TOP1_MIN[name]
    assert parameter_count(model) == params
    prompt = torch.tensor([[1, 2, 3, 4]], device=cuda)
    with torch.inference_mode():
        out = model.generate(input_ids=prompt, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    assert out.shape == (1, 12)


@pytest.mark.gpu
def test_int4_storage_on_cuda():
    """Without padding (in_features a multiple of 1024): 0.5 byte per weight + a bf16 scale and zero per group."""
    cuda = torch.device("cuda")
    layer = torch.nn.Sequential(torch.nn.Linear(1024, 1024, bias=False)).to(cuda, torch.bfloat16)
    x = torch.randn(4, 1024, device=cuda, dtype=torch.bfloat16)
    ref = layer(x)
    q, _ = apply("torchao-int4-weight:group_size=128", layer, device=cuda, dtype="bf16")
    expected = 1024 * 1024 // 2 + (1024 // 128) * 1024 * 2 * 2  # int4 codes + (scale, zero) per group and row
    assert weight_bytes(q) == pytest.approx(expected, rel=0.02)
    assert parameter_count(q) == 1024 * 1024
    assert _sqnr_db(ref.float(), q(x).float()) > 12
