"""Per-layer sensitivity: one row per layer, SQNR and KL as heatmap data, histograms before/after."""

from __future__ import annotations

import json

import pytest
import torch

from workbench.errors import ConfigError
from workbench.sensitivity import SensitivityReport, analyze, effective_weight
from workbench.techniques.sim import quantize_weight, sqnr_db


@pytest.fixture(scope="module")
def report():
    return analyze("tiny", "sim:bits=3", eval_tokens=256, eval_context=64)


def test_one_row_per_block_linear(report, tiny):
    cfg = tiny.model.config
    assert len(report.layers) == cfg.num_hidden_layers * 7
    blocks, modules, grid = report.matrix("kl")
    assert blocks == list(range(cfg.num_hidden_layers)) and len(modules) == 7
    assert all(v is not None and v >= 0 for row in grid for v in row)
    assert max(r.kl for r in report.layers) > 0


def test_sqnr_matches_a_direct_computation(report, tiny):
    w = tiny.model.model.layers[2].mlp.down_proj.weight
    row = next(r for r in report.layers if r.layer == "model.layers.2.mlp.down_proj")
    assert row.sqnr_db == pytest.approx(sqnr_db(w, quantize_weight(w, 3, True, "per-channel", 128)), rel=1e-4)


def test_histogram_before_and_after(report, tiny):
    h = report.histogram
    assert h.layer == max(report.layers, key=lambda r: r.kl).layer
    w = tiny.model.get_submodule(h.layer).weight
    assert len(h.edges) == len(h.before) + 1 == len(h.after) + 1
    assert sum(h.before) == sum(h.after) == w.numel()
    assert h.distinct_after <= 8 * w.shape[0] < w.unique().numel()


def test_json_round_trip(report):
    assert SensitivityReport.from_dict(json.loads(json.dumps(report.to_dict()))) == report


def test_identity_probe_recovers_a_packed_layers_weight():
    from torch.ao.quantization import quantize_dynamic

    lin = torch.nn.Linear(16, 8)
    packed = quantize_dynamic(torch.nn.Sequential(lin), {torch.nn.Linear}, dtype=torch.qint8)[0]
    w = effective_weight(packed, 16, lin.weight)
    assert w.shape == (8, 16) and sqnr_db(lin.weight, w) > 25


def test_unknown_histogram_layer_is_refused():
    with pytest.raises(ConfigError, match="no Linear layer named"):
        analyze("tiny", "sim:bits=4", eval_tokens=64, eval_context=32, histogram_layer="model.nope")


def test_cli_json(capsys):
    from workbench.cli import main

    assert main(["sensitivity", "--quant", "sim:bits=4", "--eval-tokens", "64", "--eval-context", "32", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["technique"].startswith("sim:bits=4") and len(data["layers"]) > 0
