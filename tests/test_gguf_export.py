"""The GGUF writer, its tokenizer, the GGUF cache and llama.cpp's quantizer (issue 14, items 1-2)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

gguf = pytest.importorskip("gguf")

from workbench.engines import gguf_cache, gguf_export, gguf_vocab  # noqa: E402
from workbench.engines.gguf_export import (ExportStopped, export_problem, gguf_tensor_bytes,  # noqa: E402
                                           write_gguf)
from workbench.errors import ConfigError, RunFailed  # noqa: E402
from workbench.models.presets import PRESETS  # noqa: E402

TIED = ("token_embd.weight", "output_norm.weight")


def _field(reader, key: str):
    field = reader.get_field(key)
    return None if field is None else field.contents()


def _small_llama(**changes):
    """A small random Llama (the tiny tokenizer's 4096 ids fit): preset-like shapes at a test's size."""
    from transformers import LlamaConfig, LlamaForCausalLM

    kwargs = dict(vocab_size=4096, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True, rms_norm_eps=1e-5)
    kwargs.update(changes)
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**kwargs)).eval()


@pytest.fixture(scope="module")
def tiny_f32(tiny, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("gguf") / "tiny-f32.gguf"
    write_gguf(tiny.model, tiny.tokenizer, path, dtype="fp32", name="tiny")
    return path


def test_tiny_f32_metadata(tiny_f32):
    r = gguf.GGUFReader(tiny_f32)
    expect = {"general.architecture": "llama", "general.name": "tiny", "general.file_type": 0,
              "llama.block_count": 6, "llama.context_length": 1024, "llama.embedding_length": 256,
              "llama.feed_forward_length": 768, "llama.attention.head_count": 8,
              "llama.attention.head_count_kv": 8, "llama.attention.key_length": 32, "llama.rope.dimension_count": 32,
              "llama.rope.freq_base": 10000.0, "llama.vocab_size": 4096, "tokenizer.ggml.model": "gpt2",
              "tokenizer.ggml.pre": "gpt-2", "tokenizer.ggml.bos_token_id": 0, "tokenizer.ggml.eos_token_id": 0,
              "tokenizer.ggml.padding_token_id": 0, "tokenizer.ggml.add_bos_token": False}
    assert {k: _field(r, k) for k in expect} == expect
    assert _field(r, "llama.attention.layer_norm_rms_epsilon") == pytest.approx(1e-5)


def test_tiny_f32_tensors_and_permuted_qk(tiny, tiny_f32):
    r = gguf.GGUFReader(tiny_f32)
    tensors = {t.name: t for t in r.tensors}
    assert "output.weight" not in tensors  # tied embeddings: llama.cpp reuses token_embd
    assert set(TIED) <= set(tensors) and len(tensors) == 2 + 6 * 9
    assert all(t.tensor_type == gguf.GGMLQuantizationType.F32 for t in r.tensors)
    state = tiny.model.state_dict()
    hd = 32
    order = [h * hd + i + half for h in range(8) for i in range(hd // 2) for half in (0, hd // 2)]
    for i in (0, 5):
        for proj in ("q", "k"):
            hf = state[f"model.layers.{i}.self_attn.{proj}_proj.weight"]
            got = torch.from_numpy(tensors[f"blk.{i}.attn_{proj}.weight"].data.copy())
            assert torch.equal(got, hf[order])  # halves (rotate_half) -> interleaved pairs, head by head
        v = torch.from_numpy(tensors[f"blk.{i}.attn_v.weight"].data.copy())
        assert torch.equal(v, state[f"model.layers.{i}.self_attn.v_proj.weight"])
    assert torch.equal(torch.from_numpy(tensors["token_embd.weight"].data.copy()), state["model.embed_tokens.weight"])
    assert gguf_tensor_bytes(tiny_f32) == sum(v.numel() * 4 for k, v in state.items() if k != "lm_head.weight")


def test_the_header_reader_agrees_with_gguf_and_catches_truncation(tiny_f32, tmp_path):
    layout = gguf_cache.read_layout(tiny_f32)
    r = gguf.GGUFReader(tiny_f32)
    assert layout.tensor_bytes == {t.name: int(t.n_bytes) for t in r.tensors}
    assert layout.metadata["llama.block_count"] == 6 and layout.metadata["tokenizer.ggml.pre"] == "gpt-2"
    assert "tokenizer.ggml.tokens" in layout.metadata  # arrays are skipped, their keys kept
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(tiny_f32.read_bytes()[:-1000])
    with pytest.raises(ValueError, match="runs past the end"):
        gguf_cache.read_layout(cut)
    cut.write_bytes(tiny_f32.read_bytes()[:5000])
    with pytest.raises(ValueError, match="ends inside its header"):
        gguf_cache.read_layout(cut)


def test_tiny_vocabulary_goes_in_as_it_is(tiny, tiny_f32):
    r = gguf.GGUFReader(tiny_f32)
    tokens = _field(r, "tokenizer.ggml.tokens")
    vocab = tiny.tokenizer.get_vocab()
    assert tokens == sorted(vocab, key=vocab.get)
    types = _field(r, "tokenizer.ggml.token_type")
    assert types[0] == gguf.TokenType.CONTROL and set(types[1:]) == {gguf.TokenType.NORMAL}
    spec = json.loads((Path(tiny.source.location) / "tokenizer.json").read_text())
    assert _field(r, "tokenizer.ggml.merges") == [" ".join(m) for m in spec["model"]["merges"]]


def test_a_larger_vocabulary_is_padded_with_unused_tokens(tiny, tmp_path):
    """Presets borrow the 4096-token reference tokenizer with more embeddings (GPT-2's 50257; 6000 here, faster)."""
    model = _small_llama(vocab_size=6000, hidden_size=32, intermediate_size=64, num_hidden_layers=1)
    write_gguf(model, tiny.tokenizer, tmp_path / "p.gguf", dtype="fp32", name="preset")
    r = gguf.GGUFReader(tmp_path / "p.gguf")
    tokens, types = _field(r, "tokenizer.ggml.tokens"), _field(r, "tokenizer.ggml.token_type")
    assert len(tokens) == len(types) == 6000 == _field(r, "llama.vocab_size")
    assert tokens[4096] == "[PAD4096]" and tokens[-1] == "[PAD5999]"
    assert set(types[4096:]) == {gguf.TokenType.UNUSED} and gguf.TokenType.UNUSED not in types[:4096]
    assert next(t for t in r.tensors if t.name == "token_embd.weight").data.shape == (6000, 32)


def _small(arch: str):
    """A small random model of each supported architecture (GQA: 4 heads, 2 KV heads)."""
    import transformers

    if arch == "llama":
        return _small_llama()
    kwargs = dict(vocab_size=4096, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=arch == "qwen2")
    config = getattr(transformers, f"{arch.capitalize()}Config")(**kwargs)
    torch.manual_seed(0)
    model = getattr(transformers, f"{arch.capitalize()}ForCausalLM")(config).eval()
    if arch == "qwen2":  # its q/k/v biases start at zero: make them count
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                torch.nn.init.normal_(proj.bias, std=0.5)
    return model


@pytest.mark.parametrize("arch", ["mistral", "qwen2"])
def test_mistral_and_qwen2_layouts(arch, tiny, tmp_path):
    model = _small(arch)
    write_gguf(model, tiny.tokenizer, tmp_path / "m.gguf", dtype="fp32", name=arch)
    r = gguf.GGUFReader(tmp_path / "m.gguf")
    tensors = {t.name: torch.from_numpy(t.data.copy()) for t in r.tensors}
    assert _field(r, "general.architecture") == gguf_export.ARCHITECTURES[type(model).__name__]
    q = model.model.layers[0].self_attn.q_proj
    if arch == "qwen2":  # NEOX rope in llama.cpp too: written as is, biases included, tied output
        assert torch.equal(tensors["blk.0.attn_q.weight"], q.weight)
        assert torch.equal(tensors["blk.0.attn_q.bias"], q.bias)
        assert "output.weight" not in tensors
    else:  # Mistral is written as llama: q re-ordered, untied output kept
        assert not torch.equal(tensors["blk.0.attn_q.weight"], q.weight)
        assert torch.equal(tensors["output.weight"], model.lm_head.weight)


def test_fp16_and_bf16_keep_norms_in_f32(tmp_path, tiny):
    model = _small_llama()
    for dtype, qtype, torch_dtype in (("fp16", "F16", torch.float16), ("bf16", "BF16", torch.bfloat16)):
        write_gguf(model, tiny.tokenizer, tmp_path / f"{dtype}.gguf", dtype=dtype, name="small")
        r = gguf.GGUFReader(tmp_path / f"{dtype}.gguf")
        types = {t.name: t.tensor_type.name for t in r.tensors}
        assert types["blk.0.attn_norm.weight"] == types["output_norm.weight"] == "F32"
        assert types["blk.1.ffn_down.weight"] == types["token_embd.weight"] == qtype
        down = next(t for t in r.tensors if t.name == "blk.1.ffn_down.weight")
        raw = torch.from_numpy(down.data.copy().view("int16" if dtype == "bf16" else "float16"))
        got = raw.view(torch.bfloat16) if dtype == "bf16" else raw
        assert torch.equal(got.reshape(64, 128), model.model.layers[1].mlp.down_proj.weight.to(torch_dtype))
    assert _field(gguf.GGUFReader(tmp_path / "bf16.gguf"), "general.file_type") == gguf.LlamaFileType.MOSTLY_BF16


def test_export_problem_names_the_supported_architectures(tiny):
    gpt2 = export_problem(PRESETS["gpt2-124m"].make_config())
    assert gpt2 and "GPT2" in gpt2 and all(a in gpt2 for a in gguf_export.ARCHITECTURES)
    from transformers import PretrainedConfig

    made_up = export_problem(PretrainedConfig(architectures=["FooForCausalLM"]))
    assert made_up and "FooForCausalLM" in made_up and "Qwen2ForCausalLM" in made_up
    assert export_problem(tiny.model.config) is None
    for name in ("llama-124m", "smollm2-135m", "qwen2.5-0.5b", "llama-3.2-1b"):
        assert export_problem(PRESETS[name].make_config()) is None, name


def test_export_problem_refuses_rope_scaling_it_cannot_write():
    from transformers import LlamaConfig, Qwen2Config

    yarn = LlamaConfig(rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 2048})
    assert "'yarn'" in export_problem(yarn)
    llama3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 8192}
    assert "'llama3'" in export_problem(Qwen2Config(rope_scaling=llama3))
    pruned = Qwen2Config(hidden_size=64, num_attention_heads=4, head_dim=8)
    assert "heads × head size" in export_problem(pruned)
    assert "sliding-window" in export_problem(Qwen2Config(use_sliding_window=True))
    assert "gelu" in export_problem(LlamaConfig(hidden_act="gelu"))


