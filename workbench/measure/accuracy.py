"""Accuracy on held-out text: perplexity, next-token accuracy, and agreement with a baseline model."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from workbench.errors import ConfigError
from workbench.result import AccuracyStats

# Above this many (positions x vocab) entries the baseline keeps only its top-k log-probs plus a
# "rest" bucket; below it the whole distribution is kept and the KL is exact.
FULL_BASELINE_MAX_ENTRIES = 32 * 1024 * 1024
TOPK_BASELINE = 1024


@dataclass(frozen=True)
class EvalWindows:
    """Held-out token windows: each row is `context` tokens; the last `stride` positions are scored."""

    ids: torch.Tensor  # (W, C) int64
    stride: int

    @property
    def scored_tokens(self) -> int:
        """How many next-token predictions the windows score."""
        return self.ids.shape[0] * self.stride

    @property
    def context(self) -> int:
        """Tokens per window."""
        return self.ids.shape[1]


def make_windows(ids: list[int], context: int, n_tokens: int, stride: int | None = None) -> EvalWindows:
    """Cut a token stream into windows that score about `n_tokens` predictions.

    With stride == context - 1 the windows do not overlap (each token predicted from the tokens
    before it in its window); a smaller stride slides the window so every scored token sees at
    least context - stride tokens of history.
    """
    if context < 2:
        raise ValueError(f"evaluation context must be >= 2 tokens, got {context}")
    stride = context - 1 if stride is None else stride
    if not 1 <= stride <= context - 1:
        raise ValueError(f"evaluation stride must be in 1..{context - 1}, got {stride}")
    if len(ids) < context:
        raise ConfigError(f"the held-out text has {len(ids)} tokens with this tokenizer, fewer than the context of "
                          f"{context} that evaluation needs; set eval_context to {len(ids)} or less")
    n_windows = min(max(1, math.ceil(n_tokens / stride)), (len(ids) - context) // stride + 1)
    rows = [ids[i * stride: i * stride + context] for i in range(n_windows)]
    return EvalWindows(torch.tensor(rows, dtype=torch.long), stride)


EVAL_BATCH = 8  # evaluation windows per forward


@torch.inference_mode()
def window_logprobs(model: torch.nn.Module, windows: EvalWindows, device: torch.device,
                    batch_size: int = EVAL_BATCH) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (log_probs (B, S, V) float32, targets (B, S)) for the scored positions of each batch."""
    s = windows.stride
    for start in range(0, windows.ids.shape[0], batch_size):
        rows = windows.ids[start:start + batch_size].to(device)  # (B, C)
        logits = model(input_ids=rows, use_cache=False).logits  # (B, C, V)
        logp = torch.log_softmax(logits[:, -s - 1:-1].float(), dim=-1)  # (B, S, V)
        yield logp, rows[:, -s:]


@dataclass(frozen=True)
class Baseline:
    """What the unmodified model predicted on the eval windows, kept to compare later runs against."""

    topk_logp: torch.Tensor  # (N, K) log-probs of the baseline's top-k tokens (K == V: all, float32)
    topk_ids: torch.Tensor  # (N, K) int32 (empty when K == V: ids are 0..V-1)
    vocab: int

    @property
    def exact(self) -> bool:
        """True when the whole distribution is kept (KL exact), False for top-k + rest bucket."""
        return self.topk_logp.shape[1] == self.vocab


