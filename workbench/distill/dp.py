"""One rank of a data-parallel distillation: synchronous (averaged gradients) or asynchronous (local SGD) updates.

Every rank holds the teacher and a copy of the student (rank 0's initial weights, broadcast), samples
`batch_size / N` windows per step from its own contiguous shard of the training text, and:

- `sync`: all-reduces (averages) its gradients every step before the optimizer step. The ranks move in
  lockstep and keep bit-identical weights (same averaged gradient, same AdamW state): it is one training with
  an N-times larger batch, and every step waits for the slowest rank.
- `async`: local SGD with periodic parameter averaging (Stich 2019; Lin et al. 2020). Each rank steps its own
  copy with its own AdamW state for K = `average_every` steps, then the ranks all-reduce their weights and go
  on from the average (optimizer states are not averaged). Between averagings the copies drift apart; a slow
  rank holds the others back only at the averaging points, where they all still meet, not at every step.
  A parameter-server variant (asynchronous SGD, Dean et al. 2012) differs: workers push gradients computed
  on the weights they last pulled to a server that applies them as they arrive, nobody ever waits, fast
  workers contribute more updates than slow ones, and each gradient is stale by the updates that happened
  since its worker's pull; here every rank does the same number of steps on fresh local weights.

Rank 0 alone scores the held-out text, right after a meeting (sync: any step; async: an averaging, so the
weights scored are the average); the others wait for it at a barrier counted as check time, not as waiting.
Each rank counts where its training wall time went: compute, injected straggler sleep, waiting for the others
(a barrier just before each collective) and the collective itself.
"""

from __future__ import annotations

import hashlib
import logging
import time
from typing import Any

import torch
import torch.distributed as dist

from workbench.distill.config import DistillConfig, DistillParallel, RankStats
from workbench.distill.train import MIN_LR_RATIO, Distillation
from workbench.errors import ConfigError
from workbench.events import OnEvent, TrainEvent
from workbench.parallel.distributed import DistributedCoordinator, share
from workbench.reference.build import adamw, lr_at, sample_batch

logger = logging.getLogger(__name__)


def weights_checksum(model: torch.nn.Module) -> str:
    """SHA-256 of every parameter's bytes, in order: equal exactly when the weights are bit-identical."""
    digest = hashlib.sha256()
    for p in model.parameters():
        digest.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


