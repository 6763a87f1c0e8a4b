"""Text in and out: prompts, the held-out evaluation text, and streaming-safe decoding."""

from __future__ import annotations

import functools
import gzip
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from workbench.config import DEFAULT_PROMPT, RunConfig
from workbench.errors import ConfigError
from workbench.measure.accuracy import EvalWindows, make_windows
from workbench.models.sources import TINY_DIR, text_config


HELDOUT_FILE, CALIBRATION_FILE = "heldout.txt.gz", "calibration.txt.gz"


def read_gz(path: Path) -> str:
    """Text of a gzip-compressed UTF-8 file."""
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return f.read()


def write_gz(path: Path, text: str) -> None:
    """Write UTF-8 text gzip-compressed, byte-for-byte reproducible (no timestamp in the header)."""
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="") as f:
        f.write(text.encode("utf-8"))


@functools.cache
def heldout_text() -> str:
    """The reference corpus's held-out split (shipped with the reference model)."""
    return read_gz(TINY_DIR / HELDOUT_FILE)


@functools.cache
def calibration_text() -> str:
    """A slice of the reference corpus's training split, for calibration (static quantization, Wanda)."""
    return read_gz(TINY_DIR / CALIBRATION_FILE)


_ids_cache: dict[int, list[int]] = {}


def heldout_ids(tokenizer: Any) -> list[int]:
    """The held-out text tokenized by `tokenizer` (cached per tokenizer object)."""
    key = id(tokenizer)
    if key not in _ids_cache:
        _ids_cache[key] = encode(tokenizer, heldout_text())
    return _ids_cache[key]


def encode(tokenizer: Any, text: str) -> list[int]:
    """Token ids of `text`: no special tokens added, never truncated, no length warnings for long texts.

    A tokenizer.json may switch truncation on (sentence encoders cut at 128 tokens), and the fast
    backend applies it silently; it is switched off for this call. Lengths are checked against the
    model's context by the caller, which says so when something does not fit.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return tokenizer(text, add_special_tokens=False, truncation=False, verbose=False)["input_ids"]
    saved = backend.truncation  # None, or {max_length, stride, strategy, direction}
    if saved is None:
        return backend.encode(text, add_special_tokens=False).ids
    backend.no_truncation()
    try:
        return backend.encode(text, add_special_tokens=False).ids
    finally:
        backend.enable_truncation(**saved)


def tokenizer_limit_warning(tokenizer: Any, tokens: int, context: int) -> str | None:
    """A warning when a run's `tokens` pass the tokenizer's declared model_max_length but fit the model's context.

    Nothing is cut either way (see `encode`); the tokenizer's limit often marks the length the model was
    trained on, so positions past it may be of lower quality.
    """
    limit = getattr(tokenizer, "model_max_length", None)
    if not isinstance(limit, int) or limit >= context or tokens <= limit:
        return None
    return (f"the run uses {tokens} positions (prompt + new tokens), more than the tokenizer's model_max_length "
            f"of {limit} (the model's context is {context}): nothing is truncated, but the model may not have "
            "been trained on positions that far")


def build_prompts(config: RunConfig, tokenizer: Any, vocab_size: int) -> list[list[int]]:
    """One distinct prompt per batch row, all the same length (no padding needed).

    Row 0 is the prompt text (or the first `prompt_tokens` held-out tokens); every other row is
    cut, at that length, from a different place in the held-out text.
    """
    stream = heldout_ids(tokenizer)
    if config.prompt_tokens is None:
        first = encode(tokenizer, config.prompt if config.prompt is not None else DEFAULT_PROMPT)
        if not first:
            raise ConfigError("the prompt encodes to zero tokens; give some text")
        n = len(first)
    else:
        first, n = None, config.prompt_tokens
    while len(stream) < n * config.batch_size:
        stream = stream + stream
    rows = [stream[i * n:(i + 1) * n] for i in range(config.batch_size)]
    if first is not None:
        rows[0] = first
    if max(max(r) for r in rows) >= vocab_size:
        raise ConfigError(f"the tokenizer produced ids beyond the model's vocabulary of {vocab_size}")
    return rows


class IncrementalDecoder:
    """Decode a growing token list into new text pieces, holding back incomplete UTF-8 sequences.

    Ids the tokenizer does not know (random-weight presets have larger vocabularies than the
    tokenizer they borrow) are shown as <id>.
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.size = len(tokenizer)
        self.ids: list[int] = []
        self.prefix = 0  # ids[prefix:read] were already shown; decoding from `prefix` keeps context
        self.read = 0

    def decode(self, ids: list[int]) -> str:
        """Decode a whole list (unknown ids as <id>)."""
        parts, run = [], []
        for i in ids:
            if i < self.size:
                run.append(i)
                continue
            if run:
                parts.append(self.tokenizer.decode(run))
                run = []
            parts.append(f"<{i}>")
        if run:
            parts.append(self.tokenizer.decode(run))
        return "".join(parts)

    def push(self, token: int) -> str:
        """Add one token; return the text that became printable (constant work per token)."""
        self.ids.append(token)
        shown = self.decode(self.ids[self.prefix:self.read])
        text = self.decode(self.ids[self.prefix:])
        if len(text) <= len(shown) or text.endswith("\ufffd"):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return text[len(shown):]


@dataclass(frozen=True)
class Workload:
    """A run's token work: this process's prompt rows (B, T), the evaluation windows, a length warning."""

    prompt_ids: list[list[int]]
    windows: EvalWindows | None
    warning: str | None


def plan_workload(config: RunConfig, tokenizer: Any, model_config: Any, accuracy: bool,
                  my_rows: Callable[[list[list[int]]], list[list[int]]]) -> Workload:
    """Prompts and (when `accuracy`) held-out windows for `config`; ConfigError when they do not fit the model."""
    text = text_config(model_config)
    max_positions = getattr(text, "max_position_embeddings", None) or 1 << 20
    rows = my_rows(build_prompts(config, tokenizer, text.vocab_size))
    total = len(rows[0]) + config.max_new_tokens
    if total > max_positions:
        raise ConfigError(f"prompt ({len(rows[0])} tokens) + max_new_tokens ({config.max_new_tokens}) "
                          f"= {total} exceeds the model's context of {max_positions} tokens")
    windows = (make_windows(heldout_ids(tokenizer), min(config.eval_context, max_positions), config.eval_tokens)
               if accuracy else None)
    return Workload(rows, windows, tokenizer_limit_warning(tokenizer, total, max_positions))
