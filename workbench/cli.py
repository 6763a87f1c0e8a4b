"""`workbench` command line: run, models, techniques, results, build-reference."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import typing
from collections.abc import Sequence
from typing import Any

from workbench import logs
from workbench.config import spell_fields
from workbench.paths import STORE_HELP
from workbench.distill_cli import add_distill_parser, cmd_distill
from workbench.results_cli import add_results_parser, cmd_results
from workbench.sweep_cli import add_sweep_parser, cmd_sweep

EXIT_ERROR, EXIT_USAGE, EXIT_STOPPED = 1, 2, 130


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as one sentence (plus a pointer to --help)."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def flags_in(message: str, cls: type) -> str:
    """`message` with `cls`'s field names written as the flags the user typed (max_new_tokens -> --max-new-tokens)."""
    return spell_fields(message, cls, _flag)


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type, skip: Sequence[str] = ()) -> None:
    """One flag per dataclass field: type, choices and help from the field; unset flags keep the default."""
    hints = typing.get_type_hints(cls)
    groups: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        meta = f.metadata
        group = groups.setdefault(meta.get("group", "options"), parser.add_argument_group(meta.get("group", "options")))
        help_text = meta.get("help", "") + (f" (default: {f.default})" if f.default is not None else "")
        types = [a for a in (typing.get_args(hints[f.name]) or (hints[f.name],)) if a is not type(None)]
        if types == [bool]:
            flag = _flag(f.name) if not f.default else "--no-" + f.name.replace("_", "-")
            text = meta.get("help", "")
            if f.default:  # a --no-FLAG turns the field off: its help says what that does, not what "on" does
                text = meta.get("help_off") or f"Turn this off (it is on by default): {text}"
            group.add_argument(flag, dest=f.name, action="store_false" if f.default else "store_true",
                               default=argparse.SUPPRESS, help=text)
            continue
        group.add_argument(_flag(f.name), dest=f.name, type=types[0], choices=meta.get("choices"),
                           default=argparse.SUPPRESS, help=help_text,
                           metavar=None if meta.get("choices") else f.name.upper())


