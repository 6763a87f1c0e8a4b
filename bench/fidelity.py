"""Fidelity: the runner's decode tokens/s and TTFT against an independent plain timing loop, same process.

The plain loop times `generate` with `perf_counter` around the whole call and nothing inside it:
TTFT = a 1-token generate, decode tokens/s = (N - 1) / (t(N tokens) - t(1 token)). The runner's
numbers come from per-token timestamps taken inside `generate`. Rounds alternate between the two so
slow drifts of a shared machine hit both alike.

    python bench/fidelity.py [--models tiny preset:llama-124m] [--new-tokens 32] [--rounds 3] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from workbench import logs  # noqa: E402

logs.quiet_libraries()

from workbench.config import RunConfig  # noqa: E402
from workbench.engines.hf_generate import fixed_length  # noqa: E402
from workbench.models.loader import load_model  # noqa: E402
from workbench.models.sources import resolve  # noqa: E402
from workbench.report import table  # noqa: E402
from workbench.runner import run  # noqa: E402
from workbench.textio import build_prompts  # noqa: E402


def plain_timing(model: torch.nn.Module, ids: torch.Tensor, new_tokens: int, tokenizer: Any,
                 repeats: int) -> tuple[float, float]:
    """(median TTFT ms, median decode tokens/s) from whole-call timings of generate, with the runner's settings."""
    mask = torch.ones_like(ids)

    def timed(n: int) -> float:
        settings = fixed_length(tokenizer, n, ids.device)  # the same per-step work as the runner's generate
        t0 = time.perf_counter()
        model.generate(input_ids=ids, attention_mask=mask, **settings)
        return time.perf_counter() - t0

    timed(new_tokens)  # warm-up
    ones = [timed(1) for _ in range(repeats)]
    fulls = [timed(new_tokens) for _ in range(repeats)]
    t1, tn = statistics.median(ones), statistics.median(fulls)
    return t1 * 1e3, ids.shape[0] * (new_tokens - 1) / (tn - t1)


def compare(model_spec: str, new_tokens: int, rounds: int, repeats: int) -> dict:
    """Alternate runner and plain-loop rounds on one model; return medians and ratios."""
    cfg = RunConfig(model=model_spec, max_new_tokens=new_tokens, warmup=1, repeats=repeats, min_duration_s=0.0,
                    eval_tokens=0)
    loaded = load_model(resolve(model_spec), cfg.dtype, torch.device("cpu"))
    ids = torch.tensor(build_prompts(cfg, loaded.tokenizer, loaded.model.config.vocab_size))
    wb_ttft, wb_decode, pl_ttft, pl_decode = [], [], [], []
    for _ in range(rounds):
        r = run(cfg)
        wb_ttft.append(r.latency.ttft_ms.p50)
        wb_decode.append(r.latency.decode_tokens_per_s)
        with torch.inference_mode():
            t, d = plain_timing(loaded.model, ids, new_tokens, loaded.tokenizer, repeats)
        pl_ttft.append(t)
        pl_decode.append(d)
    med = statistics.median
    return {"model": model_spec, "new_tokens": new_tokens, "rounds": rounds, "repeats": repeats,
            "workbench_decode_tokens_per_s": med(wb_decode), "plain_decode_tokens_per_s": med(pl_decode),
            "decode_ratio": med(wb_decode) / med(pl_decode), "workbench_ttft_ms": med(wb_ttft),
            "plain_ttft_ms": med(pl_ttft), "ttft_ratio": med(wb_ttft) / med(pl_ttft)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["tiny", "preset:llama-124m"])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    args = parser.parse_args()
    rows = [compare(m, args.new_tokens, args.rounds, args.repeats) for m in args.models]
    print(f"CPU threads: {torch.get_num_threads()}, torch {torch.__version__}")
    print(table([(r["model"], f"{r['workbench_decode_tokens_per_s']:.1f}", f"{r['plain_decode_tokens_per_s']:.1f}",
                  f"{r['decode_ratio']:.3f}", f"{r['workbench_ttft_ms']:.2f}", f"{r['plain_ttft_ms']:.2f}",
                  f"{r['ttft_ratio']:.3f}") for r in rows],
                ("model", "decode tok/s (workbench)", "decode tok/s (plain loop)", "ratio", "TTFT ms (workbench)",
                 "TTFT ms (plain loop)", "ratio")))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