def test_bad_settings_are_refused_before_writing(tiny, tmp_path):
    with pytest.raises(ConfigError, match="unknown GGUF export dtype 'int8'"):
        write_gguf(tiny.model, tiny.tokenizer, tmp_path / "x.gguf", dtype="int8", name="x")
    with pytest.raises(ConfigError, match="ids up to 4095, beyond the model's 1000 embeddings"):
        write_gguf(_small_llama(vocab_size=1000), tiny.tokenizer, tmp_path / "x.gguf", dtype="fp32", name="x")
    assert list(tmp_path.iterdir()) == []


def test_llama3_rope_becomes_rope_freqs_that_reproduce_transformers(tiny, tmp_path):
    scaling = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}
    model = _small_llama(rope_theta=500000.0, rope_scaling=scaling, head_dim=32)
    write_gguf(model, tiny.tokenizer, tmp_path / "l3.gguf", dtype="fp32", name="l3")
    freqs = next(t for t in gguf.GGUFReader(tmp_path / "l3.gguf").tensors if t.name == "rope_freqs.weight")
    factors = torch.from_numpy(freqs.data.copy()).double()
    plain = 1.0 / 500000.0 ** (torch.arange(0, 32, 2, dtype=torch.float64) / 32)
    hf = model.model.rotary_emb.inv_freq.double()
    assert torch.allclose(plain / factors, hf, rtol=1e-5) and factors.max() == 32.0 and factors.min() == 1.0


