"""The shipped reference model: real HF loading path, size, quality numbers, and the build recipe."""

from __future__ import annotations

import json
import re

import pytest

from workbench.models.sources import TINY_DIR

REPORT = json.loads((TINY_DIR / "recipe.json").read_text())


def test_ships_hf_format_within_20_mb():
    names = {p.name for p in TINY_DIR.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "heldout.txt.gz",
            "calibration.txt.gz", "recipe.json", "README.md"} <= names
    total = sum(p.stat().st_size for p in TINY_DIR.iterdir())
    assert total <= 20 * 1024 * 1024


def test_loads_through_the_auto_classes():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(TINY_DIR)
    tok = AutoTokenizer.from_pretrained(TINY_DIR)
    assert model.config.model_type == "llama"
    assert 2_000_000 <= sum(p.numel() for p in model.parameters()) <= 10_000_000
    assert tok.decode(tok("def f(x): return x")["input_ids"]) == "def f(x): return x"  # byte-level: lossless


def test_heldout_perplexity_is_far_below_unigram():
    m = REPORT["metrics"]
    assert m["heldout_perplexity"] < m["unigram_perplexity"] / 5
    assert m["heldout_scored_tokens"] > 20_000


def test_runner_reproduces_the_reported_perplexity(fast):
    from workbench.runner import run

    # the runner scores the first tokens only: same model, same text, same window length
    r = run(fast(eval_tokens=40_000, eval_context=REPORT["recipe"]["seq_len"], max_new_tokens=2))
    assert r.accuracy.perplexity == pytest.approx(REPORT["metrics"]["heldout_perplexity"], rel=0.15)


def test_greedy_generation_about_python_is_recognisable_text(tiny):
    prompt = "The return statement"
    ids = tiny.tokenizer(prompt, return_tensors="pt")
    out = tiny.model.generate(**ids, max_new_tokens=40, do_sample=False, pad_token_id=tiny.tokenizer.eos_token_id)
    text = tiny.tokenizer.decode(out[0, ids["input_ids"].shape[1]:])
    words = re.findall(r"[A-Za-z]+", text)
    from workbench.textio import calibration_text

    vocabulary = set(re.findall(r"[A-Za-z]+", calibration_text()))
    known = [w for w in words if w in vocabulary]
    assert len(words) >= 5 and len(known) / len(words) >= 0.8, text
    assert len(set(words)) >= 4, text  # not one word repeated


def test_build_reference_recipe_runs_end_to_end(tmp_path):
    """A miniature build (same code path, toy sizes) produces a loadable model and a report."""
    from transformers import AutoModelForCausalLM

    from workbench.reference.build import Recipe, build_reference

    recipe = Recipe(vocab_size=300, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, seq_len=32,
                    batch_size=2, steps=3, eval_every=3, warmup_steps=1)
    report = build_reference(tmp_path / "mini", recipe)
    assert report["metrics"]["params"] > 0 and report["corpus"]["heldout_tokens"] > 1000
    assert report["metrics"]["heldout_perplexity"] > 1 and report["metrics"]["unigram_perplexity"] > 1
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "mini")
    assert model.config.hidden_size == 32
    assert (tmp_path / "mini" / "README.md").read_text().startswith("# `tiny`")
    from workbench.textio import read_gz

    assert read_gz(tmp_path / "mini" / "heldout.txt.gz").count("<|endoftext|>") == report["corpus"]["heldout_docs"]


def test_recipe_validation():
    from workbench.reference.build import Recipe

    with pytest.raises(ValueError, match="divisible"):
        Recipe(hidden_size=100, num_heads=3)
    with pytest.raises(ValueError, match="steps must be in 1.."):
        Recipe(steps=0)
