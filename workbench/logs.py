"""Logging setup for the CLI and apps: our INFO lines on stderr, third-party chatter quieted."""

from __future__ import annotations

import logging
import os
import sys
import warnings

# "kernels": Hugging Face's kernel hub (a transformers 5.25 dependency); bitsandbytes asks it for its fused CPU
# kernel on CPUs with AVX512-BF16, and offline it warns at import that it skips the publisher check
_NOISY = ("torchao", "torch.utils._pytree", "bitsandbytes", "accelerate", "transformers", "urllib3", "httpx",
          "huggingface_hub", "torch._dynamo", "torch._inductor", "filelock", "kernels")


def quiet_libraries() -> None:
    """Silence libraries that log per call or at import (bitsandbytes per matmul, torchao's kernel probes)."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # The roofline's profiled decode call (measure/busy.py) would print kineto's "USDT ... profiler_start/stop"
    # lines on stderr at every run; kineto reads this when the profiler first starts. Level 6 also hides kineto's
    # own errors: a profile that recorded nothing is reported by the busy measurement itself, as a warning.
    os.environ.setdefault("KINETO_LOG_LEVEL", "6")
    for name in _NOISY:
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", message=".*TypedStorage is deprecated.*")
    warnings.filterwarnings("ignore", message=".*_stable_hash_for_caching.*")  # torchao tensors under torch.compile
    # transformers reads the variables above when it is imported; one imported already is told directly (importing it
    # here would cost every command, `workbench --help` too, 0.8 s)
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()


def setup(verbose: int = 0) -> None:
    """Configure the root logger for a command-line process (stderr only: stdout stays for results)."""
    level = logging.WARNING if verbose <= 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s", force=True)
    quiet_libraries()
