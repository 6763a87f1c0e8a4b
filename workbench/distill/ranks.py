"""Start the ranks of a data-parallel distillation and follow them; the rank entry point (torchrun-compatible).

`distill_on_ranks` (the parent) checks the request, writes a private launch file, starts N
`python -m workbench.distill.ranks` ranks with torch's elastic launcher (as `workbench run --data-parallel`
does, see `workbench.parallel.launch`), relays rank 0's events and the stop requests, and returns rank 0's
DistillResult. The same module runs under torchrun with the flags of `workbench distill`:

    torchrun --standalone --nproc-per-node 2 -m workbench.distill.ranks --data-parallel 2 --sync async \\
        --average-every 8 --steps 200 --name tiny-dp

rank 0 then prints the result as one JSON object on stdout.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch

from workbench.distill.config import DistillConfig, DistillResult, DistillStart
from workbench.errors import ConfigError
from workbench.events import MetricEvent, OnEvent, never_stop, no_event
from workbench.execution import cpu_cores, resolve_device, threads
from workbench.serde import from_dict

logger = logging.getLogger(__name__)


def check_ranks(config: DistillConfig) -> torch.device:
    """The device type of the ranks; ConfigError when this machine cannot hold `data_parallel` of them."""
    from workbench.parallel.distributed import ranks_device

    return ranks_device(config.device, "data_parallel", config.data_parallel, config.data_parallel)


def distill_on_ranks(config: DistillConfig, on_event: OnEvent = no_event,
                     should_stop: Callable[[], bool] = never_stop) -> DistillResult:
    """Distil on `config.data_parallel` local ranks; rank 0's result (it saved the student)."""
    from workbench.distill.train import Distillation
    from workbench.parallel.launch import launch_ranks

    check_ranks(config)
    Distillation(config, on_event, should_stop).prepare()  # teacher source, name, text: before a process starts
    world = config.data_parallel
    return DistillResult.from_dict(launch_ranks("workbench.distill.ranks", config.to_dict(), world, _typed(on_event),
                                                should_stop, f"the {world} distillation ranks"))


def _typed(on_event: OnEvent) -> OnEvent:
    """Rank 0's start and result metrics arrive as dicts: hand them on as DistillStart / DistillResult."""
    kinds = {"start": DistillStart, "result": DistillResult}

    def forward(event: Any) -> None:
        if isinstance(event, MetricEvent) and event.section in kinds and isinstance(event.value, dict):
            event = MetricEvent(event.section, from_dict(kinds[event.section], event.value))
        on_event(event)
    return forward


def run_rank(config: DistillConfig, on_event: OnEvent, should_stop: Callable[[], bool]) -> DistillResult | None:
    """Join the process group, train this rank's share; rank 0 saves the student and returns the result."""
    from workbench.distill.dp import RankDistillation
    from workbench.parallel import distributed as d

    rank, world, local_rank, local_world = d.world_from_env()
    if world != config.data_parallel:
        raise ConfigError(f"{world} ranks were started but the distillation asks for data_parallel "
                          f"{config.data_parallel}; they must match")
    device = torch.device("cuda", local_rank) if resolve_device(config.device).type == "cuda" else torch.device("cpu")
    d.init_process_group(device)
    try:
        with threads(config.threads or max(1, cpu_cores() // local_world)):
            job = RankDistillation(config, on_event if rank == 0 else no_event, should_stop, device)
            job.prepare()
            job.load()
            job.train()
            return job.finish() if rank == 0 else None
    finally:
        d.destroy()


def _parse(argv: Sequence[str]) -> tuple[DistillConfig, dict[str, Any] | None]:
    """`--launch-file` (from distill_on_ranks), else the flags of `workbench distill`."""
    own = argparse.ArgumentParser(add_help=False)
    own.add_argument("--launch-file", default=None)
    known, rest = own.parse_known_args(argv)
    if known.launch_file:
        with open(known.launch_file, encoding="utf-8") as f:
            launch = json.load(f)
        return DistillConfig.from_dict(launch["config"]), launch
    from workbench.flags import add_dataclass_arguments, dataclass_from_args

    parser = argparse.ArgumentParser(prog="workbench.distill.ranks", description="One rank of `workbench distill "
                                     "--data-parallel N` under torchrun (the same flags).")
    add_dataclass_arguments(parser, DistillConfig)
    return dataclass_from_args(DistillConfig, parser.parse_args(rest)), None


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of one rank."""
    from workbench import logs
    from workbench.parallel.distributed import hide_gpus_for_cpu_run
    from workbench.parallel.rank_exit import die_with_parent, report_failure
    from workbench.parallel.relay import RankLink

    logs.setup(0)
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # stray prints from libraries go to stderr: stdout carries only the result
    link, stop = None, never_stop
    try:
        config, launch = _parse(sys.argv[1:] if argv is None else argv)
        hide_gpus_for_cpu_run(config.device)
        if launch:
            die_with_parent()
            link = RankLink(launch["relay"], launch["token"], int(os.environ.get("RANK", "0")))
            stop = link.stop.is_set
        result = run_rank(config, link.emit if link is not None else no_event, stop)
    except (Exception, KeyboardInterrupt) as e:  # noqa: BLE001 - every failure becomes one sentence
        return report_failure(e, link, out)
    if result is not None:
        if link is not None:
            link.send({"result": result.to_dict()})
        else:
            out.write(result.to_json() + "\n")
            out.flush()
    if link is not None:
        link.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
