"""Real architectures with random weights: the published shapes, for speed and memory studies only."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Preset:
    """A named architecture: the transformers config class and its keyword arguments."""

    name: str
    config_class: str  # name in transformers, e.g. "LlamaConfig"
    kwargs: tuple[tuple[str, Any], ...]
    about: str

    def make_config(self) -> Any:
        """Build the transformers config object."""
        import transformers

        return getattr(transformers, self.config_class)(**dict(self.kwargs))


def _p(name: str, config_class: str, about: str, **kwargs: Any) -> Preset:
    return Preset(name, config_class, tuple(sorted(kwargs.items())), about)


PRESETS: dict[str, Preset] = {p.name: p for p in (
    _p("llama-124m", "LlamaConfig", "Llama block, GPT-2-small size: hidden 768, 12 layers, 12 heads, "
       "MLP 2048, tied embeddings, GPT-2 vocabulary (124 M parameters).",
       vocab_size=50257, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
       num_attention_heads=12, num_key_value_heads=12, max_position_embeddings=2048,
       tie_word_embeddings=True, rms_norm_eps=1e-5),
    _p("gpt2-124m", "GPT2Config", "GPT-2 small: hidden 768, 12 layers, 12 heads, learned positions.",
       vocab_size=50257, n_embd=768, n_layer=12, n_head=12, n_positions=1024),
    _p("smollm2-135m", "LlamaConfig", "SmolLM2-135M: hidden 576, 30 layers, 9 heads / 3 KV heads, "
       "MLP 1536, tied embeddings.",
       vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
       num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
       tie_word_embeddings=True, rms_norm_eps=1e-5, rope_theta=100000.0),
    _p("qwen2.5-0.5b", "Qwen2Config", "Qwen2.5-0.5B: hidden 896, 24 layers, 14 heads / 2 KV heads, "
       "MLP 4864, tied embeddings, 151 936-token vocabulary.",
       vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
       num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
       tie_word_embeddings=True, rms_norm_eps=1e-6, rope_theta=1000000.0),
    _p("llama-3.2-1b", "LlamaConfig", "Llama-3.2-1B: hidden 2048, 16 layers, 32 heads / 8 KV heads, "
       "MLP 8192, tied embeddings, 128 256-token vocabulary.",
       vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
       num_attention_heads=32, num_key_value_heads=8, head_dim=64, max_position_embeddings=131072,
       tie_word_embeddings=True, rms_norm_eps=1e-5, rope_theta=500000.0,
       rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                     "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
    _p("llama-3.1-8b", "LlamaConfig", "Llama-3.1-8B: hidden 4096, 32 layers, 32 heads / 8 KV heads, MLP 14336, "
       "untied embeddings, 128 256-token vocabulary (8.0 B parameters: 16 GB in bf16, about 5.7 GB with its "
       "block layers in nf4, quantized while loading).",
       vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
       num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=131072,
       tie_word_embeddings=False, rms_norm_eps=1e-5, rope_theta=500000.0,
       rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                     "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
)}
