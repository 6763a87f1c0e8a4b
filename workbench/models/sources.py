"""Model sources: the shipped reference model, random-weight presets, saved students, hub ids and local folders."""

from __future__ import annotations

import hashlib
import logging
import os
import re
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from workbench.errors import ModelSourceError
from workbench.models.presets import PRESETS

logger = logging.getLogger(__name__)

TINY_DIR = Path(__file__).resolve().parent.parent / "reference" / "tiny"
TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
STUDENT_PREFIX = "student:"
STUDENT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")


@dataclass(frozen=True)
class ModelSource:
    """A resolved `--model` value: kind is reference, preset, student, local or hub."""

    spec: str
    kind: str
    location: str  # folder for reference/local, preset name, or hub id

    @property
    def random_weights(self) -> bool:
        """Presets have random weights: speed and memory only, no meaningful accuracy."""
        return self.kind == "preset"

    @property
    def display_name(self) -> str:
        """Short name for tables and plots."""
        return self.spec


def resolve(spec: str) -> ModelSource:
    """Classify a `--model` value; raise ModelSourceError with one sentence if it cannot be used."""
    if spec == "tiny":
        if not (TINY_DIR / "config.json").exists():
            raise ModelSourceError(f"the reference model is missing from {TINY_DIR}; run "
                                   "`workbench build-reference` to rebuild it")
        return ModelSource(spec, "reference", str(TINY_DIR))
    if spec.startswith("preset:"):
        name = spec.split(":", 1)[1]
        if name not in PRESETS:
            raise ModelSourceError(f"unknown preset {name!r}; presets: {', '.join(sorted(PRESETS))}")
        return ModelSource(spec, "preset", name)
    if spec.startswith(STUDENT_PREFIX):
        return _resolve_student(spec)
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ModelSourceError(f"folder {spec!r} has no config.json, so it is not a Hugging Face model folder")
        return ModelSource(spec, "local", str(path.resolve()))
    if path.exists():
        raise ModelSourceError(f"{spec!r} is a file; give the folder that holds config.json and the weights")
    if spec.startswith((".", "/", "~")) or not _HUB_ID.match(spec):
        raise ModelSourceError(f"no model folder at {spec!r} (and it is not a hub id like 'org/name')")
    return ModelSource(spec, "hub", spec)


def saved_students() -> list[str]:
    """Names of the students saved by `workbench distill`, sorted."""
    from workbench.paths import students_dir

    return sorted(p.name for p in students_dir().iterdir()
                  if p.is_dir() and STUDENT_NAME.match(p.name) and (p / "config.json").exists())


def _resolve_student(spec: str) -> ModelSource:
    """`student:NAME` -> the folder `workbench distill --name NAME` saved (real weights, HF format)."""
    from workbench.paths import students_dir

    name = spec[len(STUDENT_PREFIX):]
    if not STUDENT_NAME.match(name):
        raise ModelSourceError(f"{name!r} is not a student name: use letters, digits, '-' and '_' "
                               "(e.g. student:tiny-student)")
    folder = students_dir() / name
    if not (folder / "config.json").exists():
        known = ", ".join(saved_students()) or "none yet"
        raise ModelSourceError(f"no saved student named {name!r} in {folder.parent} (saved: {known}); make one with "
                               f"`workbench distill --name {name}`")
    return ModelSource(spec, "student", str(folder))


def _hub_reachable(timeout: float = 3.0) -> bool:
    """True when huggingface.co answers on 443 within `timeout` seconds (and offline mode is off)."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    try:
        host = os.environ.get("HF_ENDPOINT", "https://huggingface.co").split("://")[-1].split("/")[0]
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def _hub_kwargs(source: ModelSource) -> dict[str, Any]:
    """Offline-first: use the local cache when it has the model; probe the network otherwise."""
    if source.kind != "hub":
        return {}
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(source.location, "config.json")
    if isinstance(cached, str):
        return {"local_files_only": not _hub_reachable(1.0)}
    if not _hub_reachable():
        raise ModelSourceError(f"{source.spec!r} is not a local folder, not in the Hugging Face cache, and "
                               "huggingface.co cannot be reached (offline?); download it where there is "
                               "network or give a local folder")
    return {}


def text_config(config: Any) -> Any:
    """The language model's part of a transformers config (multimodal configs nest it; others are it)."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def load_config(source: ModelSource, trust_remote_code: bool = False) -> Any:
    """The transformers config of a source (no weights read)."""
    from transformers import AutoConfig

    if source.kind == "preset":
        return PRESETS[source.location].make_config()
    try:
        return AutoConfig.from_pretrained(source.location, trust_remote_code=trust_remote_code,
                                          **_hub_kwargs(source))
    except ModelSourceError:
        raise
    except ValueError as e:
        if "trust_remote_code" in str(e):
            raise ModelSourceError(f"{source.spec!r} needs its own Python code to run; pass "
                                   "--trust-remote-code only if you trust its authors") from None
        raise ModelSourceError(f"cannot read the config of {source.spec!r}: {_first_line(e)}") from None
    except (OSError, KeyError) as e:
        raise ModelSourceError(f"cannot load {source.spec!r}: {_first_line(e)}") from None


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


def fingerprint(source: ModelSource) -> str:
    """A short id that changes when the weights change (for caching baselines)."""
    if source.kind == "preset":
        return f"preset-{source.location}"
    h = hashlib.sha256(source.spec.encode())
    folder = Path(source.location)
    if folder.is_dir():  # small files (and the reference weights) by content, big weights by size+mtime
        for f in sorted(folder.iterdir()):
            if f.suffix in (".json", ".safetensors", ".bin"):
                st = f.stat()
                if f.suffix == ".json" or source.kind == "reference":
                    h.update(f.name.encode() + f.read_bytes())
                else:
                    h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]
