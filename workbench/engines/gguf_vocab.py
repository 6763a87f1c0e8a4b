"""The tokenizer side of a GGUF file: a Hugging Face fast tokenizer written as llama.cpp's own, and the check
that llama.cpp then tokenizes text exactly as the original does.

Two kinds are written. A byte-level BPE (GPT-2 style: a `ByteLevel` pre-tokenizer or decoder, merges) becomes
`tokenizer.ggml.model = "gpt2"`; llama.cpp does not run a tokenizer's own pre-tokenizer regex but knows a fixed
set by name (`tokenizer.ggml.pre`), so the closest stock one is chosen (GPT-2's regex -> "gpt-2", Qwen2's ->
"qwen2", Llama 3's -> "llama-bpe", digits-then-GPT-2 -> "smollm"). A SentencePiece-style BPE (byte fallback,
spaces as "▁", Llama 2 / Mistral) becomes `"llama"`, whose merges are scores: a token's score is minus the
rank of the first merge that makes it, so llama.cpp merges in the order the tokenizer's merge list does.
Whether either is exact is a question for `tokenizer_problem`, which compares both on real text. This module
registers no engine; llama_cpp is imported only where it is used.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

# llama.cpp's token types (llama_token_type / gguf.TokenType)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
_BYTE_TOKEN = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")
_SPACE = "\u2581"  # ▁, SentencePiece's space
_GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_WORDS = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|"
_REST = r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_SPLIT_REGEXES = {  # the Split pre-tokenizer's pattern -> llama.cpp's name for the same regex
    _WORDS + r"\p{N}|" + _REST: "qwen2",
    _WORDS + r"\p{N}{1,3}|" + _REST: "llama-bpe",
    _GPT2_REGEX: "gpt-2",
}


def tokenizer_json(tokenizer: Any) -> dict[str, Any] | None:
    """The fast tokenizer's own definition (tokenizer.json as a dict), None for a slow (Python) tokenizer."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return None if backend is None else json.loads(backend.to_str())


def _parts(node: dict[str, Any] | None, key: str) -> list[dict[str, Any]]:
    """A pre-tokenizer / decoder and, for a Sequence, its members."""
    if not node:
        return []
    return [node, *node.get(key, [])] if node.get("type") == "Sequence" else [node]


def _byte_level(spec: dict[str, Any]) -> bool:
    """True for a byte-level BPE (GPT-2 family): BPE merges over a ByteLevel alphabet, no byte fallback."""
    model = spec.get("model") or {}
    kinds = {p.get("type") for p in _parts(spec.get("pre_tokenizer"), "pretokenizers")}
    kinds |= {p.get("type") for p in _parts(spec.get("decoder"), "decoders")}
    return model.get("type") == "BPE" and "ByteLevel" in kinds and not model.get("byte_fallback")


def _sentencepiece_like(spec: dict[str, Any]) -> bool:
    """True for a SentencePiece-style BPE: byte fallback, and spaces turned into ▁ (normalizer or Metaspace)."""
    model = spec.get("model") or {}
    norms = _parts(spec.get("normalizer"), "normalizers")
    metaspace = any(p.get("type") == "Metaspace" for p in _parts(spec.get("pre_tokenizer"), "pretokenizers"))
    replaces = any(p.get("type") == "Replace" and (p.get("content") == _SPACE) for p in norms)
    return model.get("type") == "BPE" and bool(model.get("byte_fallback")) and (metaspace or replaces)


def _adds_space_prefix(spec: dict[str, Any]) -> bool:
    """Whether a SentencePiece-style tokenizer puts ▁ before the text (Prepend normalizer, Metaspace prepend)."""
    norms = _parts(spec.get("normalizer"), "normalizers")
    pres = _parts(spec.get("pre_tokenizer"), "pretokenizers")
    return (any(p.get("type") == "Prepend" and p.get("prepend") == _SPACE for p in norms)
            or any(p.get("type") == "Metaspace" and p.get("prepend_scheme", "always") != "never" for p in pres))


