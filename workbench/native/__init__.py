"""The workbench's own CPU kernel (`q4q8.c`), built with the system C compiler at first use and called as a
PyTorch operator, `torch.ops.workbench.q4q8_linear`, so that `torch.compile` keeps it inside the decode graph.

The build goes to `<cache>/native/q4q8-<hash>.so`, the hash covering the source, the compiler and the flags:
AVX2 + FMA + F16C where the CPU has them (read from /proc/cpuinfo), portable C otherwise. `torch.compile` on the
CPU needs the same compiler, so a machine that compiles models can build this too.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shlex
import shutil
import subprocess
import sysconfig
from pathlib import Path

import torch

from workbench.errors import ConfigError
from workbench.execution import cpu_flags
from workbench.paths import cache_dir

logger = logging.getLogger(__name__)
SOURCE = Path(__file__).with_name("q4q8.c")
BLOCK = 32  # inputs per quantization block (the kernel's fixed block)
VECTOR_FLAGS = ("avx2", "fma", "f16c")  # what the vectorized path needs, as /proc/cpuinfo spells it
PORTABLE_ENV = "WORKBENCH_PORTABLE_KERNEL"  # "1": build the portable C path even where AVX2 is there


def compiler() -> list[str] | None:
    """The C compiler command: `$CC` when set, else the one Python was built with, else cc or gcc; None: none."""
    explicit = os.environ.get("CC")
    for candidate in ([explicit] if explicit else [sysconfig.get_config_var("CC"), "cc", "gcc"]):
        words = shlex.split(candidate or "")
        if words and shutil.which(words[0]):
            return words
    return None


def cpu_vector_flags() -> list[str]:
    """`-mavx2 -mfma -mf16c` where this x86 CPU has them (Linux), else nothing (the portable C path); also
    nothing with `WORKBENCH_PORTABLE_KERNEL=1`, to measure what the SIMD path is worth."""
    if os.environ.get(PORTABLE_ENV) == "1":
        return []
    return [f"-m{f}" for f in VECTOR_FLAGS] if cpu_flags().issuperset(VECTOR_FLAGS) else []


def unavailable() -> str | None:
    """Why the kernel cannot be built here (None: it can)."""
    if compiler() is None:
        given = os.environ.get("CC")
        return (f"$CC={given!r} is not an executable" if given else
                "no C compiler (cc or gcc) on PATH; w4a8 builds its kernel with one, as torch.compile does")
    return None


@functools.lru_cache(maxsize=None)
def library() -> ctypes.CDLL:
    """The built kernel, loaded (built first if this source, compiler and flags have no build yet)."""
    cc = compiler()
    if cc is None:
        raise ConfigError(f"cannot build the w4a8 kernel: {unavailable()}")
    flags = ["-O3", *cpu_vector_flags(), "-fopenmp", "-fPIC", "-shared"]
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join(cc + flags).encode()).hexdigest()[:16]
    target = cache_dir() / "native" / f"q4q8-{key}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(f".{os.getpid()}.tmp")
        logger.info("building the w4a8 kernel: %s", " ".join([*cc, *flags]))
        done = subprocess.run([*cc, *flags, str(SOURCE), "-o", str(tmp)], capture_output=True, text=True)
        if done.returncode != 0 or not tmp.exists():
            tmp.unlink(missing_ok=True)
            tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
            raise ConfigError(f"could not build the w4a8 kernel with {' '.join(cc)} (exit {done.returncode}): "
                              + " / ".join(tail))
        os.replace(tmp, target)  # atomic: another process building the same key sees a whole file or none
    lib = ctypes.CDLL(str(target))
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.q4q8_linear.argtypes = [p, i64, i64, p, p, p, i64, p, ctypes.c_int]
    lib.q4q8_linear.restype = ctypes.c_int
    return lib


def vectorized() -> bool:
    """Whether the build runs the AVX2 path (False: portable C, slower than the float matmuls)."""
    return bool(library().q4q8_vectorized())


def max_in_features() -> int:
    """The largest input width the kernel takes."""
    return int(library().q4q8_max_in_features())


def _q4q8_linear(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor) -> torch.Tensor:
    """(M, K) float32 @ the (N, K) 4-bit weight -> (M, N) float32."""
    x = x.to(torch.float32).contiguous()  # no copy when it already is (W4A8Linear converts before calling)
    rows, width = x.shape
    out = torch.empty(rows, codes.shape[0], dtype=torch.float32)
    code = library().q4q8_linear(x.data_ptr(), rows, width, codes.data_ptr(), scales.data_ptr(), mins.data_ptr(),
                                 codes.shape[0], out.data_ptr(), torch.get_num_threads())
    if code:
        raise RuntimeError("w4a8 kernel: out of memory" if code == 1 else
                           f"w4a8 kernel: in_features {width} is not a multiple of {BLOCK} or above the maximum")
    return out


def _fake(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor) -> torch.Tensor:
    """Shape and dtype of the result, for torch.compile's tracing."""
    return x.new_empty((x.shape[0], codes.shape[0]), dtype=torch.float32)


_LIBRARY = torch.library.Library("workbench", "DEF")  # kept alive: the operator lives as long as this object
_LIBRARY.define("q4q8_linear(Tensor x, Tensor codes, Tensor scales, Tensor mins) -> Tensor")
_LIBRARY.impl("q4q8_linear", _q4q8_linear, "CPU")
torch.library.register_fake("workbench::q4q8_linear", _fake, lib=_LIBRARY)
