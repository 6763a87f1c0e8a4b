"""`workbench run`, and the listings and one-model tools beside it: models, techniques, sensitivity, build-reference."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from workbench import runner
from workbench.cli.common import EXIT_STOPPED, HELP, fail, progress_printer, usage
from workbench.cli.interrupt import stop_on_ctrl_c
from workbench.config import RunConfig
from workbench.errors import ConfigError, InsufficientMemory, WorkbenchError
from workbench.flags import (TechniqueAction, add_dataclass_arguments, add_run_arguments, config_from_args,
                             dataclass_from_args, flags_in)
from workbench.models.catalog import describe_sources
from workbench.reference.build import Recipe, build_reference
from workbench.report import format_result, format_sensitivity, table
from workbench.sensitivity import analyze
from workbench.store import Store
from workbench.engines.base import engine_class, engines
from workbench.techniques import describe_techniques


def add_run_parser(sub: Any) -> None:
    """The `run` subcommand: one flag per RunConfig field, --quant/--prune, and the output flags."""
    p = sub.add_parser("run", help=HELP["run"],
                       description="Run one configuration and store its result.")
    add_run_arguments(p)


def cmd_run(args: argparse.Namespace) -> int:
    """Run one configuration, store it, print it (a table, or one JSON object with --json)."""
    try:
        config = config_from_args(args)
    except ValueError as e:
        return usage(args.prog, flags_in(str(e), RunConfig))
    store = None
    try:
        with stop_on_ctrl_c("stopping after the current token") as stop:
            store = None if args.no_store else Store(args.store)
            result = runner.run(config, progress_printer(not args.json), stop)
    except (ConfigError, InsufficientMemory) as e:  # refused before anything was loaded: nothing to store
        return usage(args.prog, flags_in(str(e), RunConfig))
    except WorkbenchError as e:
        if store is not None:
            store.add_error(config, str(e))
        return fail(flags_in(str(e), RunConfig), args.json, config)
    if store is not None:
        result = result.with_id(store.add(result))
        if not args.json:
            print(f"stored as run {result.run_id} in {store.path}", file=sys.stderr, flush=True)
    print(result.to_json() if args.json else format_result(result), flush=True)
    return EXIT_STOPPED if result.status == "stopped" else 0


def add_models_parser(sub: Any) -> None:
    """`models`: the model sources that can be run."""
    m = sub.add_parser("models", help=HELP["models"])
    m.add_argument("--json", action="store_true")


def add_techniques_parser(sub: Any) -> None:
    """`techniques`: what each technique does and whether it runs here."""
    t = sub.add_parser("techniques", help=HELP["techniques"])
    t.add_argument("--device", default="auto", help="device to check against (default: auto)")
    t.add_argument("--engine", default="hf", choices=sorted(engines()),
                   help="inference engine to check against (default: hf)")
    t.add_argument("--json", action="store_true")


def cmd_models(args: argparse.Namespace) -> int:
    """List the model sources (a table, or JSON)."""
    rows = describe_sources()
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        print(table([(r["source"], r["kind"], r["params"], r["notes"]) for r in rows],
                    ("source", "kind", "params", "notes")))
    return 0


def cmd_techniques(args: argparse.Namespace) -> int:
    """List every technique, its parameters and whether it runs on the device (a table, or JSON)."""
    engine = engine_class(args.engine)
    rows = [{**r, "engine": args.engine, **({"available": False, "reason": why} if r["available"] and why else {})}
            for r in describe_techniques(args.device) for why in [engine.can_apply(r["name"])]]
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    print(table([(r["name"], r["kind"], "yes" if r["available"] else f"no: {r['reason']}",
                  "simulated" if r["simulated"] else "real", r["signature"]) for r in rows],
                ("name", "kind", f"runs on {rows[0]['device'] if rows else args.device} ({args.engine})", "effect",
                 "parameters")))
    return 0


def add_build_reference_parser(sub: Any) -> None:
    """`build-reference`: one flag per Recipe field, and the output folder."""
    b = sub.add_parser("build-reference", help=HELP["build-reference"])
    b.add_argument("--out", default="build/tiny", help="output folder (default: build/tiny)")
    add_dataclass_arguments(b, Recipe)


def cmd_build_reference(args: argparse.Namespace) -> int:
    """Train the reference model into --out and print its held-out metrics."""
    try:
        recipe = dataclass_from_args(Recipe, args)
    except ValueError as e:
        return usage(args.prog, str(e))
    report = build_reference(args.out, recipe, progress_printer(True))
    m = report["metrics"]
    print(f"built {args.out}: {m['params'] / 1e6:.2f} M params, held-out perplexity {m['heldout_perplexity']:.2f} "
          f"(unigram {m['unigram_perplexity']:.2f}), next-token accuracy {m['heldout_next_token_accuracy']:.3f}")
    return 0


def add_sensitivity_parser(sub: Any) -> None:
    """`sensitivity`: one technique's per-layer error."""
    s = sub.add_parser("sensitivity", help=HELP["sensitivity"])
    s.add_argument("--model", default="tiny", help="model source (default: tiny)")
    s.add_argument("--dtype", default="fp32", choices=("fp32", "fp16", "bf16"))
    s.add_argument("--device", default="auto")
    s.add_argument("--quant", action=TechniqueAction, const="quant", metavar="SPEC", help="the technique to study")
    s.add_argument("--prune", action=TechniqueAction, const="prune", metavar="SPEC", help="the technique to study")
    s.add_argument("--eval-tokens", type=int, default=512, help="held-out tokens per layer (default 512)")
    s.add_argument("--eval-context", type=int, default=128, help="tokens per window (default 128)")
    s.add_argument("--layer", default=None, help="layer for the histogram (default: the most sensitive)")
    s.add_argument("--json", action="store_true", help="print the report as one JSON object")


def cmd_sensitivity(args: argparse.Namespace) -> int:
    """Measure one technique layer by layer; print the table (or JSON)."""
    specs = [spec for _, spec in getattr(args, "technique_flags", []) or []]
    if len(specs) != 1:
        return usage(args.prog, "give exactly one technique with --quant SPEC or --prune SPEC")
    try:
        report = analyze(args.model, specs[0], dtype=args.dtype, device=args.device, eval_tokens=args.eval_tokens,
                         eval_context=args.eval_context, histogram_layer=args.layer,
                         on_event=progress_printer(not args.json))
    except ValueError as e:
        return usage(args.prog, str(e))
    except WorkbenchError as e:
        return fail(str(e), args.json)
    print(json.dumps(report.to_dict()) if args.json else format_sensitivity(report))
    return 0