def tokenizer_kind_problem(tokenizer: Any) -> str | None:
    """Why this tokenizer cannot be written into a GGUF file (one sentence), None when it can."""
    spec = tokenizer_json(tokenizer)
    if spec is None:
        return (f"the tokenizer {type(tokenizer).__name__} has no tokenizer.json (a slow Python tokenizer); the "
                "GGUF writer needs a fast tokenizer (a byte-level or SentencePiece-style BPE)")
    if not _byte_level(spec) and not _sentencepiece_like(spec):
        kind = (spec.get("model") or {}).get("type", "unknown")
        return (f"the tokenizer is a {kind} model that is neither a byte-level BPE (GPT-2, Llama 3, Qwen2 style) nor "
                "a SentencePiece-style BPE with byte fallback (Llama 2, Mistral), the two kinds the GGUF writer writes")
    return None


def pre_tokenizer_name(spec: dict[str, Any]) -> str:
    """llama.cpp's stock pre-tokenizer closest to this byte-level tokenizer's own."""
    parts = _parts(spec.get("pre_tokenizer"), "pretokenizers")
    kinds = [p.get("type") for p in parts if p.get("type") != "Sequence"]
    splits = [p for p in parts if p.get("type") == "Split"]
    if splits:
        pattern = (splits[0].get("pattern") or {}).get("Regex") or (splits[0].get("pattern") or {}).get("String")
        if pattern in _SPLIT_REGEXES:
            return _SPLIT_REGEXES[pattern]
        logger.warning("unknown pre-tokenizer regex %r: using llama.cpp's 'gpt-2' as the closest", pattern)
        return "gpt-2"
    if kinds and kinds[0] == "Digits" and "ByteLevel" in kinds:
        return "smollm"  # digits one by one, then GPT-2's regex
    if kinds != ["ByteLevel"]:
        logger.warning("pre-tokenizer %s: using llama.cpp's 'gpt-2' as the closest", " + ".join(map(str, kinds)))
    return "gpt-2"


def vocab_entries(tokenizer: Any, vocab_size: int, sentencepiece: bool = False) -> tuple[list[str], list[int]]:
    """Tokens in id order and their llama.cpp types; ids the tokenizer lacks up to `vocab_size` (a model's
    embedding rows beyond its tokenizer) become unused `[PAD{id}]` tokens."""
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    if by_id and max(by_id) >= vocab_size:
        raise ValueError(f"the tokenizer has ids up to {max(by_id)}, beyond the model's {vocab_size} embeddings")
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    tokens: list[str] = []
    types: list[int] = []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(UNUSED)
        elif sentencepiece and _BYTE_TOKEN.match(by_id[i]):
            tokens.append(by_id[i])
            types.append(BYTE)
        elif sentencepiece and i == tokenizer.unk_token_id:
            tokens.append(by_id[i])
            types.append(UNKNOWN)
        elif i in added:
            tokens.append(by_id[i])
            types.append(CONTROL if added[i].special else USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(NORMAL)
    return tokens, types


def merges(spec: dict[str, Any]) -> list[str]:
    """BPE merges as "left right" strings (tokenizer.json stores pairs or such strings)."""
    return [m if isinstance(m, str) else " ".join(m) for m in (spec.get("model") or {}).get("merges", [])]


def _adds(tokenizer: Any, token_id: int | None, first: bool) -> bool:
    """Whether the tokenizer adds this special token at the start (first) or end of every encoding."""
    if token_id is None:
        return False
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    if len(ids) == len(plain):
        return False
    return bool(ids) and ids[0 if first else -1] == token_id


def merge_scores(tokens: list[str], merge_list: list[str]) -> list[float]:
    """SentencePiece scores from BPE merges: minus the rank of the first merge that makes each token (those no
    merge makes, single characters and specials, score below every merge)."""
    rank: dict[str, int] = {}
    for r, merge in enumerate(merge_list):
        rank.setdefault(merge.replace(" ", "", 1), r)
    last = len(merge_list)
    return [-float(rank.get(t, last)) for t in tokens]


def add_vocab(writer: Any, tokenizer: Any, vocab_size: int) -> None:
    """Write the tokenizer into a GGUFWriter: model, pre-tokenizer, tokens, types, merges or scores, special ids."""
    spec = tokenizer_json(tokenizer)
    assert spec is not None and tokenizer_kind_problem(tokenizer) is None, "checked before writing"
    sentencepiece = not _byte_level(spec)
    tokens, types = vocab_entries(tokenizer, vocab_size, sentencepiece)
    if sentencepiece:
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_token_scores(merge_scores(tokens, merges(spec)))
        writer.add_add_space_prefix(_adds_space_prefix(spec))
    else:
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre_tokenizer_name(spec))
        writer.add_token_merges(merges(spec))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    for key, value in (("bos", tokenizer.bos_token_id), ("eos", tokenizer.eos_token_id),
                       ("pad", tokenizer.pad_token_id), ("unk", tokenizer.unk_token_id)):
        if value is not None and 0 <= value < vocab_size:
            getattr(writer, f"add_{key}_token_id")(value)
    writer.add_add_bos_token(_adds(tokenizer, tokenizer.bos_token_id, first=True))
    writer.add_add_eos_token(_adds(tokenizer, tokenizer.eos_token_id, first=False))
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str) and template:
        writer.add_chat_template(template)