def _keep(logp: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Flatten (B, S, V) log-probs into what a Baseline stores."""
    flat = logp.reshape(-1, logp.shape[-1])  # (B*S, V)
    if k >= flat.shape[-1]:
        return flat.float(), torch.empty(0, dtype=torch.int32)
    vals, idx = flat.topk(k, dim=-1)  # (B*S, K)
    return vals.float(), idx.int()


def compute_baseline(model: torch.nn.Module, windows: EvalWindows, device: torch.device,
                     should_stop: Callable[[], bool] = lambda: False) -> Baseline | None:
    """Run the unmodified model over the windows and keep its predictions (None if stopped)."""
    vals, ids, vocab = [], [], 0
    for logp, _ in window_logprobs(model, windows, device):
        vocab = logp.shape[-1]
        k = vocab if windows.scored_tokens * vocab <= FULL_BASELINE_MAX_ENTRIES else TOPK_BASELINE
        v, i = _keep(logp.cpu(), k)
        vals.append(v)
        ids.append(i)
        if should_stop():
            return None
    return Baseline(torch.cat(vals), torch.cat(ids), vocab)


def _kl_and_top1(logp: torch.Tensor, base: Baseline, offset: int) -> tuple[float, int]:
    """Sum of KL(baseline || model) and count of equal argmaxes over one batch of positions."""
    q = logp.reshape(-1, logp.shape[-1])  # (N, V)
    n = q.shape[0]
    p_logp = base.topk_logp[offset:offset + n].to(q.device).float()  # (N, K)
    if base.exact:
        kl = (p_logp.exp() * (p_logp - q)).sum(-1)  # (N,)
        agree = (p_logp.argmax(-1) == q.argmax(-1)).sum()
    else:
        idx = base.topk_ids[offset:offset + n].to(q.device).long()  # (N, K)
        q_top = q.gather(-1, idx)  # (N, K)
        p = p_logp.exp()
        p_rest = (1 - p.sum(-1)).clamp_min(1e-12)
        q_rest = (1 - q_top.exp().sum(-1)).clamp_min(1e-12)
        kl = (p * (p_logp - q_top)).sum(-1) + p_rest * (p_rest.log() - q_rest.log())
        agree = (idx[:, 0] == q.argmax(-1)).sum()
    return float(kl.clamp_min(0).sum()), int(agree)


def evaluate(model: torch.nn.Module, windows: EvalWindows, device: torch.device,
             baseline: Baseline | None = None,
             should_stop: Callable[[], bool] = lambda: False) -> AccuracyStats | None:
    """Perplexity, next-token accuracy and (with a baseline) KL / top-1 agreement of a PyTorch model."""
    return score(window_logprobs(model, windows, device), windows, baseline, should_stop)


def score(batches: Iterable[tuple[torch.Tensor, torch.Tensor]], windows: EvalWindows,
          baseline: Baseline | None = None, should_stop: Callable[[], bool] = lambda: False) -> AccuracyStats | None:
    """The same from any engine's log-probabilities: batches of (logp (W, T, V), targets (W, T)) in window
    order; None when stopped."""
    nll, correct, n, kl, agree = 0.0, 0, 0, 0.0, 0
    for logp, targets in batches:
        nll -= float(logp.gather(-1, targets.unsqueeze(-1)).sum())
        correct += int((logp.argmax(-1) == targets).sum())
        if baseline is not None:
            k, a = _kl_and_top1(logp, baseline, n)
            kl, agree = kl + k, agree + a
        n += targets.numel()
        if should_stop():
            return None
    return AccuracyStats(
        perplexity=math.exp(nll / n),
        next_token_accuracy=correct / n,
        kl_vs_baseline=kl / n if baseline is not None else None,
        top1_agreement_vs_baseline=agree / n if baseline is not None else None,
        greedy_match_vs_baseline=None,
        eval_tokens=n,
        definition=definition(windows, baseline),
    )


def definition(windows: EvalWindows, baseline: Baseline | None) -> str:
    """Say in words what the accuracy numbers mean for these windows."""
    text = (f"token-level perplexity = exp(mean negative log-likelihood) of {windows.scored_tokens} "
            f"held-out tokens, in {windows.ids.shape[0]} windows of {windows.context} tokens, "
            f"stride {windows.stride} (each scored token sees at least "
            f"{windows.context - windows.stride} earlier tokens of its window); next-token accuracy = "
            "share of those positions where the most likely token is the true one")
    if baseline is not None:
        kind = "exact" if baseline.exact else (
            f"over the baseline's top-{baseline.topk_logp.shape[1]} tokens plus one bucket for the "
            "rest (a lower bound)")
        text += (f"; KL = mean KL(unmodified || this run) per position, {kind}; top-1 agreement = "
                 "share of positions where both pick the same token; greedy match = share of the "
                 "generated tokens equal to the unmodified model's greedy continuation before the "
                 "first difference")
    return text


def greedy_match(tokens: list[int], baseline_tokens: list[int]) -> float:
    """Length of the common prefix of two greedy continuations, as a share of the baseline's."""
    if not baseline_tokens:
        return 0.0
    same = 0
    for a, b in zip(tokens, baseline_tokens):
        if a != b:
            break
        same += 1
    return same / len(baseline_tokens)


# Below this share of decoded tokens in the top 10 of one forward over the same text, the decode path is wrong.
DECODE_CONSISTENCY_MIN = 0.5
DECODE_WRONG = "decode looks wrong"


def decode_warning(share: float | None) -> str | None:
    """The warning for a decode path whose tokens disagree with one uncompiled forward (None: they agree)."""
    if share is None or share >= DECODE_CONSISTENCY_MIN:
        return None
    return (f"{DECODE_WRONG}: only {share:.0%} of the generated tokens are among the top 10 of one uncompiled "
            "forward pass over the same text, so the speed measured is that of wrong output (a miscompiled or "
            "broken kernel on the one-token path); do not trust this configuration")


def decode_looks_wrong(warnings: tuple[str, ...]) -> bool:
    """True when a run's warnings say its decoded tokens disagreed with its own forward (wrong output's speed)."""
    return any(w.startswith(DECODE_WRONG) for w in warnings)


def decode_consistency(forward: Callable[..., Any], prompt: list[int], generated: list[int], device: torch.device,
                       top_k: int = 10) -> float | None:
    """Share of the generated tokens that are in the top `top_k` of one forward pass over the same text.

    Decoding a token at a time (KV cache, compiled or fused kernels) must compute what one forward over the
    whole text computes. A low share means the decode path is wrong — a miscompiled kernel, a broken cache —
    and its speed is the speed of wrong output. Top-k rather than argmax: kernels for one token and for many
    round differently, which can flip near-ties (random-weight models are full of them).
    """
    if not generated:
        return None
    ids = torch.tensor([list(prompt) + list(generated[:-1])], dtype=torch.long, device=device)
    with torch.inference_mode():
        logits = forward(input_ids=ids, use_cache=False).logits[0, len(prompt) - 1:]
    top = logits.float().topk(min(top_k, logits.shape[-1]), dim=-1).indices  # (n, k)
    target = torch.tensor(generated, dtype=torch.long, device=top.device)[:, None]
    return (top == target).any(dim=-1).float().mean().item()


def unigram_perplexity(train_ids: list[int], eval_ids: list[int], vocab: int) -> float:
    """Perplexity of an add-one-smoothed unigram model fitted on train_ids, on eval_ids."""
    counts = torch.bincount(torch.tensor(train_ids), minlength=vocab).double() + 1.0
    logp = (counts / counts.sum()).log()
    return math.exp(-float(logp[torch.tensor(eval_ids)].mean()))
