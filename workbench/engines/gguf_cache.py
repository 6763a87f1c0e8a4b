"""GGUF files in the workbench cache: built once per key, verified before use, quantized by llama.cpp itself.

`cached_gguf(key, build)` keeps `cache_dir()/gguf/<key>.gguf` next to a sidecar `<key>.gguf.json` with its
size and SHA-256. A file is trusted only when its size and digest match the sidecar and its header reads as
GGUF; otherwise it is deleted and rebuilt (with a warning naming it). Builds write a temporary file
(unique per process) and rename it into place, under a per-key lock so that concurrent processes build a
key once and never see each other's half-written files. `quantize_gguf` runs `llama_model_quantize` from
llama-cpp-python (imported only there). This module registers no engine.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import logging
import math
import mmap
import os
import re
import struct
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from workbench.errors import ConfigError, RunFailed
from workbench.paths import cache_dir

logger = logging.getLogger(__name__)

GGUF_TYPES: tuple[str, ...] = ("Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q4_0", "Q3_K_M", "Q2_K", "IQ4_NL")
# llama.cpp refuses these without an importance matrix (llama-quant.cpp: tensor_requires_imatrix); none of
# GGUF_TYPES is among them (Q2_K needs one only as part of a Q2_K_S file).
IMATRIX_TYPES: tuple[str, ...] = ("IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M", "IQ3_XXS", "Q2_K_S")
_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,199}$")
_CHUNK = 8 << 20
_verified: dict[Path, tuple[int, int, int]] = {}  # path -> (size, mtime_ns, inode) checked in this process


def quant_problem(gguf_type: str) -> str | None:
    """Why `gguf_type` cannot be produced (one sentence listing the valid types), None when it can."""
    if gguf_type in GGUF_TYPES:
        return None
    valid = ", ".join(GGUF_TYPES)
    if gguf_type in IMATRIX_TYPES:
        return (f"GGUF type {gguf_type} needs an importance matrix, which the workbench does not compute; "
                f"choose one of {valid}")
    return f"unknown GGUF type {gguf_type!r}; choose one of {valid}"


_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True)
class GGUFLayout:
    """What a GGUF file's header says: scalar and string metadata (arrays skipped) and each tensor's data bytes."""

    metadata: dict[str, Any]
    tensor_bytes: dict[str, int]


class _Cursor:
    """Little-endian reads from a buffer, raising ValueError past its end."""

    def __init__(self, buf: Any) -> None:
        self.buf, self.pos = buf, 0

    def take(self, fmt: str) -> Any:
        size = struct.calcsize(fmt)
        if self.pos + size > len(self.buf):
            raise ValueError("the file ends inside its header")
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return value

    def string(self) -> str:
        n = self.take("<Q")
        if self.pos + n > len(self.buf):
            raise ValueError("the file ends inside its header")
        self.pos += n
        return bytes(self.buf[self.pos - n:self.pos]).decode("utf-8", "replace")

    def value(self, vtype: int) -> Any:
        """One metadata value; arrays are skipped (None)."""
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            itype, count = self.take("<I"), self.take("<Q")
            if itype in _SCALARS:
                self.pos += count * struct.calcsize(_SCALARS[itype])
            else:
                for _ in range(count):
                    self.value(itype)
            return None
        if vtype not in _SCALARS:
            raise ValueError(f"unknown metadata type {vtype}")
        return self.take(_SCALARS[vtype])


def read_layout(path: Path) -> GGUFLayout:
    """Parse a GGUF header without reading tensor data (gguf.GGUFReader takes seconds on a 150k-token vocabulary);
    ValueError when it is not GGUF or the tensor data it describes runs past the end of the file."""
    import gguf

    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        c = _Cursor(buf)
        if c.take("<I") != gguf.GGUF_MAGIC:
            raise ValueError("not a GGUF file (bad magic)")
        version, n_tensors, n_kv = c.take("<I"), c.take("<Q"), c.take("<Q")
        if version not in (2, 3):
            raise ValueError(f"GGUF version {version} is not supported")
        metadata = {c.string(): c.value(c.take("<I")) for _ in range(n_kv)}
        ends, sizes = [], {}
        for _ in range(n_tensors):
            name, dims = c.string(), c.take("<I")
            count = math.prod(c.take("<Q") for _ in range(dims))
            block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(c.take("<I"))]
            sizes[name] = count // block * size
            ends.append(c.take("<Q") + sizes[name])
        align = int(metadata.get("general.alignment") or gguf.GGUF_DEFAULT_ALIGNMENT)
        start = -(-c.pos // align) * align
        if start + max(ends, default=0) > len(buf):
            raise ValueError(f"tensor data runs past the end of the file ({len(buf)} bytes)")
    return GGUFLayout(metadata, sizes)


def gguf_dir() -> Path:
    """The cache folder of GGUF files (created)."""
    path = cache_dir() / "gguf"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _digest(path: Path) -> tuple[int, str]:
    """(size in bytes, SHA-256 hex) of a file."""
    sha = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            sha.update(chunk)
            size += len(chunk)
    return size, sha.hexdigest()


def _stamp(path: Path) -> tuple[int, int, int]:
    st = path.stat()
    return st.st_size, st.st_mtime_ns, st.st_ino


def _header_problem(path: Path) -> str | None:
    """None when the file's header, metadata and tensor table read as GGUF and its tensor data is all there."""
    try:
        read_layout(path)
    except (OSError, ValueError, KeyError, OverflowError, struct.error) as e:
        return f"unreadable GGUF header ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
    return None


