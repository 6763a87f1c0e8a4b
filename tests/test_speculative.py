"""Speculative decoding: the predicted speed-up, vocabulary checks, forward counts, burst timing, refusals."""

from __future__ import annotations

import json

import pytest
import torch

from workbench.config import RunConfig
from workbench.engines.hf_speculative import ForwardCounter, predicted_speedup, vocabulary_mismatch
from workbench.errors import ConfigError
from workbench.measure.latency import TokenClock, summarize
from workbench.result import RunResult
from workbench.runner import run


def test_predicted_speedup_formula():
    assert predicted_speedup(0.0, 4, 0.1) == pytest.approx(1 / 1.4)  # nothing accepted: pure overhead
    assert predicted_speedup(1.0, 4, 0.0) == pytest.approx(5.0)  # free and always right: K + 1 tokens per forward
    assert predicted_speedup(0.8, 4, 0.1) == pytest.approx((1 - 0.8 ** 5) / (0.2 * 1.4))
    with pytest.raises(ValueError, match="alpha"):
        predicted_speedup(1.5, 4, 0.1)


class _Tok:
    def __init__(self, tokens: list[str]) -> None:
        self.tokens = tokens

    def __len__(self) -> int:
        return len(self.tokens)

    def convert_ids_to_tokens(self, i: int) -> str:
        return self.tokens[i]


def test_vocabulary_mismatch_names_the_difference():
    base = _Tok([f"t{i}" for i in range(100)])
    assert vocabulary_mismatch(base, _Tok(list(base.tokens)), 100, 100) is None
    assert "vocabulary has 120 tokens" in vocabulary_mismatch(base, base, 100, 120)
    other = _Tok(list(base.tokens))
    other.tokens[0] = "zz"
    assert "token id 0" in vocabulary_mismatch(base, other, 100, 100)


def test_forward_counter_counts_calls_and_removes_its_hooks():
    lin = torch.nn.Linear(2, 2)
    counter = ForwardCounter({"lin": lin})
    with counter.counting() as counts:
        lin(torch.zeros(1, 2))
        lin(torch.zeros(1, 2))
    assert counts == {"lin": 2}
    lin(torch.zeros(1, 2))
    assert counter.counts == {"lin": 2} and not lin._forward_hooks


def test_token_clock_splits_a_burst_into_tokens_with_one_stamp():
    clock = TokenClock(torch.device("cpu"))
    clock.begin()
    clock.put(torch.tensor([[1, 2, 3]]))  # the prompt
    clock.put(torch.tensor([[7, 8, 9]]))  # assisted generation: 3 tokens accepted in one forward
    clock.put(torch.tensor([5]))  # a plain step
    assert clock.tokens == [[7], [8], [9], [5]]
    assert clock.stamps[0] == clock.stamps[1] == clock.stamps[2] <= clock.stamps[3]
    t = clock.timing(clock.stamps[-1] + 0.001)
    s = summarize([t], batch=1, prompt_tokens=3, warmup=0)
    assert s.new_tokens == 4
    assert s.ttft_ms.p50 == pytest.approx(t.token_ms[0])  # TTFT: the first burst
    assert s.tpot_ms.p50 == pytest.approx((t.e2e_ms - t.ttft_ms) / 3)  # TPOT: (E2E - TTFT) / (N - 1)


@pytest.fixture(scope="module")
def noisy_draft(tmp_path_factory, tiny):
    """`tiny` with 2 % noise on its weights, saved as a folder: same tokenizer, a draft that is sometimes wrong."""
    import copy

    folder = tmp_path_factory.mktemp("draft")
    model = copy.deepcopy(tiny.model)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02 * p.std())
    model.save_pretrained(folder)
    tiny.tokenizer.save_pretrained(folder)
    return str(folder)


def test_draft_run_counts_acceptance_and_keeps_the_greedy_output(fast, noisy_draft):
    plain = run(fast(max_new_tokens=12, eval_tokens=0, repeats=1))
    r = run(fast(max_new_tokens=12, eval_tokens=0, repeats=1, draft_model=noisy_draft, draft_tokens=3))
    s = r.speculative
    assert r.output_text == plain.output_text and s.matches_target_greedy is True
    assert s.new_tokens == r.latency.new_tokens == 12
    accepted = s.new_tokens - s.target_forwards  # each forward of the model adds one token of its own
    assert s.acceptance_rate == pytest.approx(accepted / s.draft_forwards)
    assert 0 < s.acceptance_rate < 1 and s.draft_forwards <= 3 * s.target_forwards
    assert s.tokens_per_target_forward == pytest.approx(12 / s.target_forwards) and s.tokens_per_target_forward > 1
    assert plain.speculative is None
    assert RunResult.from_dict(json.loads(r.to_json())).speculative == s


def test_the_model_as_its_own_draft_accepts_everything(fast):
    r = run(fast(max_new_tokens=9, eval_tokens=0, repeats=1, draft_model="tiny", draft_tokens=3))
    s = r.speculative
    assert s.acceptance_rate == 1.0 and s.target_forwards < 9 and s.matches_target_greedy
    assert not [w for w in r.warnings if "speculative" in w]


def test_mismatched_output_is_a_warning(fast, monkeypatch):
    from workbench.engines import hf

    monkeypatch.setattr(hf, "own_greedy", lambda model, tok, prompt, n, device: [0] * n)
    r = run(fast(max_new_tokens=4, eval_tokens=0, repeats=1, draft_model="tiny", draft_tokens=2))
    assert r.speculative.matches_target_greedy is False
    assert any("speculative decoding changed the output" in w for w in r.warnings)


@pytest.mark.parametrize("changes, message", [
    (dict(draft_model="tiny", draft_tokens=0), "draft_tokens must be in 1..64"),
    (dict(draft_model="tiny", batch_size=2), "batch_size must be 1"),
    (dict(draft_model="tiny", engine="llamacpp"), "needs engine hf"),
    (dict(draft_model="tiny", tensor_parallel=2), "does not combine with tensor_parallel"),
    (dict(draft_model="tiny", data_parallel=2, batch_size=2), "batch_size must be 1"),
    (dict(draft_model="tiny", kv_cache="static", compile=True), "choose one of compile and draft_model"),
    (dict(draft_model=" "), "draft_model is empty"),
])
def test_bad_draft_settings_are_refused(changes, message):
    with pytest.raises(ValueError, match=message):
        RunConfig(model="tiny", **changes)


def test_draft_with_another_vocabulary_is_refused_before_loading(fast):
    with pytest.raises(ConfigError, match="vocabulary has 50257 tokens and the model's 4096"):
        run(fast(draft_model="preset:llama-124m"))
