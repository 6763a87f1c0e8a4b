"""The publisher's lock: what visitors of a published dashboard may run, checked in the app before anything starts.

`RunConfig` validation is unchanged (it describes what the workbench can do); a `PublishPolicy` says what a
visitor may ask of this server, and `check_run` / `check_distill` / `check_sensitivity` refuse the rest in one
sentence. The policy reaches each Voila kernel as JSON in `WORKBENCH_POLICY`.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from workbench.config import RunConfig
from workbench.errors import ConfigError
from workbench.models.presets import PRESETS
from workbench.options import check_fields, option
from workbench.serde import from_dict, to_dict

logger = logging.getLogger(__name__)

ENV = "WORKBENCH_POLICY"
LOOPBACK_NAMES = ("localhost", "::1")
STUDENTS = "student:*"  # in `models`: any student saved by `workbench distill` (safetensors, made here)


def is_loopback(ip: str) -> bool:
    """True for addresses only this machine can reach (127.x, ::1, localhost)."""
    return ip in LOOPBACK_NAMES or ip.startswith("127.")


def default_models() -> tuple[str, ...]:
    """tiny, every preset, and the students distilled on this server."""
    return ("tiny", *(f"preset:{name}" for name in sorted(PRESETS)), STUDENTS)


@dataclass(frozen=True)
class PublishPolicy:
    """What a visitor of a locked dashboard may run (no trust-remote-code, no pickle, listed models, caps)."""

    models: tuple[str, ...] = option((), "Model sources visitors may choose, e.g. tiny,preset:gpt2-124m "
                                     "('student:*': students distilled here; default: tiny, every preset and "
                                     "the students).", group="Lock")
    root: str = option("", "The server's working folder: file inputs (distillation text) must lie under it "
                       "(default: the folder `workbench dashboard` started in).", group="Lock")
    max_batch_size: int = option(8, "Largest batch size a visitor may run.", group="Lock", minimum=1, maximum=4096)
    max_new_tokens: int = option(256, "Most tokens a visitor may generate per sequence.", group="Lock",
                                 minimum=1, maximum=32768)
    max_prompt_tokens: int = option(1024, "Longest prompt a visitor may give, in tokens (prompt text: four "
                                    "characters per token).", group="Lock", minimum=1, maximum=131072)
    max_eval_tokens: int = option(4096, "Most held-out tokens a visitor may score (runs, sensitivity, "
                                  "distillation checks).", group="Lock", minimum=0, maximum=1_000_000)
    max_repeats: int = option(50, "Most timed runs (and warm-up runs) per run.", group="Lock", minimum=1,
                              maximum=100000)
    max_duration_s: float = option(30.0, "Longest min_duration_s a visitor may ask for.", group="Lock",
                                   minimum=0.0, maximum=3600.0)
    max_processes: int = option(2, "Most tensor-, data- or pipeline-parallel processes per run.", group="Lock", minimum=1,
                                maximum=1024)
    max_train_steps: int = option(500, "Most optimizer steps per distillation.", group="Lock", minimum=1,
                                  maximum=1_000_000)

    def __post_init__(self) -> None:
        if isinstance(self.models, str):
            object.__setattr__(self, "models", tuple(m.strip() for m in self.models.split(",") if m.strip()))
        object.__setattr__(self, "models", tuple(self.models) or default_models())
        object.__setattr__(self, "root", str(Path(self.root or os.getcwd()).resolve()))
        check_fields(self)
        if not [m for m in self.models if m != STUDENTS]:
            raise ValueError("--models must name at least one model besides student:*")
        for model in self.models:
            if model != STUDENTS:
                try:
                    RunConfig(model=model)
                except ValueError as e:
                    raise ValueError(f"--models: {e}") from None

    # ------------------------------------------------------------------ environment edge
    def to_json(self) -> str:
        """JSON for the kernels' environment."""
        return json.dumps(to_dict(self))

    @classmethod
    def from_json(cls, text: str) -> PublishPolicy:
        """Inverse of `to_json` (validated like the constructor)."""
        return from_dict(cls, json.loads(text))

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> PublishPolicy | None:
        """The policy the server put in `WORKBENCH_POLICY`, or None when the dashboard is not locked.

        A value that does not parse raises: a locked server must never fall back to an unlocked app.
        """
        text = (os.environ if env is None else env).get(ENV, "")
        return cls.from_json(text) if text else None

    # ------------------------------------------------------------------ checks
    def allows_model(self, model: str) -> bool:
        """Whether visitors may load this model source."""
        return model in self.models or (STUDENTS in self.models and model.startswith("student:"))

    def model_choices(self, saved_students: list[str]) -> list[str]:
        """The listed sources, with `student:*` expanded to the students saved now."""
        out = [m for m in self.models if m != STUDENTS]
        if STUDENTS in self.models:
            out += [f"student:{name}" for name in saved_students]
        return out

    def check_model(self, model: str, what: str = "model") -> None:
        """ConfigError unless the source is on the publisher's list."""
        if not self.allows_model(model):
            listed = ", ".join(self.models)
            raise ConfigError(f"{what} {model!r} is not offered on this server; choose one of: {listed}")

    def resolve_path(self, path: str, what: str = "file") -> str:
        """The absolute path of a visitor's file input, refused when it lies outside the working folder."""
        root = Path(self.root)
        full = (root / Path(path).expanduser()).resolve()  # follows symlinks: no escape through a link
        if full != root and root not in full.parents:
            raise ConfigError(f"{what} {path!r} is outside this server's working folder {self.root}; only files "
                              "under it can be used")
        return str(full)


