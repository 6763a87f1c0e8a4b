"""One NVIDIA GPU, the fast paths of issue 15: decode speed, the bound that holds, energy and memory per configuration.

Speed on `preset:llama-3.2-1b` (random weights; batch 1, 128 new tokens unless named): bf16 eager, bf16 with
the compiled one-token step (CUDA graphs), torchao int4 / int8 weight-only with it, bnb-nf4, bf16 batch 16;
`preset:llama-3.1-8b` in nf4, whole on the GPU and capped at 4 GiB of GPU memory (layers offloaded). Each row:
decode tokens/s, the fraction of the bandwidth bound, which bound holds, J/token, weights and peak GPU memory.
Accuracy (perplexity, KL against the fp32 model) of each technique on `tiny` (real weights). Each configuration
runs in its own process, so an out-of-memory error or a missing package is one row with its error, not a crash;
a time budget skips what would overrun it. The issue's targets are printed as met / missed with their numbers.

    python bench/gpu.py [--budget-s 480] [--new-tokens 128] [--repeats 3] [--eval-tokens 4096]
                        [--only LABEL ...] [--dry-run | --list]
                        [--markdown docs/gpu-results.md] [--json bench/results/gpu.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import date
from importlib import metadata
from pathlib import Path
from typing import Any, NamedTuple

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from workbench import logs  # noqa: E402

logs.quiet_libraries()

from workbench.config import RunConfig  # noqa: E402
from workbench.report import table  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_report import (BIG, COMPILED, EAGER, INT4, NF4_8B, OFFLOAD_8B, SMALL, markdown,  # noqa: E402,F401
                        targets)

NO_GPU = "bench/gpu.py measures a CUDA GPU; this machine has none"
ACCURACY = "accuracy on tiny"
VERSIONS = ("torch", "transformers", "bitsandbytes", "torchao")


class Config(NamedTuple):
    """One configuration of the plan: what runs, on which model, and about how long it takes (process included)."""

    label: str
    model: str
    techniques: tuple[str, ...] = ()
    compile: bool = False
    batch: int = 1
    max_memory: str | None = None
    estimate_s: float = 40.0  # a guess until a GPU run's JSON records each row's "seconds"
    new_tokens: int | None = None  # None: --new-tokens
    repeats: int | None = None  # None: --repeats


PLAN = [Config(EAGER, SMALL, estimate_s=30),
        Config(COMPILED, SMALL, compile=True, estimate_s=60),
        Config(INT4, SMALL, ("torchao-int4-weight",), compile=True, estimate_s=70),
        Config(NF4_8B, BIG, ("bnb-nf4",), estimate_s=100),
        Config(OFFLOAD_8B, BIG, ("bnb-nf4",), max_memory="cuda:0=4GiB", estimate_s=110, new_tokens=16, repeats=1),
        Config(ACCURACY, "tiny", estimate_s=40),
        Config("torchao-int8-weight + compiled step", SMALL, ("torchao-int8-weight",), compile=True, estimate_s=70),
        Config("bnb-nf4", SMALL, ("bnb-nf4",), estimate_s=30),
        Config("bf16 batch 16", SMALL, batch=16, estimate_s=30)]
# the accuracy child: each technique of the plan on `tiny`, eager (compiling does not change the weights)
ACCURACY_TECHNIQUES = [("bf16 (no technique)", ()), ("torchao-int4-weight", ("torchao-int4-weight",)),
                       ("torchao-int8-weight", ("torchao-int8-weight",)), ("bnb-nf4", ("bnb-nf4",))]


def run_config(c: Config, args: argparse.Namespace, techniques: tuple[str, ...] | None = None) -> RunConfig:
    """The RunConfig of configuration `c` on the GPU (`techniques` replace the plan's)."""
    kwargs: dict[str, Any] = dict(model=c.model, dtype="bf16", device="cuda", batch_size=c.batch,
                                  techniques=c.techniques if techniques is None else techniques,
                                  max_new_tokens=c.new_tokens or args.new_tokens, warmup=1,
                                  repeats=c.repeats or args.repeats, min_duration_s=0.0, eval_tokens=0,
                                  token_events=False)
    if c.compile:  # the compiled one-token step replayed as a CUDA graph
        kwargs.update(compile=True, kv_cache="static", compile_mode="reduce-overhead")
    if c.max_memory:
        kwargs.update(device_map="auto", max_memory=c.max_memory)
    return RunConfig(**kwargs)


def one_sentence(e: BaseException) -> str:
    """An exception as one line: its type and the first line of its message, at most 240 characters."""
    text = (str(e).strip().splitlines() or [""])[0]
    text = f"{type(e).__name__}: {text}" if text else type(e).__name__
    return text if len(text) <= 240 else text[:239] + "…"


def speed_row(label: str, r: Any) -> dict[str, Any]:
    """The numbers of one finished run that the tables show."""
    lat, mem, roof, energy = r.latency, r.memory, r.roofline, r.energy
    peaks = [p for p in (mem.load_peak_gpu_allocated_bytes, mem.peak_gpu_allocated_bytes,
                         mem.peak_gpu_reserved_bytes) if p is not None] if mem else []
    offloaded = sum(b for d, b in r.parallel.bytes_by_device.items() if not d.startswith("cuda")) \
        if r.parallel is not None else None
    energy_note = next((w for w in r.warnings if w.startswith("no energy counter")), "")
    return {"config": label, "model": r.config.model, "status": r.status, "error": None,
            "decode_tokens_per_s": lat.decode_tokens_per_s if lat else None,
            "bound_tokens_per_s": roof.decode_bound_tokens_per_s if roof else None,
            "fraction_of_bound": roof.fraction_of_bound if roof else None,
            "bound": roof.bound if roof else None, "bound_explanation": getattr(roof, "explanation", "") or "",
            "busy_share": roof.busy_share if roof else None,
            "kernel_fraction_of_bound": roof.kernel_fraction_of_bound if roof else None,
            "joules_per_token": energy.joules_per_token if energy else None, "energy_note": energy_note,
            "weights_bytes": mem.weights_bytes if mem else None, "peak_gpu_bytes": max(peaks, default=None),
            "offloaded_bytes": offloaded, "batch": r.config.batch_size,
            "warnings": [w for w in r.warnings if w != energy_note],
            "gpu": r.env.gpu if r.env else None, "driver": r.env.driver if r.env else None}


def accuracy_row(label: str, r: Any) -> dict[str, Any]:
    """Perplexity and agreement with the fp32 model of one technique on `tiny`."""
    a = r.accuracy
    return {"config": label, "model": r.config.model, "status": r.status, "error": None,
            "perplexity": a.perplexity if a else None,
            "kl_vs_baseline": a.kl_vs_baseline if a else None,
            "top1_agreement": a.top1_agreement_vs_baseline if a else None,
            "eval_tokens": a.eval_tokens if a else None, "weights_bytes": r.memory.weights_bytes if r.memory else None}


def error_row(label: str, model: str, message: str, status: str = "error") -> dict[str, Any]:
    """A configuration that did not run (status error or skipped), with its one-sentence reason."""
    return {"config": label, "model": model, "status": status, "error": message, "warnings": []}


def child(label: str, out: Path, args: argparse.Namespace) -> None:
    """Run one configuration of the plan in this process; write its row(s) as JSON to `out`."""
    from workbench.runner import run

    c = next(c for c in PLAN if c.label == label)
    rows = []
    if label == ACCURACY:
        for name, techniques in ACCURACY_TECHNIQUES:
            try:
                cfg = run_config(c, args, techniques).replace(max_new_tokens=8, warmup=0, repeats=1,
                                                              eval_tokens=args.eval_tokens)
                rows.append(accuracy_row(name, run(cfg)))
            except Exception as e:  # noqa: BLE001 - one technique's failure is its row
                rows.append(error_row(name, c.model, one_sentence(e)))
    else:
        try:
            rows.append(speed_row(label, run(run_config(c, args))))
        except Exception as e:  # noqa: BLE001 - out of memory, a missing package: the row says which
            rows.append(error_row(label, c.model, one_sentence(e)))
    out.write_text(json.dumps(rows, default=str))


class Budget:
    """Wall-clock seconds for the whole benchmark; what would overrun them is skipped."""

    def __init__(self, total_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.total_s, self.clock, self.start = total_s, clock, clock()

    def left(self) -> float:
        """Seconds still left (negative once overrun)."""
        return self.total_s - (self.clock() - self.start)

    def skip_reason(self, estimate_s: float) -> str | None:
        """Why a configuration estimated at `estimate_s` is skipped, or None when it fits."""
        left = self.left()
        if estimate_s <= left:
            return None
        return (f"skipped: it takes about {estimate_s:.0f} s and {max(left, 0.0):.0f} s of the "
                f"{self.total_s:.0f} s budget are left (raise --budget-s to run it)")


def child_command(c: Config, args: argparse.Namespace, out: Path) -> list[str]:
    """This script again, running configuration `c` alone and writing its rows to `out`."""
    return [sys.executable, str(Path(__file__).resolve()), "--child", c.label, "--child-out", str(out),
            "--new-tokens", str(args.new_tokens), "--repeats", str(args.repeats),
            "--eval-tokens", str(args.eval_tokens)]


def run_child(c: Config, args: argparse.Namespace, timeout_s: float) -> list[dict[str, Any]]:
    """Run configuration `c` in a fresh process, killed (with its compile workers) after `timeout_s`."""
    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as tmp:
        out, log = Path(tmp) / "rows.json", Path(tmp) / "stderr.txt"
        started = time.monotonic()
        with open(log, "w") as err:
            proc = subprocess.Popen(child_command(c, args, out), stdout=err, stderr=err, start_new_session=True)
            try:
                code = proc.wait(timeout=max(timeout_s, 1.0))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                return [error_row(c.label, c.model, f"stopped after {timeout_s:.0f} s: it would have overrun the "
                                           f"{args.budget_s:.0f} s budget (raise --budget-s to run it)")]
        sys.stderr.write(log.read_text(errors="replace"))
        if out.exists():
            rows = json.loads(out.read_text())
            return [{**r, "seconds": time.monotonic() - started} for r in rows]
        tail = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
        how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
        last = f": {tail[-1][:200]}" if tail else ""
        return [error_row(c.label, c.model, f"its process {how} without a result{last}")]


def plan_text(plan: list[Config], args: argparse.Namespace) -> str:
    """What a run would do, in order, with each configuration's time estimate."""
    rows = []
    for i, c in enumerate(plan, 1):
        how = " + ".join(c.techniques) or "none"
        how += ", compiled step (reduce-overhead, static cache)" if c.compile else ""
        how += f", device_map auto, max_memory {c.max_memory}" if c.max_memory else ""
        if c.label == ACCURACY:
            how, tokens = "each technique in turn, eager", f"{args.eval_tokens} scored"
        else:
            tokens = str(c.new_tokens or args.new_tokens)
        rows.append((i, c.label, c.model, how, c.batch, tokens, f"{c.estimate_s:.0f}"))
    total = sum(c.estimate_s for c in plan)
    accuracy = ", ".join(name for name, _ in ACCURACY_TECHNIQUES)
    return (table(rows, ("#", "configuration", "model", "techniques", "batch", "new tokens", "about s"))
            + f"\n{len(plan)} configurations, about {total:.0f} s in all, budget {args.budget_s:.0f} s (what would "
              f"overrun it is skipped); accuracy on tiny: {accuracy}; writes {args.markdown} and {args.json}")


def versions() -> dict[str, str | None]:
    """Installed versions of the libraries the fast paths come from (None: not installed)."""
    out: dict[str, str | None] = {}
    for name in VERSIONS:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


Runner = Callable[[Config, argparse.Namespace, float], list[dict[str, Any]]]


def execute(plan: list[Config], args: argparse.Namespace, budget: Budget, runner: Runner = run_child,
            after: Callable[[list[dict], list[dict]], None] = lambda speed, acc: None) -> tuple[list, list]:
    """Every configuration in order, each in its own process, skipping what would overrun the budget."""
    speed: list[dict[str, Any]] = []
    accuracy: list[dict[str, Any]] = []
    for c in plan:
        reason = budget.skip_reason(c.estimate_s)
        print(f"{c.label}: {reason or 'running'}", file=sys.stderr, flush=True)
        if reason:
            rows = [error_row(c.label, c.model, reason, "skipped")]
        else:
            rows = runner(c, args, budget.left() - 5.0)
            done = ", ".join(r["status"] + (f" ({r['error']})" if r.get("error") else "") for r in rows)
            print(f"{c.label}: {done}; {budget.left():.0f} s left", file=sys.stderr, flush=True)
        (accuracy if c.label == ACCURACY else speed).extend(rows)
        after(speed, accuracy)
    return speed, accuracy


def result_of(speed: list[dict], accuracy: list[dict], args: argparse.Namespace, duration_s: float) -> dict:
    """Everything the JSON and the markdown hold."""
    ran = next((r for r in speed if r.get("gpu")), {})
    return {"date": str(date.today()), "gpu": ran.get("gpu"), "driver": ran.get("driver"), "versions": versions(),
            "budget_s": args.budget_s, "duration_s": duration_s, "new_tokens": args.new_tokens,
            "repeats": args.repeats, "eval_tokens": args.eval_tokens, "speed": speed, "accuracy": accuracy,
            "targets": targets(speed)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (the --child flags are how the script runs one configuration in a fresh process)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget-s", type=float, default=480.0, help="wall-clock budget; what would overrun it "
                        "is skipped")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per configuration")
    parser.add_argument("--eval-tokens", type=int, default=4096, help="held-out tokens of the accuracy on tiny")
    parser.add_argument("--only", nargs="+", default=None, help="only these configuration labels")
    parser.add_argument("--dry-run", "--list", action="store_true", help="print the plan and run nothing")
    parser.add_argument("--markdown", default=str(ROOT / "docs" / "gpu-results.md"))
    parser.add_argument("--json", default=str(ROOT / "bench" / "results" / "gpu.json"))
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child-out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    unknown = sorted(set(args.only or ()) - {c.label for c in PLAN})
    if unknown:
        parser.error(f"--only names no configuration {unknown[0]!r}; the plan has: {', '.join(c.label for c in PLAN)}")
    return args


def main(argv: list[str] | None = None) -> int:
    """Plan, refuse without a GPU, or run the plan and write the JSON and markdown after every configuration."""
    args = parse_args(argv)
    if args.child:
        child(args.child, Path(args.child_out), args)
        return 0
    plan = [c for c in PLAN if not args.only or c.label in args.only]
    if args.dry_run:
        print(plan_text(plan, args))
        return 0
    import torch

    if not torch.cuda.is_available():
        print(f"{NO_GPU} (--dry-run prints the plan).", file=sys.stderr)
        return 2
    started = time.monotonic()

    def write(speed: list[dict], accuracy: list[dict]) -> None:
        result = result_of(speed, accuracy, args, time.monotonic() - started)
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1))
        Path(args.markdown).write_text(markdown(result))

    speed, accuracy = execute(plan, args, Budget(args.budget_s), after=write)
    print(markdown(result_of(speed, accuracy, args, time.monotonic() - started)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