class _TechniqueAction(argparse.Action):
    """--quant / --prune: append (kind, spec) to one ordered list, so the order of flags is the order applied."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, value: Any,
                 option_string: str | None = None) -> None:
        items = list(getattr(namespace, "technique_flags", []) or [])
        items.append((self.const, value))
        namespace.technique_flags = items


def _run_parser(sub: Any) -> None:
    from workbench.config import RunConfig

    p = sub.add_parser("run", help="load a model, apply techniques, measure latency, memory and accuracy",
                       description="Run one configuration and store its result.")
    add_dataclass_arguments(p, RunConfig, skip=("techniques",))
    t = p.add_argument_group("Techniques")
    t.add_argument("--quant", action=_TechniqueAction, const="quant", metavar="SPEC",
                   help="quantization technique NAME or NAME:key=value,... (repeatable; see `workbench techniques`)")
    t.add_argument("--prune", action=_TechniqueAction, const="prune", metavar="SPEC",
                   help="pruning technique NAME or NAME:key=value,... (repeatable, applied in order)")
    o = p.add_argument_group("Output")
    o.add_argument("--store", default=None, help=STORE_HELP)
    o.add_argument("--no-store", action="store_true", help="do not record this run")
    o.add_argument("--json", action="store_true", help="print exactly one JSON object on stdout")


def dataclass_from_args(cls: type, args: argparse.Namespace, **extra: Any) -> Any:
    """`cls` built from the parsed flags named like its fields (ValueError with one sentence when invalid)."""
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
    return cls(**{**given, **extra})


def _config_from_args(args: argparse.Namespace):  # -> RunConfig
    from workbench.config import RunConfig
    from workbench.techniques import load_all, parse_spec

    load_all()
    specs = []
    for kind, spec in getattr(args, "technique_flags", []) or []:
        technique = parse_spec(spec)
        if technique.kind != kind:
            what, flag = ("pruning", "--prune") if technique.kind == "prune" else ("quantization", "--quant")
            raise ValueError(f"{technique.name} is a {what} technique: pass it with {flag}")
        specs.append(spec)
    return dataclass_from_args(RunConfig, args, techniques=tuple(specs))


def _progress_printer(enabled: bool, every_s: float = 5.0):
    """An on_event that narrates stages on stderr (the result itself goes to stdout): each start, and a stage's
    progress (tokens done, time left) when it has been quiet for `every_s` seconds (its first progress at once)."""
    from workbench.events import StageEvent

    last: dict[str, float] = {}

    def on_event(event: Any) -> None:
        if not enabled or not isinstance(event, StageEvent):
            return
        if event.state == "start":
            last[event.stage] = float("-inf")  # the stage's first progress line is printed at once
        elif not (event.state == "progress" and event.message
                  and event.elapsed_s - last.get(event.stage, float("-inf")) >= every_s):
            return
        else:
            last[event.stage] = event.elapsed_s
        print(f"[{event.elapsed_s:6.1f}s] {event.stage}: {event.message}", file=sys.stderr, flush=True)
    return on_event


def cmd_run(args: argparse.Namespace) -> int:
    from workbench.cli_interrupt import stop_on_ctrl_c
    from workbench.config import RunConfig
    from workbench.errors import ConfigError, InsufficientMemory, WorkbenchError
    from workbench.report import format_result
    from workbench.runner import run
    from workbench.store import Store

    try:
        config = _config_from_args(args)
    except ValueError as e:
        return _usage(args.prog, flags_in(str(e), RunConfig))
    store = None
    try:
        with stop_on_ctrl_c("stopping after the current token") as stop:
            store = None if args.no_store else Store(args.store)
            result = run(config, _progress_printer(not args.json), stop)
    except (ConfigError, InsufficientMemory) as e:  # refused before anything was loaded: nothing to store
        return _usage(args.prog, flags_in(str(e), RunConfig))
    except WorkbenchError as e:
        if store is not None:
            store.add_error(config, str(e))
        return _fail(flags_in(str(e), RunConfig), args.json, config)
    if store is not None:
        result = result.with_id(store.add(result))
        if not args.json:
            print(f"stored as run {result.run_id} in {store.path}", file=sys.stderr, flush=True)
    print(result.to_json() if args.json else format_result(result), flush=True)
    return EXIT_STOPPED if result.status == "stopped" else 0


def _usage(prog: str, message: str) -> int:
    print(f"{prog}: error: {message}", file=sys.stderr)
    return EXIT_USAGE


def _fail(message: str, as_json: bool, config: Any = None) -> int:
    print(f"error: {message}", file=sys.stderr)
    if as_json:
        print(json.dumps({"status": "error", "error": message, "config": config.to_dict() if config else None}))
    return EXIT_ERROR


def cmd_models(args: argparse.Namespace) -> int:
    from workbench.models.catalog import describe_sources
    from workbench.report import table

    rows = describe_sources()
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        print(table([(r["source"], r["kind"], r["params"], r["notes"]) for r in rows],
                    ("source", "kind", "params", "notes")))
    return 0


def cmd_techniques(args: argparse.Namespace) -> int:
    from workbench.report import table
    from workbench.techniques import describe_techniques

    rows = describe_techniques(args.device)
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    print(table([(r["name"], r["kind"], "yes" if r["available"] else f"no: {r['reason']}",
                  "simulated" if r["simulated"] else "real", r["signature"]) for r in rows],
                ("name", "kind", f"runs on {rows[0]['device'] if rows else args.device}", "effect", "parameters")))
    return 0


def cmd_build_reference(args: argparse.Namespace) -> int:
    from workbench.reference.build import Recipe, build_reference

    try:
        recipe = dataclass_from_args(Recipe, args)
    except ValueError as e:
        return _usage(args.prog, str(e))
    report = build_reference(args.out, recipe, _progress_printer(True))
    m = report["metrics"]
    print(f"built {args.out}: {m['params'] / 1e6:.2f} M params, held-out perplexity {m['heldout_perplexity']:.2f} "
          f"(unigram {m['unigram_perplexity']:.2f}), next-token accuracy {m['heldout_next_token_accuracy']:.3f}")
    return 0


def cmd_sensitivity(args: argparse.Namespace) -> int:
    from workbench.errors import WorkbenchError
    from workbench.report import format_sensitivity
    from workbench.sensitivity import analyze

    specs = [spec for _, spec in getattr(args, "technique_flags", []) or []]
    if len(specs) != 1:
        return _usage(args.prog, "give exactly one technique with --quant SPEC or --prune SPEC")
    try:
        report = analyze(args.model, specs[0], dtype=args.dtype, device=args.device, eval_tokens=args.eval_tokens,
                         eval_context=args.eval_context, histogram_layer=args.layer,
                         on_event=_progress_printer(not args.json))
    except ValueError as e:
        return _usage(args.prog, str(e))
    except WorkbenchError as e:
        return _fail(str(e), args.json)
    print(json.dumps(report.to_dict()) if args.json else format_sensitivity(report))
    return 0


def _sensitivity_parser(sub: Any) -> None:
    s = sub.add_parser("sensitivity", help="per-layer error (SQNR, KL) of one technique, and a weight histogram")
    s.add_argument("--model", default="tiny", help="model source (default: tiny)")
    s.add_argument("--dtype", default="fp32", choices=("fp32", "fp16", "bf16"))
    s.add_argument("--device", default="auto")
    s.add_argument("--quant", action=_TechniqueAction, const="quant", metavar="SPEC", help="the technique to study")
    s.add_argument("--prune", action=_TechniqueAction, const="prune", metavar="SPEC", help="the technique to study")
    s.add_argument("--eval-tokens", type=int, default=512, help="held-out tokens per layer (default 512)")
    s.add_argument("--eval-context", type=int, default=128, help="tokens per window (default 128)")
    s.add_argument("--layer", default=None, help="layer for the histogram (default: the most sensitive)")
    s.add_argument("--json", action="store_true", help="print the report as one JSON object")


def cmd_dashboard(args: argparse.Namespace) -> int:
    from workbench.dashboard import DashboardConfig, check_defaults, local_url, serve, server_token
    from workbench.publish import PublishPolicy

    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(DashboardConfig) if hasattr(args, f.name)}
    caps = {f.name: getattr(args, f.name) for f in dataclasses.fields(PublishPolicy) if hasattr(args, f.name)}
    defaults: dict[str, Any] = {}
    try:
        config = DashboardConfig(**given)
        if caps and not config.locked:
            raise ValueError(f"{_flag(next(iter(caps)))} sets the publisher's lock, which is off here: add --lock")
        policy = PublishPolicy(**caps) if config.locked else None
        for item in args.set or []:
            key, eq, raw = item.partition("=")
            if not eq:
                raise ValueError(f"--set takes KEY=VALUE; got {item!r}")
            try:
                defaults[key.strip()] = json.loads(raw)
            except ValueError:
                defaults[key.strip()] = raw
        from workbench.config import RunConfig

        RunConfig(**{k: v for k, v in defaults.items() if k != "techniques"})
        check_defaults(policy, defaults)
    except (ValueError, TypeError) as e:
        return _usage(args.prog, str(e))
    token = server_token(config)
    print(f"dashboard: {local_url(config, token)}  (Ctrl-C to stop)", flush=True)
    if config.published and not config.needs_token:
        print("warning: published without a token: every visitor who reaches this port gets the app; only do "
              "this behind a proxy that authenticates", file=sys.stderr, flush=True)
    if policy is not None:
        print(f"locked: models {', '.join(policy.models)}; batch <= {policy.max_batch_size}, new tokens <= "
              f"{policy.max_new_tokens}; files under {policy.root}", flush=True)
    return serve(config, defaults, policy, token)


def _dashboard_parser(sub: Any) -> None:
    from workbench.dashboard import DashboardConfig
    from workbench.publish import PublishPolicy

    d = sub.add_parser("dashboard", help="serve the app as a Voila dashboard (127.0.0.1 unless told otherwise)",
                       description="Serve the app with Voila. On 127.0.0.1 it is yours alone; on any other "
                       "address it is published: a token is required and the publisher's lock is on by default.")
    add_dataclass_arguments(d, DashboardConfig, skip=("token", "lock"))
    p = d.add_argument_group("Publishing")
    for name in ("token", "lock"):
        p.add_argument(_flag(name), dest=name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                       help=DashboardConfig.__dataclass_fields__[name].metadata["help"])
    add_dataclass_arguments(d, PublishPolicy, skip=("models", "root"))
    d.add_argument("--models", dest="models", default=argparse.SUPPRESS, metavar="LIST",
                   help=PublishPolicy.__dataclass_fields__["models"].metadata["help"])
    d.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="starting value of a run setting in the app, e.g. --set threads=1 --set max_new_tokens=64")


def build_parser() -> argparse.ArgumentParser:
    """The whole command line."""
    from workbench import __version__
    from workbench.reference.build import Recipe

    parser = _Parser(prog="workbench", description="LLM Inference Workbench: what each inference optimization "
                     "costs in latency, memory and accuracy.")
    parser.add_argument("--version", action="version", version=f"workbench {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging on stderr (-vv: debug)")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _run_parser(sub)
    m = sub.add_parser("models", help="list model sources")
    m.add_argument("--json", action="store_true")
    t = sub.add_parser("techniques", help="list techniques, their parameters, and whether they run here")
    t.add_argument("--device", default="auto", help="device to check against (default: auto)")
    t.add_argument("--json", action="store_true")
    add_results_parser(sub)
    _sensitivity_parser(sub)
    add_sweep_parser(sub)
    add_distill_parser(sub)
    _dashboard_parser(sub)
    b = sub.add_parser("build-reference", help="rebuild the `tiny` reference model from the stdlib docs")
    b.add_argument("--out", default="build/tiny", help="output folder (default: build/tiny)")
    add_dataclass_arguments(b, Recipe)
    return parser


COMMANDS = {"run": cmd_run, "models": cmd_models, "techniques": cmd_techniques, "results": cmd_results,
            "build-reference": cmd_build_reference, "sensitivity": cmd_sensitivity, "dashboard": cmd_dashboard,
            "sweep": cmd_sweep, "distill": cmd_distill}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `workbench` console script."""
    logs.quiet_libraries()
    parser = build_parser()
    args = parser.parse_args(argv)
    logs.setup(args.verbose)
    args.prog = f"workbench {args.command}"
    try:
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print("aborted", file=sys.stderr)
        return EXIT_STOPPED


if __name__ == "__main__":
    sys.exit(main())
