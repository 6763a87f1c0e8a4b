"""The `llamacpp` engine: the same model written as GGUF and run by llama.cpp (llama-cpp-python).

The loaded model (after any PyTorch pruning) is exported once to GGUF at the run's dtype and, with
`gguf:type=...`, quantized by llama.cpp's own quantizer; both files are cached under the model's fingerprint.
Decoding is llama.cpp's token-by-token greedy decode (batch 1, fixed length), each token timestamped by the
runner's clock; accuracy scores llama.cpp's logits of the same held-out windows against the same fp32
PyTorch baseline as every other run.
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from workbench.engines.base import Engine, EngineContext, Generation, register
from workbench.engines.llamacpp_model import Aborted, LlamaCppModel, bindings, supports_gpu
from workbench.errors import ConfigError
from workbench.measure.accuracy import EVAL_BATCH, EvalWindows
from workbench.measure.latency import TokenClock
from workbench.models.loader import kv_bytes_per_token
from workbench.models.sources import fingerprint, text_config
from workbench.result import ModelInfo, TechniqueRecord
from workbench.techniques.base import TechniqueConfig

KV_DTYPE = "fp16"  # llama.cpp's default K and V cache type
_EXPORT_FORMAT = 1  # bump when the writer's output changes: older cached files are not reused


def _unsupported_settings(cfg: Any) -> str | None:
    """A setting this engine cannot honour (one sentence), or None."""
    if cfg.batch_size > 1:
        return "it decodes batch 1 (one sequence); use --batch-size 1"
    if cfg.compile:
        return "--compile is PyTorch's compiler; llama.cpp is compiled ahead of time, drop --compile"
    if cfg.device_map or cfg.tensor_parallel > 1 or cfg.data_parallel > 1 or cfg.pipeline_parallel > 1:
        return "it runs in one process on one device (no device map, tensor, data or pipeline parallelism)"
    if cfg.kv_cache != "dynamic":
        return "its KV cache is llama.cpp's own (fp16, allocated for the whole context); use --kv-cache dynamic"
    return None


@register
class LlamaCppEngine(Engine):
    """A GGUF export of the model, decoded by llama.cpp one token at a time."""

    name = "llamacpp"

    def __init__(self, ctx: EngineContext) -> None:
        super().__init__(ctx)
        self.model: LlamaCppModel | None = None
        self.records: tuple[TechniqueRecord, ...] = ()
        self.model_info: ModelInfo | None = None
        self.gguf_path: Path | None = None
        self.tensor_bytes = self.embedding_bytes = 0
        self.n_ctx = 0

    @classmethod
    def refusal(cls, technique: type[TechniqueConfig]) -> str:
        return (f"{technique.name} changes PyTorch modules, which a GGUF file cannot hold; quantize with "
                "gguf:type=Q8_0 (or another GGUF type) instead")

    @property
    def gguf_type(self) -> str | None:
        return next((t.type for t in self.ctx.config.techniques if t.name == "gguf"), None)

    def check(self) -> None:
        """Settings, the architecture and llama-cpp-python itself, before the tokenizer loads."""
        from workbench.engines.gguf_export import export_problem

        super().check()
        cfg = self.ctx.config
        problem = _unsupported_settings(cfg) or export_problem(self.ctx.model_config)
        if problem:
            raise ConfigError(f"the llamacpp engine cannot run this: {problem}")
        bindings()  # ConfigError when llama-cpp-python is missing or broken
        if self.ctx.device.type == "cuda" and cfg.device != "auto" and not supports_gpu():
            raise ConfigError("this llama-cpp-python build has no GPU support; use --device cpu, or rebuild it with "
                              "CMAKE_ARGS=-DGGML_CUDA=on (see the README's llama.cpp section)")

    def plan(self, tokenizer: Any, prompt_ids: list[list[int]], windows: EvalWindows | None) -> None:
        """The context holds the prompt and every new token (and an evaluation window); the model's limit decides."""
        from workbench.engines.hf import check_memory

        super().plan(tokenizer, prompt_ids, windows)
        need = max(len(prompt_ids[0]) + self.ctx.config.max_new_tokens, windows.context if windows else 0)
        limit = getattr(text_config(self.ctx.model_config), "max_position_embeddings", None)
        if limit and need > limit:
            raise ConfigError(f"the prompt ({len(prompt_ids[0])} tokens) plus {self.ctx.config.max_new_tokens} new "
                              f"tokens need {need} positions, more than this model's context of {limit}")
        self.n_ctx = need
        check_memory(self.ctx, prompt_ids, windows)

    def _export_key(self) -> str:
        cfg, source = self.ctx.config, self.ctx.source
        pruning = [t.spec() for t in cfg.techniques if t.name != "gguf"]
        salt = json.dumps([_EXPORT_FORMAT, cfg.dtype, pruning, cfg.seed if source.random_weights else None])
        return f"{fingerprint(source)}-{cfg.dtype}-{hashlib.sha256(salt.encode()).hexdigest()[:12]}"

    def _export(self, tmp: Path) -> None:
        """Load the PyTorch model, apply its pruning, write the GGUF and check its tokenizer (nothing cached if not)."""
        from workbench.engines.gguf_export import tokenizer_problem, write_gguf
        from workbench.models.loader import load_model
        from workbench.techniques.apply import apply_techniques
        from workbench.textio import heldout_text

        cfg, ctx = self.ctx.config, self.ctx
        loaded = load_model(ctx.source, cfg.dtype, torch.device("cpu"), trust_remote_code=cfg.trust_remote_code,
                            seed=cfg.seed, allow_pickle=cfg.allow_pickle)
        pruning = tuple(t for t in cfg.techniques if t.name != "gguf")
        records = apply_techniques(loaded, cfg.replace(techniques=pruning), ctx.on_event) if pruning else ()
        write_gguf(loaded.model, self.tokenizer, tmp, dtype=cfg.dtype, name=ctx.source.display_name,
                   stop_requested=ctx.stop_requested)
        del loaded
        gc.collect()
        problem = tokenizer_problem(tmp, self.tokenizer, heldout_text())
        if problem:
            raise ConfigError(f"llama.cpp cannot reproduce this model's tokenizer: {problem}")
        _atomic_write(_records_path(self._export_key()), json.dumps([dataclasses.asdict(r) for r in records]))

    def _gguf(self) -> Path:
        """The cached GGUF for this run: the export, then (with gguf:type) its quantization."""
        from workbench.engines.gguf_cache import cached_gguf, quantize_gguf

        key, say = self._export_key(), lambda message: self.ctx.on_event(_stage(message))
        path = cached_gguf(key, self._export, on_progress=say)
        records_file = _records_path(key)
        if not records_file.exists():  # written with the export: a file without it is not trusted
            path.unlink(missing_ok=True)
            path = cached_gguf(key, self._export, on_progress=say)
        self.records = tuple(TechniqueRecord(**r) for r in json.loads(records_file.read_text()))
        gguf_type = self.gguf_type
        if gguf_type is None:
            return path
        threads = self.ctx.config.threads or torch.get_num_threads()
        quantized = cached_gguf(f"{key}-{gguf_type}", lambda tmp: quantize_gguf(path, tmp, gguf_type, threads),
                                on_progress=say)
        technique = next(t for t in self.ctx.config.techniques if t.name == "gguf")
        self.records += (TechniqueRecord(technique.name, technique.kind, technique.params(), False, technique.notes()),)
        return quantized

    def load(self) -> None:
        """The cached GGUF (exported and quantized first if needed), opened by llama.cpp; a stop ends the export."""
        from workbench.engines.gguf_export import ExportStopped, gguf_tensor_bytes

        cfg = self.ctx.config
        try:
            self.gguf_path = self._gguf()
        except ExportStopped:
            return  # nothing was cached; the runner sees the stop request and ends the run
        self.tensor_bytes = gguf_tensor_bytes(self.gguf_path)
        gpu_layers = -1 if self.ctx.device.type == "cuda" and supports_gpu() else 0
        self.model = LlamaCppModel(self.gguf_path, n_ctx=self.n_ctx, threads=cfg.threads or torch.get_num_threads(),
                                   gpu_layers=gpu_layers)
        text = text_config(self.ctx.model_config)
        tied = getattr(text, "tie_word_embeddings", getattr(self.ctx.model_config, "tie_word_embeddings", False))
        # an untied input embedding is only looked up (one row per token), not read whole each step
        self.embedding_bytes = 0 if tied else self._embedding_bytes()
        self.model_info = ModelInfo(
            name=self.ctx.source.display_name, params=self._params(), weight_bytes=self.tensor_bytes,
            random_weights=self.ctx.source.random_weights, dtype=cfg.dtype,
            device="cuda" if gpu_layers else "cpu", source=self.ctx.source.kind,
            architecture=f"GGUF {self.gguf_type or {'fp32': 'F32', 'fp16': 'F16', 'bf16': 'BF16'}[cfg.dtype]} "
                         f"({type(self.ctx.model_config).__name__.removesuffix('Config')})")

    def _params(self) -> int:
        return int(self.model.lib.llama_model_n_params(self.model.model))

    def _embedding_bytes(self) -> int:
        """Bytes of the input embedding table in the GGUF file."""
        from workbench.engines.gguf_cache import read_layout

        return read_layout(self.gguf_path).tensor_bytes.get("token_embd.weight", 0)

    def apply(self) -> tuple[TechniqueRecord, ...]:
        """The techniques were applied on the way to the GGUF file (pruning before export, then quantization)."""
        return self.records

    def info(self) -> ModelInfo:
        return self.model_info

    def generate(self, clock: TokenClock, *, want_cache: bool, interruptible: bool) -> Generation:
        """Exactly max_new_tokens greedy tokens for the one prompt row, each step to the clock."""
        m, n, prompt = self.model, self.ctx.config.max_new_tokens, self.prompt_ids[0]
        stop = self.ctx.stop_requested
        m.clear()
        m.stoppable(stop if interruptible else None)
        tokens: list[int] = []
        clock.begin()
        clock.put(torch.tensor(prompt))
        try:
            m.decode(prompt, 0, outputs=1)
            token = m.greedy()
            while True:
                tokens.append(token)
                clock.put(torch.tensor([token]))
                if len(tokens) == n or stop():
                    break
                token = m.step(token, len(prompt) + len(tokens) - 1)
        except Aborted:
            pass  # stopped inside a decode: the tokens before it are all there is
        finally:
            m.stoppable(None)
        timing = clock.timing(time.perf_counter())
        kv = kv_bytes_per_token(self.ctx.model_config, KV_DTYPE) * m.n_ctx if want_cache else None
        return Generation(timing, [tokens], kv)

    def logprobs(self, windows: EvalWindows) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """llama.cpp's logits at the scored positions of each window (one window per decode, fresh cache)."""
        s, m = windows.stride, self.model
        m.stoppable(self.ctx.stop_requested)
        try:
            for start in range(0, windows.ids.shape[0], EVAL_BATCH):
                rows = windows.ids[start:start + EVAL_BATCH]  # (B, C)
                logits = []
                for row in rows.tolist():
                    m.clear()
                    m.decode(row, 0, outputs=s + 1)
                    logits.append(torch.from_numpy(m.logits(s + 1)[:s]))
                yield torch.log_softmax(torch.stack(logits), dim=-1), rows[:, -s:]
        except Aborted:
            return
        finally:
            m.stoppable(None)

    def decode_consistency(self, prompt: list[int], generated: list[int]) -> float | None:
        """Share of the decoded tokens in the top 10 of llama.cpp's logits over the whole text in one decode."""
        if not generated:
            return None
        m = self.model
        m.clear()
        m.decode(list(prompt) + list(generated[:-1]), 0, outputs=len(generated))
        top = torch.from_numpy(m.logits(len(generated))).topk(min(10, m.n_vocab), dim=-1).indices
        return (top == torch.tensor(generated)[:, None]).any(dim=-1).float().mean().item()

    def bytes_per_step(self, prompt_tokens: int, new_tokens: int, kv_bytes: int | None) -> int:
        """Every GGUF tensor (an untied input embedding excepted) plus the K and V written so far, at the mean length."""
        kv_read = kv_bytes_per_token(self.ctx.model_config, KV_DTYPE) * (prompt_tokens + new_tokens / 2)
        return int(self.tensor_bytes - self.embedding_bytes + kv_read)

    def release(self) -> None:
        if self.model is not None:
            self.model.close()
            self.model = None
        gc.collect()


def _records_path(key: str) -> Path:
    """Where an export's technique records live, next to its cached file."""
    from workbench.paths import cache_dir

    folder = cache_dir() / "gguf"
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{key}.records.json"


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _stage(message: str) -> Any:
    from workbench.events import StageEvent

    return StageEvent("load", "progress", message, None, 0.0)


def prepared_gguf(config: Any) -> Path:
    """The cached GGUF file a run of `config` loads (exported and quantized now if it is not cached yet).

    For tools that time the same file outside the workbench: bench/engines.py's plain llama-cpp-python loop
    and llama.cpp's own llama-bench.
    """
    from workbench.events import never_stop, no_event
    from workbench.models.loader import load_tokenizer
    from workbench.models.sources import load_config, resolve

    source = resolve(config.model)
    model_config = load_config(source, config.trust_remote_code)
    engine = LlamaCppEngine(EngineContext(config, source, torch.device("cpu"), model_config, no_event, never_stop, {}))
    engine.check()
    engine.tokenizer = load_tokenizer(source, config.trust_remote_code)
    return engine._gguf()