def test_layers_of_different_sizes_are_refused_before_writing(tiny, tmp_path):
    model = _small_llama()
    model.model.layers[1].mlp.gate_proj = torch.nn.Linear(64, 96, bias=False)
    with pytest.raises(ConfigError, match="layer 1's gate_proj has 96 rows"):
        write_gguf(model, tiny.tokenizer, tmp_path / "x.gguf", dtype="fp32", name="x")
    assert list(tmp_path.iterdir()) == []


def test_structured_pruning_shapes_are_written(tiny, tmp_path):
    """Structured pruning keeps every layer the same size but head_dim × heads < hidden: key_length says so."""
    model = _small_llama(num_attention_heads=2, num_key_value_heads=1, head_dim=16)  # 2 × 16 = 32 < 64
    write_gguf(model, tiny.tokenizer, tmp_path / "s.gguf", dtype="fp32", name="s")
    r = gguf.GGUFReader(tmp_path / "s.gguf")
    assert _field(r, "llama.attention.key_length") == 16 and _field(r, "llama.embedding_length") == 64
    assert next(t for t in r.tensors if t.name == "blk.0.attn_q.weight").data.shape == (32, 64)


def test_stop_mid_export_leaves_nothing(tiny, tmp_path):
    calls = []

    def stop() -> bool:
        calls.append(1)
        return len(calls) > 3

    with pytest.raises(ExportStopped):
        write_gguf(tiny.model, tiny.tokenizer, tmp_path / "t.gguf", dtype="fp32", name="tiny", stop_requested=stop)
    assert len(calls) == 4 and list(tmp_path.iterdir()) == []