def verify_problem(path: Path) -> str | None:
    """Why a cached GGUF file cannot be trusted (missing or damaged sidecar, size or digest mismatch, unreadable
    header); None when it can. A file already verified in this process, unchanged since, is not re-hashed."""
    sidecar = path.with_name(path.name + ".json")
    if not path.exists():
        return "missing"
    if _verified.get(path) == _stamp(path):
        return None
    try:
        expected = json.loads(sidecar.read_text())
        size, digest = int(expected["size"]), str(expected["sha256"])
    except (OSError, ValueError, KeyError, TypeError):
        return "its size and digest record is missing or damaged"
    stamp = _stamp(path)
    if stamp[0] != size:
        return f"size {stamp[0]} bytes where {size} were written"
    if _digest(path)[1] != digest:
        return "its SHA-256 digest does not match the one recorded when it was written"
    why = _header_problem(path)
    if why is None:
        _verified[path] = stamp
    return why


@contextlib.contextmanager
def _key_lock(folder: Path, key: str) -> Iterator[None]:
    """An exclusive lock on one key across processes (fcntl where the OS has it; else none)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    with open(folder / f".{key}.lock", "a+b") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _temp(path: Path) -> Path:
    """A temporary name beside `path`, unique to this process and call."""
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")


def cached_gguf(key: str, build: Callable[[Path], None], *,
                on_progress: Callable[[str], None] = lambda message: None) -> Path:
    """`cache_dir()/gguf/<key>.gguf`: returned as is when verified, else built by `build(tmp_path)` (which writes
    `tmp_path` completely), recorded (size + SHA-256) and renamed into place. A corrupt file is rebuilt."""
    if not _KEY.match(key):
        raise ValueError(f"GGUF cache key {key!r} must be letters, digits, '.', '_', '+', '-' (at most 200)")
    folder = gguf_dir()
    path = folder / f"{key}.gguf"
    with _key_lock(folder, key):
        if path.exists():
            why = verify_problem(path)
            if why is None:
                return path
            logger.warning("cached GGUF file %s cannot be trusted (%s): deleting and rebuilding it", path, why)
            _verified.pop(path, None)
            path.unlink(missing_ok=True)
            path.with_name(path.name + ".json").unlink(missing_ok=True)
        on_progress(f"writing {path.name}")
        _build(path, build)
    return path


def _build(path: Path, build: Callable[[Path], None]) -> None:
    """Build into a temporary file, check and record it, rename file and record into place; clean up on failure."""
    tmp, sidecar = _temp(path), path.with_name(path.name + ".json")
    tmp_sidecar = _temp(sidecar)
    try:
        build(tmp)
        why = _header_problem(tmp)
        if why:
            raise RunFailed(f"the GGUF file written for {path.name} is not readable: {why}")
        size, digest = _digest(tmp)
        tmp_sidecar.write_text(json.dumps({"size": size, "sha256": digest}))
        os.replace(tmp_sidecar, sidecar)
        os.replace(tmp, path)
        _verified[path] = _stamp(path)
    finally:
        tmp.unlink(missing_ok=True)
        tmp_sidecar.unlink(missing_ok=True)


def quantize_gguf(src: Path, dst: Path, gguf_type: str, threads: int) -> None:
    """Quantize the F32/F16/BF16 GGUF file `src` to `gguf_type` with llama.cpp's own quantizer, writing `dst`
    through a temporary file; ConfigError for a type it cannot make, RunFailed (one sentence) if it fails."""
    why = quant_problem(gguf_type)
    if why:
        raise ConfigError(why)
    from workbench.engines.llamacpp_model import bindings

    llama_cpp = bindings()  # ConfigError (one sentence) where llama-cpp-python is missing
    params = llama_cpp.llama_model_quantize_default_params()
    params.nthread = max(1, int(threads))
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{gguf_type}")
    dst = Path(dst)
    tmp = _temp(dst)
    try:
        code = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params))
        if code != 0 or not tmp.exists():
            raise RunFailed(f"llama.cpp could not quantize {Path(src).name} to {gguf_type} (error {code}; its "
                            "log above says why)")
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)
