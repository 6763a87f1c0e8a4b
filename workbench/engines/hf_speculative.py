"""Speculative decoding on the `hf` engine: transformers' assisted generation with a fixed number of draft tokens.

A small draft model (any `--model` spec: `student:NAME`, `tiny`, a folder, a hub id) proposes `draft_tokens`
greedy tokens, one forward each; the model scores the prompt so far plus all of them in one forward and keeps
the longest prefix it agrees with, plus one token of its own. Greedy output is therefore the model's own greedy
output; the speed-up depends on how often the draft is right (acceptance rate α) and on what a draft forward
costs against a forward of the model (c): expected tokens per forward of the model (1 − α^(K+1)) / (1 − α), and
speed-up (1 − α^(K+1)) / ((1 − α)(K·c + 1)) (Leviathan et al., 2023).

The draft's schedule is fixed (`num_assistant_tokens_schedule="constant"`, no confidence cut-off) so K is what
the run says. Forwards are counted by forward hooks on both models, apart from the model code.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from typing import Any

import torch

from workbench.errors import ConfigError
from workbench.measure.memory import parameter_count, weight_bytes
from workbench.measure.trackers.decoding import SpeculativeStats
from workbench.models.checks import check_causal_lm
from workbench.models.loader import load_model, load_tokenizer
from workbench.models.sources import ModelSource, load_config, resolve, text_config

logger = logging.getLogger(__name__)

SAMPLE_TOKENS = 64  # token ids compared between the two tokenizers (spread over the vocabulary)


def predicted_speedup(alpha: float, k: int, cost: float) -> float:
    """Expected speed-up of speculative decoding over plain decoding: (1 − α^(K+1)) / ((1 − α)(K·c + 1)),
    α the chance a draft token is accepted, K draft tokens per step, c a draft forward's cost / the model's."""
    if not 0.0 <= alpha <= 1.0 or k < 1 or cost < 0:
        raise ValueError(f"need 0 <= alpha <= 1, k >= 1 and cost >= 0; got alpha={alpha}, k={k}, cost={cost}")
    tokens = k + 1 if alpha == 1.0 else (1 - alpha ** (k + 1)) / (1 - alpha)  # expected tokens per model forward
    return tokens / (k * cost + 1)


def vocabulary_mismatch(target: Any, draft: Any, target_vocab: int, draft_vocab: int) -> str | None:
    """Why the draft cannot propose tokens for the model (one sentence), or None when their vocabularies agree:
    the same logits size, the same tokenizer size and the same text for a sample of token ids."""
    if target_vocab != draft_vocab:
        return f"its vocabulary has {draft_vocab} tokens and the model's {target_vocab}"
    if len(draft) != len(target):
        return f"its tokenizer has {len(draft)} tokens and the model's {len(target)}"
    step = max(1, len(target) // SAMPLE_TOKENS)
    for token_id in range(0, len(target), step):
        a, b = target.convert_ids_to_tokens(token_id), draft.convert_ids_to_tokens(token_id)
        if a != b:
            return f"token id {token_id} is {b!r} in its tokenizer but {a!r} in the model's"
    return None


class ForwardCounter:
    """Forward hooks counting calls of each named module while active (never inside the model code)."""

    def __init__(self, modules: dict[str, torch.nn.Module]) -> None:
        self.modules = modules
        self.counts = {name: 0 for name in modules}

    @contextlib.contextmanager
    def counting(self) -> Iterator[dict[str, int]]:
        """Reset the counts, count every forward inside the block, then remove the hooks."""
        self.counts = {name: 0 for name in self.modules}

        def hook(name: str) -> Callable[..., None]:
            def count(module: torch.nn.Module, args: Any, output: Any) -> None:
                self.counts[name] += 1
            return count

        handles = [m.register_forward_hook(hook(name)) for name, m in self.modules.items()]
        try:
            yield self.counts
        finally:
            for h in handles:
                h.remove()


class Speculation:
    """The draft model of a run: refused before loading when its vocabulary differs, loaded beside the model,
    handed to `generate`, its forwards and the model's counted on every call."""

    def __init__(self, spec: str, draft_tokens: int, trust_remote_code: bool = False) -> None:
        self.spec, self.k, self.trust_remote_code = spec, draft_tokens, trust_remote_code
        self.source: ModelSource | None = None
        self.model: torch.nn.Module | None = None
        self.counts: dict[str, int] | None = None  # the last complete call's forwards
        self.new_tokens = 0
        self.matches: bool | None = None

    def plan(self, tokenizer: Any, model_config: Any) -> None:
        """Resolve the draft and compare vocabularies (config and tokenizer only: no weight is read)."""
        self.source = resolve(self.spec)
        config = load_config(self.source, self.trust_remote_code)
        check_causal_lm(config, self.spec)
        why = vocabulary_mismatch(tokenizer, load_tokenizer(self.source, self.trust_remote_code),
                                  text_config(model_config).vocab_size, text_config(config).vocab_size)
        if why:
            raise ConfigError(f"draft model {self.spec!r} cannot propose tokens for this model: {why} (speculative "
                              "decoding needs the same tokenizer)")

    def load(self, dtype: str, device: torch.device, seed: int, attn_implementation: str) -> None:
        """The draft's weights, on the model's device in the model's dtype, with a fixed draft length."""
        self.model = load_model(self.source, dtype, device, trust_remote_code=self.trust_remote_code, seed=seed,
                                attn_implementation=attn_implementation).model
        gen = self.model.generation_config
        gen.num_assistant_tokens = self.k
        gen.num_assistant_tokens_schedule = "constant"  # K stays K (the default heuristic moves it every step)
        gen.assistant_confidence_threshold = 0.0  # no early stop of a draft on low confidence

    def config_kwargs(self) -> dict[str, Any]:
        """GenerationConfig settings (none: the draft's own generation_config holds K)."""
        return {}

    def call_kwargs(self) -> dict[str, Any]:
        """What `generate` needs for assisted generation."""
        return {"assistant_model": self.model}

    @contextlib.contextmanager
    def around(self, target: torch.nn.Module, expected_tokens: int) -> Iterator[list[int]]:
        """Count the forwards of one `generate` call; the caller appends the call's new-token count to the yielded
        list, and the counts are kept when it is `expected_tokens` (a stopped call is not representative)."""
        produced: list[int] = []
        with ForwardCounter({"target": target, "draft": self.model}).counting() as counts:
            yield produced
        if produced and produced[0] == expected_tokens:
            self.counts, self.new_tokens = dict(counts), produced[0]

    def check_greedy(self, own_greedy: list[int], generated: list[int]) -> str | None:
        """Compare the assisted output with the model's own greedy output; a warning sentence when they differ."""
        self.matches = own_greedy == generated
        if self.matches:
            return None
        first = next((i for i, (a, b) in enumerate(zip(own_greedy, generated)) if a != b), len(generated))
        return (f"speculative decoding changed the output: it differs from the model's own greedy output from token "
                f"{first} (in fp16/bf16 a forward over several tokens can round differently from one token at a time)")

    def stats(self) -> SpeculativeStats:
        """The section of the result."""
        counts = self.counts or {"target": 0, "draft": 0}
        target, draft = counts["target"], counts["draft"]
        accepted = self.new_tokens - target
        return SpeculativeStats(
            draft_model=self.spec, draft_tokens=self.k,
            acceptance_rate=accepted / draft if draft else None,
            tokens_per_target_forward=self.new_tokens / target if target else None,
            target_forwards=target, draft_forwards=draft, new_tokens=self.new_tokens,
            draft_params=parameter_count(self.model) if self.model is not None else 0,
            draft_weight_bytes=weight_bytes(self.model) if self.model is not None else 0,
            matches_target_greedy=self.matches)

    def release(self) -> None:
        self.model = None


@torch.inference_mode()
def own_greedy(model: torch.nn.Module, tokenizer: Any, prompt: list[int], n: int, device: torch.device) -> list[int]:
    """The model's own greedy continuation of `prompt` (n tokens, no draft): what assisted output must equal."""
    from transformers import GenerationConfig

    ids = torch.tensor([prompt], dtype=torch.long, device=device)  # (1, T)
    gen = GenerationConfig(max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                           eos_token_id=tokenizer.eos_token_id)
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=gen)
    return out[0, ids.shape[1]:].tolist()
