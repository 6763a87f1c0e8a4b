"""What a distillation takes and gives: its config (validated on construction), progress and result records."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any

from workbench.distill.students import parse_student
from workbench.models.sources import STUDENT_NAME
from workbench.options import check_fields, option
from workbench.serde import from_dict, to_dict

_DEVICE_RE = re.compile(r"^(auto|cpu|cuda|cuda:\d+)$")


@dataclass(frozen=True)
class DistillConfig:
    """One distillation: teacher, how the student is made, the training text and schedule, where it is saved."""

    teacher: str = option("tiny", "Teacher: any model source with real weights ('tiny', student:NAME, a hub id "
                          "or a local folder).", group="Models")
    student: str = option("structured:heads_ratio=0.5,mlp_ratio=0.5", "How the student is made, steps joined by "
                          "'+': structured:heads_ratio=H,mlp_ratio=M (cut heads and MLP channels from a copy of the "
                          "teacher), layers:keep=N (keep N evenly spaced layers) or layers:indices=0|2|5, "
                          "model:SPEC (start from an existing smaller model with the teacher's tokenizer; first "
                          "step only).", group="Models")
    name: str = option("tiny-student", "Name the student is saved under; use it as --model student:NAME "
                       "(letters, digits, '-', '_').", group="Output")
    overwrite: bool = option(False, "Replace a saved student of the same name.", group="Output")
    save_dtype: str = option("fp32", "Dtype of the saved weights.", group="Output", choices=("fp32", "fp16", "bf16"))
    text: str | None = option(None, "Training text: a UTF-8 text file (default: the training split of the "
                              "reference corpus, the text tiny learned from).", group="Data")
    steps: int = option(200, "Optimizer steps.", group="Training", minimum=1, maximum=1_000_000)
    lr: float = option(1e-3, "Peak AdamW learning rate (linear warm-up, then cosine decay to a tenth).",
                       group="Training", minimum=1e-8, maximum=1.0)
    warmup_steps: int = option(10, "Linear warm-up steps (capped at a tenth of the steps).", group="Training",
                               minimum=0, maximum=1_000_000)
    batch_size: int = option(8, "Training windows per step.", group="Training", minimum=1, maximum=4096)
    seq_len: int = option(128, "Tokens per training window.", group="Training", minimum=8, maximum=131072)
    temperature: float = option(2.0, "Temperature T of the distillation term: both distributions are softened "
                                "by T, so the student also learns how the teacher ranks unlikely tokens; the term "
                                "is scaled by T².", group="Training", minimum=0.1, maximum=100.0)
    ce_weight: float = option(0.5, "Weight α of the cross-entropy on the text: loss = (1 − α)·T²·KL + α·CE "
                              "(0: pure distillation; 1: plain training on the text, no teacher).",
                              group="Training", minimum=0.0, maximum=1.0)
    eval_every: int = option(25, "Steps between held-out checks; the best check is the checkpoint saved.",
                             group="Evaluation", minimum=1, maximum=1_000_000)
    eval_tokens: int = option(2048, "Held-out tokens scored at each check (the reference corpus's held-out "
                              "split, rounded up to whole windows).", group="Evaluation", minimum=16,
                              maximum=1_000_000)
    eval_context: int = option(256, "Tokens per evaluation window (256, like a run's default, so the perplexities "
                               "match `workbench run`).", group="Evaluation", minimum=2, maximum=131072)
    device: str = option("auto", "Where to train: auto (CUDA if present, else CPU), cpu, cuda or cuda:N.",
                         group="Execution")
    dtype: str = option("fp32", "Compute dtype of the forward passes: fp32, or bf16 autocast (weights and "
                        "optimizer stay fp32).", group="Execution", choices=("fp32", "bf16"))
    threads: int | None = option(None, "Intra-op CPU threads (default: PyTorch's choice).", group="Execution",
                                 minimum=1, maximum=1024)
    seed: int = option(0, "Seed of the batch sampling.", group="Training", minimum=0)

    def __post_init__(self) -> None:
        check_fields(self)
        if not self.teacher.strip():
            raise ValueError("teacher is empty: give a model source such as 'tiny'")
        if self.teacher.startswith("preset:"):
            raise ValueError(f"teacher {self.teacher!r} has random weights: there is nothing to distil from it; "
                             "use 'tiny', a saved student, a hub id or a folder")
        if not STUDENT_NAME.match(self.name):
            raise ValueError(f"name must be letters, digits, '-' and '_' (up to 64, starting with a letter or "
                             f"digit); got {self.name!r}")
        if not _DEVICE_RE.match(self.device):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N; got {self.device!r}")
        if self.text is not None and not self.text.strip():
            raise ValueError("text is empty: give the path of a UTF-8 text file, or leave it unset for the reference "
                             "corpus")
        parse_student(self.student)

    @property
    def effective_warmup(self) -> int:
        """Warm-up steps actually used (at most a tenth of the run)."""
        return min(self.warmup_steps, self.steps // 10)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (JSON edge)."""
        return to_dict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DistillConfig:
        """Inverse of `to_dict`; validates like the constructor."""
        return from_dict(cls, data)


@dataclass(frozen=True)
class CurvePoint:
    """One held-out check: `train_loss` and `kl` are means over the steps since the previous check (nats/token)."""

    step: int
    heldout_loss: float
    train_loss: float | None
    kl: float | None
    tokens_per_s: float | None
    lr: float | None

    @property
    def perplexity(self) -> float:
        """Held-out perplexity at this check."""
        return math.exp(self.heldout_loss)


@dataclass(frozen=True)
class DistillStart:
    """Sent as MetricEvent("start", ...) before training: the reference lines of a live loss plot."""

    teacher_heldout_loss: float
    start_heldout_loss: float
    teacher_params: int
    student_params: int
    student_layout: str


@dataclass(frozen=True)
class DistillResult:
    """What a distillation produced: where the student is, and the measured perplexities, sizes and speed."""

    config: DistillConfig
    status: str  # "ok" | "stopped"
    name: str
    path: str
    model: str  # the --model value of the saved student: student:NAME
    steps_done: int
    best_step: int
    teacher_perplexity: float
    start_perplexity: float  # the student before training (e.g. pruned only)
    final_perplexity: float  # the saved (best) checkpoint
    teacher_params: int
    student_params: int
    student_layout: str
    tokens_per_s: float  # student training tokens per second of training (held-out checks excluded)
    train_s: float
    wall_s: float
    eval_tokens: int
    definition: str
    notes: tuple[str, ...]
    curve: tuple[CurvePoint, ...]

    @property
    def recovered(self) -> float | None:
        """Share of the held-out loss (log-perplexity) lost by making the student that training won back."""
        lost = math.log(self.start_perplexity) - math.log(self.teacher_perplexity)
        return None if lost <= 0 else (math.log(self.start_perplexity) - math.log(self.final_perplexity)) / lost

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (JSON edge)."""
        return to_dict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DistillResult:
        """Inverse of `to_dict`."""
        return from_dict(cls, data)

    def to_json(self, indent: int | None = None) -> str:
        """JSON text."""
        return json.dumps(self.to_dict(), indent=indent)
