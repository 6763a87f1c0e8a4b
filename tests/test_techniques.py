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
                "dynamic-int8", "sim", "magnitude", "wanda", "structured", "2:4"}
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
            check_combination([parse_spec(name).spec()], CPU)
        return
    cfg = parse_spec(name)
    model = copy.deepcopy(tiny.model)
    ctx = ApplyContext(model, tiny.tokenizer, CPU, "fp32", lambda m, f: None)
    model = handler_for(cfg)(cfg, ctx) or model
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, min_new_tokens=4,
                         do_sample=False, pad_token_id=0)
    assert out.shape == (1, 9)


def test_listing_says_where_each_technique_runs(capsys):
    from workbench.cli import main

    assert main(["techniques", "--json", "--device", "cpu"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert set(rows) == set(NAMES)
    for name, row in rows.items():
        assert row["available"] == (REGISTRY[name].unavailable(CPU) is None)
        assert row["available"] or row["reason"]
        assert all(p["help"] for p in row["params"])


def test_order_is_recorded_and_impossible_orders_are_refused():
    cfg = RunConfig(techniques=("magnitude:sparsity=0.5", "dynamic-int8"))
    assert [s.split(":")[0] for s in cfg.techniques] == ["magnitude", "dynamic-int8"]
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
