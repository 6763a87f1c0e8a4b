"""Accuracy definitions on controlled models: perplexity, next-token accuracy, KL, agreement."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from workbench.measure import accuracy as acc
from workbench.measure.accuracy import compute_baseline, evaluate, greedy_match, make_windows, unigram_perplexity

CPU = torch.device("cpu")


class FixedLogits(torch.nn.Module):
    """A fake LM: logits = fn(input_ids) (B, T, V)."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, input_ids, use_cache=False):
        return SimpleNamespace(logits=self.fn(input_ids))


def uniform(vocab):
    return FixedLogits(lambda ids: torch.zeros(*ids.shape, vocab))


def oracle(vocab, stream):
    """Predicts the next token of an arithmetic stream (t -> t+1 mod V) with certainty."""
    def fn(ids):
        out = torch.full((*ids.shape, vocab), -1e4)
        out.scatter_(-1, ((ids + 1) % vocab).unsqueeze(-1), 0.0)
        return out
    return FixedLogits(fn)


STREAM = [i % 7 for i in range(200)]


def test_windows_cover_the_stream_without_overlap():
    w = make_windows(list(range(100)), context=10, n_tokens=27)
    assert w.ids.shape == (3, 10) and w.stride == 9 and w.scored_tokens == 27
    assert w.ids[1, 0].item() == 9  # window i starts at i * stride: it re-reads one token as context
    w2 = make_windows(list(range(100)), context=10, n_tokens=10_000)
    assert w2.ids.shape[0] == (100 - 10) // 9 + 1  # capped by the text
    with pytest.raises(ValueError, match="stride"):
        make_windows(list(range(100)), context=10, n_tokens=5, stride=10)
    with pytest.raises(ValueError, match="fewer than the context"):
        make_windows(list(range(5)), context=10, n_tokens=5)


def test_uniform_model_has_perplexity_equal_to_vocab():
    w = make_windows(STREAM, context=20, n_tokens=60)
    r = evaluate(uniform(7), w, CPU)
    assert r.perplexity == pytest.approx(7.0, rel=1e-5)
    assert r.eval_tokens == w.scored_tokens
    assert r.kl_vs_baseline is None and "stride 19" in r.definition


def test_oracle_model_is_perfect():
    w = make_windows(STREAM, context=20, n_tokens=60)
    r = evaluate(oracle(7, STREAM), w, CPU)
    assert r.perplexity == pytest.approx(1.0, abs=1e-4)
    assert r.next_token_accuracy == 1.0


def test_kl_and_agreement_against_a_baseline():
    w = make_windows(STREAM, context=20, n_tokens=60)
    base = compute_baseline(oracle(7, STREAM), w, CPU)
    assert base.exact
    same = evaluate(oracle(7, STREAM), w, CPU, base)
    assert same.kl_vs_baseline == pytest.approx(0.0, abs=1e-6) and same.top1_agreement_vs_baseline == 1.0
    # baseline certain (p=1 on one token), model uniform: KL(p||q) = log V
    diff = evaluate(uniform(7), w, CPU, base)
    assert diff.kl_vs_baseline == pytest.approx(math.log(7), rel=1e-4)


def test_kl_matches_a_hand_computation():
    p_logits = torch.tensor([2.0, 1.0, 0.0, -1.0])
    q_logits = torch.tensor([0.0, 1.0, 2.0, 0.5])
    p, q = p_logits.softmax(-1), q_logits.softmax(-1)
    expected = float((p * (p.log() - q.log())).sum())
    stream = [0, 1, 2, 3] * 10
    w = make_windows(stream, context=4, n_tokens=3)
    base = compute_baseline(FixedLogits(lambda ids: p_logits.expand(*ids.shape, 4)), w, CPU)
    r = evaluate(FixedLogits(lambda ids: q_logits.expand(*ids.shape, 4)), w, CPU, base)
    assert r.kl_vs_baseline == pytest.approx(expected, rel=1e-5)


def test_topk_baseline_is_a_lower_bound_of_the_exact_kl(monkeypatch):
    torch.manual_seed(0)
    vocab = 50
    table = torch.randn(vocab, vocab) * 2
    table2 = table + torch.randn(vocab, vocab)
    w = make_windows([i % vocab for i in range(400)], context=40, n_tokens=100)
    p_model = FixedLogits(lambda ids: table[ids])
    q_model = FixedLogits(lambda ids: table2[ids])
    exact = evaluate(q_model, w, CPU, compute_baseline(p_model, w, CPU)).kl_vs_baseline
    monkeypatch.setattr(acc, "FULL_BASELINE_MAX_ENTRIES", 0)
    monkeypatch.setattr(acc, "TOPK_BASELINE", 10)
    base = compute_baseline(p_model, w, CPU)
    assert not base.exact and base.topk_logp.shape[1] == 10
    approx = evaluate(q_model, w, CPU, base)
    assert 0 < approx.kl_vs_baseline <= exact + 1e-6
    assert "top-10" in approx.definition
    assert approx.top1_agreement_vs_baseline == evaluate(q_model, w, CPU, compute_baseline(p_model, w, CPU)
                                                         ).top1_agreement_vs_baseline


def test_greedy_match_is_the_common_prefix_share():
    assert greedy_match([1, 2, 3, 4], [1, 2, 3, 4]) == 1.0
    assert greedy_match([1, 2, 9, 4], [1, 2, 3, 4]) == 0.5
    assert greedy_match([9, 2, 3, 4], [1, 2, 3, 4]) == 0.0


def test_unigram_perplexity_by_hand():
    train, heldout = [0, 0, 0, 1], [0, 1]
    # add-one counts: token0 4, token1 2, token2 1 -> probabilities 4/7, 2/7, 1/7
    expected = math.exp(-(math.log(4 / 7) + math.log(2 / 7)) / 2)
    assert unigram_perplexity(train, heldout, 3) == pytest.approx(expected)


def test_decode_consistency_accepts_real_greedy_decoding_and_rejects_wrong_tokens(tiny):
    model, cpu = tiny.model, torch.device("cpu")
    prompt = [5, 17, 42, 99, 7]
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=12,
                             min_new_tokens=12, do_sample=False, pad_token_id=0)
    greedy = out[0, len(prompt):].tolist()
    assert acc.decode_consistency(model.forward, prompt, greedy, cpu) == 1.0
    # the least likely token at each step, as a broken one-token kernel might produce
    text, worst = list(prompt), []
    with torch.inference_mode():
        for _ in range(12):
            worst.append(int(model(input_ids=torch.tensor([text])).logits[0, -1].argmin()))
            text.append(worst[-1])
    assert acc.decode_consistency(model.forward, prompt, worst, cpu) == 0.0
    half = greedy[:6] + worst[6:]  # right until step 6, then wrong: the check reads each step in its context
    assert 0.4 <= acc.decode_consistency(model.forward, prompt, half, cpu) <= 0.6
    assert acc.decode_consistency(model.forward, prompt, [], cpu) is None
