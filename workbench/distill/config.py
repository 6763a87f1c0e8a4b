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
    data_parallel: int = option(1, "Data-parallel ranks (processes on torch.distributed: gloo on CPU, nccl on "
                                "CUDA, one GPU each); each takes its own shard of the text and batch_size / N "
                                "windows per step.", group="Distributed", minimum=1, maximum=1024)
    sync: str = option("sync", "How the ranks combine their updates: sync (gradients averaged every step, ranks in "
                       "lockstep, identical weights) or async (local SGD: each rank steps on its own and the "
                       "weights are averaged every average_every steps).", group="Distributed",
                       choices=("sync", "async"))
    average_every: int = option(8, "async: local steps between weight averagings (K).", group="Distributed",
                                minimum=1, maximum=1_000_000)
    straggler_ms: float = option(0.0, "Sleep injected into every training step of the straggler rank "
                                 "(milliseconds), to see who waits for whom.", group="Distributed", minimum=0.0,
                                 maximum=60_000.0)
    straggler_rank: int = option(1, "The rank that sleeps straggler_ms per step; -1: a randomly drawn rank each "
                                 "step (a noisy shared machine).", group="Distributed", minimum=-1, maximum=1023)

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
        self._check_distributed()

    def _check_distributed(self) -> None:
        """Rank counts, batch split and straggler must fit together (one sentence naming the fix)."""
        world = self.data_parallel
        if world == 1 and (self.straggler_ms > 0 or self.sync == "async"):
            what = "straggler_ms" if self.straggler_ms > 0 else "sync 'async'"
            raise ValueError(f"{what} needs data_parallel of 2 or more: a single process has no other rank to "
                             "wait for or to average with")
        if self.batch_size % world:
            raise ValueError(f"batch_size {self.batch_size} must be a multiple of data_parallel {world}: each rank "
                             "takes batch_size / data_parallel windows per step")
        if self.straggler_rank >= world and world > 1:
            raise ValueError(f"straggler_rank must be -1 or one of the ranks 0..{world - 1}; got "
                             f"{self.straggler_rank}")

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
    wall_s: float | None = None  # training wall-clock seconds when the check was made (checks excluded)

    @property
    def perplexity(self) -> float:
        """Held-out perplexity at this check."""
        return math.exp(self.heldout_loss)


@dataclass(frozen=True)
class RankStats:
    """What one data-parallel rank did: its steps, and where its wall time went (seconds)."""

    rank: int
    steps_done: int
    compute_s: float  # forward, backward and optimizer steps
    straggler_s: float  # the injected sleeps
    wait_s: float  # blocked until every rank reached the collective (a barrier just before it)
    comm_s: float  # the collective itself (gradient or weight all-reduce)
    collectives: int  # how many times this rank met the others
    blocked_at: tuple[int, ...]  # the local steps after which it met them (sync: every step; async: every K)
    wall_s: float  # training wall time (held-out checks excluded)
    checksum: str  # SHA-256 of the final weights (before the best checkpoint is restored)
    pre_average_checksum: str | None  # async: the weights just before the last averaging


@dataclass(frozen=True)
class DistillParallel:
    """A data-parallel distillation: mode, ranks, and each rank's account (rank order)."""

    world_size: int
    sync: str
    average_every: int | None  # None in sync mode
    backend: str
    straggler_ms: float
    straggler_rank: int
    ranks: tuple[RankStats, ...]

    @property
    def identical(self) -> bool:
        """Whether every rank ended with bit-identical weights."""
        return len({r.checksum for r in self.ranks}) == 1


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
    parallel: DistillParallel | None = None  # data_parallel > 1

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