def _show(tokenizer: Any, ids: list[int]) -> str:
    """A few ids with their text, for a one-sentence difference report."""
    return repr(tokenizer.decode(ids)) + f" {ids}"


def llama_cpp_tokens(gguf_path: Path, text: str) -> list[int]:
    """llama.cpp's tokenization of `text` with the GGUF file's vocabulary alone (no BOS added; special tokens
    written in the text, such as <|endoftext|> between documents, parsed as the workbench's `encode` does)."""
    from workbench.engines.llamacpp_model import bindings
    from workbench.errors import RunFailed

    lib = bindings()
    params = lib.llama_model_default_params()
    params.vocab_only = True
    model = lib.llama_model_load_from_file(str(gguf_path).encode(), params)
    if not model:
        raise RunFailed(f"llama.cpp cannot read the vocabulary of {Path(gguf_path).name}")
    try:
        vocab, data = lib.llama_model_get_vocab(model), text.encode("utf-8")
        room = len(data) + 8
        out = (lib.llama_token * room)()
        n = lib.llama_tokenize(vocab, data, len(data), out, room, False, True)
        if n < 0:  # never more tokens than bytes, but llama.cpp says how many it needs
            room = -n
            out = (lib.llama_token * room)()
            n = lib.llama_tokenize(vocab, data, len(data), out, room, False, True)
        if n < 0:
            raise RunFailed(f"llama.cpp could not tokenize {len(data)} bytes with {Path(gguf_path).name}")
        return list(out[:n])
    finally:
        lib.llama_model_free(model)


def tokenizer_problem(gguf_path: Path, tokenizer: Any, text: str) -> str | None:
    """None when llama.cpp, reading the GGUF file's vocabulary, tokenizes `text` exactly as `tokenizer` does
    (no BOS, no special-token parsing); else one sentence saying where they first differ."""
    from workbench.textio import encode

    theirs, ours = llama_cpp_tokens(gguf_path, text), encode(tokenizer, text)
    if theirs == ours:
        return None
    at = next((i for i, (a, b) in enumerate(zip(theirs, ours)) if a != b), min(len(theirs), len(ours)))
    pre = _gguf_string(gguf_path, "tokenizer.ggml.pre")
    return (f"llama.cpp's tokenizer (pre-tokenizer {pre!r}) splits the text differently from the model's own at "
            f"token {at} of {len(ours)}: llama.cpp gives {_show(tokenizer, theirs[at:at + 4])}, the model "
            f"{_show(tokenizer, ours[at:at + 4])}")


def _gguf_string(path: Path, key: str) -> str | None:
    """One string value of a GGUF file's metadata (None when absent)."""
    from workbench.engines.gguf_cache import read_layout

    return read_layout(path).metadata.get(key)
