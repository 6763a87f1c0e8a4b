"""One GGUF model and one batch-1 context through llama-cpp-python's low-level API (`llama_cpp`).

The high-level `llama_cpp.Llama` copies every step's logits into a Python-side array and samples in Python;
here each step is one `llama_decode` of one token and a NumPy argmax over the logits llama.cpp already holds,
which is as close to llama.cpp's own `llama-bench` loop as Python gets. llama_cpp is imported on first use, so
the workbench imports (and explains itself) where llama-cpp-python is not installed.
"""

from __future__ import annotations

import ctypes
import logging
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from workbench.errors import ConfigError, RunFailed

logger = logging.getLogger(__name__)

INSTALL_HINT = ("`bash dev.sh setup` builds it for this CPU (several minutes, once), or `pip install "
                "llama-cpp-python` (see the README's llama.cpp section for the build flags, CUDA included)")
_init_lock = threading.Lock()
_initialized = False
_log_callback: Any = None  # kept alive: llama.cpp calls it from C


class Aborted(Exception):
    """llama_decode returned because the abort callback asked it to (a stop request)."""


def bindings() -> Any:
    """The `llama_cpp` module, its backend initialised once and its log routed to this module's logger."""
    global _initialized, _log_callback
    try:
        import llama_cpp
    except ImportError as e:  # also a missing shared library (OSError is wrapped by llama_cpp as RuntimeError)
        raise ConfigError(f"the llamacpp engine needs llama-cpp-python, which is not installed here ({e}); "
                          f"{INSTALL_HINT}") from None
    except (OSError, RuntimeError) as e:
        raise ConfigError(f"llama-cpp-python is installed but its library does not load ({str(e)[:160]}); "
                          f"rebuild it: {INSTALL_HINT}") from None
    with _init_lock:
        if not _initialized:
            def log(level: int, text: bytes, data: Any) -> None:
                logger.debug("llama.cpp: %s", text.decode("utf-8", "replace").rstrip())

            _log_callback = llama_cpp.llama_log_callback(log)
            llama_cpp.llama_log_set(_log_callback, ctypes.c_void_p(0))
            llama_cpp.llama_backend_init()
            _initialized = True
    return llama_cpp


def supports_gpu() -> bool:
    """Whether this llama-cpp-python build can offload layers to a GPU."""
    return bool(bindings().llama_supports_gpu_offload())


class LlamaCppModel:
    """A loaded GGUF with a context of `n_ctx` positions for one sequence; `decode` feeds tokens, logits read."""

    def __init__(self, path: Path, *, n_ctx: int, threads: int, gpu_layers: int = 0, n_ubatch: int = 512) -> None:
        lib = self.lib = bindings()
        self.model = self.ctx = self.batch = None
        mp = lib.llama_model_default_params()
        mp.n_gpu_layers = gpu_layers
        self.model = lib.llama_model_load_from_file(str(path).encode(), mp)
        if not self.model:
            raise RunFailed(f"llama.cpp could not load {path.name}; the file is re-exported on the next run")
        cp = lib.llama_context_default_params()
        # one llama_decode takes any sequence that fits the context (so the logits of its last outputs are all
        # in one call's output buffer); llama.cpp computes it in micro-batches of n_ubatch tokens
        self.n_batch = max(1, n_ctx)
        cp.n_ctx, cp.n_batch, cp.n_ubatch, cp.n_seq_max = n_ctx, self.n_batch, max(1, min(n_ubatch, n_ctx)), 1
        cp.n_threads = cp.n_threads_batch = threads
        cp.no_perf = True
        self.ctx = lib.llama_init_from_model(self.model, cp)
        if not self.ctx:
            self.close()
            raise RunFailed(f"llama.cpp could not create a context of {n_ctx} tokens for {path.name}")
        self.n_ctx = lib.llama_n_ctx(self.ctx)
        self.n_vocab = lib.llama_vocab_n_tokens(lib.llama_model_get_vocab(self.model))
        self.batch = lib.llama_batch_init(self.n_batch, 0, 1)
        self._abort: Any = None
        self._stop: Callable[[], bool] | None = None

    def stoppable(self, stop: Callable[[], bool] | None) -> None:
        """Check `stop` inside every llama_decode (between graph nodes), or never (None: no per-node Python call)."""
        lib = self.lib
        if stop is None:
            lib.llama_set_abort_callback(self.ctx, lib.ggml_abort_callback(0), None)
            self._abort = self._stop = None
            return
        self._stop = stop
        self._abort = lib.ggml_abort_callback(lambda data: bool(self._stop and self._stop()))
        lib.llama_set_abort_callback(self.ctx, self._abort, None)

    def clear(self) -> None:
        """Forget every cached position (the next decode starts a new sequence at position 0)."""
        self.lib.llama_memory_clear(self.lib.llama_get_memory(self.ctx), True)

    def decode(self, tokens: Sequence[int], start: int = 0, outputs: int = 1) -> None:
        """Feed `tokens` at positions start.., asking logits for the last `outputs` of them (read with `logits`)."""
        lib, b, n = self.lib, self.batch, len(tokens)
        if n > self.n_batch or start + n > self.n_ctx:  # the batch holds n_batch tokens, the cache n_ctx positions
            raise RunFailed(f"{n} tokens at position {start} do not fit the llama.cpp context of "
                            f"{min(self.n_ctx, self.n_batch)}")
        b.n_tokens = n
        for i, tok in enumerate(tokens):
            b.token[i], b.pos[i], b.n_seq_id[i] = tok, start + i, 1
            b.seq_id[i][0] = 0
            b.logits[i] = i >= n - outputs
        rc = lib.llama_decode(self.ctx, b)
        if rc == 2:
            raise Aborted
        if rc != 0:
            raise RunFailed(f"llama_decode failed (code {rc}) for {n} tokens at position {start}")

    def step(self, token: int, position: int) -> int:
        """Decode one token at `position` and return the greedy next token (the hot loop: no Python copies)."""
        b = self.batch
        b.n_tokens = 1
        b.token[0], b.pos[0], b.n_seq_id[0], b.logits[0] = token, position, 1, 1
        b.seq_id[0][0] = 0
        rc = self.lib.llama_decode(self.ctx, b)
        if rc != 0:
            if rc == 2:
                raise Aborted
            raise RunFailed(f"llama_decode failed (code {rc}) at position {position}")
        return self.greedy()

    def greedy(self) -> int:
        """Argmax of the last output's logits."""
        ptr = self.lib.llama_get_logits_ith(self.ctx, -1)
        return int(np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).argmax())

    def logits(self, outputs: int) -> np.ndarray:
        """(outputs, vocab) float32 copy of the logits of the last decode's output positions."""
        ptr = self.lib.llama_get_logits(self.ctx)
        return np.ctypeslib.as_array(ptr, shape=(outputs, self.n_vocab)).copy()

    def close(self) -> None:
        """Free the batch, context and model (idempotent)."""
        lib = self.lib
        if self.batch is not None:
            lib.llama_batch_free(self.batch)
            self.batch = None
        if self.ctx:
            lib.llama_free(self.ctx)
            self.ctx = None
        if self.model:
            lib.llama_model_free(self.model)
            self.model = None