def test_an_error_mid_export_leaves_nothing(tiny, tmp_path, monkeypatch):
    real, seen = gguf_export._Tensor.array, []

    def failing(self):
        seen.append(self.name)
        if len(seen) == 5:
            raise OSError("No space left on device")
        return real(self)

    monkeypatch.setattr(gguf_export._Tensor, "array", failing)
    with pytest.raises(OSError, match="No space"):
        write_gguf(tiny.model, tiny.tokenizer, tmp_path / "t.gguf", dtype="fp32", name="tiny")
    assert list(tmp_path.iterdir()) == []


def test_tokenizers_that_are_not_byte_level_bpe_are_refused(tiny, tmp_path):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    word_level = Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    word = PreTrainedTokenizerFast(tokenizer_object=word_level)
    why = gguf_vocab.tokenizer_kind_problem(word)
    assert why and "WordLevel" in why and "byte-level BPE" in why and "SentencePiece-style" in why
    plain_bpe = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.BPE({"a": 0, "<unk>": 1}, [],
                                                                              unk_token="<unk>")))
    assert "neither" in gguf_vocab.tokenizer_kind_problem(plain_bpe)
    assert "slow Python tokenizer" in gguf_vocab.tokenizer_kind_problem(object())
    with pytest.raises(ConfigError, match="byte-level BPE"):
        write_gguf(_small_llama(), word, tmp_path / "w.gguf", dtype="fp32", name="w")
    assert gguf_vocab.tokenizer_kind_problem(tiny.tokenizer) is None


