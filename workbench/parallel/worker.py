"""The rank entry point of tensor-, data- and pipeline-parallel runs; runs unchanged under torchrun.

    torchrun --standalone --nproc-per-node 2 -m workbench.parallel.worker --model tiny --tensor-parallel 2
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \\
        -m workbench.parallel.worker --model NAME --data-parallel 16 --batch-size 64

It takes the flags of `workbench run` and reads RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR from the
environment. Every rank runs the same `run_local` in lockstep; rank 0 merges the ranks' shares, prints the
result as one JSON object on stdout and stores it (unless --no-store). Started by `run_distributed`
(`--launch-file`), rank 0 sends its events and the result to the parent instead, and every rank obeys the
parent's stop requests.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from workbench.config import RunConfig
from workbench.events import OnEvent, never_stop, no_event
from workbench.measure import tracker
from workbench.parallel.rank_exit import die_with_parent, report_failure

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class _Ctx:
    """What a rank knows about itself."""

    config: RunConfig
    rank: int
    world: int
    local_rank: int
    local_world: int
    on_event: OnEvent = no_event
    should_stop: Callable[[], bool] = never_stop


def run_rank(ctx: _Ctx) -> Any:
    """Join the process group, run this rank's share, gather the shares: the merged RunResult on rank 0, else None."""
    from workbench.parallel import distributed as d
    from workbench.runner import run_local

    _check_world(ctx)
    plan = d.layout(ctx.config, ctx.local_world)
    device = d.rank_device(plan, ctx.local_rank)
    rank_config = ctx.config.replace(device=str(device), threads=d.rank_threads(ctx.config, ctx.local_world))
    d.init_process_group(device)
    try:
        coord = d.DistributedCoordinator(plan.kind) if plan.kind != "pipeline" else _pipeline_coordinator(ctx)
        _prime_baselines(ctx, rank_config, plan)
        coord.barrier()
        result = run_local(rank_config, ctx.on_event, ctx.should_stop, coord)
        shares = coord.gather({"info": result.parallel.ranks[0], "outputs": result.outputs, "status": result.status,
                               "sections": result.sections})
        return _merge(ctx.config, result, shares, coord) if shares is not None else None
    finally:
        d.destroy()


def _pipeline_coordinator(ctx: _Ctx) -> Any:
    from workbench.parallel.pipeline import PipelineCoordinator

    return PipelineCoordinator(ctx.config)


def _check_world(ctx: _Ctx) -> None:
    from workbench.errors import ConfigError

    cfg = ctx.config
    asked = max(cfg.tensor_parallel, cfg.data_parallel, cfg.pipeline_parallel)
    if asked == 1:
        raise ConfigError(f"{ctx.world} ranks were started: give --tensor-parallel {ctx.world}, --data-parallel "
                          f"{ctx.world} or --pipeline-parallel {ctx.world}")
    if asked != ctx.world:
        kind = ("tensor_parallel" if cfg.tensor_parallel > 1 else
                "pipeline_parallel" if cfg.pipeline_parallel > 1 else "data_parallel")
        raise ConfigError(f"{ctx.world} ranks were started but the run asks for {kind} {asked}; they must match")


def _prime_baselines(ctx: _Ctx, rank_config: RunConfig, plan: Any) -> None:
    """Local rank 0 fills the accuracy-baseline cache for every rank of its machine, so ranks only read it."""
    from workbench.models.sources import resolve
    from workbench.parallel.distributed import RowShare
    from workbench.runner import precompute_baseline

    if ctx.local_rank != 0 or rank_config.eval_tokens == 0 or resolve(rank_config.model).random_weights:
        return
    first = ctx.rank - ctx.local_rank
    ranks = range(first, first + ctx.local_world) if plan.kind == "data" else [ctx.rank]
    for rank in ranks:
        precompute_baseline(rank_config, ctx.on_event, ctx.should_stop, RowShare(plan.kind, rank, ctx.world))


