"""How a rank process ends: killed with its launcher, and a failure reported once (to the parent, or on stderr).

Shared by the run ranks (`workbench.parallel.worker`) and the distillation ranks (`workbench.distill.ranks`).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import signal
import sys
from typing import Any

from workbench.errors import WorkbenchError

logger = logging.getLogger(__name__)


def die_with_parent() -> None:
    """Linux: be killed when the launching process dies, so no rank outlives an interrupted parent."""
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() == 1:
        os._exit(1)


def error_text(error: BaseException) -> str:
    """One line for a rank's error: a WorkbenchError's own sentence, else its type and first line."""
    if isinstance(error, WorkbenchError):
        return str(error)
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}".rstrip(": ")


def secondary(error: BaseException) -> bool:
    """Errors that only echo another rank's failure (its connection closed, a collective timed out)."""
    text = f"{type(error).__name__} {error}".lower()
    return any(k in text for k in ("distbackenderror", "connection closed", "connection reset", "gloo",
                                   "broken pipe", "timed out", "nccl"))


def report_failure(error: BaseException, link: Any, out: Any) -> int:
    """Report a rank's failure: to the parent when launched by it, else on stderr (rank 0: also JSON on stdout)."""
    text, rank = error_text(error), os.environ.get("RANK", "?")
    if not isinstance(error, WorkbenchError):
        logger.error("rank %s failed", rank, exc_info=error)
    if link is not None:
        link.send({"error": text, "type": type(error).__name__, "secondary": secondary(error)})
        link.close()
    else:
        logger.error("rank %s: error: %s", rank, text)
        if rank == "0":
            out.write(json.dumps({"status": "error", "error": text}) + "\n")
            out.flush()
    return 1
