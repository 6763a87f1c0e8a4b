"""RunConfig: validation on construction (messages name the allowed values) and JSON round trips."""

from __future__ import annotations

import json

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