@pytest.fixture(scope="module")
def spm_tokenizer():
    """A SentencePiece-style BPE (Llama 2's tokenizer.json layout: ▁ for spaces, byte fallback), trained here."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from workbench.textio import heldout_text

    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    tok.pre_tokenizer = pre_tokenizers.Split("\u2581", behavior="merged_with_next")  # pieces never span a space
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    text = heldout_text()[:100_000].replace("<|endoftext|>", "\n")  # a learnt "<|endoftext|>" piece would be
    # taken by llama.cpp for the end-of-text control token (it detects those by their text)
    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    tok.train_from_iterator([text[i:i + 2000] for i in range(0, len(text), 2000)],
                            trainers.BpeTrainer(vocab_size=1000, special_tokens=specials, show_progress=False))
    tok.pre_tokenizer = None  # as Llama 2's tokenizer.json: the normalizer alone
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])  # adds BOS
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def test_a_sentencepiece_style_tokenizer_is_written_with_scores(spm_tokenizer, tmp_path):
    write_gguf(_small_llama(vocab_size=1000), spm_tokenizer, tmp_path / "spm.gguf", dtype="fp32", name="spm")
    r = gguf.GGUFReader(tmp_path / "spm.gguf")
    assert _field(r, "tokenizer.ggml.model") == "llama" and _field(r, "tokenizer.ggml.add_space_prefix") is True
    tokens, types = _field(r, "tokenizer.ggml.tokens"), _field(r, "tokenizer.ggml.token_type")
    scores = _field(r, "tokenizer.ggml.scores")
    byte = tokens.index("<0x41>")
    assert types[byte] == gguf.TokenType.BYTE and types[0] == gguf.TokenType.UNKNOWN
    assert types[1] == types[2] == gguf.TokenType.CONTROL
    merges = json.loads(spm_tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    first, tenth = "".join(merges[0]), "".join(merges[9])
    assert scores[tokens.index(first)] == 0.0 and scores[tokens.index(tenth)] == -9.0  # merge rank order
    assert scores[byte] == -len(merges)
    assert _field(r, "tokenizer.ggml.bos_token_id") == 1 and _field(r, "tokenizer.ggml.unknown_token_id") == 0
    assert _field(r, "tokenizer.ggml.add_bos_token") is True and _field(r, "tokenizer.ggml.add_eos_token") is False


def test_pre_tokenizers_map_to_llama_cpp_names():
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "use_regex": False}
    for regex, name in ((r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                         r"\s*[\r\n]+|\s+(?!\S)|\s+", "qwen2"),
                        (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                         r"\s*[\r\n]+|\s+(?!\S)|\s+", "llama-bpe"),
                        (r"x+", "gpt-2")):
        spec = {"pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated"}, byte_level]}}
        assert gguf_vocab.pre_tokenizer_name(spec) == name
    digits = {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True}, byte_level]}
    assert gguf_vocab.pre_tokenizer_name({"pre_tokenizer": digits}) == "smollm"
    assert gguf_vocab.pre_tokenizer_name({"pre_tokenizer": byte_level}) == "gpt-2"


# ---- the cache -------------------------------------------------------------------------------------------

def _tiny_gguf(path: Path, value: int = 1) -> None:
    w = gguf.GGUFWriter(path, "llama")
    w.add_uint32("test.value", value)
    w.add_tensor("t", torch.arange(64, dtype=torch.float32).numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture
def cache(monkeypatch, tmp_path):
    monkeypatch.setenv("WORKBENCH_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(gguf_cache, "_verified", {})
    builds: list[Path] = []

    def build(path: Path) -> None:
        builds.append(path)
        _tiny_gguf(path, len(builds))

    return tmp_path / "gguf", build, builds


def test_a_second_call_does_not_rebuild(cache):
    folder, build, builds = cache
    messages: list[str] = []
    path = gguf_cache.cached_gguf("m-fp32", build, on_progress=messages.append)
    assert path == folder / "m-fp32.gguf" and len(builds) == 1 and messages == ["writing m-fp32.gguf"]
    assert json.loads((folder / "m-fp32.gguf.json").read_text())["size"] == path.stat().st_size
    gguf_cache._verified.clear()  # as a new process: the digest is checked, not remembered
    assert gguf_cache.cached_gguf("m-fp32", build) == path and len(builds) == 1
    assert sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")) == ["m-fp32.gguf", "m-fp32.gguf.json"]
    assert not [p for p in folder.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize("damage", ["flip", "truncate", "sidecar", "header"])
def test_a_corrupt_cached_file_is_rebuilt(cache, caplog, damage):
    folder, build, builds = cache
    path = gguf_cache.cached_gguf("m", build)
    gguf_cache._verified.clear()
    data = bytearray(path.read_bytes())
    if damage == "flip":
        data[-1] ^= 0xFF
    elif damage == "truncate":
        data = data[:-7]
    elif damage == "header":  # a bad header recorded as good (written by a broken build): still not trusted
        data[:4] = b"XXXX"
        side = folder / "m.gguf.json"
        side.write_text(json.dumps({"size": len(data), "sha256": __import__("hashlib").sha256(data).hexdigest()}))
    path.write_bytes(bytes(data))
    if damage == "sidecar":
        (folder / "m.gguf.json").write_text("{not json")
    with caplog.at_level(logging.WARNING, logger=gguf_cache.__name__):
        assert gguf_cache.cached_gguf("m", build) == path
    assert len(builds) == 2 and _field(gguf.GGUFReader(path), "test.value") == 2
    assert any(str(path) in r.getMessage() and "rebuilding" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("interrupt", [KeyboardInterrupt, ExportStopped])
def test_an_interrupted_build_leaves_nothing(cache, interrupt):
    folder, _, _ = cache

    def half(path: Path) -> None:
        path.write_bytes(b"GGUF half written")
        raise interrupt("stopped")

    with pytest.raises(interrupt):
        gguf_cache.cached_gguf("m", half)
    assert [p.name for p in folder.iterdir() if not p.name.endswith(".lock")] == []


def test_a_build_that_writes_no_gguf_is_not_cached(cache):
    folder, _, _ = cache
    with pytest.raises(Exception, match="not readable"):
        gguf_cache.cached_gguf("m", lambda path: path.write_bytes(b"not a gguf file at all"))
    assert [p.name for p in folder.iterdir() if not p.name.endswith(".lock")] == []


def test_concurrent_builds_of_one_key_build_it_once(cache):
    """Two dashboard kernels asking for the same export at once: one builds, the other waits and reuses it."""
    import threading
    import time

    folder, build, builds = cache

    def slow(path: Path) -> None:
        time.sleep(0.3)
        build(path)

    paths: list[Path] = []
    threads = [threading.Thread(target=lambda: paths.append(gguf_cache.cached_gguf("m", slow))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(builds) == 1 and paths == [folder / "m.gguf"] * 2
    assert gguf_cache.verify_problem(folder / "m.gguf") is None


def test_cache_keys_must_be_file_names(cache):
    with pytest.raises(ValueError, match="cache key"):
        gguf_cache.cached_gguf("../escape", cache[1])


def test_quant_problem_lists_valid_types():
    assert all(gguf_cache.quant_problem(t) is None for t in gguf_cache.GGUF_TYPES)
    why = gguf_cache.quant_problem("Q9_9")
    assert "Q9_9" in why and all(t in why for t in gguf_cache.GGUF_TYPES)
    assert "importance matrix" in gguf_cache.quant_problem("IQ2_XXS")
    with pytest.raises(ConfigError, match="unknown GGUF type"):
        gguf_cache.quantize_gguf(Path("a"), Path("b"), "q8", 1)


# ---- with llama.cpp --------------------------------------------------------------------------------------

def test_llama_cpp_tokenizes_the_held_out_text_like_the_model(tiny, tiny_f32):
    pytest.importorskip("llama_cpp")
    from workbench.textio import heldout_text

    assert gguf_export.tokenizer_problem(tiny_f32, tiny.tokenizer, heldout_text()) is None


def test_a_wrong_pre_tokenizer_is_reported(tiny, tmp_path, monkeypatch):
    pytest.importorskip("llama_cpp")
    monkeypatch.setattr(gguf_vocab, "pre_tokenizer_name", lambda spec: "deepseek-coder")
    write_gguf(tiny.model, tiny.tokenizer, tmp_path / "w.gguf", dtype="fp32", name="tiny")
    why = gguf_export.tokenizer_problem(tmp_path / "w.gguf", tiny.tokenizer, "In 1999 there were 12345 apples.")
    assert why and "'deepseek-coder'" in why and "differently" in why


def _llama_logits(path: Path, ids: list[int]) -> torch.Tensor:
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, n_batch=64, logits_all=True, n_threads=1, verbose=False)
    try:
        llm.eval(ids)
        return torch.tensor(llm.scores[:len(ids)].copy())
    finally:
        llm.close()


def test_a_failed_quantization_says_so_and_leaves_nothing(tmp_path):
    pytest.importorskip("llama_cpp")
    src = tmp_path / "bad.gguf"
    src.write_bytes(b"GGUF" + bytes(60))
    with pytest.raises(RunFailed, match="could not quantize bad.gguf to Q4_0"):
        gguf_cache.quantize_gguf(src, tmp_path / "q.gguf", "Q4_0", threads=1)
    assert [p.name for p in tmp_path.iterdir()] == ["bad.gguf"]


def test_f32_gguf_logits_match_pytorch(tiny, tiny_f32):
    pytest.importorskip("llama_cpp")
    ids = tiny.tokenizer("The cat sat on the mat, and then it went to sleep.", add_special_tokens=False)["input_ids"]
    with torch.inference_mode():
        want = tiny.model(torch.tensor([ids])).logits[0].float()
    got = _llama_logits(tiny_f32, ids)
    assert (got - want).abs().max().item() < 2e-3 * want.abs().max().item()


@pytest.mark.parametrize("arch", ["llama", "llama3-rope", "linear-rope", "pruned-heads", "mistral", "qwen2"])
def test_f32_gguf_logits_match_pytorch_for_each_layout(arch, tiny, tmp_path):
    """GQA (4 heads, 2 KV heads) K re-ordering, Llama 3's rope_freqs, heads × head size < hidden (structured
    pruning), Mistral's untied output, Qwen2's biases."""
    pytest.importorskip("llama_cpp")
    if arch == "pruned-heads":
        model = _small_llama(num_attention_heads=2, num_key_value_heads=1, head_dim=16)
    elif arch == "linear-rope":
        model = _small_llama(rope_scaling={"rope_type": "linear", "factor": 4.0})
    elif arch == "llama3-rope":
        model = _small_llama(rope_theta=500000.0, head_dim=32, rope_scaling={
            "rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64})
    else:
        model = _small(arch)
    write_gguf(model, tiny.tokenizer, tmp_path / "m.gguf", dtype="fp32", name=arch)
    ids = list(range(5, 400, 13))  # 31 positions
    with torch.inference_mode():
        want = model(torch.tensor([ids])).logits[0].float()
    got = _llama_logits(tmp_path / "m.gguf", ids)
    assert (got - want).abs().max().item() < 2e-3 * want.abs().max().item()


def test_q8_0_quantization_of_tiny(tiny, tiny_f32, tmp_path):
    pytest.importorskip("llama_cpp")
    dst = tmp_path / "tiny-q8.gguf"
    gguf_cache.quantize_gguf(tiny_f32, dst, "Q8_0", threads=1)
    r = gguf.GGUFReader(dst)
    types = {t.name: t.tensor_type.name for t in r.tensors}
    assert types["blk.0.attn_q.weight"] == "Q8_0" and types["blk.0.attn_norm.weight"] == "F32"
    assert gguf_tensor_bytes(dst) < gguf_tensor_bytes(tiny_f32) / 3
    assert [p.name for p in tmp_path.iterdir()] == ["tiny-q8.gguf"]
    ids = tiny.tokenizer("The cat sat on the mat.", add_special_tokens=False)["input_ids"]
    assert _llama_logits(dst, ids).argmax(-1).tolist() == _llama_logits(tiny_f32, ids).argmax(-1).tolist()


def test_llama_cpp_tokenizes_like_a_sentencepiece_style_tokenizer(spm_tokenizer, tmp_path):
    pytest.importorskip("llama_cpp")
    from workbench.textio import heldout_text

    write_gguf(_small_llama(vocab_size=1000), spm_tokenizer, tmp_path / "spm.gguf", dtype="fp32", name="spm")
    assert gguf_export.tokenizer_problem(tmp_path / "spm.gguf", spm_tokenizer, heldout_text()) is None


@pytest.mark.parametrize("gguf_type", gguf_cache.GGUF_TYPES)
def test_every_offered_type_quantizes_tiny_without_an_importance_matrix(gguf_type, tiny_f32, tmp_path):
    llama_cpp = pytest.importorskip("llama_cpp")
    dst = tmp_path / f"{gguf_type}.gguf"
    gguf_cache.quantize_gguf(tiny_f32, dst, gguf_type, threads=1)
    layout = gguf_cache.read_layout(dst)
    assert layout.metadata["general.file_type"] == getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{gguf_type}")
    assert sum(layout.tensor_bytes.values()) < gguf_tensor_bytes(tiny_f32) / 3
    assert torch.isfinite(_llama_logits(dst, [5, 6, 7, 8])).all()
