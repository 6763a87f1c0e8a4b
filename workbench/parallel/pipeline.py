"""Pipeline parallelism: the decoder layers split into N contiguous stages, one rank each, a GPipe schedule.

Every rank loads the whole checkpoint (the accuracy evaluation and the decode check run on each rank's full
copy, in lockstep), but a timed `generate` runs only the rank's own stage: stage 0 embeds the prompt, the last
stage applies the final norm and the LM head and picks the greedy token. Each generated token is one pipelined
step (the prefill is the first): the batch splits into M micro-batches; stage s takes micro-batch m from stage
s-1 (`recv`), runs its layers on it and passes it on (`isend`, so it can start micro-batch m+1 at once) —
GPipe's forward schedule, in which the stages idle (N-1)/(M+N-1) of a step. The last stage broadcasts the
step's tokens to every rank, so every rank feeds them back and rank 0's token clock times the whole pipeline.
Each stage keeps one stage-local `DynamicCache` per micro-batch: it only ever holds the keys and values of the
stage's own layers. The compute time of each stage's forward (perf_counter around it, after a CUDA sync) is
summed as its busy time; the bubble measured is 1 - sum(busy) / (N x wall) over the pipelined steps.

Why send/recv instead of `torch.distributed.pipelining` (PipelineStage + ScheduleGPipe): its schedules drive one
`step()` over a fixed micro-batch shape and keep no state between steps, while decoding changes the sequence
length between the prefill and every decode step and needs each stage's KV cache to persist per micro-batch
across steps; the GPipe forward schedule itself is a few lines of point-to-point calls.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import time
from typing import Any

import torch

from workbench.config import RunConfig
from workbench.engines.base import Generation
from workbench.engines.hf_generate import NoEarlyEnd
from workbench.errors import ConfigError
from workbench.measure.memory import cache_bytes
from workbench.parallel.distributed import DistributedCoordinator, not_a_pipeline_decoder, share

logger = logging.getLogger(__name__)


def predicted_bubble(stages: int, micro_batches: int) -> float:
    """GPipe's idle share of a step: (N - 1) / (M + N - 1)."""
    return (stages - 1) / (micro_batches + stages - 1)


def stage_layers(layers: int, stages: int) -> list[range]:
    """The contiguous layer range of every stage; the first layers % stages stages take one more layer."""
    return [range(r[0], r[-1] + 1) for r in (share(list(range(layers)), s, stages) for s in range(stages))]


class PipelineCoordinator(DistributedCoordinator):
    """A pipeline rank: every rank takes the whole batch; the hf engine generates through `PipelineGenerator`."""

    def __init__(self, config: RunConfig) -> None:
        super().__init__("pipeline")
        self.micro_batches = config.micro_batches

    def make_generator(self, model: torch.nn.Module, tokenizer: Any, device: torch.device, config: RunConfig,
                       prompt_ids: list[list[int]], stop_requested: Any, compile_config: Any = None) -> Any:
        """The engine's generator: this rank's stage of the model."""
        return PipelineGenerator(model, device, config, prompt_ids, stop_requested, self.rank, self.world_size,
                                 self.group, eos_token_id=tokenizer.eos_token_id)


@dataclasses.dataclass
class _Counters:
    busy_s: float = 0.0
    wall_s: float = 0.0
    steps: int = 0


