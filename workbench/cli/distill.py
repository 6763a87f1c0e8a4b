"""`workbench distill`: distil a smaller student from a teacher and save it as `student:NAME` (see workbench.distill)."""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable
from typing import Any

from workbench.cli.common import EXIT_STOPPED, HELP, fail, usage
from workbench.cli.interrupt import stop_on_ctrl_c
from workbench.distill import DistillConfig, DistillResult, distill
from workbench.errors import WorkbenchError
from workbench.events import StageEvent, TrainEvent
from workbench.flags import add_dataclass_arguments, dataclass_from_args
from workbench.report import table

_EPILOG = """\
student specs (steps joined by '+', applied to a copy of the teacher):
  structured:heads_ratio=0.5,mlp_ratio=0.5   cut half the heads and MLP channels of every layer
  layers:keep=4                              keep 4 evenly spaced decoder layers (layers:indices=0|2|5: these)
  layers:keep=4+structured:mlp_ratio=0.5     both
  model:student:small                        start from an existing smaller model (same tokenizer)

examples:
  workbench distill --steps 400 --name tiny-half
  workbench run --model student:tiny-half          # then compare it with the teacher and the pruned-only model
  workbench distill --text my_notes.txt --student layers:keep=3 --name notes-3l --json
  workbench distill --data-parallel 2 --sync async --average-every 8 --straggler-ms 50 --name tiny-dp

loss = (1 - ce_weight) * T^2 * KL(teacher_T || student_T) + ce_weight * CE(student, text), per token.
The held-out perplexity is checked every --eval-every steps; the best checkpoint is saved. Ctrl-C stops after
the current step and still saves the best checkpoint; a second Ctrl-C aborts without saving.
"""


def add_distill_parser(sub: Any) -> None:
    """The `distill` subcommand's arguments: one flag per DistillConfig field, plus --json."""
    p = sub.add_parser("distill", help=HELP["distill"],
                       description="Make a student from the teacher (pruned or with fewer layers), train it to "
                       "match the teacher's next-token distributions, and save the best checkpoint as a model "
                       "source.", epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataclass_arguments(p, DistillConfig)
    p.add_argument("--json", action="store_true", help="print exactly one JSON object on stdout")


def _progress(enabled: bool) -> Callable[[Any], None]:
    """An on_event that prints stages and one line per held-out check on stderr."""
    best = [math.inf]

    def on_event(event: Any) -> None:
        if not enabled:
            return
        if isinstance(event, StageEvent) and event.state == "start":
            print(f"[{event.elapsed_s:6.1f}s] {event.stage}: {event.message}", file=sys.stderr, flush=True)
        elif isinstance(event, TrainEvent) and event.heldout_loss is not None:
            best[0] = min(best[0], event.heldout_loss)
            print(progress_line(event, best[0]), file=sys.stderr, flush=True)
    return on_event


def progress_line(event: Any, best_loss: float) -> str:
    """`step 50/200  loss 3.81  KL 0.41  held-out perplexity 40.1 (best 39.8)  2,412 tok/s` for a TrainEvent."""
    kl = f"  KL {event.kl:.3f}" if event.kl is not None else ""
    return (f"step {event.step}/{event.steps}  loss {event.loss:.3f}{kl}  held-out perplexity "
            f"{math.exp(event.heldout_loss):.2f} (best {math.exp(best_loss):.2f})  {event.tokens_per_s:,.0f} tok/s")


def pruned_only_command(config: DistillConfig) -> str | None:
    """The `workbench run` that measures the student before training, when a run can build it (pruning steps only)."""
    parts = [p.strip() for p in config.student.split("+")]
    if not all(p.startswith("structured") for p in parts):
        return None
    return f"workbench run --model {config.teacher} " + " ".join(f"--prune {p}" for p in parts)


def format_distill(r: DistillResult) -> str:
    """The final table: teacher / student before training / distilled, and how to use the student."""
    rows = [(f"teacher ({r.config.teacher})", f"{r.teacher_params / 1e6:.2f} M", f"{r.teacher_perplexity:.2f}"),
            ("student before training", f"{r.student_params / 1e6:.2f} M", f"{r.start_perplexity:.2f}"),
            (f"distilled (best: step {r.best_step})", f"{r.student_params / 1e6:.2f} M", f"{r.final_perplexity:.2f}")]
    lines = [table(rows, ("model", "params", "held-out perplexity")), ""]
    recovered = r.recovered
    if recovered is not None:
        lines.append(f"recovered {recovered:.0%} of the held-out log-perplexity the student had lost")
    lines.append(f"{r.status}: {r.steps_done}/{r.config.steps} steps in {r.train_s:.1f} s of training "
                 f"({r.tokens_per_s:,.0f} tok/s), {r.wall_s:.1f} s in all; student: {r.student_layout}")
    lines.append(f"saved to {r.path}")
    lines.append(f"use it:  workbench run --model {r.model}")
    pruned = pruned_only_command(r.config)
    if pruned:
        lines.append(f"compare: {pruned}   (the student before training)")
    if r.parallel is not None:
        lines += ["", format_ranks(r.parallel)]
    return "\n".join(lines)


def format_ranks(par: Any) -> str:
    """Where each data-parallel rank's training time went, and whether the ranks ended identical."""
    mode = ("sync: gradients averaged every step" if par.sync == "sync"
            else f"async (local SGD): weights averaged every {par.average_every} steps")
    rows = [(str(s.rank), str(s.steps_done), f"{s.compute_s:.2f}", f"{s.straggler_s:.2f}", f"{s.wait_s:.2f}",
             f"{s.comm_s:.2f}", str(s.collectives), f"{s.wall_s:.2f}") for s in par.ranks]
    head = ("rank", "steps", "compute s", "straggler s", "waiting s", "all-reduce s", "meetings", "wall s")
    same = "yes" if par.identical else "no"
    return "\n".join([f"{mode}, {par.world_size} ranks ({par.backend}); final weights bit-identical: {same}",
                      table(rows, head)])


def cmd_distill(args: argparse.Namespace) -> int:
    """Validate the flags, distil, print the table (or one JSON object)."""
    try:
        config = dataclass_from_args(DistillConfig, args)
    except ValueError as e:
        return usage(args.prog, str(e))
    try:
        with stop_on_ctrl_c("stopping after the current step; the best checkpoint will be saved") as stop:
            result = distill(config, _progress(not args.json), stop)
    except WorkbenchError as e:
        return fail(str(e), args.json, config)
    if args.json:
        print(json.dumps(result.to_dict() | {"recovered": result.recovered}), flush=True)
    else:
        print(format_distill(result), flush=True)
    return EXIT_STOPPED if result.status == "stopped" else 0
