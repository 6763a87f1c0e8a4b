"""Registry-driven: every registered technique is listed, validated, applied to the reference model, recorded."""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch

from workbench.config import RunConfig
from workbench.errors import ConfigError
from workbench.techniques import REGISTRY, ApplyContext, handler_for, load_all, parse_spec

NAMES = sorted(load_all())
CPU = torch.device("cpu")


def test_the_issue_names_are_all_registered():
    expected = {"bnb-int8", "bnb-nf4", "bnb-fp4", "torchao-int8-weight", "torchao-int8-dynamic", "torchao-int4-weight",
                "dynamic-int8", "static-int8", "sim", "magnitude", "wanda", "structured", "2:4"}
    assert expected <= set(NAMES), expected - set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_config_fields_have_help_and_spec_round_trips(name):
    cls = REGISTRY[name]
    assert cls.kind in ("quant", "prune") and cls.summary
    for f in dataclasses.fields(cls):
        assert f.metadata.get("help"), f"{name}.{f.name} has no help"
    cfg = parse_spec(name)
    assert parse_spec(cfg.spec()) == cfg
    assert parse_spec(cfg.label()) == cfg


@pytest.mark.parametrize("name", NAMES)
def test_unknown_parameter_is_refused_with_the_known_ones(name):
    with pytest.raises(ConfigError, match="unknown parameter 'colour'"):
        parse_spec(f"{name}:colour=blue")


@pytest.mark.parametrize("name", NAMES)
def test_applies_to_the_reference_model_or_says_why_not(name, tiny):
    cls = REGISTRY[name]
    reason = cls.unavailable(CPU)
    if reason:
        assert reason.strip() and len(reason.splitlines()) == 1
        from workbench.techniques import check_combination

        with pytest.raises(ConfigError, match="cannot run on cpu"):
            check_combination([parse_spec(name)], CPU)
        return
    cfg = parse_spec(name)
    model = copy.deepcopy(tiny.model)
    ctx = ApplyContext(model, tiny.tokenizer, CPU, "fp32", lambda m, f: None)
    if "hf" not in cls.engines:  # gguf: its engine applies it (tests/test_llamacpp.py); a PyTorch model is refused
        with pytest.raises(RuntimeError, match="--engine llamacpp"):
            handler_for(cfg)(cfg, ctx)
        return
    model = handler_for(cfg)(cfg, ctx) or model
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, min_new_tokens=4,
                         do_sample=False, pad_token_id=0)
    assert out.shape == (1, 9)


EVAL_CONTEXT, EVAL_WINDOWS = 256, 4  # 1 020 held-out tokens: enough for 50 % pruning to raise perplexity


@pytest.fixture(scope="module")
def heldout(tiny):
    """A few held-out windows, the unmodified model's predictions on them, and its perplexity."""
    from workbench.measure.accuracy import compute_baseline, evaluate, make_windows
    from workbench.textio import heldout_ids

    windows = make_windows(heldout_ids(tiny.tokenizer), EVAL_CONTEXT, EVAL_WINDOWS * (EVAL_CONTEXT - 1))
    return windows, compute_baseline(tiny.model, windows, CPU), evaluate(tiny.model, windows, CPU).perplexity


def declared_expectation(cls):
    """The expectation a technique declares on its own class (inheriting one from a parent does not count)."""
    from workbench.techniques.base import Expectation

    expect = vars(cls).get("expect")
    assert isinstance(expect, Expectation), (
        f"{cls.name} declares no expectation on tiny: add e.g. `expect = Expectation(max_kl=0.02)` or "
        "`Expectation(raises_perplexity=True)` to its config class, with the measured values in a comment")
    return expect


def where_it_runs(cfg):
    """(device, dtype) where this technique runs with its defaults, the CPU first; None: nowhere here."""
    devices = [CPU] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    for device in (d for d in devices if type(cfg).unavailable(d) is None):
        for dtype in ("fp32", "bf16"):
            if cfg.conflicts_with(None, dtype) is None:
                return device, dtype
    return None


@pytest.mark.parametrize("name", NAMES)
def test_default_settings_meet_the_declared_expectation(name, tiny, heldout):
    """KL vs the unmodified model and perplexity on held-out text, against the number the technique declares."""
    from workbench.measure.accuracy import evaluate
    from workbench.models.sources import TORCH_DTYPES

    expect = declared_expectation(REGISTRY[name])
    if "hf" not in REGISTRY[name].engines:  # e.g. gguf: checked through its engine in tests/test_llamacpp.py
        pytest.skip(f"{name} runs on the {REGISTRY[name].engines} engine, not on a PyTorch model")
    cfg = parse_spec(name)
    place = where_it_runs(cfg)
    if place is None:
        pytest.skip(f"{name} cannot run here: {REGISTRY[name].unavailable(CPU)}")
    device, dtype = place
    windows, baseline, baseline_ppl = heldout
    model = copy.deepcopy(tiny.model).to(device, TORCH_DTYPES[dtype])
    model = handler_for(cfg)(cfg, ApplyContext(model, tiny.tokenizer, device, dtype, lambda m, f: None)) or model
    stats = evaluate(model, windows, device, baseline)
    problem = expect.check(stats.kl_vs_baseline, stats.perplexity, baseline_ppl)
    assert problem is None, f"{name} on {device} ({dtype}): {problem}"


def test_a_technique_without_its_own_expectation_fails():
    from workbench.techniques.sim import SimQuantConfig

    @dataclasses.dataclass(frozen=True)
    class Unmeasured(SimQuantConfig):  # inherits sim's number, declares none of its own
        name = "unmeasured"

    with pytest.raises(AssertionError, match="unmeasured declares no expectation"):
        declared_expectation(Unmeasured)
    assert declared_expectation(SimQuantConfig).max_kl is not None