def _merge(config: RunConfig, result: Any, shares: list[dict[str, Any]], coord: Any) -> Any:
    """Rank 0's result with every rank's info; data parallel: every replica's outputs, in prompt order."""
    from workbench.result import ParallelInfo

    ranks = tuple(s["info"] for s in shares)
    warnings, outputs, aggregate = list(result.warnings), result.outputs, ranks[0].decode_tokens_per_s
    if coord.kind == "data":
        outputs = tuple(o for s in shares for o in s["outputs"])
        rates = [r.decode_tokens_per_s for r in ranks]
        aggregate = sum(rates) if None not in rates else None
        warnings.append(f"data parallel: latency, memory and accuracy are rank 0's ({ranks[0].rows} of "
                        f"{config.batch_size} prompts); aggregate decode tokens/s is the sum of the {len(ranks)} "
                        "replicas' decode tokens/s, measured side by side")
    if coord.kind == "pipeline":
        warnings.append(f"pipeline parallel: each of the {coord.world_size} ranks loads the whole model (the accuracy "
                        "pass runs on every rank's copy) and times only its stage; memory is rank 0's")
    info = ParallelInfo(kind=coord.kind, world_size=coord.world_size, backend=coord.backend, placement={},
                        bytes_by_device={}, ranks=ranks, aggregate_decode_tokens_per_s=aggregate)
    stopped = any(s["status"] == "stopped" for s in shares)
    sections = {t.section: t.merge([s["sections"].get(t.section) for s in shares], coord.kind)
                for t in tracker.trackers()}  # each tracker says how its ranks' values combine
    return dataclasses.replace(result, config=config, outputs=outputs, output_text=outputs[0] if outputs else "",
                               parallel=info, warnings=tuple(warnings), sections=sections,
                               status="stopped" if stopped else result.status)


def _parse(argv: Sequence[str]) -> tuple[RunConfig, argparse.Namespace, dict[str, Any] | None]:
    """`--launch-file` (from run_distributed), else the flags of `workbench run`."""
    own = argparse.ArgumentParser(add_help=False)
    own.add_argument("--launch-file", default=None)
    known, rest = own.parse_known_args(argv)
    if known.launch_file:
        with open(known.launch_file, encoding="utf-8") as f:
            launch = json.load(f)
        return RunConfig.from_dict(launch["config"]), argparse.Namespace(no_store=True, store=None), launch
    from workbench.flags import add_run_arguments, config_from_args

    parser = argparse.ArgumentParser(prog="workbench.parallel.worker", description="One rank of `workbench run` "
                                     "under torchrun (the same flags).")
    add_run_arguments(parser)
    args = parser.parse_args(rest)
    return config_from_args(args), args, None


def _standalone_output(result: Any, args: argparse.Namespace, out: Any) -> None:
    """Under torchrun: store the result (unless --no-store) and print it as one JSON object."""
    if not args.no_store:
        from workbench.store import Store

        result = result.with_id(Store(args.store).add(result))
    out.write(result.to_json() + "\n")
    out.flush()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of one rank."""
    from workbench import logs

    logs.setup(0)
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # stray prints from libraries go to stderr: stdout carries only the result
    from workbench.parallel.distributed import hide_gpus_for_cpu_run, world_from_env
    from workbench.parallel.relay import RankLink

    link = None
    try:
        config, args, launch = _parse(sys.argv[1:] if argv is None else argv)
        hide_gpus_for_cpu_run(config.device)
        rank, world, local_rank, local_world = world_from_env()
        ctx = _Ctx(config, rank, world, local_rank, local_world)
        if launch:
            die_with_parent()
            link = RankLink(launch["relay"], launch["token"], rank)
            ctx.on_event, ctx.should_stop = (link.emit if rank == 0 else no_event), link.stop.is_set
        result = run_rank(ctx)
    except (Exception, KeyboardInterrupt) as e:  # noqa: BLE001 - every failure becomes one sentence
        return report_failure(e, link, out)
    if result is not None:
        if link is not None:
            link.send({"result": result.to_dict()})
        else:
            _standalone_output(result, args, out)
    if link is not None:
        link.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