class RankDistillation(Distillation):
    """The distillation as one of N ranks (the process group is joined by the caller)."""

    def __init__(self, config: DistillConfig, on_event: OnEvent, should_stop: Any, device: torch.device) -> None:
        super().__init__(config, on_event, should_stop)
        self.rank_device = device
        self.coord = DistributedCoordinator("data")
        self.rank, self.world = self.coord.rank, self.coord.world_size
        self.account = dict(compute_s=0.0, straggler_s=0.0, wait_s=0.0, comm_s=0.0)
        self.blocked_at: list[int] = []
        self.pre_average: str | None = None
        self.stats: tuple[RankStats, ...] = ()

    def prepare(self) -> None:
        """As one process, on this rank's device."""
        super().prepare()
        self.device = self.rank_device

    def load(self) -> None:
        """Teacher and student as one process; then rank 0's student everywhere and this rank's text shard."""
        super().load()
        for p in self.student.parameters():
            dist.broadcast(p.data, src=0)
        if self.rank == 0:
            self.best = (self.best[0], 0, self._snapshot())
        shard = share(list(range(len(self.train_ids))), self.rank, self.world)
        if len(shard) < self.config.seq_len + 2:
            raise ConfigError(f"the training text has {len(self.train_ids)} tokens: too few for {self.world} "
                              f"shards of at least {self.config.seq_len + 2}; give more text or fewer ranks")
        self.train_ids = self.train_ids[shard[0]:shard[-1] + 1]

    def _heldout(self, model: torch.nn.Module) -> float:
        """Rank 0 scores the held-out text; the other ranks skip it (NaN)."""
        return super()._heldout(model) if self.rank == 0 else float("nan")

    def train(self) -> None:
        """Steps in the configured mode until done or stopped (every rank agrees on the stop at a meeting)."""
        cfg = self.config
        self.stage("train", "start", f"{cfg.steps} steps of {cfg.batch_size} x {cfg.seq_len} tokens on {self.world} "
                   f"ranks ({self._mode()})")
        opt = adamw(self.student, cfg.lr, 0.0)
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + self.rank)  # each rank its own windows
        who = torch.Generator().manual_seed(cfg.seed)  # the same draws on every rank: who straggles
        self.student.train()
        self.train_t0, last_check, stopping = time.perf_counter(), 0, False
        while self.done < cfg.steps and not stopping:
            lr = lr_at(self.done, cfg.steps, cfg.lr, cfg.effective_warmup, MIN_LR_RATIO)
            batch = sample_batch(self.train_ids, cfg.batch_size // self.world, cfg.seq_len, gen).to(self.device)
            ce, kl, stop_vote = self._one_step(opt, batch, lr, who)
            self.done, self.tokens = self.done + 1, self.tokens + cfg.batch_size * cfg.seq_len
            self.since.append((ce, kl))
            met = self._meets()
            if cfg.sync == "async":  # a stop is agreed at the next averaging, so no rank leaves the others waiting
                stopping = self._average_weights(stop_vote) if met else False
            else:
                stopping = stop_vote  # already agreed in the gradient all-reduce
            self.train_s = time.perf_counter() - self.train_t0 - self.check_s
            held = None
            if met and (self.done - last_check >= cfg.eval_every or self.done == cfg.steps or stopping):
                held, last_check = self._rank_check(lr), self.done
            self.on_event(TrainEvent(self.done, cfg.steps, ce, held, self.tokens_per_s, lr, kl))
            self.stage("train", "progress", f"step {self.done}/{cfg.steps}", self.done / cfg.steps)
        self.status = "stopped" if self.done < cfg.steps else "ok"
        self._gather_stats()
        self.stage("train", "end", f"{self.done} steps" + (" (stopped)" if self.status == "stopped" else ""))

    def _mode(self) -> str:
        return "synchronous" if self.config.sync == "sync" else f"local SGD, averaged every {self.config.average_every}"

    def _meets(self) -> bool:
        """Whether the ranks meet after this step (sync: always; async: every K steps and at the last step)."""
        cfg = self.config
        return cfg.sync == "sync" or self.done % cfg.average_every == 0 or self.done == cfg.steps

    def _one_step(self, opt: torch.optim.Optimizer, batch: torch.Tensor, lr: float,
                  who: torch.Generator) -> tuple[float, float | None, bool]:
        """Straggle if it is this rank's turn, forward/backward, (sync: average gradients), step: (ce, kl, stop)."""
        cfg = self.config
        drawn = int(torch.randint(self.world, (1,), generator=who))
        if cfg.straggler_ms > 0 and self.rank == (drawn if cfg.straggler_rank < 0 else cfg.straggler_rank):
            t = time.perf_counter()
            time.sleep(cfg.straggler_ms / 1000)
            self.account["straggler_s"] += time.perf_counter() - t
        t = time.perf_counter()
        ce, kl = self._backward(batch)
        stop = bool(self.should_stop())
        self.account["compute_s"] += self._synced() - t
        if cfg.sync == "sync":
            ce, kl, stop = self._average_gradients(ce, kl, stop)
        t = time.perf_counter()
        self._apply(opt, lr)
        self.account["compute_s"] += self._synced() - t
        return float(ce), None if kl is None else float(kl), stop

    def _synced(self) -> float:
        """Now, once this rank's GPU work is done (so compute is not counted as waiting)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def _meet(self, flat: torch.Tensor) -> torch.Tensor:
        """Wait for every rank (counted as waiting), then all-reduce `flat` to its mean (counted as communication)."""
        self.blocked_at.append(self.done + 1 if self.config.sync == "sync" else self.done)
        t = time.perf_counter()
        self.coord.barrier()
        t2 = time.perf_counter()
        dist.all_reduce(flat)
        flat /= self.world
        self.account["wait_s"], self.account["comm_s"] = (self.account["wait_s"] + t2 - t,
                                                          self.account["comm_s"] + self._synced() - t2)
        return flat

    def _average_gradients(self, ce: torch.Tensor, kl: torch.Tensor | None,
                           stop: bool) -> tuple[torch.Tensor, torch.Tensor | None, bool]:
        """All-reduce every gradient (one flat buffer, with the losses and the stop flag): their mean on all ranks."""
        params = [p for p in self.student.parameters() if p.requires_grad]
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        extra = torch.stack([ce.float(), (kl if kl is not None else ce).float(), torch.tensor(float(stop))
                             .to(ce.device)])
        flat = self._meet(torch.cat([g.reshape(-1).float() for g in grads] + [extra]))
        offset = 0
        for p, g in zip(params, grads):
            p.grad = flat[offset:offset + g.numel()].view_as(g).to(g.dtype).clone()
            offset += g.numel()
        ce_mean, kl_mean, stop_any = flat[-3], flat[-2], flat[-1].item() > 0
        return ce_mean, None if kl is None else kl_mean, stop_any

    def _average_weights(self, stop: bool) -> bool:
        """Local SGD's averaging: every rank's weights become their mean; True when any rank wants to stop."""
        self.pre_average = weights_checksum(self.student)
        params = list(self.student.parameters())
        stop_flag = torch.tensor([float(stop)], device=self.device)
        flat = self._meet(torch.cat([p.data.reshape(-1).float() for p in params] + [stop_flag]))
        offset = 0
        with torch.no_grad():
            for p in params:
                p.copy_(flat[offset:offset + p.numel()].view_as(p))
                offset += p.numel()
        return flat[-1].item() > 0

    def _rank_check(self, lr: float) -> float | None:
        """Rank 0 scores the held-out text while the others wait at a barrier; all count it as check time."""
        t, before = time.perf_counter(), self.check_s
        held = self._check(lr) if self.rank == 0 else None
        self.since = [] if self.rank else self.since
        self.coord.barrier()
        self.check_s = before + time.perf_counter() - t  # the whole pause once (`_check` counted its own part)
        return held

    def _gather_stats(self) -> None:
        """Every rank's account on rank 0."""
        mine = RankStats(rank=self.rank, steps_done=self.done, **{k: round(v, 6) for k, v in self.account.items()},
                         collectives=len(self.blocked_at), blocked_at=tuple(self.blocked_at),
                         wall_s=round(time.perf_counter() - self.train_t0 - self.check_s, 6),
                         checksum=weights_checksum(self.student), pre_average_checksum=self.pre_average)
        shares = self.coord.gather(mine)
        self.stats = tuple(shares) if shares is not None else ()

    def parallel(self) -> DistillParallel | None:
        """The data-parallel account (rank 0, after training)."""
        cfg = self.config
        return DistillParallel(world_size=self.world, sync=cfg.sync,
                               average_every=cfg.average_every if cfg.sync == "async" else None,
                               backend=self.coord.backend, straggler_ms=cfg.straggler_ms,
                               straggler_rank=cfg.straggler_rank, ranks=self.stats)