def test_expectation_checks_and_refuses_empty_or_inverted_bounds():
    from workbench.techniques.base import Expectation

    band = Expectation(max_kl=0.02, min_kl=0.001)
    assert band.check(0.01, 50.0, 40.0) is None
    assert "above the declared max_kl 0.02" in band.check(0.03, 40.0, 40.0)
    assert "below the declared min_kl 0.001" in band.check(0.0, 40.0, 40.0)
    destructive = Expectation(raises_perplexity=True)
    assert destructive.check(5.0, 41.0, 40.0) is None
    assert "not above the unmodified model's 40" in destructive.check(0.5, 39.0, 40.0)
    with pytest.raises(ValueError, match="needs max_kl or raises_perplexity"):
        Expectation()
    with pytest.raises(ValueError, match="min_kl must be below max_kl"):
        Expectation(max_kl=0.01, min_kl=0.02)
    with pytest.raises(ValueError, match="max_kl must be in 0.0..inf"):
        Expectation(max_kl=-1.0)


def test_listing_says_where_each_technique_runs(capsys):
    from workbench.cli import main

    assert main(["techniques", "--json", "--device", "cpu"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert set(rows) == set(NAMES)
    for name, row in rows.items():
        on_hf = "hf" in REGISTRY[name].engines  # the listing's default engine
        assert row["available"] == (REGISTRY[name].unavailable(CPU) is None and on_hf)
        assert row["available"] or row["reason"]
        assert all(p["help"] for p in row["params"])


def test_order_is_recorded_and_impossible_orders_are_refused():
    cfg = RunConfig(techniques=("magnitude:sparsity=0.5", "dynamic-int8"))
    assert [s.split(":")[0] for s in cfg.technique_specs] == ["magnitude", "dynamic-int8"]
    with pytest.raises(ValueError, match="dynamic-int8 then magnitude: .*apply magnitude first"):
        RunConfig(techniques=("dynamic-int8", "magnitude"))
    with pytest.raises(ValueError, match="two quantizations"):
        RunConfig(techniques=("sim:bits=4", "dynamic-int8"))
    assert RunConfig.from_json(cfg.to_json()) == cfg


def test_out_of_range_parameter_names_its_range():
    with pytest.raises(ValueError, match=r"bits must be in 2\.\.8"):
        RunConfig(techniques=("sim:bits=1",))
    with pytest.raises(ValueError, match="granularity must be one of per-tensor, per-channel, per-group"):
        RunConfig(techniques=("sim:granularity=row",))


def test_impossible_combination_is_refused_before_loading(fast):
    from workbench.events import StageEvent
    from workbench.runner import run

    events = []
    unavailable = [n for n in NAMES if REGISTRY[n].unavailable(CPU)]
    if not unavailable:
        pytest.skip("every technique runs on this machine")
    with pytest.raises(ConfigError, match="cannot run on cpu"):
        run(fast(device="cpu", dtype="bf16", techniques=(unavailable[0],)), events.append)
    assert not any(isinstance(e, StageEvent) and e.stage == "load" for e in events)


def test_prune_then_quantize_records_both_in_order(fast):
    from workbench.runner import run

    r = run(fast(techniques=("magnitude:sparsity=0.3", "sim:bits=4"), eval_tokens=200))
    assert [t.name for t in r.techniques] == ["magnitude", "sim"]
    assert r.techniques[0].params["sparsity"] == 0.3 and r.techniques[1].simulated
    assert all(t.notes for t in r.techniques)
    assert r.accuracy.kl_vs_baseline > 0


def test_techniques_never_touch_the_cached_baseline(fast):
    from workbench.runner import run

    before = run(fast(eval_tokens=300)).accuracy
    run(fast(techniques=("sim:bits=2",), eval_tokens=300))
    after = run(fast(eval_tokens=300)).accuracy
    assert after.kl_vs_baseline == pytest.approx(0.0, abs=1e-6)
    assert after.perplexity == pytest.approx(before.perplexity, rel=1e-6)


def test_specs_are_parsed_once_when_the_config_is_built(monkeypatch, tiny):
    """RunConfig parses each spec once; check_combination and apply_techniques use the parsed configs."""
    import sys
    from types import SimpleNamespace

    from workbench.techniques import apply_techniques, base, check_combination

    original, calls = base.parse_spec, []

    def counting(spec):
        calls.append(spec)
        return original(spec)

    for module in list(sys.modules.values()):  # every module holding its own reference to parse_spec
        if module.__name__.startswith(("workbench", "widgets")) and getattr(module, "parse_spec", None) is original:
            monkeypatch.setattr(module, "parse_spec", counting)
    cfg = RunConfig(techniques=("magnitude:sparsity=0.5", "sim:bits=8"), device="cpu")
    assert calls == ["magnitude:sparsity=0.5", "sim:bits=8"]
    check_combination(cfg.techniques, CPU)
    loaded = SimpleNamespace(model=copy.deepcopy(tiny.model), tokenizer=tiny.tokenizer, device=CPU)
    records = apply_techniques(loaded, cfg, lambda event: None)
    assert [r.name for r in records] == ["magnitude", "sim"] and records[0].params["sparsity"] == 0.5
    cfg.replace(seed=1)
    assert len(calls) == 2, calls
    assert RunConfig.from_json(cfg.to_json()) == cfg and len(calls) == 4  # read back from JSON: once each


def test_check_combination_takes_parsed_configs_only():
    from workbench.techniques import check_combination

    with pytest.raises(TypeError, match="parsed technique configs"):
        check_combination(["sim"], CPU)