def _cap(value: float | None, limit: float, name: str) -> None:
    if value is not None and value > limit:
        raise ConfigError(f"{name} {value:g} is above this server's limit of {limit:g}")


def check_run(policy: PublishPolicy, config: RunConfig) -> None:
    """Refuse (ConfigError, one sentence) a run the publisher's lock does not allow."""
    if config.trust_remote_code or config.allow_pickle:
        raise ConfigError("this server does not allow trust_remote_code or allow_pickle")
    policy.check_model(config.model)
    _cap(config.batch_size, policy.max_batch_size, "batch_size")
    _cap(config.max_new_tokens, policy.max_new_tokens, "max_new_tokens")
    _cap(config.prompt_tokens, policy.max_prompt_tokens, "prompt_tokens")
    if config.prompt is not None and len(config.prompt) > 4 * policy.max_prompt_tokens:
        raise ConfigError(f"the prompt has {len(config.prompt)} characters, above this server's limit of "
                          f"{4 * policy.max_prompt_tokens}")
    _cap(config.eval_tokens, policy.max_eval_tokens, "eval_tokens")
    _cap(config.repeats, policy.max_repeats, "repeats")
    _cap(config.warmup, policy.max_repeats, "warmup")
    _cap(config.min_duration_s, policy.max_duration_s, "min_duration_s")
    _cap(max(config.tensor_parallel, config.data_parallel, config.pipeline_parallel), policy.max_processes,
         "parallel processes")
    if (config.device_map and "disk" in config.device_map) or config.offload_folder is not None:
        raise ConfigError("this server does not allow offloading layers to disk")


def check_distill(policy: PublishPolicy, config: Any) -> Any:
    """Refuse a distillation the lock does not allow; return it with its text path made absolute."""
    import dataclasses

    policy.check_model(config.teacher, "teacher")
    for step in config.student.split("+"):
        if step.strip().startswith("model:"):
            policy.check_model(step.strip()[len("model:"):], "student starting model")
    _cap(config.steps, policy.max_train_steps, "steps")
    _cap(config.batch_size, policy.max_batch_size, "batch_size")
    _cap(config.eval_tokens, policy.max_eval_tokens, "eval_tokens")
    _cap(config.seq_len, policy.max_prompt_tokens, "seq_len")
    _cap(config.data_parallel, policy.max_processes, "parallel processes")
    if config.text:
        return dataclasses.replace(config, text=policy.resolve_path(config.text, "training text"))
    return config


def check_sensitivity(policy: PublishPolicy, model: str, eval_tokens: int) -> None:
    """Refuse a sensitivity analysis the lock does not allow."""
    policy.check_model(model)
    _cap(eval_tokens, policy.max_eval_tokens, "eval_tokens")
