"""RunConfig: validation on construction (messages name the allowed values) and JSON round trips."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from workbench.config import RunConfig


def test_defaults_are_valid_and_round_trip():
    cfg = RunConfig()
    assert RunConfig.from_json(cfg.to_json()) == cfg
    assert RunConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_every_field_has_help():
    import dataclasses

    for f in dataclasses.fields(RunConfig):
        assert f.metadata.get("help"), f"{f.name} has no help text"


@pytest.mark.parametrize("changes, fragment", [
    ({"dtype": "int3"}, "fp32, fp16, bf16"),
    ({"max_new_tokens": 0}, "max_new_tokens must be in 1.."),
    ({"batch_size": -1}, "batch_size must be in 1.."),
    ({"device": "tpu"}, "auto, cpu, cuda or cuda:N"),
    ({"model": "preset:nope"}, "presets: "),
    ({"model": "  "}, "model must be"),
    ({"prompt": "hi", "prompt_tokens": 4}, "either prompt or prompt_tokens"),
    ({"prompt": "   "}, "prompt is empty"),
    ({"repeats": "five"}, "repeats must be an integer"),
    ({"eval_context": 1}, "eval_context must be in 2.."),
    ({"techniques": ("nope",)}, "unknown technique 'nope'"),
])
def test_bad_values_are_refused_with_the_allowed_values(changes, fragment):
    with pytest.raises(ValueError) as e:
        RunConfig(**changes)
    assert fragment in str(e.value)


def test_from_dict_refuses_unknown_keys():
    with pytest.raises(ValueError, match="unknown field"):
        RunConfig.from_dict({"model": "tiny", "colour": "blue"})


def test_from_dict_validates_like_the_constructor():
    with pytest.raises(ValueError, match="max_new_tokens"):
        RunConfig.from_dict({"max_new_tokens": 0})


def test_replace_revalidates():
    with pytest.raises(ValueError):
        RunConfig().replace(batch_size=0)


# ---------------------------------------------------------------- techniques: held parsed, written as specs

SIM8 = ("sim:bits=8,symmetric=true,granularity=per-channel,group_size=128,activations=none,act_granularity=tensor,"
        "activation_bits=8,calibration_tokens=2048,include_lm_head=false")
OLD_SIM8 = ("sim:bits=8,symmetric=true,granularity=per-channel,group_size=128,activations=none,activation_bits=8,"
            "calibration_tokens=2048,include_lm_head=false")  # before sim had act_granularity
# `RunConfig(techniques=("magnitude:sparsity=0.5", "sim:bits=8"), device="cpu").to_json()` as the code before
# parsed techniques wrote it into the store's config_json (no `engine` field yet).
OLD_CONFIG_JSON = (
    '{"model": "tiny", "dtype": "fp32", "device": "cpu", "trust_remote_code": false, "allow_pickle": false, '
    '"prompt": null, "prompt_tokens": null, "max_new_tokens": 32, "batch_size": 1, "warmup": 1, "repeats": 5, '
    '"min_duration_s": 2.0, "max_repeats": 200, "threads": null, "interop_threads": null, "attn_implementation": '
    '"sdpa", "kv_cache": "dynamic", "compile": false, "device_map": null, "max_memory": null, "tensor_parallel": 1, '
    '"data_parallel": 1, "eval_tokens": 2048, "eval_context": 256, "techniques": ["magnitude:sparsity=0.5,scope=layer", '
    f'"{OLD_SIM8}"], '
    '"token_events": true, "seed": 0}')


def test_techniques_are_parsed_configs_equal_from_specs_or_objects():
    from workbench.techniques.magnitude import MagnitudeConfig
    from workbench.techniques.sim import SimQuantConfig

    from_specs = RunConfig(techniques=("magnitude:sparsity=0.5", "sim:bits=8"))
    from_objects = RunConfig(techniques=(MagnitudeConfig(sparsity=0.5), SimQuantConfig(bits=8)))
    mixed = RunConfig(techniques=[MagnitudeConfig(sparsity=0.5), "sim"])
    assert from_specs == from_objects == mixed and hash(from_specs) == hash(from_objects)
    assert from_specs.techniques == (MagnitudeConfig(sparsity=0.5), SimQuantConfig(bits=8))
    assert from_specs.technique_specs == ("magnitude:sparsity=0.5,scope=layer", SIM8)
    assert RunConfig(techniques="sim").techniques == (SimQuantConfig(),)


def test_to_dict_writes_spec_strings_and_from_dict_parses_them():
    cfg = RunConfig(techniques=("magnitude:sparsity=0.5", "sim:bits=8"))
    data = json.loads(cfg.to_json())
    assert data["techniques"] == ["magnitude:sparsity=0.5,scope=layer", SIM8]
    assert cfg.to_dict()["techniques"] == list(cfg.technique_specs)
    assert RunConfig.from_dict(data) == cfg and RunConfig.from_json(cfg.to_json()) == cfg


def test_a_config_stored_by_the_old_code_still_loads():
    cfg = RunConfig.from_json(OLD_CONFIG_JSON)
    assert [t.name for t in cfg.techniques] == ["magnitude", "sim"] and cfg.techniques[0].sparsity == 0.5
    assert cfg == RunConfig(techniques=("magnitude:sparsity=0.5", "sim:bits=8"), device="cpu")
    old = json.loads(OLD_CONFIG_JSON)
    old["techniques"][1] = SIM8  # the one parameter added since (act_granularity) is spelled out with its default
    assert {k: v for k, v in cfg.to_dict().items() if k in old} == old  # written back the same way


def test_a_result_stored_by_the_old_code_still_loads_with_parsed_techniques():
    from pathlib import Path

    from workbench.result import RunResult

    text = (Path(__file__).parent / "data" / "run_stored_before_parsed_techniques.json").read_text()
    result = RunResult.from_dict(json.loads(text))  # as the store reads result_json
    assert [t.name for t in result.config.techniques] == ["magnitude", "sim"]
    assert result.config.technique_specs == ("magnitude:sparsity=0.5,scope=layer", SIM8)
    stored = json.loads(text)["config"]["techniques"]
    assert stored[1] == OLD_SIM8  # written back with the parameter added since (act_granularity) spelled out
    assert result.to_dict()["config"]["techniques"] == [stored[0], SIM8]
    assert RunResult.from_dict(json.loads(result.to_json())) == result


@pytest.mark.parametrize("techniques, message", [
    (("sim:bits=99",), "sim: bits must be in 2..8; got 99"),
    (("sim", "dynamic-int8"), "sim then dynamic-int8: two quantizations in one run; choose one"),
    (("sim:colour=1",), "sim: unknown parameter 'colour'; parameters: act_granularity, activation_bits, activations, "
                        "bits, calibration_tokens, granularity, group_size, include_lm_head, symmetric"),
    ((7,), "a technique is a spec such as 'sim:bits=4' (NAME or NAME:key=value,...); got 7"),
])
def test_a_bad_technique_fails_on_construction_with_the_same_sentence(techniques, message):
    from workbench.errors import ConfigError

    with pytest.raises(ConfigError) as e:
        RunConfig(techniques=techniques)
    assert str(e.value) == message
    with pytest.raises(ConfigError) as e:
        RunConfig.from_dict({"techniques": list(techniques)})
    assert str(e.value) == message


def test_parsed_objects_are_checked_again_as_a_combination():
    from workbench.techniques.dynamic_int8 import DynamicInt8Config
    from workbench.techniques.sim import SimQuantConfig

    with pytest.raises(ValueError, match="two quantizations"):
        RunConfig(techniques=(SimQuantConfig(), DynamicInt8Config()))
    cfg = RunConfig(techniques=(SimQuantConfig(),))
    with pytest.raises(ValueError, match="two quantizations"):
        cfg.replace(techniques=cfg.techniques + (DynamicInt8Config(),))


def test_the_technique_layer_sits_below_the_config():
    """Importing the technique configs loads neither the config, the result nor the text modules."""
    import subprocess
    import sys

    probe = ("import sys, workbench.techniques.base, workbench.techniques.rules; "
             "print(sorted(m for m in ('workbench.config', 'workbench.result', 'workbench.textio') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_children_import_the_workbench_this_process_imported(monkeypatch, tmp_path):
    """A checkout that is not installed: its root goes first on PYTHONPATH, once; site-packages never does."""
    import workbench
    from workbench import paths

    root = str(Path(workbench.__file__).resolve().parent.parent)
    monkeypatch.setenv("PYTHONPATH", "/elsewhere")
    paths.share_import_path()
    paths.share_import_path()
    assert os.environ["PYTHONPATH"] == os.pathsep.join([root, "/elsewhere"])
    done = subprocess.run([sys.executable, "-c", "import workbench; print(workbench.__file__)"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == workbench.__file__
    monkeypatch.delenv("PYTHONPATH")
    monkeypatch.setattr(paths, "__file__", str(tmp_path / "site-packages" / "workbench" / "paths.py"))
    paths.share_import_path()
    assert "PYTHONPATH" not in os.environ
