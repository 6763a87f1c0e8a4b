"""`workbench sweep`: run a grid of configurations from a file and/or flags; a rerun resumes (see workbench.sweep)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from workbench.cli.common import EXIT_ERROR, EXIT_STOPPED, HELP, fail, usage
from workbench.cli.interrupt import stop_on_ctrl_c
from workbench.errors import WorkbenchError
from workbench.paths import STORE_HELP
from workbench.report import human_bytes, table
from workbench.store import Store, config_hash
from workbench.sweep import SweepEvent, SweepReport, SweepSpec, run_sweep

_EPILOG = """\
grid file (YAML or JSON; every key is a `workbench run` setting, with underscores):
  base: {model: tiny, max_new_tokens: 16}
  grid:
    dtype: [fp32, bf16]
    techniques: [none, "sim:bits=4,granularity=per-group", "magnitude:sparsity=0.5+dynamic-int8"]

examples:
  workbench sweep grid.yaml
  workbench sweep --set max_new_tokens=16 --axis 'dtype=fp32|bf16' \\
      --axis 'techniques=none|sim:bits=4|magnitude:sparsity=0.5+dynamic-int8'

Each run is stored as soon as it ends; running the same sweep again skips the configurations already
stored with status ok (a stopped or failed one runs again). Ctrl-C stops after the current token and
ends the sweep (the partial run is stored as stopped); a second Ctrl-C aborts.
"""


def add_sweep_parser(sub: Any) -> None:
    """The `sweep` subcommand's arguments."""
    s = sub.add_parser("sweep", help=HELP["sweep"],
                       description="Run every combination of the grid's values, in order, storing each run as it "
                       "ends.", epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("file", nargs="?", default=None, help="YAML or JSON grid file: {base: {...}, grid: {...}}")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a setting shared by every run, e.g. --set max_new_tokens=16 (repeatable; overrides the file)")
    s.add_argument("--axis", action="append", default=[], metavar="KEY=V1|V2",
                   help="one axis of the grid, values separated by '|'; a techniques value chains specs with '+', "
                   "'none' for no technique (repeatable; overrides the file)")
    s.add_argument("--store", default=None, help=STORE_HELP)
    s.add_argument("--isolate", action="store_true",
                   help="run each configuration in a fresh Python process (no memory or state carried over)")
    s.add_argument("--dry-run", action="store_true", help="list the configurations and which are stored; run nothing")
    s.add_argument("--json", action="store_true", help="print exactly one JSON object on stdout")


def cmd_sweep(args: argparse.Namespace) -> int:
    """Validate the whole grid, then run (or list) it."""
    try:
        spec = SweepSpec.from_sources(args.file, args.set, args.axis)
    except ValueError as e:
        return usage(args.prog, str(e))
    try:
        store = Store(args.store)
        if args.dry_run:
            return _dry_run(spec, store, args.json)
        with stop_on_ctrl_c("stopping after the current token, then ending the sweep") as stopped:
            report = run_sweep(spec, store, _progress, stopped, isolate=args.isolate)
        rows = _rows(report, store)
    except WorkbenchError as e:
        return fail(str(e), args.json)
    print(json.dumps(_report_json(report, rows, store)) if args.json else _format_report(report, rows), flush=True)
    return EXIT_STOPPED if report.stopped else EXIT_ERROR if report.failed else 0


def progress_line(event: SweepEvent) -> str:
    """`[3/16] ok run 42: tiny fp32 sim:bits=4 — decode 412 tok/s, perplexity 22.3`."""
    head = f"[{event.index}/{event.total}] {event.status}"
    if event.status == "skipped":
        return f"{head}: {event.label} — already stored"
    head += f" run {event.run_id}" if event.run_id is not None else ""
    if event.status == "error":
        return f"{head}: {event.label} — {event.message}"
    decode = "-" if event.decode_tokens_per_s is None else f"{event.decode_tokens_per_s:.0f}"
    ppl = "-" if event.perplexity is None else f"{event.perplexity:.1f}"
    return f"{head}: {event.label} — decode {decode} tok/s, perplexity {ppl}"


def _progress(event: Any) -> None:
    if isinstance(event, SweepEvent) and event.status != "start":
        print(progress_line(event), file=sys.stderr, flush=True)


def _rows(report: SweepReport, store: Store) -> list[tuple[SweepEvent, Any]]:
    """Each configuration reached with its stored result (None for errors); skipped ones found by hash."""
    earlier = {config_hash(r.config): r for r in store.results("ok")} if report.skipped else {}
    rows = []
    for event in report.outcomes:
        result = earlier.get(event.config_hash)  # the newest stored run of a skipped configuration
        if event.status in ("ok", "stopped") and event.run_id is not None:
            result = store.get(event.run_id)
        rows.append((event, result))
    return rows


def _metrics(result: Any) -> dict[str, Any]:
    lat, mem, acc = (result.latency, result.memory, result.accuracy) if result else (None, None, None)
    energy = result.sections.get("energy") if result else None
    return {"run_id": result.run_id if result else None,
            "decode_tokens_per_s": lat.decode_tokens_per_s if lat else None,
            "joules_per_token": energy.joules_per_token if energy else None,
            "ttft_ms_p50": lat.ttft_ms.p50 if lat and lat.ttft_ms else None,
            "weights_bytes": mem.weights_bytes if mem else None, "perplexity": acc.perplexity if acc else None,
            "kl_vs_baseline": acc.kl_vs_baseline if acc else None}


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _format_report(report: SweepReport, rows: list[tuple[SweepEvent, Any]]) -> str:
    """The summary table and one line of totals."""
    body = []
    for event, result in rows:
        m = _metrics(result)
        body.append((event.index, "stored" if event.status == "skipped" else event.status, _num(m["run_id"], "d"),
                     event.label, _num(m["decode_tokens_per_s"], ".1f"), _num(m["joules_per_token"], ".4g"),
                     _num(m["ttft_ms_p50"], ".1f"),
                     human_bytes(m["weights_bytes"]), _num(m["perplexity"], ".2f"), _num(m["kl_vs_baseline"], ".4f"),
                     event.message[:80]))
    text = table(body, ("#", "status", "run", "configuration", "decode tok/s", "J/token", "TTFT ms", "weights",
                        "perplexity", "KL", "error"))
    return f"{text}\n{_totals(report)}"


def _totals(report: SweepReport) -> str:
    parts = [f"{report.done} ran ok", f"{report.skipped} already stored", f"{report.failed} failed"]
    if report.pending:
        parts.append(f"{report.pending} still to run" + (" (stopped: run the sweep again to resume)"
                                                          if report.stopped else ""))
    return f"{report.total} configurations: {', '.join(parts)} — {report.elapsed_s:.1f} s"


def _report_json(report: SweepReport, rows: list[tuple[SweepEvent, Any]], store: Store) -> dict[str, Any]:
    runs = [{"index": e.index, "label": e.label, "status": e.status, "config_hash": e.config_hash,
             "error": e.message or None, "pid": e.pid, **_metrics(result)} for e, result in rows]
    data = {k: v for k, v in report.to_dict().items() if k != "outcomes"}
    return {**data, "store": str(store.path), "runs": runs}


def _dry_run(spec: SweepSpec, store: Store, as_json: bool) -> int:
    """List the configurations and which are already stored with status ok; run nothing."""
    stored = store.hashes("ok")
    configs = [(i, spec.label(c), config_hash(c), c) for i, c in enumerate(spec.configs(), 1)]
    done = sum(h in stored for _, _, h, _ in configs)
    if as_json:
        print(json.dumps({"total": len(configs), "stored": done, "to_run": len(configs) - done,
                          "store": str(store.path),
                          "configs": [{"index": i, "label": label, "config_hash": h, "stored": h in stored,
                                       "config": c.to_dict()} for i, label, h, c in configs]}))
        return 0
    print(table([(i, "stored" if h in stored else "to run", label, h) for i, label, h, _ in configs],
                ("#", "status", "configuration", "config hash")))
    print(f"{len(configs)} configurations: {done} already stored, {len(configs) - done} to run "
          f"(store: {store.path}); nothing was run (--dry-run)")
    return 0