class PipelineGenerator:
    """Rank `rank`'s stage of the model, run by a GPipe schedule; `generate` has the hf Generator's interface."""

    def __init__(self, model: torch.nn.Module, device: torch.device, config: RunConfig, prompt_ids: list[list[int]],
                 stop_requested: Any, rank: int, world: int, cpu_group: Any = None,
                 eos_token_id: int | None = None) -> None:
        """`cpu_group`: the gloo group small CPU tensors travel over (None: the default group is gloo);
        `eos_token_id`: never picked, as the hf Generator's fixed-length decoding never picks it."""
        why = not_a_pipeline_decoder(model)
        if why:
            raise ConfigError(why)
        base = model.model
        self.model, self.base, self.device, self.stop_requested = model, base, device, stop_requested
        self.rank, self.world, self.config, self.cpu_group = rank, world, config, cpu_group
        self.layer_range = stage_layers(len(base.layers), world)[rank]
        self.layers = [base.layers[i] for i in self.layer_range]
        self.first, self.last = rank == 0, rank == world - 1
        ids = torch.tensor(prompt_ids, dtype=torch.long, device=device)
        self.micro = list(ids.chunk(config.micro_batches))
        self.ids = ids
        self.dtype = next(model.parameters()).dtype
        params = inspect.signature(self.layers[0].forward).parameters
        self.cache_kw = next((k for k in ("cache", "past_key_values", "past_key_value") if k in params), "cache")
        self.counters = _Counters()
        self.no_early_end = NoEarlyEnd(eos_token_id, device)

    def reset_counters(self) -> None:
        """Start summing busy and wall time afresh (the tracker calls it before the timed calls)."""
        self.counters = _Counters()

    def stage_stats(self) -> tuple[int, range, _Counters]:
        """(stage, its layers, its summed busy / wall / steps)."""
        return self.rank, self.layer_range, self.counters

    def generate(self, clock: Any, want_cache: bool = False, interruptible: bool = False) -> Generation:
        """Exactly max_new_tokens greedy tokens for every row, one pipelined step per token (the first: the prefill)."""
        import torch.distributed as dist

        caches = [self._new_cache() for _ in self.micro]
        inputs, past = list(self.micro), 0
        clock.begin()
        with torch.inference_mode():
            clock.put(self.ids)  # the prompt, as generate's streamer gets it first
            for _ in range(self.config.max_new_tokens):
                tokens = self._step(inputs, caches, past)
                past += inputs[0].shape[1]
                clock.put(tokens)
                inputs = list(tokens.view(-1, 1).chunk(len(self.micro)))
                if self.stop_requested():
                    break
        timing = clock.timing(time.perf_counter())
        kv = None
        if want_cache:
            total = torch.tensor([sum(cache_bytes(c) for c in caches)], dtype=torch.int64)
            dist.all_reduce(total, group=self.cpu_group)  # every stage holds its own layers' keys and values
            kv = int(total.item())
        rows = [list(row) for row in zip(*clock.tokens)] if clock.tokens else [[] for _ in range(self.ids.shape[0])]
        return Generation(timing, rows, kv)

    def _new_cache(self) -> Any:
        from transformers import DynamicCache

        return DynamicCache()  # grows only the entries of the layers that write to it: this stage's

    def _step(self, inputs: list[torch.Tensor], caches: list[Any], past: int) -> torch.Tensor:
        """One pipelined step over every micro-batch; the step's next token of every row (B,), on every rank."""
        import torch.distributed as dist

        start, q = time.perf_counter(), inputs[0].shape[1]
        positions = torch.arange(past, past + q, device=self.device).unsqueeze(0)
        sends, picked = [], []
        for m, x in enumerate(inputs):
            if not self.first:
                x = torch.empty((x.shape[0], q, self.base.config.hidden_size), dtype=self.dtype, device=self.device)
                dist.recv(x, src=self.rank - 1)  # waiting for the previous stage is not busy time
            t0 = time.perf_counter()
            h = self._forward(x, caches[m], positions, past)
            if self.last:
                logits = self.model.lm_head(self.base.norm(h[:, -1:, :]))
                picked.append(self.no_early_end(None, logits[:, -1, :].float()).argmax(-1))  # (b,)
            else:
                h = h.contiguous()
                sends.append((dist.isend(h, dst=self.rank + 1), h))
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.counters.busy_s += time.perf_counter() - t0
        for work, _tensor in sends:
            work.wait()
        tokens = torch.cat(picked) if self.last else torch.empty(self.ids.shape[0], dtype=torch.long,
                                                                  device=self.device)
        dist.broadcast(tokens, src=self.world - 1)
        self.counters.wall_s += time.perf_counter() - start
        self.counters.steps += 1
        return tokens

    def _forward(self, x: torch.Tensor, cache: Any, positions: torch.Tensor, past: int) -> torch.Tensor:
        """This stage's layers over one micro-batch (stage 0 embeds the token ids first)."""
        h = self.base.embed_tokens(x) if self.first else x
        q = h.shape[1]
        rotary = self.base.rotary_emb(h, positions)
        mask = None  # sdpa: causal by itself in the prefill, a single query attends to every key when decoding
        if self.config.attn_implementation == "eager" and q > 1:
            keys = torch.arange(past + q, device=self.device)
            allowed = keys[None, :] <= (positions[0][:, None])
            mask = torch.zeros(allowed.shape, dtype=h.dtype, device=self.device)
            mask = mask.masked_fill(~allowed, torch.finfo(h.dtype).min)[None, None]
        for layer in self.layers:
            out = layer(h, attention_mask=mask, position_ids=positions, position_embeddings=rotary, use_cache=True,
                        **{self.cache_kw: cache})
            h = out[0] if isinstance(out, tuple) else out
        return h
