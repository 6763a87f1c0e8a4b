"""Fixed-length greedy decoding (`NoEarlyEnd`): the tokens `min_new_tokens = max_new_tokens` gives, without the
per-step vocabulary masks transformers builds for it."""

from __future__ import annotations

import contextlib
import math

import pytest
import torch

from workbench.engines.hf_generate import Generator, NoEarlyEnd, fixed_length
from workbench.measure.latency import TokenClock


def test_only_the_eos_column_is_masked_in_a_new_tensor():
    scores = torch.randn(3, 11)  # (B, V)
    before = scores.clone()
    out = NoEarlyEnd(4, torch.device("cpu"))(torch.zeros(3, 2, dtype=torch.long), scores)
    assert torch.equal(scores, before)  # the input is left alone
    assert torch.all(out[:, 4] == -math.inf)
    keep = [i for i in range(11) if i != 4]
    assert torch.equal(out[:, keep], before[:, keep])
    assert NoEarlyEnd(None, torch.device("cpu"))(None, scores) is scores  # no EOS token: nothing to keep out


@contextlib.contextmanager
def eos_wins(model: torch.nn.Module, eos: int, from_call: int):
    """Make EOS the top logit of every forward from the `from_call`-th on (0 is the prefill)."""
    calls = {"n": 0}

    def hook(module, args, output):
        calls["n"] += 1
        if calls["n"] > from_call:
            output = output.clone()
            output[..., eos] = output.abs().max() * 10 + 10  # (B, T, V): EOS beats every other token
        return output

    handle = model.get_output_embeddings().register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def test_greedy_tokens_equal_min_new_tokens_when_eos_would_win(tiny):
    model, tok = tiny.model, tiny.tokenizer
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])  # (B, T)
    mask = torch.ones_like(ids)
    with torch.inference_mode(), eos_wins(model, tok.eos_token_id, from_call=3):
        free = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False,
                              pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    assert free.shape[1] < ids.shape[1] + 8  # the hook works: left alone, generation stops at EOS
    with torch.inference_mode(), eos_wins(model, tok.eos_token_id, from_call=3):
        ref = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, min_new_tokens=8,
                             do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    with torch.inference_mode(), eos_wins(model, tok.eos_token_id, from_call=3):
        ours = model.generate(input_ids=ids, attention_mask=mask, **fixed_length(tok, 8, torch.device("cpu")))
    assert ours.shape == (2, ids.shape[1] + 8)
    assert torch.equal(ours, ref)
    assert not (ours[:, ids.shape[1]:] == tok.eos_token_id).any()


def test_the_runner_generate_never_runs_transformers_min_length_processors(tiny, fast, monkeypatch):
    from transformers.generation import logits_process

    def refuse(self, input_ids, scores):
        raise AssertionError(f"{type(self).__name__} ran: it rebuilds a vocabulary mask every step")

    for name in ("MinLengthLogitsProcessor", "MinNewTokensLengthLogitsProcessor"):
        monkeypatch.setattr(getattr(logits_process, name), "__call__", refuse)
    cpu = torch.device("cpu")
    gen = Generator(tiny.model, tiny.tokenizer, cpu, fast(max_new_tokens=6), [[5, 6, 7], [8, 9, 10]],
                    stop_requested=lambda: False)
    with eos_wins(tiny.model, tiny.tokenizer.eos_token_id, from_call=2):
        generation = gen.generate(TokenClock(cpu))
    assert [len(row) for row in generation.rows] == [6, 6]
    assert all(t != tiny.tokenizer.eos_token_id for row in generation.rows for t in row)
    assert len(generation.timing.token_ms) == 6


@pytest.mark.parametrize("batch", [1, 3])
def test_settings_are_fresh_per_call_and_build_a_valid_generation_config(tiny, batch):
    from transformers import GenerationConfig

    a, b = (fixed_length(tiny.tokenizer, 5, torch.device("cpu")) for _ in range(2))
    assert a["logits_processor"] is not b["logits_processor"]
    settings = {k: v for k, v in a.items() if k != "logits_processor"}
    GenerationConfig(**settings).validate(strict=True)
    ids = torch.full((batch, 3), 7)  # (B, T)
    with torch.inference_mode():
        out = tiny.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **a)
    assert out.shape == (batch, 8)
