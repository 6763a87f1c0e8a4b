"""The distillation job: check, load, build the student, train with `distill_loss`, save the best (`distill`)."""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch

from workbench.distill.config import CurvePoint, DistillConfig, DistillParallel, DistillResult, DistillStart
from workbench.distill.students import build_student, check_name_free, layout, parse_student, save_student
from workbench.errors import ConfigError
from workbench.events import MetricEvent, OnEvent, StageEvent, TrainEvent
from workbench.execution import resolve_device
from workbench.measure.accuracy import evaluate, make_windows
from workbench.measure.memory import parameter_count
from workbench.models.loader import load_model
from workbench.models.sources import resolve
from workbench.reference.build import adamw, lr_at, sample_batch
from workbench.reference.corpus import join_documents, load_corpus
from workbench.textio import encode, heldout_ids

logger = logging.getLogger(__name__)
MIN_LR_RATIO = 0.1  # the cosine schedule ends at lr / 10


@functools.cache
def reference_train_text() -> str:
    """The reference corpus's training split (the text `tiny` was trained on), rebuilt from the stdlib."""
    return join_documents(load_corpus()[0])


_reference_ids: dict[int, list[int]] = {}


def reference_train_ids(tokenizer: Any) -> list[int]:
    """The reference training split tokenized by `tokenizer` (cached per tokenizer content: it takes a second)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    key = hash(backend.to_str()) if backend is not None else hash(frozenset(tokenizer.get_vocab().items()))
    if key not in _reference_ids:
        _reference_ids[key] = encode(tokenizer, reference_train_text())
    return _reference_ids[key]


def read_text_file(path: str) -> str:
    """A user's training text; ConfigError for a missing, unreadable, non-UTF-8 or empty file."""
    file = Path(path).expanduser()
    if not file.exists():
        raise ConfigError(f"the text file {path!r} does not exist")
    if not file.is_file():
        raise ConfigError(f"{path!r} is not a file; give a UTF-8 text file to train on")
    try:
        text = file.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"the text file {path!r} is not UTF-8 text (undecodable byte at offset {e.start})") from None
    except OSError as e:
        raise ConfigError(f"cannot read the text file {path!r}: {e.strerror}") from None
    if not text.strip():
        raise ConfigError(f"the text file {path!r} is empty; give some UTF-8 text to train on")
    return text


def distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor | None, targets: torch.Tensor,
                 temperature: float, ce_weight: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(loss, ce, kl): loss = (1 − α)·T²·KL(teacher_T ‖ student_T) + α·CE, each a mean over token positions."""
    s = student_logits.flatten(0, 1).float()  # (N, V)
    ce = torch.nn.functional.cross_entropy(s, targets.flatten())
    if teacher_logits is None:
        return ce, ce, None
    t = teacher_logits.flatten(0, 1).float()  # (N, V)
    log_q = torch.log_softmax(s / temperature, dim=-1)  # (N, V) student
    log_p = torch.log_softmax(t / temperature, dim=-1)  # (N, V) teacher
    kl = torch.nn.functional.kl_div(log_q, log_p, log_target=True, reduction="batchmean")  # mean over N
    return (1 - ce_weight) * temperature ** 2 * kl + ce_weight * ce, ce, kl


class Distillation:
    """One distillation, stage by stage (core-internal: the models never leave it)."""

    def __init__(self, config: DistillConfig, on_event: OnEvent, should_stop: Any) -> None:
        self.config, self.on_event, self.should_stop = config, on_event, should_stop
        self.t0 = time.perf_counter()
        self.student_steps = parse_student(config.student)
        self.curve: list[CurvePoint] = []
        self.status, self.done, self.train_s, self.tokens = "ok", 0, 0.0, 0
        self.train_t0, self.check_s = 0.0, 0.0  # training start; seconds spent in held-out checks since
        self.since: list[tuple[float, float | None]] = []  # (ce, kl) of the steps since the last check

    def stage(self, name: str, state: str, message: str = "", fraction: float | None = None) -> None:
        self.on_event(StageEvent(name, state, message, fraction, time.perf_counter() - self.t0))

    def prepare(self) -> None:
        """Everything that can fail before a weight is read: teacher source, device, name, text file."""
        cfg = self.config
        self.source = resolve(cfg.teacher)
        if self.source.random_weights:
            raise ConfigError(f"the teacher {cfg.teacher!r} has random weights: there is nothing to distil from it")
        self.device = resolve_device(cfg.device)
        check_name_free(cfg.name, cfg.overwrite)
        self.text = read_text_file(cfg.text) if cfg.text is not None else None

    def load(self) -> None:
        """Teacher, training tokens, held-out windows, the student, and both starting perplexities."""
        cfg = self.config
        self.stage("load", "start", f"loading the teacher {cfg.teacher} on {self.device}")
        self.teacher = load_model(self.source, "fp32", self.device)
        self.teacher.model.requires_grad_(False)
        self.train_ids = self._train_ids()
        max_pos = getattr(self.teacher.model.config, "max_position_embeddings", None) or 1 << 20
        if cfg.seq_len > max_pos:
            raise ConfigError(f"seq_len {cfg.seq_len} is longer than the teacher's context of {max_pos} tokens")
        self.windows = make_windows(heldout_ids(self.teacher.tokenizer), min(cfg.eval_context, max_pos),
                                    cfg.eval_tokens)
        self.stage("load", "end")
        self.stage("student", "start", cfg.student)
        self.student, self.notes = build_student(self.student_steps, self.teacher,
                                                 lambda msg, frac: self.stage("student", "progress", msg, frac))
        self._check_smaller()
        self.stage("student", "end", layout(self.student))
        self.stage("evaluate", "start", "held-out perplexity of the teacher and of the student before training")
        self.teacher_loss = self._heldout(self.teacher.model)
        start = self._heldout(self.student)
        self.best = (start, 0, self._snapshot())
        self.curve.append(CurvePoint(0, start, None, None, None, None))
        self.stage("evaluate", "end")
        self.on_event(MetricEvent("start", DistillStart(self.teacher_loss, start, self.teacher_params,
                                                        self.student_params, layout(self.student))))

    def _train_ids(self) -> torch.Tensor:
        """The training text as one token stream (CPU, int64)."""
        cfg = self.config
        tok = self.teacher.tokenizer
        ids = encode(tok, self.text) if self.text is not None else reference_train_ids(tok)
        if len(ids) < cfg.seq_len + 2:
            raise ConfigError(f"the text file {cfg.text!r} has {len(ids)} tokens, too few for one training window "
                              f"of {cfg.seq_len + 1}; give more text or lower seq_len")
        vocab = self.teacher.model.config.vocab_size
        if max(ids) >= vocab:
            raise ConfigError(f"the teacher's tokenizer produced ids beyond its model's vocabulary of {vocab}")
        return torch.tensor(ids, dtype=torch.long)

    def _check_smaller(self) -> None:
        """Refuse a student that is not smaller than its teacher."""
        self.teacher_params, self.student_params = parameter_count(self.teacher.model), parameter_count(self.student)
        if self.student_params >= self.teacher_params:
            layers = self.teacher.model.config.num_hidden_layers
            raise ConfigError(f"the student {self.config.student!r} has {self.student_params:,} parameters, not fewer "
                              f"than the teacher's {self.teacher_params:,}; keep fewer layers (layers:keep=N with N "
                              f"< {layers}) or cut heads and MLP channels (structured ratios above 0)")

    def _heldout(self, model: torch.nn.Module) -> float:
        """Held-out loss (log-perplexity, nats/token) on the eval windows."""
        was_training = model.training
        model.eval()
        stats = evaluate(model, self.windows, self.device)
        model.train(was_training)
        self.definition = stats.definition
        return math.log(stats.perplexity)

    def _snapshot(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.student.state_dict().items()}

    def train(self) -> None:
        """Steps until done or stopped (the stop is seen after the current step); checks every eval_every."""
        cfg = self.config
        self.stage("train", "start", f"{cfg.steps} steps of {cfg.batch_size} x {cfg.seq_len} tokens")
        opt = adamw(self.student, cfg.lr, 0.0)
        gen = torch.Generator().manual_seed(cfg.seed)
        self.student.train()
        self.train_t0 = time.perf_counter()
        stopping = bool(self.should_stop())
        while self.done < cfg.steps and not stopping:
            lr = lr_at(self.done, cfg.steps, cfg.lr, cfg.effective_warmup, MIN_LR_RATIO)
            batch = sample_batch(self.train_ids, cfg.batch_size, cfg.seq_len, gen).to(self.device)  # (B, T+1)
            t = time.perf_counter()
            ce, kl = self._step(opt, batch, lr)
            self.train_s += time.perf_counter() - t
            self.done, self.tokens = self.done + 1, self.tokens + cfg.batch_size * cfg.seq_len
            self.since.append((ce, kl))
            stopping = bool(self.should_stop())
            held = None
            if self.done % cfg.eval_every == 0 or self.done == cfg.steps or stopping:
                held = self._check(lr)
            self.on_event(TrainEvent(self.done, cfg.steps, ce, held, self.tokens_per_s, lr, kl))
            self.stage("train", "progress", f"step {self.done}/{cfg.steps}", self.done / cfg.steps)
        self.status = "stopped" if self.done < cfg.steps else "ok"
        self.stage("train", "end", f"{self.done} steps" + (" (stopped)" if self.status == "stopped" else ""))

    @property
    def tokens_per_s(self) -> float:
        """Training tokens per second of training (held-out checks excluded)."""
        return self.tokens / self.train_s if self.train_s > 0 else 0.0

    def _autocast(self) -> contextlib.AbstractContextManager:
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.config.dtype == "bf16")

    def _step(self, opt: torch.optim.Optimizer, batch: torch.Tensor, lr: float) -> tuple[float, float | None]:
        """One optimizer step; returns the batch's (cross-entropy, KL) in nats per token."""
        ce, kl = self._backward(batch)
        self._apply(opt, lr)
        return ce.item(), None if kl is None else kl.item()

    def _backward(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Forward both models, backward the student's loss; the batch's (cross-entropy, KL) tensors."""
        cfg = self.config
        x, y = batch[:, :-1], batch[:, 1:]  # (B, T), (B, T)
        with self._autocast():
            teacher_logits = None
            if cfg.ce_weight < 1:  # with α = 1 the teacher's term has weight 0: skip its forward pass
                with torch.no_grad():
                    teacher_logits = self.teacher.model(input_ids=x, use_cache=False).logits  # (B, T, V)
            student_logits = self.student(input_ids=x, use_cache=False).logits  # (B, T, V)
        loss, ce, kl = distill_loss(student_logits, teacher_logits, y, cfg.temperature, cfg.ce_weight)
        loss.backward()
        return ce.detach(), None if kl is None else kl.detach()

    def _apply(self, opt: torch.optim.Optimizer, lr: float) -> None:
        """Clip the gradients and take the optimizer step at `lr`."""
        for group in opt.param_groups:
            group["lr"] = lr
        torch.nn.utils.clip_grad_norm_(self.student.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    def _check(self, lr: float) -> float:
        """Held-out check: add a curve point; keep a snapshot when it is the best so far."""
        t = time.perf_counter()
        wall = t - self.train_t0 - self.check_s
        held = self._heldout(self.student)
        kls = [k for _, k in self.since if k is not None]
        self.curve.append(CurvePoint(self.done, held, sum(c for c, _ in self.since) / len(self.since),
                                     sum(kls) / len(kls) if kls else None, self.tokens_per_s, lr, wall))
        self.since = []
        if held < self.best[0]:
            self.best = (held, self.done, self._snapshot())
        logger.info("step %d/%d held-out perplexity %.2f (best %.2f at step %d), %.0f tok/s", self.done,
                    self.config.steps, math.exp(held), math.exp(self.best[0]), self.best[1], self.tokens_per_s)
        self.check_s += time.perf_counter() - t
        return held

    def parallel(self) -> DistillParallel | None:
        """The data-parallel account of the result (None for one process)."""
        return None

    def finish(self) -> DistillResult:
        """Restore the best checkpoint, save it as student:NAME, and describe what happened."""
        cfg = self.config
        best_loss, best_step, state = self.best
        self.student.load_state_dict(state)
        self.student.eval()
        self.stage("save", "start", f"saving the best checkpoint (step {best_step}) as student:{cfg.name}")
        result = DistillResult(
            config=cfg, status=self.status, name=cfg.name, path=str(check_name_free(cfg.name, cfg.overwrite)),
            model=f"student:{cfg.name}", steps_done=self.done, best_step=best_step,
            teacher_perplexity=math.exp(self.teacher_loss), start_perplexity=self.curve[0].perplexity,
            final_perplexity=math.exp(best_loss), teacher_params=self.teacher_params,
            student_params=self.student_params, student_layout=layout(self.student), tokens_per_s=self.tokens_per_s,
            train_s=self.train_s, wall_s=time.perf_counter() - self.t0, eval_tokens=self.windows.scored_tokens,
            definition=self.definition, notes=tuple(self.notes), curve=tuple(self.curve), parallel=self.parallel())
        save_student(self.student, self.teacher.tokenizer, cfg.name, cfg.overwrite, cfg.save_dtype, result.to_dict())
        self.stage("save", "end", result.path)
        self.on_event(MetricEvent("result", result))
        return result
