"""Execution settings side by side in one process on a 124M model: threads, batch, compile, split, TP, DP.

    python bench/parallel.py [--model preset:llama-124m] [--new-tokens 32] [--json PATH] [--markdown PATH]

Every row is one `workbench.runner.run` with the same workload; only the named setting changes.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from workbench import logs  # noqa: E402

logs.quiet_libraries()

from workbench.config import RunConfig  # noqa: E402
from workbench.errors import WorkbenchError  # noqa: E402
from workbench.report import table  # noqa: E402
from workbench.runner import run  # noqa: E402

# (group, label, settings that differ from the common workload)
ROWS = [
    ("threads", "1 thread", {"threads": 1}),
    ("threads", "2 threads", {"threads": 2}),
    ("batch", "batch 1", {"batch_size": 1}),
    ("batch", "batch 4", {"batch_size": 4}),
    ("batch", "batch 16", {"batch_size": 16}),
    ("compile", "eager, static cache", {"kv_cache": "static"}),
    ("compile", "torch.compile, static cache", {"kv_cache": "static", "compile": True}),
    ("split", "all layers in RAM", {}),
    ("split", "half the layers offloaded to disk", {"device_map": "model.layers.0-5=cpu;model.layers.6-11=disk"}),
    ("tensor parallel", "1 process, 2 threads", {"threads": 2}),
    ("tensor parallel", "2 ranks x 1 thread", {"tensor_parallel": 2}),
    ("data parallel", "1 process, batch 4, 2 threads", {"batch_size": 4, "threads": 2}),
    ("data parallel", "2 replicas x batch 2, 1 thread each", {"batch_size": 4, "data_parallel": 2}),
]


def measure(model: str, new_tokens: int) -> list[dict]:
    """One run per row; failures are reported, not fatal."""
    out = []
    for group, label, changes in ROWS:
        cfg = RunConfig(**{"model": model, "max_new_tokens": new_tokens, "warmup": 1, "repeats": 3,
                           "min_duration_s": 0.0, "eval_tokens": 0, "token_events": False, **changes})
        try:
            r = run(cfg)
        except WorkbenchError as e:
            print(f"{label}: {e}", file=sys.stderr)
            continue
        lat, par = r.latency, r.parallel
        row = {"group": group, "config": label, "decode_tokens_per_s": lat.decode_tokens_per_s,
               "per_sequence_tokens_per_s": lat.decode_tokens_per_s_per_sequence,
               "aggregate_tokens_per_s": par.aggregate_decode_tokens_per_s if par else lat.decode_tokens_per_s,
               "tpot_ms_p50": lat.tpot_ms.p50 if lat.tpot_ms else None, "cold_start_s": lat.cold_start_s,
               "ttft_ms_p50": lat.ttft_ms.p50}
        print(f"{label}: {_f(row['aggregate_tokens_per_s'])} tok/s aggregate", file=sys.stderr, flush=True)
        out.append(row)
    return out


def _f(x: float | None) -> str:
    return "–" if x is None else f"{x:.1f}"


def markdown(rows: list[dict], model: str) -> str:
    """The README table."""
    lines = [f"On `{model}`:", "", "| setting | configuration | aggregate decode tok/s | per sequence tok/s | TPOT p50 ms | "
             "first call s |", "| --- | --- | ---: | ---: | ---: | ---: |"]
    lines += [f"| {r['group']} | {r['config']} | {_f(r['aggregate_tokens_per_s'])} | "
              f"{_f(r['per_sequence_tokens_per_s'])} | {_f(r['tpot_ms_p50'])} | {_f(r['cold_start_s'])} |" for r in rows]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="preset:llama-124m")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--json", default=None)
    parser.add_argument("--markdown", default=None)
    args = parser.parse_args()
    rows = measure(args.model, args.new_tokens)
    print(table([(r["group"], r["config"], _f(r["aggregate_tokens_per_s"]), _f(r["per_sequence_tokens_per_s"]),
                  _f(r["tpot_ms_p50"]), _f(r["cold_start_s"])) for r in rows],
                ("setting", "configuration", "aggregate tok/s", "per seq tok/s", "TPOT ms", "first call s")))
    if args.markdown:
        Path(args.markdown).write_text(markdown(rows, args.model))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
